//! Our Llama-family models against transformers and PEFT on the fixtures in `tests/fixtures`
//! (made by `scripts/make_fixtures.py`): logits, LoRA logits, gradients, greedy decoding.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ferrotune::infer::generate::generate_greedy;
use ferrotune::models::common::mask::packed_causal_mask;
use ferrotune::models::common::ops::masked_cross_entropy_sum;
use ferrotune::models::config::ModelConfig;
use ferrotune::models::llama::{Adaptation, CausalLm};
use ferrotune::models::moe::load_balancing_loss;
use ferrotune::models::weights::load_model_weights;
use ferrotune::models::ForwardCtx;
use ferrotune::peft::adapter::load_adapter;
use ferrotune::peft::lora::LoraPlan;

pub const MODELS: [&str; 11] =
    ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe"];

/// The mixture-of-experts fixtures (their LoRA fixtures also adapt the experts and the routers).
pub const MOE_MODELS: [&str; 3] = ["mixtral", "qwen2_moe", "qwen3_moe"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

pub fn load(name: &str, adaptation: impl FnOnce(&ModelConfig) -> AdaptationSpec) -> CausalLm {
    let dir = fixture(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = load_model_weights(&dir, DType::F32, &Device::Cpu).unwrap();
    match adaptation(&config) {
        AdaptationSpec::None => CausalLm::new(config, weights, Adaptation::None).unwrap(),
        AdaptationSpec::Full => CausalLm::new(config, weights, Adaptation::Full).unwrap(),
        AdaptationSpec::Lora(plan) => CausalLm::new(config, weights, Adaptation::Lora(&plan)).unwrap(),
    }
}

pub enum AdaptationSpec {
    None,
    Full,
    Lora(LoraPlan),
}

/// The fixture adapter in `<model>/<dir>`, trained or frozen.
pub fn saved_adapter(name: &str, dir: &str, trainable: bool) -> LoraPlan {
    let (config, norms, tensors) = load_adapter(&fixture(name).join(dir), &Device::Cpu).unwrap();
    LoraPlan { config, seed: 0, trainable, train_norms: norms, loaded: Some(tensors) }
}

fn input_ids(reference: &HashMap<String, Tensor>) -> Tensor {
    reference["input_ids"].to_dtype(DType::U32).unwrap()
}

/// Logits of all positions with plain causal attention.
fn logits(model: &CausalLm, ids: &Tensor) -> Tensor {
    logits_in(model, ids, &ForwardCtx::inference())
}

fn logits_in(model: &CausalLm, ids: &Tensor, ctx: &ForwardCtx) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let positions = Tensor::arange(0u32, t as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap().repeat((b, 1)).unwrap();
    let mask = packed_causal_mask(&vec![0; b * t], b, t, model.config.sliding_window, &Device::Cpu).unwrap();
    let hidden = model.forward_hidden(ids, &positions, &mask, ctx).unwrap();
    model.logits(&hidden, ctx).unwrap()
}

/// transformers' causal-LM loss: mean next-token cross-entropy over every position, plus, for a
/// mixture of experts (the fixtures set `output_router_logits`), `router_aux_loss_coef` times the
/// load-balancing loss.
fn lm_loss(model: &CausalLm, ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let ctx = match model.config.moe {
        Some(_) => ForwardCtx::inference().collect_routing(None),
        None => ForwardCtx::inference(),
    };
    let logits = logits_in(model, ids, &ctx).narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), ())).unwrap();
    let labels = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let mask = Tensor::ones(b * (t - 1), DType::F32, &Device::Cpu).unwrap();
    let loss = (masked_cross_entropy_sum(&logits, &labels, &mask).unwrap() / (b * (t - 1)) as f64).unwrap();
    match &model.config.moe {
        Some(moe) => {
            let aux = load_balancing_loss(&ctx.take_routing(), moe.num_experts).unwrap().unwrap();
            (loss + (aux * moe.aux_loss_coef).unwrap()).unwrap()
        }
        None => loss,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn logits_equal_transformers() {
    for name in MODELS {
        let reference = reference(name);
        let model = load(name, |_| AdaptationSpec::None);
        let diff = max_abs_diff(&logits(&model, &input_ids(&reference)), &reference["logits"]);
        eprintln!("{name}: max |logits - transformers| = {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: max |logits - transformers| = {diff}");
    }
}

#[test]
fn logits_with_a_lora_adapter_equal_peft() {
    for name in MODELS {
        let reference = reference(name);
        let model = load(name, |_| AdaptationSpec::Lora(saved_adapter(name, "lora", false)));
        let diff = max_abs_diff(&logits(&model, &input_ids(&reference)), &reference["lora_logits"]);
        eprintln!("{name}: max |LoRA logits - peft| = {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: max |lora logits - peft| = {diff}");
        assert!(max_abs_diff(&reference["lora_logits"], &reference["logits"]) > 1e-2, "the adapter changes the logits");
    }
    let reference = reference("llama");
    let model = load("llama", |_| AdaptationSpec::Lora(saved_adapter("llama", "lora-rs", false)));
    let diff = max_abs_diff(&logits(&model, &input_ids(&reference)), &reference["rslora_logits"]);
    assert!(diff <= 1e-4, "rsLoRA: max |logits - peft| = {diff}");
}

/// LongRoPE (the phi3 fixture): a forward no longer than the original context uses the short
/// factors, a longer one the long factors, as transformers switches them.
#[test]
fn longrope_switches_to_the_long_factors_past_the_original_context() {
    let reference = reference("phi3");
    let model = load("phi3", |_| AdaptationSpec::None);
    let short = reference["short_logits"].dim(1).unwrap();
    let ids = input_ids(&reference).narrow(1, 0, short).unwrap();
    let diff = max_abs_diff(&logits(&model, &ids), &reference["short_logits"]);
    assert!(diff <= 1e-4, "short context: max |logits - transformers| = {diff}");
    let long = reference["logits"].narrow(1, 0, short).unwrap();
    assert!(max_abs_diff(&long, &reference["short_logits"]) > 1e-2, "the two factor sets differ here");
}

/// LoRA targets that name no module of the model (Llama's `q_proj` on Phi-3, whose attention is
/// one `qkv_proj`) are an error that lists the model's modules, not a run that trains nothing.
#[test]
fn lora_targets_matching_no_module_are_refused_with_the_models_modules() {
    use ferrotune::peft::lora::{LoraConfig, TargetModules};
    let plan = |targets: &[&str]| LoraPlan {
        config: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::List(targets.iter().map(|t| t.to_string()).collect()),
            use_rslora: false,
            target_parameters: Vec::new(),
            train_router: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        },
        seed: 1,
        trainable: true,
        train_norms: false,
        loaded: None,
    };
    let config = ModelConfig::from_file(&fixture("phi3").join("config.json")).unwrap();
    let weights = || load_model_weights(&fixture("phi3"), DType::F32, &Device::Cpu).unwrap();
    let refused = plan(&["q_proj", "v_proj"]);
    let error =
        CausalLm::new(config.clone(), weights(), Adaptation::Lora(&refused)).err().expect("refused").to_string();
    assert!(error.contains("match no linear module"), "{error}");
    assert!(error.contains("qkv_proj, o_proj, gate_up_proj, down_proj"), "{error}");
    let fused = plan(&["qkv_proj"]);
    let model = CausalLm::new(config, weights(), Adaptation::Lora(&fused)).unwrap();
    assert_eq!(model.trainable.params.len(), 2 * 2, "A and B of qkv_proj in each of 2 layers");
}

