//! Gradient checkpointing gives the gradients of the uncut graph, for every method (full, LoRA
//! with dropout and trained norms, QLoRA, bottleneck adapters, prefix tuning) on every fixture
//! architecture, with packed sequences; and a checkpointed run trains to the same adapter.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ferrotune::models::common::mask::packed_causal_mask;
use ferrotune::models::common::ops::masked_cross_entropy_sum;
use ferrotune::models::config::ModelConfig;
use ferrotune::models::llama::{Adaptation, CausalLm};
use ferrotune::models::weights::load_model_weights;
use ferrotune::models::ForwardCtx;
use ferrotune::peft::lora::{LoraConfig, LoraPlan, TargetModules};
use ferrotune::rng::Rng;

use crate::model_numerics::{fixture, MODELS};

/// Two rows of `t` tokens, each two packed examples (positions restart, no attention across).
fn packed_inputs(vocab: u32, t: usize) -> (Tensor, Tensor, Tensor) {
    let b = 2;
    let ids: Vec<u32> = (0..b * t).map(|i| 3 + (i as u32 * 37 + 11) % (vocab - 3)).collect();
    let split = [t / 3, t / 2];
    let mut segments = Vec::new();
    let mut positions = Vec::new();
    for cut in split {
        for i in 0..t {
            segments.push(u32::from(i >= cut));
            positions.push(if i >= cut { (i - cut) as u32 } else { i as u32 });
        }
    }
    let mask = packed_causal_mask(&segments, b, t, None, &Device::Cpu).unwrap();
    (
        Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap(),
        mask,
    )
}

fn loss_of(model: &CausalLm, hidden: &Tensor, ids: &Tensor, ctx: &ForwardCtx) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let h = hidden.narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), ())).unwrap();
    let logits = model.logits(&h, ctx).unwrap();
    let labels = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let ones = Tensor::ones(b * (t - 1), DType::F32, &Device::Cpu).unwrap();
    (masked_cross_entropy_sum(&logits, &labels, &ones).unwrap() / (b * (t - 1)) as f64).unwrap()
}

/// (loss, gradients by name) of the plain graph and of the checkpointed one, with the same
/// dropout generator.
fn both_ways(model: &CausalLm) -> [(f32, HashMap<String, Tensor>); 2] {
    let (ids, positions, mask) = packed_inputs(model.config.vocab_size as u32, 14);
    let rng = Rng::derive(5, "dropout");
    let plain = {
        let ctx = ForwardCtx::training(rng.clone());
        let loss = loss_of(model, &model.forward_hidden(&ids, &positions, &mask, &ctx).unwrap(), &ids, &ctx);
        let store = loss.backward().unwrap();
        let grads = model
            .trainable
            .params
            .iter()
            .filter_map(|p| Some((p.name.clone(), store.get(p.var.as_tensor())?.clone())))
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let checkpointed = {
        let ctx = ForwardCtx::training(rng);
        let forward = model.forward_checkpointed(&ids, &positions, &mask, &ctx).unwrap();
        let loss = loss_of(model, &forward.hidden, &ids, &ctx);
        let value = loss.to_scalar::<f32>().unwrap();
        let store = loss.backward().unwrap();
        drop(loss);
        (value, forward.backward(store).unwrap())
    };
    [plain, checkpointed]
}

/// A plain gradient step, so that zero-initialised halves (LoRA's B, a bottleneck's `up`) give
/// the other half a gradient.
fn step(model: &CausalLm, grads: &HashMap<String, Tensor>) {
    for p in &model.trainable.params {
        if let Some(g) = grads.get(&p.name) {
            p.var.set(&(p.var.as_tensor() - (g * 0.5).unwrap()).unwrap()).unwrap();
        }
    }
}

fn assert_same_gradients(model: &CausalLm, what: &str) {
    let [(loss_a, first), _] = both_ways(model);
    step(model, &first);
    let [(loss_a2, a), (loss_b, b)] = both_ways(model);
    assert!(loss_a.is_finite() && loss_a2 != loss_a, "{what}: the step moved the loss");
    assert!((loss_a2 - loss_b).abs() <= 1e-6 * loss_a2.abs(), "{what}: loss {loss_a2} vs {loss_b}");
    let mut names_a: Vec<&String> = a.keys().collect();
    let mut names_b: Vec<&String> = b.keys().collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b, "{what}: the same parameters get gradients");
    assert_eq!(names_a.len(), model.trainable.params.len(), "{what}: every parameter gets one");
    for (name, ga) in &a {
        let gb = &b[name];
        let scale = ga.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = (ga - gb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 0.0, "{what}: {name} has a zero gradient");
        assert!(diff <= 1e-5 * scale, "{what}: {name} differs by {diff} (largest entry {scale})");
    }
}

