//! Encoders against transformers, PEFT and sentence-transformers (`tests/fixtures/encoders`, made
//! by `scripts/make_encoder_fixtures.py`): logits, one-step gradients for full fine-tuning and
//! LoRA, pooled embeddings, and the real all-MiniLM-L6-v2's vectors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ferrotune::models::adaptation::Adaptation;
use ferrotune::models::bert::{Encoder, EncoderConfig, EncoderInput, Task};
use ferrotune::models::weights::load_model_weights;
use ferrotune::models::ForwardCtx;
use ferrotune::peft::adapter::load_adapter;
use ferrotune::peft::lora::LoraPlan;

pub fn encoder_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders").join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(encoder_fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn task_of(config: &EncoderConfig, name: &str) -> Task {
    let labels = config.saved_labels().unwrap_or_default();
    if name.ends_with("ner") {
        Task::TokenClassification { labels }
    } else if name.ends_with("embed") {
        Task::Embedding
    } else {
        Task::Classification { labels }
    }
}

fn load(name: &str, adaptation: Adaptation<'_>) -> Encoder {
    let dir = encoder_fixture(name);
    let config = EncoderConfig::from_file(&dir.join("config.json")).unwrap();
    let task = task_of(&config, name);
    Encoder::new(config, task, load_model_weights(&dir, DType::F32, &Device::Cpu).unwrap(), adaptation).unwrap()
}

fn input(model: &Encoder, reference: &HashMap<String, Tensor>) -> EncoderInput {
    let ids: Vec<Vec<i64>> = reference["input_ids"].to_vec2().unwrap();
    let types: Vec<Vec<i64>> = reference["token_type_ids"].to_vec2().unwrap();
    let mask: Vec<Vec<i64>> = reference["attention_mask"].to_vec2().unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = ids
        .iter()
        .zip(&types)
        .zip(&mask)
        .map(|((ids, types), mask)| {
            let n = mask.iter().filter(|&&m| m == 1).count();
            (ids[..n].iter().map(|&i| i as u32).collect(), types[..n].iter().map(|&i| i as u32).collect())
        })
        .collect();
    let borrowed: Vec<(&[u32], &[u32])> = rows.iter().map(|(a, b)| (&a[..], &b[..])).collect();
    EncoderInput::new(&borrowed, &model.config, &Device::Cpu).unwrap()
}

/// Logits where the reference scores them: every row (classification), real tokens (NER).
fn logits(model: &Encoder, x: &EncoderInput) -> Tensor {
    let ctx = ForwardCtx::inference();
    model.logits(&model.hidden(x, &ctx).unwrap(), &ctx).unwrap()
}

fn max_abs_diff_where(a: &Tensor, b: &Tensor, mask: Option<&Tensor>) -> f32 {
    let mut diff = (a - b).unwrap().abs().unwrap();
    if let Some(mask) = mask {
        diff = diff.broadcast_mul(&mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap()).unwrap();
    }
    diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// transformers' loss: mean cross-entropy over rows, or over tokens whose label is not -100.
fn loss(model: &Encoder, x: &EncoderInput, reference: &HashMap<String, Tensor>) -> Tensor {
    let logits = logits(model, x);
    let labels: Vec<i64> = reference["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let classes = logits.dim(candle_core::D::Minus1).unwrap();
    let flat = logits.reshape(((), classes)).unwrap();
    let mask: Vec<f32> = labels.iter().map(|&l| if l < 0 { 0.0 } else { 1.0 }).collect();
    let count = mask.iter().sum::<f32>() as f64;
    let targets: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
    let sum = ferrotune::models::common::ops::masked_cross_entropy_sum(
        &flat,
        &Tensor::new(targets.as_slice(), &Device::Cpu).unwrap(),
        &Tensor::new(mask.as_slice(), &Device::Cpu).unwrap(),
    )
    .unwrap();
    (sum / count).unwrap()
}

/// Our gradient of every trainable parameter against the reference's `{prefix}{name}`, where PEFT
/// names LoRA factors `….lora_A.default.weight` and heads it saves whole
/// `….classifier.modules_to_save.default.…`.
fn assert_grads_match(
    model: &Encoder,
    loss: &Tensor,
    reference: &HashMap<String, Tensor>,
    prefix: &str,
    context: &str,
) {
    let grads = loss.backward().unwrap();
    let mut worst = 0f32;
    for p in &model.trainable.params {
        let ours = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{context}: no gradient for {}", p.name));
        let peft_name = p
            .name
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight");
        let head_name =
            format!("base_model.model.{}", p.name.replacen("classifier.", "classifier.modules_to_save.default.", 1));
        let theirs = reference
            .get(&format!("{prefix}{peft_name}"))
            .or_else(|| reference.get(&format!("{prefix}{head_name}")))
            .unwrap_or_else(|| panic!("{context}: no reference gradient for {}", p.name));
        // A key bias's true gradient is zero (softmax ignores a shift shared by a query's keys):
        // both sides hold rounding noise there, so the scale has a floor.
        let relative = max_abs_diff_where(ours, theirs, None) / max_abs(theirs).max(1e-6);
        assert!(relative <= 1e-3, "{context}: gradient of {} differs by {relative} (relative)", p.name);
        worst = worst.max(relative);
    }
    let expected = reference.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(model.trainable.params.len(), expected, "{context}: every reference gradient is compared");
    eprintln!("{context} {prefix}: {expected} gradients, worst relative difference {worst:.2e}");
}

const TASK_MODELS: [&str; 3] = ["bert-cls", "bert-ner", "roberta-cls"];

fn token_mask<'a>(name: &str, reference: &'a HashMap<String, Tensor>) -> Option<&'a Tensor> {
    name.ends_with("ner").then(|| &reference["attention_mask"])
}

