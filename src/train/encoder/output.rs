//! What a finished encoder run leaves: a transformers model directory (full fine-tuning; its
//! `config.json` names the task class and the labels, `id2label`/`label2id`, as transformers
//! writes them; embedding models also get sentence-transformers' module files), or a PEFT LoRA
//! adapter with the task's `task_type` and the new head in `modules_to_save`, or a bottleneck
//! adapter; each with the tokenizer files and `task.json` (the task and its labels), which
//! serving reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::models::bert::{Encoder, Task};
use crate::train::config::{Method, TrainConfig};
use crate::train::TrainError;

/// The task file written beside every encoder output.
pub const TASK_FILE: &str = "task.json";

const TOKENIZER_FILES: [&str; 4] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"];

pub fn write_encoder_output(model: &Encoder, config: &TrainConfig) -> Result<PathBuf, TrainError> {
    let dir = config.output_dir.clone();
    std::fs::create_dir_all(&dir)?;
    let base = config.model.display().to_string();
    let tensors = model.trainable.snapshot()?;
    match config.method {
        Method::Lora => write_lora(&dir, model, config, &base, tensors)?,
        Method::Bottleneck => crate::models::bottleneck::save(&dir, config.adapter_size, &base, &tensors)?,
        _ => {
            let architecture = model.task.architecture(&model.config.model_type);
            let document = model.config.with_task(&architecture, model.task.labels());
            write_json(&dir.join("config.json"), &document)?;
            save_tensors(&dir.join("model.safetensors"), tensors)?;
            if model.task == Task::Embedding {
                write_sentence_transformers_modules(&dir)?;
            }
        }
    }
    write_task_file(&dir, &model.task)?;
    for name in TOKENIZER_FILES {
        let source = config.model.join(name);
        if source.exists() {
            std::fs::copy(&source, dir.join(name))?;
        }
    }
    Ok(dir)
}

/// PEFT's adapter: LoRA factors and the head saved whole under `base_model.model.` names; the
/// targets are written as the exact module paths that got adapters, so PEFT wraps the same ones.
fn write_lora(
    dir: &Path,
    model: &Encoder,
    config: &TrainConfig,
    base: &str,
    tensors: HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    let lora = config.lora.lora_config();
    let mut targets: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("base_model.model.")?.strip_suffix(".lora_A.weight").map(str::to_string))
        .collect();
    targets.sort();
    let heads: Vec<&str> = match model.task {
        Task::Embedding => Vec::new(),
        _ => vec!["classifier"],
    };
    let document = json!({
        "peft_type": "LORA",
        "task_type": model.task.peft_task_type(),
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

pub(super) fn write_task_file(dir: &Path, task: &Task) -> Result<(), TrainError> {
    let document = match task {
        Task::Classification { labels } => json!({ "task": "classification", "labels": labels }),
        Task::TokenClassification { labels } => json!({ "task": "token_classification", "labels": labels }),
        Task::Embedding => json!({ "task": "embedding", "pooling": "mean", "normalize": true }),
    };
    write_json(&dir.join(TASK_FILE), &document)
}

/// Reads `task.json` from a trained encoder's directory.
pub fn read_task_file(dir: &Path) -> Option<Task> {
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(TASK_FILE)).ok()?).ok()?;
    let labels = || -> Option<Vec<String>> {
        value["labels"].as_array()?.iter().map(|l| l.as_str().map(str::to_string)).collect()
    };
    match value["task"].as_str()? {
        "classification" => Some(Task::Classification { labels: labels()? }),
        "token_classification" => Some(Task::TokenClassification { labels: labels()? }),
        "embedding" => Some(Task::Embedding),
        _ => None,
    }
}

/// sentence-transformers' module files for a model trained with mean pooling and normalized
/// outputs, so `SentenceTransformer(dir)` loads it as trained.
fn write_sentence_transformers_modules(dir: &Path) -> Result<(), TrainError> {
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]);
    write_json(&dir.join("modules.json"), &modules)?;
    std::fs::create_dir_all(dir.join("1_Pooling"))?;
    std::fs::create_dir_all(dir.join("2_Normalize"))?;
    let width = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["hidden_size"].as_u64())
        .unwrap_or(0);
    let pooling = json!({
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false
    });
    write_json(&dir.join("1_Pooling/config.json"), &pooling)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")?;
    Ok(())
}

fn save_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Result<(), TrainError> {
    let cpu: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&cpu, path)?;
    Ok(())
}