#[test]
fn sharded_weights_load_like_a_single_file() {
    let single = load_model_weights(&fixture("llama"), DType::F32, &Device::Cpu).unwrap();
    let sharded = load_model_weights(&fixture("llama-sharded"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(single.len(), sharded.len());
    for (name, tensor) in &single {
        assert_eq!(max_abs_diff(tensor, &sharded[name]), 0.0, "{name}");
    }
}

/// Relative difference: max |a − b| / max |b|.
fn assert_grads_match(
    model: &CausalLm,
    loss: &Tensor,
    reference: &HashMap<String, Tensor>,
    prefix: &str,
    context: &str,
) {
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    let mut worst = 0f32;
    for p in &model.trainable.params {
        let ours = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{context}: no gradient for {}", p.name));
        // Modules a LoRA adapter saves whole (norms, routers) keep their model names inside; PEFT
        // saves them under `base_model.model.`.
        let theirs = reference
            .get(&format!("{prefix}{}", p.name))
            .or_else(|| reference.get(&format!("{prefix}base_model.model.{}", p.name)))
            .unwrap_or_else(|| panic!("{context}: no reference gradient for {}", p.name));
        let relative = max_abs_diff(ours, theirs) / max_abs(theirs).max(1e-12);
        assert!(relative <= 1e-3, "{context}: gradient of {} differs by {relative} (relative)", p.name);
        worst = worst.max(relative);
        checked += 1;
    }
    eprintln!("{context} {prefix}: {checked} gradients, worst relative difference {worst:.2e}");
    let expected = reference.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(checked, expected, "{context}: every reference gradient is compared");
}

#[test]
fn full_fine_tuning_gradients_equal_pytorch() {
    for name in MODELS {
        let reference = reference(name);
        let model = load(name, |_| AdaptationSpec::Full);
        let loss = lm_loss(&model, &input_ids(&reference));
        let diff = (loss.to_scalar::<f32>().unwrap() - reference["loss"].to_scalar::<f32>().unwrap()).abs();
        assert!(diff <= 1e-4, "{name}: loss differs by {diff}");
        assert_grads_match(&model, &loss, &reference, "grad.", name);
    }
}

#[test]
fn lora_gradients_equal_peft() {
    for name in MODELS {
        let reference = reference(name);
        let model = load(name, |_| AdaptationSpec::Lora(saved_adapter(name, "lora", true)));
        let loss = lm_loss(&model, &input_ids(&reference));
        let diff = (loss.to_scalar::<f32>().unwrap() - reference["lora_loss"].to_scalar::<f32>().unwrap()).abs();
        assert!(diff <= 1e-4, "{name}: LoRA loss differs by {diff}");
        assert_grads_match(&model, &loss, &reference, "lora_grad.", name);
    }
}

#[test]
fn greedy_decoding_equals_transformers_generate() {
    for name in MODELS {
        let reference = reference(name);
        let prompt: Vec<u32> = input_ids(&reference).get(0).unwrap().narrow(0, 0, 6).unwrap().to_vec1().unwrap();
        for (adapter, key) in [(false, "greedy_ids"), (true, "lora_greedy_ids")] {
            let model = if adapter {
                load(name, |_| AdaptationSpec::Lora(saved_adapter(name, "lora", false)))
            } else {
                load(name, |_| AdaptationSpec::None)
            };
            let expected: Vec<u32> = reference[key].to_dtype(DType::U32).unwrap().get(0).unwrap().to_vec1().unwrap();
            let generated = generate_greedy(&model, &prompt, expected.len(), &[]).unwrap();
            assert_eq!(generated, expected, "{name} {key}");
        }
    }
}

/// One plain gradient step on every trainable parameter: adapters whose output starts at zero
/// (LoRA's B, a bottleneck's up-projection) give the other half a gradient only after it.
fn one_plain_step(model: &CausalLm, ids: &Tensor) {
    let grads = lm_loss(model, ids).backward().unwrap();
    for p in &model.trainable.params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            p.var.set(&(p.var.as_tensor() - (g * 0.5).unwrap()).unwrap()).unwrap();
        }
    }
}