#[test]
fn encoder_logits_equal_transformers() {
    for name in TASK_MODELS {
        let reference = reference(name);
        let model = load(name, Adaptation::None);
        let ours = logits(&model, &input(&model, &reference));
        let diff = max_abs_diff_where(&ours, &reference["logits"], token_mask(name, &reference));
        eprintln!("{name}: logits differ by at most {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: logits differ by {diff}");
    }
}

#[test]
fn encoder_full_fine_tuning_gradients_equal_pytorch() {
    for name in TASK_MODELS {
        let reference = reference(name);
        let model = load(name, Adaptation::Full);
        let x = input(&model, &reference);
        assert_grads_match(&model, &loss(&model, &x, &reference), &reference, "grad.", name);
    }
}

#[test]
fn encoder_lora_logits_and_gradients_equal_peft() {
    for name in TASK_MODELS {
        let reference = reference(name);
        let (config, _, tensors) = load_adapter(&encoder_fixture(name).join("lora"), &Device::Cpu).unwrap();
        let plan = LoraPlan { config, seed: 0, trainable: true, train_norms: false, loaded: Some(tensors) };
        let model = load(name, Adaptation::Lora(&plan));
        let x = input(&model, &reference);
        let ours = logits(&model, &x);
        let diff = max_abs_diff_where(&ours, &reference["lora.logits"], token_mask(name, &reference));
        eprintln!("{name}: LoRA logits differ by at most {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: LoRA logits differ by {diff}");
        assert_grads_match(&model, &loss(&model, &x, &reference), &reference, "lora.grad.", name);
    }
}

#[test]
fn encoder_lora_merged_into_a_model_directory_gives_the_adapters_logits() {
    for name in TASK_MODELS {
        let reference = reference(name);
        let (config, _, tensors) = load_adapter(&encoder_fixture(name).join("lora"), &Device::Cpu).unwrap();
        let plan = LoraPlan { config, seed: 0, trainable: false, train_norms: false, loaded: Some(tensors) };
        let tuned = load(name, Adaptation::Lora(&plan));
        let dir = tempfile::tempdir().unwrap();
        ferrotune::train::encoder::output::write_model_dir(&tuned, &encoder_fixture(name), dir.path()).unwrap();
        let config = EncoderConfig::from_file(&dir.path().join("config.json")).unwrap();
        let task = ferrotune::train::encoder::read_task_file(dir.path()).unwrap();
        assert_eq!(task, tuned.task, "{name}: task.json");
        let weights = load_model_weights(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let merged = Encoder::new(config, task, weights, Adaptation::None).unwrap();
        let ours = logits(&merged, &input(&merged, &reference));
        let mask = token_mask(name, &reference);
        let diff = max_abs_diff_where(&ours, &reference["lora.logits"], mask);
        let moved = max_abs_diff_where(&reference["logits"], &reference["lora.logits"], mask);
        eprintln!("{name}: merged logits differ from PEFT's by {diff:.2e} (the adapter moves them by {moved:.2e})");
        assert!(diff <= 1e-4 && moved > 1e-3, "{name}: merged {diff}, adapter effect {moved}");
    }
}

#[test]
fn mean_pooled_embeddings_equal_transformers() {
    let reference = reference("bert-embed");
    let model = load("bert-embed", Adaptation::None);
    let x = input(&model, &reference);
    let hidden = model.hidden(&x, &ForwardCtx::inference()).unwrap();
    let pooled = Encoder::mean_pool(&hidden, &x.attention_mask).unwrap();
    let ours = ferrotune::train::encoder::normalize(&pooled).unwrap();
    let diff = max_abs_diff_where(&ours, &reference["embeddings"], None);
    eprintln!("bert-embed: embeddings differ by at most {diff:.2e}");
    assert!(diff <= 1e-5, "embeddings differ by {diff}");
}
