//! `GET /v1/models/{model}/content`: a fine-tuned model or checkpoint as a tar archive, either the
//! PEFT adapter (LoRA; the default) or a full Hugging Face model directory (`format=merged`, or
//! any fully fine-tuned model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::error::{ApiError, ErrorCode};
use super::extract::{ApiQuery, Caller};
use super::state::AppState;
use crate::domain::model_name::parse_fine_tuned_name;
use crate::executor::plan::JobPlan;
use crate::models::config::ModelConfig;
use crate::models::llama::{Adaptation, CausalLm};
use crate::models::weights::load_model_weights;
use crate::peft::adapter::save_adapter;
use crate::storage::tar::{tar_stream, TarEntry};
use crate::storage::StorageError;
use crate::train::output::write_model_dir;

#[derive(Debug, Deserialize)]
pub struct ContentParams {
    format: Option<String>,
}

/// Where the weights to package come from.
enum Source {
    /// The stored output of a finished job (adapter or model files).
    Stored { prefix: String, lora: bool },
    /// A checkpoint's trainable tensors, with the job's plan.
    Checkpoint { prefix: String, plan: Box<JobPlan> },
}

pub async fn download_model(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(name): UrlPath<String>,
    ApiQuery(params): ApiQuery<ContentParams>,
) -> Result<Response, ApiError> {
    let merged = match params.format.as_deref() {
        None | Some("adapter") => false,
        Some("merged") => true,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidQuery,
                format!("format must be adapter or merged, not {other:?}"),
            )
            .with_param("format"))
        }
    };
    let not_found = || {
        ApiError::new(ErrorCode::ModelNotFound, format!("no fine-tuned model or checkpoint {name}")).with_param("model")
    };
    let parsed = parse_fine_tuned_name(&name).ok_or_else(not_found)?;
    let (base, source) = match parsed.checkpoint_step {
        None => {
            let model = state.store.get_model(&caller.project_id, &parsed.model).await?.ok_or_else(not_found)?;
            if merged && (model.method == "bottleneck" || model.method == "prefix") {
                return Err(bottleneck_not_mergeable());
            }
            (model.base_model, Source::Stored { prefix: model.storage_key, lora: model.method == "lora" })
        }
        Some(_) => {
            let found = super::models::find_checkpoint(&state, &caller.project_id, &name).await?;
            let (job, checkpoint) = found.ok_or_else(not_found)?;
            let plan: JobPlan = serde_json::from_str(&job.hyperparameters).map_err(ApiError::internal)?;
            if merged && (plan.adapter_size.is_some() || plan.prefix_length.is_some()) {
                return Err(bottleneck_not_mergeable());
            }
            (job.model, Source::Checkpoint { prefix: checkpoint.storage_key, plan: Box::new(plan) })
        }
    };
    let work = tempfile::tempdir().map_err(ApiError::internal)?;
    // The base is read for checkpoints and merges only (a stored model or adapter is packaged as
    // is); it comes from the cache serving uses, so a fetched or merged base is made once.
    let base_dir = match &source {
        Source::Stored { lora: false, .. } => None,
        Source::Stored { lora: true, .. } if !merged => None,
        _ => Some(
            state
                .inference
                .model_dir(Some(&caller.project_id), &base)
                .await
                .map_err(|m| ApiError::new(ErrorCode::ModelNotSupported, m).with_param("model"))?,
        ),
    };
    let mut kind = Architecture::Decoder;
    if let Some(dir) = base_dir.clone() {
        kind = tokio::task::spawn_blocking(move || {
            if crate::models::bert::config::is_encoder_dir(&dir) {
                Architecture::Encoder
            } else if crate::models::t5::config::is_seq2seq_dir(&dir) {
                Architecture::Seq2Seq
            } else {
                Architecture::Decoder
            }
        })
        .await
        .map_err(ApiError::internal)?;
    }
    let prefix = match &source {
        Source::Stored { prefix, .. } | Source::Checkpoint { prefix, .. } => prefix.clone(),
    };
    let src = work.path().join("source");
    match fetch_stored(&state, &prefix, &src).await {
        Ok(()) => {}
        // A concurrent `DELETE /v1/models/{model}` removes the row, then the files: what vanished
        // under this request is a model that no longer exists. Files missing behind a row that is
        // still there are a fault of ours.
        Err(StorageError::NotFound(_)) if !still_exists(&state, &caller, &name).await? => return Err(not_found()),
        Err(err) => return Err(err.into()),
    }
    let out = work.path().join("out");
    let base_name = base.clone();
    let dir = tokio::task::spawn_blocking(move || match (base_dir.as_deref(), kind) {
        (Some(base_dir), Architecture::Seq2Seq) => package_t5(&source, &src, &out, base_dir, &base_name, merged),
        (Some(base_dir), Architecture::Encoder) => package_encoder(&source, &src, &out, base_dir, &base_name, merged),
        _ => package(&source, &src, &out, base_dir.as_deref(), &base_name, merged).map_err(Into::into),
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::internal(anyhow::anyhow!("packaging the model failed: {e}")))?;
    archive(dir, work, &name).await
}