fn nonzero_gradients(model: &CausalLm, ids: &Tensor) -> Vec<String> {
    let grads = lm_loss(model, ids).backward().unwrap();
    model
        .trainable
        .params
        .iter()
        .filter(|p| grads.get(p.var.as_tensor()).is_none_or(|g| max_abs(g) == 0.0))
        .map(|p| p.name.clone())
        .collect()
}

#[test]
fn every_trainable_parameter_receives_a_nonzero_gradient() {
    use ferrotune::peft::lora::{LoraConfig, TargetModules};
    for name in MODELS {
        let ids = input_ids(&reference(name));
        let moe = MOE_MODELS.contains(&name);
        let experts: Vec<String> = if moe { vec!["gate_up_proj".into(), "down_proj".into()] } else { Vec::new() };
        let full = load(name, |_| AdaptationSpec::Full);
        assert_eq!(nonzero_gradients(&full, &ids), Vec::<String>::new(), "{name}: full fine-tuning");

        // A fresh adapter starts with B = 0, so A's gradient is zero until B has moved: take one
        // plain gradient step on everything first, as training would.
        // As a job trains it: converted as PEFT converts Mixtral's and Qwen3-MoE's targets (their
        // all-linear adapts the experts, with the fused gate-up at twice the rank, and the router
        // with LoRA; Qwen3-MoE's dense layer 1 keeps no MLP adapter); Qwen2-MoE's router trains whole.
        let model_config = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
        let converted = matches!(name, "mixtral" | "qwen3_moe");
        let lora_config = |train_router: bool| {
            LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: TargetModules::Keyword("all-linear".into()),
                use_rslora: false,
                target_parameters: experts.clone(),
                train_router,
                rank_pattern: Default::default(),
                alpha_pattern: Default::default(),
            }
            .converted_for(&model_config.model_type, &model_config.linear_modules())
            .unwrap()
        };
        let plan = LoraPlan {
            config: lora_config(moe && !converted),
            seed: 3,
            trainable: true,
            train_norms: true,
            loaded: None,
        };
        let lora = load(name, |_| AdaptationSpec::Lora(plan));
        one_plain_step(&lora, &ids);
        assert_eq!(nonzero_gradients(&lora, &ids), Vec::<String>::new(), "{name}: LoRA with norms");
        let count = lora.trainable.params.len();
        // Qwen3 and Gemma 3 add each layer's per-head q_norm and k_norm (PEFT's `norm` matches them
        // too); Gemma 2 and 3 each layer's norms after attention and after the MLP.
        let head_norms = if ["qwen3", "gemma3", "qwen3_moe"].contains(&name) { 2 * 2 } else { 0 };
        let output_norms = if name.starts_with("gemma") { 2 * 2 } else { 0 };
        // Seven linears per layer, or Phi-3's four (fused qkv_proj and gate_up_proj).
        let modules = lora.config.linear_modules().len();
        // Mixture of experts: A and B of both stacked expert weights and the router per MoE layer;
        // Mixtral has only the attention's linears; Qwen2-MoE adds its shared expert's three and
        // gate (trained whole too, with the router); Qwen3-MoE's layer 1 is a dense MLP.
        let (modules_expected, expected) = match name {
            "phi3" => (4, 2 * 4 * 2 + 5),
            // Attention, both expert stacks and the router's LoRA, per layer.
            "mixtral" => (4, 2 * (2 * 4 + 4 + 2) + 5),
            // The shared expert's gate trains whole with the router, so it has no LoRA.
            "qwen2_moe" => (8, 2 * 7 * 2 + 2 * (4 + 1 + 1) + 5),
            "qwen3_moe" => (7, 2 * 2 * 4 + (4 + 2) + 5),
            _ => (7, 2 * 7 * 2 + 5),
        };
        assert_eq!(modules, modules_expected, "{name}");
        assert_eq!(count, expected + head_norms + output_norms, "{name}: A and B for every module, plus the norms");

        // QLoRA: the same adapters (routers not trained whole) over the projections quantized to
        // q8_0, the experts' too.
        let plan = LoraPlan { config: lora_config(false), seed: 3, trainable: true, train_norms: false, loaded: None };
        let (dense, quantized) = ferrotune::models::weights::load_quantized_weights(
            &fixture(name),
            Some(ferrotune::models::common::quantized::Quantization::Q8_0),
        )
        .unwrap();
        let quantized_experts = quantized.keys().filter(|k| k.contains(".experts.")).count();
        assert_eq!(
            quantized_experts,
            if moe {
                3 * 4 * model_config.moe.as_ref().unwrap().sparse_layers.iter().filter(|&&s| s).count()
            } else {
                0
            },
            "{name}: every expert's three weights are quantized"
        );
        let config = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
        let qlora = CausalLm::with_quantized(config, dense, quantized, Adaptation::Lora(&plan)).unwrap();
        one_plain_step(&qlora, &ids);
        assert_eq!(nonzero_gradients(&qlora, &ids), Vec::<String>::new(), "{name}: QLoRA");

        // Bottleneck adapters: `up` starts at zero too, so the same first step.
        let plan =
            ferrotune::models::bottleneck::BottleneckPlan { adapter_size: 8, seed: 3, trainable: true, loaded: None };
        let config = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
        let weights = load_model_weights(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let bottleneck = CausalLm::new(config, weights, Adaptation::Bottleneck(&plan)).unwrap();
        one_plain_step(&bottleneck, &ids);
        assert_eq!(nonzero_gradients(&bottleneck, &ids), Vec::<String>::new(), "{name}: bottleneck adapters");
        assert_eq!(bottleneck.trainable.params.len(), 2 * 2 * 4, "{name}: down/up weight and bias, 2 per layer");

        // Prefix tuning, direct and reparameterised: every vector is used from the first step.
        for projection in [None, Some(16)] {
            let plan =
                ferrotune::models::prefix::PrefixPlan { length: 3, projection, seed: 3, trainable: true, loaded: None };
            let config = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
            let weights = load_model_weights(&fixture(name), DType::F32, &Device::Cpu).unwrap();
            let prefixed = CausalLm::new(config, weights, Adaptation::Prefix(&plan)).unwrap();
            assert_eq!(nonzero_gradients(&prefixed, &ids), Vec::<String>::new(), "{name}: prefix {projection:?}");
            assert_eq!(prefixed.trainable.params.len(), if projection.is_some() { 5 } else { 1 });
        }
    }
}
