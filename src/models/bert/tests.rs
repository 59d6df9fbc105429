use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::*;
use crate::models::bottleneck::BottleneckPlan;
use crate::peft::lora::{LoraConfig, LoraPlan, TargetModules};
use crate::rng::Rng;

fn tiny_config(model_type: &str) -> EncoderConfig {
    EncoderConfig::from_json(serde_json::json!({
        "model_type": model_type, "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 34,
        "type_vocab_size": 2, "pad_token_id": if model_type == "bert" { 0 } else { 1 }
    }))
    .unwrap()
}

/// Random weights under a bare `BertModel`'s names (no prefix, pooler included).
fn bare_weights(c: &EncoderConfig) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(7);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.next_f32() * 0.2 - 0.1).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    };
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut w = HashMap::new();
    w.insert("embeddings.word_embeddings.weight".into(), t(&[c.vocab_size, h]));
    w.insert("embeddings.position_embeddings.weight".into(), t(&[c.max_position_embeddings, h]));
    w.insert("embeddings.token_type_embeddings.weight".into(), t(&[c.type_vocab_size, h]));
    for norm in ["embeddings.LayerNorm".to_string()].into_iter().chain((0..c.num_layers).flat_map(|l| {
        [format!("encoder.layer.{l}.attention.output.LayerNorm"), format!("encoder.layer.{l}.output.LayerNorm")]
    })) {
        w.insert(format!("{norm}.weight"), (t(&[h]) + 1.0).unwrap());
        w.insert(format!("{norm}.bias"), t(&[h]));
    }
    for l in 0..c.num_layers {
        let p = format!("encoder.layer.{l}");
        for (m, o, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            w.insert(format!("{p}.{m}.weight"), t(&[o, inp]));
            w.insert(format!("{p}.{m}.bias"), t(&[o]));
        }
    }
    w.insert("pooler.dense.weight".into(), t(&[h, h]));
    w.insert("pooler.dense.bias".into(), t(&[h]));
    w
}

fn input(c: &EncoderConfig) -> EncoderInput {
    let rows: [(&[u32], &[u32]); 2] = [(&[2, 5, 9, 3, 11, 3], &[0, 0, 0, 0, 1, 1]), (&[2, 7, 3], &[0, 0, 0])];
    EncoderInput::new(&rows, c, &Device::Cpu).unwrap()
}

fn lora_plan() -> LoraPlan {
    LoraPlan {
        config: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Keyword("all-linear".into()),
            use_rslora: false,
            target_parameters: Vec::new(),
            train_router: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        },
        seed: 3,
        trainable: true,
        train_norms: false,
        loaded: None,
    }
}

/// The loss of each task, for gradients.
fn loss(model: &Encoder, x: &EncoderInput) -> Tensor {
    let ctx = ForwardCtx::inference();
    let hidden = model.hidden(x, &ctx).unwrap();
    match model.task {
        Task::Embedding => Encoder::mean_pool(&hidden, &x.attention_mask).unwrap().sqr().unwrap().sum_all().unwrap(),
        _ => model.logits(&hidden, &ctx).unwrap().sqr().unwrap().sum_all().unwrap(),
    }
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
    let lora = lora_plan();
    let bottleneck = BottleneckPlan { adapter_size: 4, seed: 1, trainable: true, loaded: None };
    for model_type in ["bert", "roberta"] {
        let c = tiny_config(model_type);
        for task in [
            Task::Classification { labels: labels.clone() },
            Task::TokenClassification { labels: labels.clone() },
            Task::Embedding,
        ] {
            for adaptation in [Adaptation::Full, Adaptation::Lora(&lora), Adaptation::Bottleneck(&bottleneck)] {
                let model = Encoder::new(c.clone(), task.clone(), bare_weights(&c), adaptation).unwrap();
                let x = input(&c);
                let grads = loss(&model, &x).backward().unwrap();
                assert!(!model.trainable.params.is_empty());
                for p in &model.trainable.params {
                    // Bottleneck and LoRA up-projections start at zero, so their inputs' factors
                    // see no gradient yet; the zero factors themselves must.
                    let g = grads
                        .get(p.var.as_tensor())
                        .unwrap_or_else(|| panic!("{model_type} {task:?}: no gradient for {}", p.name));
                    let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                    let starts_downstream_of_zero = p.name.contains("lora_A") || p.name.contains("adapter.down");
                    assert!(
                        norm > 0.0 || starts_downstream_of_zero,
                        "{model_type} {task:?}: zero gradient for {}",
                        p.name
                    );
                }
            }
        }
    }
}