/// Downloads every object under `prefix` into `dir`; nothing there at all counts as not found.
async fn fetch_stored(state: &AppState, prefix: &str, dir: &Path) -> Result<(), StorageError> {
    let names = state.storage.list(prefix).await?;
    if names.is_empty() {
        return Err(StorageError::NotFound(format!("{prefix}/*")));
    }
    crate::executor::download_files(state.storage.as_ref(), prefix, &names, dir).await
}

/// Whether the fine-tuned model or checkpoint `name` is still recorded for the caller.
async fn still_exists(state: &AppState, caller: &Caller, name: &str) -> Result<bool, ApiError> {
    let Some(parsed) = parse_fine_tuned_name(name) else { return Ok(false) };
    Ok(match parsed.checkpoint_step {
        None => state.store.get_model(&caller.project_id, &parsed.model).await?.is_some(),
        Some(_) => super::models::find_checkpoint(state, &caller.project_id, name).await?.is_some(),
    })
}

fn bottleneck_not_mergeable() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidQuery,
        "bottleneck and prefix adapters add layers or positions and cannot be merged into the base; download \
         format=adapter",
    )
    .with_param("format")
}

fn copy_tokenizer(base_dir: &Path, dir: &Path) -> candle_core::Result<()> {
    for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        if base_dir.join(file).exists() {
            std::fs::copy(base_dir.join(file), dir.join(file))?;
        }
    }
    Ok(())
}

/// Writes the directory to archive and returns it.
fn package(
    source: &Source,
    src: &Path,
    out: &Path,
    base_dir: Option<&Path>,
    base: &str,
    merged: bool,
) -> candle_core::Result<PathBuf> {
    let base_dir = || base_dir.ok_or_else(|| candle_core::Error::Msg("the base model was not fetched".into()));
    let adapter_dir = match source {
        Source::Stored { lora: false, .. } => return Ok(src.to_path_buf()),
        Source::Stored { lora: true, .. } if !merged => return Ok(src.to_path_buf()),
        Source::Stored { lora: true, .. } => src.to_path_buf(),
        Source::Checkpoint { plan, .. } => {
            let base_dir = base_dir()?;
            let trainable = candle_core::safetensors::load(src.join("trainable.safetensors"), &Device::Cpu)?;
            if let Some(length) = plan.prefix_length {
                let config = ModelConfig::from_file(&base_dir.join("config.json"))
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let table =
                    crate::models::prefix::table_from_trainables(&config, length, plan.prefix_projection, trainable)?;
                let dir = out.join("adapter");
                crate::models::prefix::save(&dir, &config, length, base, &table)?;
                copy_tokenizer(base_dir, &dir)?;
                return Ok(dir);
            }
            if let Some(size) = plan.adapter_size {
                let dir = out.join("adapter");
                crate::models::bottleneck::save(&dir, size, base, &trainable)?;
                copy_tokenizer(base_dir, &dir)?;
                return Ok(dir);
            }
            let Some(lora) = &plan.lora else {
                return write_full_checkpoint(trainable, out, base_dir);
            };
            let adapter_dir = out.join("adapter");
            let tensors: HashMap<String, Tensor> = trainable
                .into_iter()
                .map(|(k, v)| if k.starts_with("base_model.") { (k, v) } else { (format!("base_model.model.{k}"), v) })
                .collect();
            let config = ModelConfig::from_file(&base_dir.join("config.json"))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let converted = lora.lora_config_for(&config).map_err(candle_core::Error::Msg)?;
            save_adapter(&adapter_dir, &converted, base, &config.linear_modules(), &tensors, lora.train_norms)?;
            for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
                if base_dir.join(file).exists() {
                    std::fs::copy(base_dir.join(file), adapter_dir.join(file))?;
                }
            }
            adapter_dir
        }
    };
    if !merged {
        return Ok(adapter_dir);
    }
    let merged_dir = out.join("merged");
    crate::train::output::merge_adapter_dir(base_dir()?, &adapter_dir, &merged_dir)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(merged_dir)
}

/// What a base model is, for packaging its fine-tuned models.
#[derive(Debug, Clone, Copy)]
enum Architecture {
    Decoder,
    /// BERT family.
    Encoder,
    /// T5.
    Seq2Seq,
}

/// The weights to build a model from when packaging an encoder or T5 download; `None` when the
/// stored files (a full model, or an adapter not asked merged) are the download as they are.
fn weights_to_build(source: &Source, src: &Path, base_dir: &Path, merged: bool) -> Option<crate::serving::Weights> {
    use crate::serving::Weights;
    match source {
        Source::Stored { lora: true, .. } if merged => {
            Some(Weights::Adapter { base: base_dir.into(), adapter: src.into() })
        }
        Source::Stored { .. } => None,
        Source::Checkpoint { plan, .. } => {
            Some(Weights::Checkpoint { base: base_dir.into(), dir: src.into(), plan: plan.clone() })
        }
    }
}

