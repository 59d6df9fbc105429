//! Our outputs load in Hugging Face transformers / PEFT and give our logits there
//! (`scripts/check_with_transformers.py`). Runs when `FERROTUNE_TEST_TORCH_PYTHON` names a Python
//! with torch, transformers and peft (`.ci/run` sets it when the perf venv exists).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrotune::models::common::mask::packed_causal_mask;
use ferrotune::models::config::ModelConfig;
use ferrotune::models::llama::{Adaptation, CausalLm};
use ferrotune::models::weights::load_model_weights;
use ferrotune::models::ForwardCtx;
use ferrotune::peft::adapter::load_adapter;
use ferrotune::peft::lora::LoraPlan;
use ferrotune::train::config::Method;
use ferrotune::train::{train, Silent};

use crate::model_numerics::fixture;

fn torch_python() -> Option<String> {
    match std::env::var("FERROTUNE_TEST_TORCH_PYTHON") {
        Ok(python) if !python.is_empty() => Some(python),
        _ => {
            eprintln!("skipping: set FERROTUNE_TEST_TORCH_PYTHON to a Python with torch, transformers and peft");
            None
        }
    }
}

/// Writes `input_ids` and our logits for them to `file`.
fn write_expected(model: &CausalLm, file: &Path) {
    let (b, t) = (2, 12);
    let ids: Vec<u32> = (0..b * t).map(|i| 4 + (i as u32 * 37) % 500).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let positions = Tensor::arange(0u32, t as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap().repeat((b, 1)).unwrap();
    let mask = packed_causal_mask(&vec![0; b * t], b, t, model.config.sliding_window, &Device::Cpu).unwrap();
    let ctx = ForwardCtx::inference();
    let logits = model.logits(&model.forward_hidden(&ids, &positions, &mask, &ctx).unwrap(), &ctx).unwrap();
    let tensors =
        HashMap::from([("input_ids".to_string(), ids.to_dtype(DType::I64).unwrap()), ("logits".to_string(), logits)]);
    candle_core::safetensors::save(&tensors, file).unwrap();
}

fn check(python: &str, args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_with_transformers.py");
    let output = std::process::Command::new(python).arg(script).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "transformers disagrees:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn load(dir: &Path, adaptation: Adaptation<'_>) -> CausalLm {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    CausalLm::new(config, load_model_weights(dir, DType::F32, &Device::Cpu).unwrap(), adaptation).unwrap()
}

/// LoRA (with and without trained norms) and QLoRA adapters load in PEFT without a warning
/// (`check_with_transformers.py` fails on any) and give our logits over the f32 base.
#[test]
fn a_trained_lora_adapter_loads_in_peft_with_the_same_logits() {
    let Some(python) = torch_python() else { return };
    for (name, method, train_norms) in [
        ("llama", Method::Lora, false),
        ("qwen2", Method::Lora, true),
        ("qwen3", Method::Lora, true),
        ("phi3", Method::Lora, true),
        ("gemma2", Method::Lora, true),
        ("gemma3", Method::Lora, true),
        ("mixtral", Method::Lora, true),
        ("qwen2_moe", Method::Lora, false),
        ("qwen3_moe", Method::Lora, false),
        ("llama", Method::Qlora, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::training::config_for(dir.path(), method, name);
        config.epochs = 2;
        config.learning_rate = 1e-2;
        config.lora.train_norms = train_norms;
        if name == "qwen2_moe" {
            // The experts (PEFT `target_parameters`), and the routers saved whole.
            config.lora.target_parameters = vec!["gate_up_proj".into(), "down_proj".into()];
            config.lora.train_router = true;
        }
        // mixtral, qwen3_moe: all-linear as PEFT converts it (experts, the gate-up stack at twice
        // the rank, LoRA on the routers; qwen3_moe's dense layer keeps no MLP adapter).
        let output = train(&config, &mut Silent).unwrap().output.unwrap();
        let (lora, norms, tensors) = load_adapter(&output, &Device::Cpu).unwrap();
        assert_eq!(norms, train_norms);
        assert_eq!(tensors.keys().any(|k| k.ends_with("input_layernorm.weight")), train_norms);
        let plan = LoraPlan { config: lora, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) };
        let expected = dir.path().join("expected.safetensors");
        write_expected(&load(&fixture(name), Adaptation::Lora(&plan)), &expected);
        let base = fixture(name).display().to_string();
        check(
            &python,
            &["--model", &base, "--adapter", output.to_str().unwrap(), "--expect", expected.to_str().unwrap()],
        );
    }
}

#[test]
fn a_fully_fine_tuned_model_loads_in_transformers_with_the_same_logits() {
    let Some(python) = torch_python() else { return };
    // qwen3: the per-head query/key norms are trained and written back; phi3: fused projections.
    // mixtral and qwen2_moe: the stacked experts are written back per expert (Mixtral's
    // `block_sparse_moe.experts.N.w1` names), as transformers writes them.
    for name in ["llama3", "qwen3", "phi3", "gemma3", "mixtral", "qwen2_moe"] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::training::config_for(dir.path(), Method::Full, name);
        config.epochs = 2;
        config.learning_rate = 1e-3;
        let output = train(&config, &mut Silent).unwrap().output.unwrap();
        let expected = dir.path().join("expected.safetensors");
        write_expected(&load(&output, Adaptation::None), &expected);
        check(&python, &["--model", output.to_str().unwrap(), "--expect", expected.to_str().unwrap()]);
    }
}

/// Also without a warning from PEFT.
#[test]
fn a_trained_prefix_loads_in_peft_with_the_same_logits() {
    let Some(python) = torch_python() else { return };
    // llama (GQA: 4 query heads over 2 key/value heads) and qwen2; trained with PEFT's MLP
    // reparameterisation, saved in PEFT's inference form. mistral and gemma2: a 6-token window
    // (on every layer, on gemma2's sliding one) over 12 tokens, so later tokens no longer see
    // the prefix, as in transformers, where the prefix is the KV cache's first positions.
    for name in ["llama", "qwen2", "mistral", "gemma2"] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::training::config_for(dir.path(), Method::Prefix, name);
        config.prefix_length = 5;
        config.prefix_projection = true;
        config.epochs = 2;
        config.learning_rate = 1e-2;
        let output = train(&config, &mut Silent).unwrap().output.unwrap();
        let table = ferrotune::models::prefix::load(&output, &Device::Cpu).unwrap();
        let plan = ferrotune::models::prefix::PrefixPlan {
            length: 5,
            projection: None,
            seed: 0,
            trainable: false,
            loaded: Some(table),
        };
        let expected = dir.path().join("expected.safetensors");
        write_expected(&load(&fixture(name), Adaptation::Prefix(&plan)), &expected);
        let base = fixture(name).display().to_string();
        check(
            &python,
            &["--model", &base, "--adapter", output.to_str().unwrap(), "--expect", expected.to_str().unwrap()],
        );
    }
}