fn dense(name: &str) -> (ModelConfig, HashMap<String, Tensor>) {
    let dir = fixture(name);
    (
        ModelConfig::from_file(&dir.join("config.json")).unwrap(),
        load_model_weights(&dir, DType::F32, &Device::Cpu).unwrap(),
    )
}

fn lora_plan(dropout: f32, train_norms: bool) -> LoraPlan {
    LoraPlan {
        config: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout,
            target_modules: TargetModules::Keyword("all-linear".into()),
            use_rslora: false,
            target_parameters: Vec::new(),
            train_router: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        },
        seed: 3,
        trainable: true,
        train_norms,
        loaded: None,
    }
}

#[test]
fn checkpointed_gradients_equal_the_uncut_graph_s_for_every_method() {
    use ferrotune::models::bottleneck::BottleneckPlan;
    use ferrotune::models::prefix::PrefixPlan;
    for name in MODELS {
        let (config, weights) = dense(name);
        assert_same_gradients(&CausalLm::new(config, weights, Adaptation::Full).unwrap(), &format!("{name} full"));

        let plan = lora_plan(0.1, true);
        let (config, weights) = dense(name);
        let model = CausalLm::new(config, weights, Adaptation::Lora(&plan)).unwrap();
        assert_same_gradients(&model, &format!("{name} LoRA (dropout, norms)"));

        let plan = lora_plan(0.0, false);
        let (dense_weights, quantized) = ferrotune::models::weights::load_quantized_weights(
            &fixture(name),
            Some(ferrotune::models::common::quantized::Quantization::Q8_0),
        )
        .unwrap();
        let config = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
        let model = CausalLm::with_quantized(config, dense_weights, quantized, Adaptation::Lora(&plan)).unwrap();
        assert_same_gradients(&model, &format!("{name} QLoRA"));

        let plan = BottleneckPlan { adapter_size: 8, seed: 3, trainable: true, loaded: None };
        let (config, weights) = dense(name);
        let model = CausalLm::new(config, weights, Adaptation::Bottleneck(&plan)).unwrap();
        assert_same_gradients(&model, &format!("{name} bottleneck"));

        for projection in [None, Some(16)] {
            let plan = PrefixPlan { length: 3, projection, seed: 3, trainable: true, loaded: None };
            let (config, weights) = dense(name);
            let model = CausalLm::new(config, weights, Adaptation::Prefix(&plan)).unwrap();
            assert_same_gradients(&model, &format!("{name} prefix (projection {projection:?})"));
        }
    }
}

/// The trainer with `gradient_checkpointing` ends where the plain one does.
#[test]
fn a_checkpointed_run_trains_to_the_same_adapter() {
    use ferrotune::train::config::Method;
    use ferrotune::train::{train, Silent};
    let mut adapters = Vec::new();
    for checkpointing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::training::config_for(dir.path(), Method::Lora, "llama");
        config.epochs = 2;
        config.learning_rate = 1e-2;
        config.lora.dropout = 0.1;
        config.gradient_checkpointing = checkpointing;
        let summary = train(&config, &mut Silent).unwrap();
        let (_, _, tensors) = ferrotune::peft::adapter::load_adapter(&summary.output.unwrap(), &Device::Cpu).unwrap();
        adapters.push((summary.final_train_loss.unwrap(), tensors));
    }
    let [(loss_a, a), (loss_b, b)] = [adapters.remove(0), adapters.remove(0)];
    assert!((loss_a - loss_b).abs() <= 1e-5 * loss_a.abs(), "final loss {loss_a} vs {loss_b}");
    for (name, ta) in &a {
        let diff =
            (ta - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5, "{name} differs by {diff}");
    }
}

/// Through the jobs API: the hyperparameter is accepted, shown once resolved, and the job trains.
#[tokio::test]
async fn a_job_with_gradient_checkpointing_trains_and_shows_the_setting() {
    use crate::jobs_e2e::{create_job, job_request, status, upload_qa, wait_for};
    let mut app = crate::helpers::TestApp::spawn(crate::helpers::Backend::SqliteLocal).await;
    app.start_executors(1);
    let file = upload_qa(&app).await;
    let mut request = job_request(&file, 2, 4, 0);
    request["method"]["supervised"]["hyperparameters"]["gradient_checkpointing"] = serde_json::json!(true);
    let id = create_job(&app, &request).await;
    let job =
        wait_for(&app, &id, std::time::Duration::from_secs(120), |j| ["succeeded", "failed"].contains(&status(j)))
            .await;
    assert_eq!(status(&job), "succeeded", "{job}");
    assert_eq!(job["hyperparameters"]["gradient_checkpointing"], true, "{job}");
}
