//! Hugging Face PEFT's adapter format: `adapter_config.json` + `adapter_model.safetensors`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor};
use serde_json::json;

use super::lora::{LoraConfig, TargetModules};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Where ferrotune records what wrote an adapter. PEFT's config classes take only their own keys
/// (an unknown one makes PEFT warn that the file came from a newer PEFT), so provenance stays out
/// of `adapter_config.json`.
pub const PROVENANCE_FILE: &str = "ferrotune.json";
/// Module names saved whole (PEFT `modules_to_save`) when norms are trained with LoRA.
pub const NORM_MODULES: [&str; 3] = ["input_layernorm", "post_attention_layernorm", "norm"];
/// The module name saved whole when mixture-of-experts routers are trained (PEFT matches it by
/// suffix, so Qwen2-MoE's `shared_expert_gate` is saved too).
pub const ROUTER_MODULE: &str = "gate";

/// Writes an adapter that PEFT's `PeftModel.from_pretrained` loads; `linear_modules` are the
/// base model's layer linears (what `all-linear` stands for).
pub fn save_adapter(
    dir: &Path,
    config: &LoraConfig,
    base_model: &str,
    linear_modules: &[&str],
    tensors: &HashMap<String, Tensor>,
    trained_norms: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let targets: Vec<String> = match &config.target_modules {
        TargetModules::List(list) => list.clone(),
        // PEFT records `all-linear` expanded to the module names it matched.
        TargetModules::Keyword(k) if k == "all-linear" => linear_modules.iter().map(|s| s.to_string()).collect(),
        TargetModules::Keyword(single) => vec![single.clone()],
    };
    let document = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "target_parameters": if config.target_parameters.is_empty() { None } else { Some(&config.target_parameters) },
        "modules_to_save": modules_to_save(trained_norms, config.train_router),
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "use_dora": false,
        "revision": null,
    });
    write_config(dir, &document, "lora", base_model)?;
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, dir.join(WEIGHTS_FILE))
}

/// PEFT's `modules_to_save`: the norms and/or the mixture-of-experts routers (`gate`), or none.
fn modules_to_save(norms: bool, router: bool) -> Option<Vec<&'static str>> {
    let mut modules = Vec::new();
    if norms {
        modules.extend(NORM_MODULES);
    }
    if router {
        modules.push(ROUTER_MODULE);
    }
    (!modules.is_empty()).then_some(modules)
}

/// Writes `adapter_config.json` (exactly `document`) and, beside it, `ferrotune.json`: the
/// library, its version, the adapter kind and the base model.
pub fn write_config(dir: &Path, document: &serde_json::Value, kind: &str, base_model: &str) -> Result<()> {
    let pretty = |value: &serde_json::Value| {
        serde_json::to_string_pretty(value).map(|t| t + "\n").map_err(|e| candle_core::Error::Msg(e.to_string()))
    };
    std::fs::write(dir.join(CONFIG_FILE), pretty(document)?)?;
    let provenance = json!({
        "library": "ferrotune",
        "version": env!("CARGO_PKG_VERSION"),
        "adapter": kind,
        "base_model": base_model,
    });
    std::fs::write(dir.join(PROVENANCE_FILE), pretty(&provenance)?)?;
    Ok(())
}

/// Reads an adapter: its LoRA settings, whether it carries norms, and its tensors by PEFT name.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<(LoraConfig, bool, HashMap<String, Tensor>)> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{CONFIG_FILE}: {e}")))?;
    if value.get("peft_type").and_then(|v| v.as_str()).is_some_and(|t| t != "LORA") {
        candle_core::bail!("{CONFIG_FILE}: only LoRA adapters are supported, not {}", value["peft_type"]);
    }
    let mut config: LoraConfig =
        serde_json::from_value(value.clone()).map_err(|e| candle_core::Error::Msg(format!("{CONFIG_FILE}: {e}")))?;
    let saved: Vec<&str> = value
        .get("modules_to_save")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str())
        .collect();
    config.train_router = saved.contains(&ROUTER_MODULE);
    let norms = saved.iter().any(|m| *m != ROUTER_MODULE);
    let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), device)?;
    Ok((config, norms, tensors))
}