/// [`package`] for an encoder (BERT family): a checkpoint's LoRA or bottleneck adapter as the
/// job's final one would be written, anything merged (or a full checkpoint) as a directory of the
/// task's transformers class; each with `task.json`.
fn package_encoder(
    source: &Source,
    src: &Path,
    out: &Path,
    base_dir: &Path,
    base: &str,
    merged: bool,
) -> anyhow::Result<PathBuf> {
    use crate::train::encoder::output;
    let task_of =
        |dir: &Path| crate::train::encoder::read_task_file(dir).context("the fine-tuned encoder has no task.json");
    // A checkpoint's adapter is written from its tensors and task alone.
    if let (Source::Checkpoint { plan, .. }, false) = (source, merged) {
        let dir = out.join("adapter");
        let read = || -> anyhow::Result<_> {
            Ok((task_of(src)?, candle_core::safetensors::load(src.join("trainable.safetensors"), &Device::Cpu)?))
        };
        if let Some(lora) = &plan.lora {
            let (task, trainable) = read()?;
            output::write_adapter_dir(&task, &lora.lora_config(), trainable, base_dir, base, &dir)?;
            return Ok(dir);
        }
        if let Some(size) = plan.adapter_size {
            let (task, trainable) = read()?;
            output::write_bottleneck_dir(&task, size, &trainable, base_dir, base, &dir)?;
            return Ok(dir);
        }
    }
    let Some(weights) = weights_to_build(source, src, base_dir, merged) else { return Ok(src.to_path_buf()) };
    let (model, _) = crate::serving::encoder::load_model(&weights, |dir, _| task_of(dir), &Device::Cpu)?;
    let dir = out.join("model");
    output::write_model_dir(&model, base_dir, &dir)?;
    Ok(dir)
}

/// [`package`] for an encoder-decoder (T5): a checkpoint's LoRA as a PEFT `SEQ_2_SEQ_LM` adapter,
/// anything merged (or a full checkpoint) as a `T5ForConditionalGeneration` directory.
fn package_t5(
    source: &Source,
    src: &Path,
    out: &Path,
    base_dir: &Path,
    base: &str,
    merged: bool,
) -> anyhow::Result<PathBuf> {
    if let (Source::Checkpoint { plan, .. }, false) = (source, merged) {
        if let Some(lora) = &plan.lora {
            let trainable = candle_core::safetensors::load(src.join("trainable.safetensors"), &Device::Cpu)?;
            let dir = out.join("adapter");
            crate::train::seq2seq::write_adapter_dir(&lora.lora_config(), trainable, base_dir, base, &dir)?;
            return Ok(dir);
        }
    }
    let Some(weights) = weights_to_build(source, src, base_dir, merged) else { return Ok(src.to_path_buf()) };
    let (model, _) = crate::serving::seq2seq::load(weights, &Device::Cpu)?;
    let dir = out.join("model");
    crate::train::seq2seq::write_model_dir(&model, base_dir, &dir)?;
    Ok(dir)
}

fn base_model(dir: &Path, adaptation: Adaptation<'_>) -> candle_core::Result<CausalLm> {
    let config =
        ModelConfig::from_file(&dir.join("config.json")).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    CausalLm::new(config, load_model_weights(dir, DType::F32, &Device::Cpu)?, adaptation)
}

/// A fully fine-tuned checkpoint holds every weight: write them as a model directory.
fn write_full_checkpoint(
    trainable: HashMap<String, Tensor>,
    out: &Path,
    base_dir: &Path,
) -> candle_core::Result<PathBuf> {
    let model = base_model(base_dir, Adaptation::Full)?;
    model.trainable.restore(&trainable)?;
    let dir = out.join("model");
    write_model_dir(&dir, &model, model.base_tensors()?, base_dir)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(dir)
}

/// Streams the files of `dir` as `<name>.tar`; the temporary directory lives until the stream ends.
async fn archive(dir: PathBuf, work: tempfile::TempDir, name: &str) -> Result<Response, ApiError> {
    let mut entries = Vec::new();
    let mut files = tokio::fs::read_dir(&dir).await.map_err(ApiError::internal)?;
    let mut paths = Vec::new();
    while let Some(entry) = files.next_entry().await.map_err(ApiError::internal)? {
        if entry.file_type().await.map_err(ApiError::internal)?.is_file() {
            paths.push(entry.path());
        }
    }
    paths.sort();
    for path in paths {
        let file = tokio::fs::File::open(&path).await.map_err(ApiError::internal)?;
        let size = file.metadata().await.map_err(ApiError::internal)?.len();
        let entry_name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        entries.push(TarEntry { name: entry_name, size, body: Box::pin(tokio_util::io::ReaderStream::new(file)) });
    }
    let stream = futures::StreamExt::chain(
        tar_stream(entries, crate::ids::unix_now().max(0) as u64),
        futures::stream::once(async move {
            drop(work);
            Ok(bytes::Bytes::new())
        }),
    );
    let filename = name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_");
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{filename}.tar\"")),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
