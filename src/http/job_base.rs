//! The base-model checks of `POST /v1/fine_tuning/jobs`: the model must be trainable here (a
//! catalog base, or a fine-tuned model whose weights can be made whole), its quantization must
//! fit, and what kind of model it is decides which data and training types it takes.

use serde_json::Value;

use super::error::{ApiError, ErrorCode};
use super::extract::Caller;
use super::state::AppState;
use crate::catalog::{Catalog, ModelSource};
use crate::domain::model_name::{parse_fine_tuned_name, root_base_model};

pub(super) fn unsupported_model(why: String) -> ApiError {
    ApiError::new(ErrorCode::ModelNotSupported, why).with_param("model")
}

/// A job may continue from a fine-tuned model of the caller's project, as OpenAI allows, when
/// that model's weights can be made whole: a fully fine-tuned model, or a LoRA adapter (merged
/// into its base). The base at the root must still be trainable here.
pub(super) async fn check_fine_tuned_start(state: &AppState, caller: &Caller, name: &str) -> Result<(), ApiError> {
    let unknown = || {
        ApiError::new(
            ErrorCode::UnknownModel,
            format!("no fine-tuned model named {name:?} in this project; GET /v1/models lists them"),
        )
        .with_param("model")
    };
    let parsed = parse_fine_tuned_name(name).ok_or_else(unknown)?;
    if parsed.checkpoint_step.is_some() {
        return Err(unsupported_model(format!(
            "{name} is a checkpoint; a job starts from a base model or from a job's fine-tuned model ({})",
            parsed.model
        )));
    }
    let model = state.store.get_model(&caller.project_id, &parsed.model).await?.ok_or_else(unknown)?;
    if model.method != "lora" && model.method != "full" {
        return Err(unsupported_model(format!(
            "{name} is a {} adapter, which adds layers or positions that cannot be merged into the base weights; \
             a job starts from a base model, a LoRA model or a fully fine-tuned model",
            model.method
        )));
    }
    check_base_model(&state.catalog, root_base_model(name))
}

/// The model must be a base model this deployment can train today.
pub(super) fn check_base_model(catalog: &Catalog, name: &str) -> Result<(), ApiError> {
    const TRAINABLE: &str = "only base models in a Hugging Face directory or a GGUF file (`path:`, `storage:` or \
                             `gguf:` in the model catalog, or `--base-model NAME=PATH`) are trainable today";
    let Some(base) = catalog.get(name) else {
        return Err(ApiError::new(
            ErrorCode::UnknownModel,
            format!("no base model named {name:?}; GET /v1/models lists them"),
        )
        .with_param("model"));
    };
    match &base.source {
        ModelSource::Directory(_) | ModelSource::Storage(_) | ModelSource::Gguf(_) => Ok(()),
        ModelSource::Hub(_) => {
            Err(unsupported_model(format!("base model {name:?} is a Hugging Face Hub model; {TRAINABLE}")))
        }
    }
}

/// QLoRA: the requested quantization must fit the base model's dimensions (checked here when the
/// base is on this machine; otherwise when the job is validated).
pub(super) async fn check_quantization(catalog: &Catalog, name: &str, hyperparameters: &Value) -> Result<(), ApiError> {
    let Some(q) = hyperparameters.get("quantization").and_then(Value::as_str) else { return Ok(()) };
    let Some(quantization) = crate::models::common::quantized::Quantization::parse(q) else { return Ok(()) };
    let config = match catalog.get(name).map(|b| b.source.clone()) {
        Some(ModelSource::Directory(dir)) => tokio::task::spawn_blocking(move || {
            crate::models::config::ModelConfig::from_file(&dir.join("config.json")).ok()
        })
        .await
        .ok()
        .flatten(),
        Some(ModelSource::Gguf(file)) => tokio::task::spawn_blocking(move || {
            let mut reader = std::fs::File::open(file).ok()?;
            let content = candle_core::quantized::gguf_file::Content::read(&mut reader).ok()?;
            crate::models::config::ModelConfig::from_json(crate::models::gguf::config_json(&content, &mut reader).ok()?)
                .ok()
        })
        .await
        .ok()
        .flatten(),
        _ => None,
    };
    match config.map(|c| crate::models::common::quantized::check_fits(&c, quantization)) {
        Some(Err(why)) => Err(ApiError::new(ErrorCode::InvalidHyperparameters, why)
            .with_param("method.supervised.hyperparameters.quantization")),
        _ => Ok(()),
    }
}

/// What kind of model a base is, when its files are on this machine to tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BaseKind {
    Decoder,
    Encoder,
    /// An encoder-decoder (T5).
    Seq2Seq,
    /// Stored elsewhere (the executor checks the data against it).
    Unknown,
}

impl BaseKind {
    /// What the base is called in messages, when it is not a decoder.
    pub(super) fn non_decoder(self) -> Option<&'static str> {
        match self {
            Self::Encoder => Some("encoder"),
            Self::Seq2Seq => Some("encoder-decoder (T5)"),
            _ => None,
        }
    }
}

/// The training types an encoder or encoder-decoder base cannot use, refused before any work.
pub(super) fn check_training_type(kind: BaseKind, hyperparameters: &Value) -> Result<(), ApiError> {
    let requested = hyperparameters.get("training_type").and_then(Value::as_str).unwrap_or("lora");
    let allowed: &[&str] = match kind {
        BaseKind::Encoder => &["lora", "full", "bottleneck"],
        BaseKind::Seq2Seq => &["lora", "full"],
        _ => return Ok(()),
    };
    if allowed.contains(&requested) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InvalidHyperparameters,
        format!(
            "training_type {requested} does not apply to an {} base; use {}",
            kind.non_decoder().unwrap_or_default(),
            allowed.join(", ")
        ),
    )
    .with_param("method.supervised.hyperparameters.training_type"))
}

pub(super) async fn base_kind(catalog: &Catalog, name: &str) -> BaseKind {
    match catalog.get(name).map(|b| b.source.clone()) {
        Some(ModelSource::Directory(dir)) => {
            let kind = tokio::task::spawn_blocking(move || {
                if crate::models::bert::config::is_encoder_dir(&dir) {
                    BaseKind::Encoder
                } else if crate::models::t5::config::is_seq2seq_dir(&dir) {
                    BaseKind::Seq2Seq
                } else {
                    BaseKind::Decoder
                }
            })
            .await;
            kind.unwrap_or(BaseKind::Unknown)
        }
        Some(ModelSource::Gguf(_)) => BaseKind::Decoder,
        _ => BaseKind::Unknown,
    }
}
