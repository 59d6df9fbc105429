//! Files a finished run writes, shared by the trainers: PEFT LoRA adapters, tensors, JSON
//! documents and the base's tokenizer files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use super::TrainError;
use crate::peft::lora::LoraConfig;

/// The tokenizer files copied from the base beside a trained model or adapter.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "spiece.model",
    "generation_config.json",
];

/// PEFT's adapter with `task_type`: LoRA factors and the `heads` (PEFT's `modules_to_save`) saved
/// whole under `base_model.model.` names; the targets are written as the exact module paths that got adapters, so PEFT wraps the same ones.
pub fn write_peft_lora(
    dir: &Path,
    lora: &LoraConfig,
    base: &str,
    task_type: &str,
    heads: &[&str],
    tensors: HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    let mut targets: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("base_model.model.")?.strip_suffix(".lora_A.weight").map(str::to_string))
        .collect();
    targets.sort();
    let document = json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "use_rslora": lora.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": if heads.is_empty() { None } else { Some(heads) },
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    });
    crate::peft::adapter::write_config(dir, &document, "lora", base)?;
    let named: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| if k.starts_with("base_model.") { (k, v) } else { (format!("base_model.model.{k}"), v) })
        .collect();
    save_tensors(&dir.join(crate::peft::adapter::WEIGHTS_FILE), named)
}

/// Copies the base's tokenizer files (those it has) into `dir`.
pub fn copy_tokenizer_files(base: &Path, dir: &Path) -> Result<(), TrainError> {
    for name in TOKENIZER_FILES {
        let source = base.join(name);
        if source.exists() {
            std::fs::copy(&source, dir.join(name))?;
        }
    }
    Ok(())
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")?;
    Ok(())
}

pub fn save_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Result<(), TrainError> {
    let cpu: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&cpu, path)?;
    Ok(())
}