#[test]
fn padding_does_not_change_real_positions() {
    let c = tiny_config("bert");
    let model = Encoder::new(c.clone(), Task::Embedding, bare_weights(&c), Adaptation::None).unwrap();
    let ctx = ForwardCtx::inference();
    let alone = EncoderInput::new(&[(&[2, 7, 3], &[0, 0, 0])], &c, &Device::Cpu).unwrap();
    let alone = Encoder::mean_pool(&model.hidden(&alone, &ctx).unwrap(), &alone.attention_mask).unwrap();
    let padded = input(&c);
    let padded = Encoder::mean_pool(&model.hidden(&padded, &ctx).unwrap(), &padded.attention_mask).unwrap();
    let diff = (alone.get(0).unwrap() - padded.get(1).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn a_task_checkpoint_loads_as_the_bare_model_and_back() {
    let c = tiny_config("bert");
    let prefixed: HashMap<String, Tensor> =
        bare_weights(&c).into_iter().map(|(k, v)| (format!("bert.{k}"), v)).collect();
    let labels = vec!["x".to_string(), "y".to_string()];
    let classifier =
        Encoder::new(c.clone(), Task::Classification { labels }, prefixed.clone(), Adaptation::Full).unwrap();
    assert!(classifier.trainable.params.iter().any(|p| p.name == "bert.pooler.dense.weight"));
    assert!(classifier.trainable.params.iter().any(|p| p.name == "classifier.weight"));
    let bare = Encoder::new(c, Task::Embedding, prefixed, Adaptation::Full).unwrap();
    assert!(bare.trainable.params.iter().any(|p| p.name == "encoder.layer.1.output.dense.weight"));
}

#[test]
fn the_composite_attention_equals_the_fused_kernel() {
    let mut rng = Rng::new(11);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    };
    let (b, s, n, d) = (2, 6, 2, 8);
    let (q, k, v) = (t(&[b, s, n, d]), t(&[b, s, n, d]), t(&[b, s, n, d]));
    let c = tiny_config("bert");
    let bias = input(&c).key_bias;
    let cos = Tensor::ones((b, 1, s, d), DType::F32, &Device::Cpu).unwrap();
    let sin = Tensor::zeros((b, 1, s, d), DType::F32, &Device::Cpu).unwrap();
    let logits = crate::models::common::attention::Logits::standard(d);
    let fused = crate::models::common::attention::attention(&q, &k, &v, &cos, &sin, &bias, logits).unwrap();
    let composite = composite_attention(&q, &k, &v, &bias, logits, &ForwardCtx::inference(), 0.1).unwrap();
    let diff = (fused.reshape((b, s, n * d)).unwrap() - composite).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{diff}");
}

#[test]
fn attention_dropout_applies_in_training_only() {
    let mut c = tiny_config("bert");
    (c.hidden_dropout, c.classifier_dropout) = (0.0, 0.0);
    let x = input(&c);
    let hidden = |c: &EncoderConfig, ctx: ForwardCtx| {
        let model = Encoder::new(c.clone(), Task::Embedding, bare_weights(c), Adaptation::None).unwrap();
        model.hidden(&x, &ctx).unwrap()
    };
    let max_diff =
        |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let inference = hidden(&c, ForwardCtx::inference());
    c.attention_dropout = 0.0;
    assert!(max_diff(&hidden(&c, ForwardCtx::training(Rng::new(5))), &inference) < 1e-5, "no dropout, same outputs");
    c.attention_dropout = 0.5;
    let dropped = hidden(&c, ForwardCtx::training(Rng::new(5)));
    assert!(max_diff(&dropped, &inference) > 1e-2, "attention dropout changes a training forward");
    assert_eq!(max_diff(&dropped, &hidden(&c, ForwardCtx::training(Rng::new(5)))), 0.0, "the same masks from one seed");
    assert!(max_diff(&hidden(&c, ForwardCtx::inference()), &inference) < 1e-6, "none at inference");
}
