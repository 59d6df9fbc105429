//! What a finished encoder run leaves: a transformers model directory (full fine-tuning; its
//! `config.json` names the task class and the labels, `id2label`/`label2id`, as transformers
//! writes them; embedding models also get sentence-transformers' module files), or a PEFT LoRA
//! adapter with the task's `task_type` and the new head in `modules_to_save`, or a bottleneck
//! adapter; each with the tokenizer files and `task.json` (the task and its labels), which
//! serving reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::json;

use crate::models::bert::{Encoder, Task};
use crate::peft::lora::LoraConfig;
use crate::train::config::{Method, TrainConfig};
use crate::train::files::{copy_tokenizer_files, save_tensors, write_json, write_peft_lora};
use crate::train::TrainError;

/// The task file written beside every encoder output.
pub const TASK_FILE: &str = "task.json";

pub fn write_encoder_output(model: &Encoder, config: &TrainConfig) -> Result<PathBuf, TrainError> {
    let dir = config.output_dir.clone();
    let base = config.model.display().to_string();
    match config.method {
        Method::Lora => {
            let tensors = model.trainable.snapshot()?;
            write_adapter_dir(&model.task, &config.lora.lora_config(), tensors, &config.model, &base, &dir)?
        }
        Method::Bottleneck => {
            let tensors = model.trainable.snapshot()?;
            write_bottleneck_dir(&model.task, config.adapter_size, &tensors, &config.model, &base, &dir)?
        }
        _ => write_model_dir(model, &config.model, &dir)?,
    }
    Ok(dir)
}

/// `model`, LoRA folded in, as a transformers directory of its task class (`config.json` with the
/// labels; sentence-transformers' module files for an embedding model), with `task.json` and the
/// tokenizer files of the base in `base_dir`.
pub fn write_model_dir(model: &Encoder, base_dir: &Path, dir: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    let architecture = model.task.architecture(&model.config.model_type);
    let document = model.config.with_task(&architecture, model.task.labels());
    write_json(&dir.join("config.json"), &document)?;
    save_tensors(&dir.join("model.safetensors"), model.merged_tensors()?.into_iter().collect())?;
    if model.task == Task::Embedding {
        write_sentence_transformers_modules(dir)?;
    }
    write_task_file(dir, &model.task)?;
    copy_tokenizer_files(base_dir, dir)
}

/// A LoRA run's trainable `tensors` as a PEFT adapter of `task`'s type (a classification
/// head in `modules_to_save`) on the base `base_name`, with `task.json` and the base's tokenizer
/// files.
pub fn write_adapter_dir(
    task: &Task,
    lora: &LoraConfig,
    tensors: HashMap<String, Tensor>,
    base_dir: &Path,
    base_name: &str,
    dir: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    let heads: &[&str] = if *task == Task::Embedding { &[] } else { &["classifier"] };
    write_peft_lora(dir, lora, base_name, task.peft_task_type(), heads, tensors)?;
    write_task_file(dir, task)?;
    copy_tokenizer_files(base_dir, dir)
}

/// A bottleneck run's trainable `tensors` as a bottleneck adapter, with `task.json` and the base's
/// tokenizer files.
pub fn write_bottleneck_dir(
    task: &Task,
    adapter_size: usize,
    tensors: &HashMap<String, Tensor>,
    base_dir: &Path,
    base_name: &str,
    dir: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    crate::models::bottleneck::save(dir, adapter_size, base_name, tensors)?;
    write_task_file(dir, task)?;
    copy_tokenizer_files(base_dir, dir)
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
