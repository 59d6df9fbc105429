//! What a finished encoder run leaves: a transformers model directory (full fine-tuning; its
//! `config.json` names the task class and the labels, `id2label`/`label2id`, as transformers
//! writes them; embedding models also get sentence-transformers' module files), or a PEFT LoRA
//! adapter with the task's `task_type` and the new head in `modules_to_save`, or a bottleneck
//! adapter; each with the tokenizer files and `task.json` (the task and its labels), which
//! serving reads.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::models::bert::{Encoder, Task};
use crate::train::config::{Method, TrainConfig};
use crate::train::files::{copy_tokenizer_files, save_tensors, write_json, write_peft_lora};
use crate::train::TrainError;

/// The task file written beside every encoder output.
pub const TASK_FILE: &str = "task.json";

pub fn write_encoder_output(model: &Encoder, config: &TrainConfig) -> Result<PathBuf, TrainError> {
    let dir = config.output_dir.clone();
    std::fs::create_dir_all(&dir)?;
    let base = config.model.display().to_string();
    let tensors = model.trainable.snapshot()?;
    match config.method {
        Method::Lora => {
            let heads: &[&str] = if model.task == Task::Embedding { &[] } else { &["classifier"] };
            write_peft_lora(&dir, &config.lora.lora_config(), &base, model.task.peft_task_type(), heads, tensors)?
        }
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
    copy_tokenizer_files(&config.model, &dir)?;
    Ok(dir)
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
