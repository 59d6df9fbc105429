//! `POST /v1/fine_tuning/jobs`: checks the request field by field (every error names its
//! `param`) and records the job as `validating_files`. Nothing is stored when a check fails.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{ApiJson, Caller};
use super::job_base::{
    base_kind, check_base_model, check_fine_tuned_start, check_quantization, check_training_type, unsupported_model,
    BaseKind,
};
use super::jobs::{render_job, JobObject};
use super::state::AppState;
use crate::db::{FileRecord, JobRecord, NewEvent};
use crate::domain::file::FilePurpose;
use crate::domain::hyperparameters::{HyperparametersRequest, MethodType};
use crate::domain::job::JobStatus;
use crate::domain::model_name::{is_valid_suffix, root_base_model, MAX_SUFFIX_LEN};
use crate::ids::{new_id, unix_now};

const FIELDS: [&str; 8] =
    ["model", "training_file", "validation_file", "method", "hyperparameters", "suffix", "seed", "metadata"];
/// Dataset formats a causal language model can be fine-tuned on.
const TRAINABLE_FORMATS: [&str; 3] = ["chat", "prompt_completion", "text"];
/// Dataset formats an encoder (BERT family) is fine-tuned on; the format picks the task.
const ENCODER_FORMATS: [&str; 3] = ["classification", "token_classification", "embedding"];
const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;

/// A request whose fields are each well-formed (references to models and files unchecked).
#[derive(Debug, PartialEq)]
struct JobRequest {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    method: MethodType,
    /// The hyperparameters object as requested (`{}` when none were given).
    hyperparameters: Value,
    suffix: Option<String>,
    seed: Option<i64>,
    metadata: Option<Map<String, Value>>,
}

pub async fn create_job(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Json<JobObject>, ApiError> {
    let request = parse_request(body)?;
    if request.model.starts_with("ft:") {
        check_fine_tuned_start(&state, &caller, &request.model).await?;
    } else {
        check_base_model(&state.catalog, &request.model)?;
    }
    check_quantization(&state.catalog, root_base_model(&request.model), &request.hyperparameters).await?;
    let kind = base_kind(&state.catalog, root_base_model(&request.model)).await;
    if let Some(what) = kind.non_decoder() {
        if request.model.starts_with("ft:") && kind == BaseKind::Encoder {
            return Err(unsupported_model(format!(
                "{} is a fine-tuned {what}; continuing from one is not supported yet: start from its base model {}",
                request.model,
                root_base_model(&request.model)
            )));
        }
        if request.method == MethodType::Dpo {
            return Err(unsupported_model(format!(
                "base model {} is an {what}; dpo trains decoder (causal language) models",
                request.model
            )));
        }
        check_training_type(kind, &request.hyperparameters)?;
    }
    let training =
        find_training_data(&state, &caller, &request.training_file, "training_file", request.method, kind).await?;
    if let Some(id) = &request.validation_file {
        let validation = find_training_data(&state, &caller, id, "validation_file", request.method, kind).await?;
        if validation.format != training.format {
            return Err(ApiError::new(
                ErrorCode::InvalidFileFormat,
                format!(
                    "the validation file is a {} dataset but the training file is {}; they must match",
                    validation.format.unwrap_or_default(),
                    training.format.unwrap_or_default()
                ),
            )
            .with_param("validation_file"));
        }
    }
    let kind = request.method.as_str();
    let method = json!({"type": kind, kind: {"hyperparameters": request.hyperparameters}});
    let job = JobRecord {
        id: new_id("ftjob"),
        project_id: caller.project_id,
        model: request.model,
        training_file: request.training_file,
        validation_file: request.validation_file,
        status: JobStatus::ValidatingFiles.as_str().into(),
        method: method.to_string(),
        hyperparameters: request.hyperparameters.to_string(),
        suffix: request.suffix,
        // OpenAI's seeds are 32-bit non-negative integers.
        seed: request.seed.unwrap_or_else(|| i64::from(rand::random::<u32>() >> 1)),
        metadata: request.metadata.map(|m| Value::Object(m).to_string()),
        fine_tuned_model: None,
        trained_tokens: None,
        error: None,
        result_files: "[]".into(),
        step: 0,
        total_steps: None,
        epoch: None,
        estimated_finish: None,
        requested_action: None,
        lease_owner: None,
        lease_expires_at: None,
        attempts: 0,
        executor: None,
        created_at: unix_now(),
        started_at: None,
        finished_at: None,
    };
    let event = NewEvent::message(format!("Validating training file: {}", job.training_file));
    state.store.insert_job(&job, event).await?;
    Ok(Json(render_job(&state, job).await?))
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message).with_param(param)
}

/// Every check that needs neither the database nor the catalog.
fn parse_request(mut body: Map<String, Value>) -> Result<JobRequest, ApiError> {
    if let Some(unknown) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(unknown, format!("unknown parameter `{unknown}`; accepted: {}", FIELDS.join(", "))));
    }
    let mut take = |name: &str| body.remove(name).filter(|v| !v.is_null());
    let model = required_string(take("model"), "model")?;
    let training_file = required_string(take("training_file"), "training_file")?;
    let validation_file = take("validation_file").map(|v| required_string(Some(v), "validation_file")).transpose()?;
    let (method, from_method) = parse_method(take("method"))?;
    let legacy = take("hyperparameters");
    let nested = format!("method.{}.hyperparameters", method.as_str());
    let hyperparameters = match (from_method, legacy) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                ErrorCode::ConflictingHyperparameters,
                format!("give hyperparameters either in `{nested}` or (deprecated) at the top level, not both"),
            )
            .with_param("hyperparameters"))
        }
        (Some(h), None) => check_hyperparameters(h, &nested, method)?,
        (None, Some(h)) => check_hyperparameters(h, "hyperparameters", method)?,
        (None, None) => check_hyperparameters(json!({}), &nested, method)?,
    };
    let suffix = take("suffix").map(|v| required_string(Some(v), "suffix")).transpose()?;
    if suffix.as_deref().is_some_and(|s| !is_valid_suffix(s)) {
        return Err(invalid("suffix", format!("`suffix` must be 1 to {MAX_SUFFIX_LEN} of A-Z a-z 0-9 - _")));
    }
    let seed = match take("seed") {
        None => None,
        Some(v) => {
            Some(v.as_i64().filter(|s| *s >= 0).ok_or_else(|| invalid("seed", "`seed` must be an integer >= 0"))?)
        }
    };
    let metadata = take("metadata").map(check_metadata).transpose()?;
    Ok(JobRequest { model, training_file, validation_file, method, hyperparameters, suffix, seed, metadata })
}

fn required_string(value: Option<Value>, param: &str) -> Result<String, ApiError> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        None => Err(invalid(param, format!("`{param}` is required"))),
        Some(_) => Err(invalid(param, format!("`{param}` must be a non-empty string"))),
    }
}

/// The method's type and hyperparameters: `{"type": "supervised" | "dpo", <type>: {"hyperparameters": ...}}`.
fn parse_method(method: Option<Value>) -> Result<(MethodType, Option<Value>), ApiError> {
    let Some(method) = method else { return Ok((MethodType::Supervised, None)) };
    let Value::Object(mut method) = method else {
        return Err(invalid("method", "`method` must be an object like {\"type\": \"supervised\"}"));
    };
    let kind = match method.get("type").and_then(Value::as_str) {
        Some(kind @ "reinforcement") => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMethod,
                format!("method `{kind}` is not supported yet; `supervised` and `dpo` fine-tuning are available"),
            )
            .with_param("method.type"))
        }
        Some(kind) => MethodType::parse(kind)
            .ok_or_else(|| invalid("method.type", "`method.type` must be \"supervised\" or \"dpo\""))?,
        None => return Err(invalid("method.type", "`method.type` must be \"supervised\" or \"dpo\"")),
    };
    let name = kind.as_str();
    if let Some(other) = method.keys().find(|k| *k != "type" && *k != name) {
        return Err(invalid(&format!("method.{other}"), format!("unknown parameter `method.{other}`")));
    }
    let settings = match method.remove(name) {
        None | Some(Value::Null) => return Ok((kind, None)),
        Some(Value::Object(settings)) => settings,
        Some(_) => return Err(invalid(&format!("method.{name}"), format!("`method.{name}` must be an object"))),
    };
    if let Some(other) = settings.keys().find(|k| *k != "hyperparameters") {
        let param = format!("method.{name}.{other}");
        return Err(invalid(&param, format!("unknown parameter `{param}`")));
    }
    Ok((kind, settings.get("hyperparameters").filter(|h| !h.is_null()).cloned()))
}

/// Parses and range-checks hyperparameters; returns them as requested.
fn check_hyperparameters(value: Value, param: &str, method: MethodType) -> Result<Value, ApiError> {
    let parsed: HyperparametersRequest = serde_json::from_value(value.clone()).map_err(|e| {
        ApiError::new(ErrorCode::InvalidHyperparameters, format!("invalid `{param}`: {e}")).with_param(param)
    })?;
    parsed.validate_for(method).map_err(|bad| {
        ApiError::new(ErrorCode::InvalidHyperparameters, bad.message).with_param(format!("{param}.{}", bad.field))
    })?;
    Ok(value)
}

fn check_metadata(value: Value) -> Result<Map<String, Value>, ApiError> {
    let Value::Object(metadata) = value else {
        return Err(invalid("metadata", "`metadata` must be an object of string values"));
    };
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(invalid("metadata", format!("`metadata` holds at most {MAX_METADATA_PAIRS} pairs")));
    }
    for (key, value) in &metadata {
        if key.is_empty() || key.chars().count() > MAX_METADATA_KEY {
            return Err(invalid("metadata", format!("metadata keys must be 1 to {MAX_METADATA_KEY} characters")));
        }
        if value.as_str().is_none_or(|v| v.chars().count() > MAX_METADATA_VALUE) {
            return Err(invalid(
                &format!("metadata.{key}"),
                format!("metadata values must be strings of at most {MAX_METADATA_VALUE} characters"),
            ));
        }
    }
    Ok(metadata)
}

/// A `fine-tune` file of the caller's project in a format the method and the base's kind accept.
async fn find_training_data(
    state: &AppState,
    caller: &Caller,
    id: &str,
    param: &str,
    method: MethodType,
    kind: BaseKind,
) -> Result<FileRecord, ApiError> {
    let file = state
        .store
        .get_file(&caller.project_id, id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownFile, format!("no such file: {id}")).with_param(param))?;
    if file.purpose != FilePurpose::FineTune.as_str() {
        return Err(ApiError::new(
            ErrorCode::InvalidPurpose,
            format!("file {id} has purpose {}; training needs a `fine-tune` file", file.purpose),
        )
        .with_param(param));
    }
    let format = file.format.as_deref().unwrap_or("unknown");
    let accepted: Vec<&str> = match (method, kind) {
        (MethodType::Dpo, _) => vec!["preference"],
        (MethodType::Supervised, BaseKind::Decoder) => TRAINABLE_FORMATS.to_vec(),
        (MethodType::Supervised, BaseKind::Encoder) => ENCODER_FORMATS.to_vec(),
        (MethodType::Supervised, BaseKind::Seq2Seq) => vec!["prompt_completion"],
        (MethodType::Supervised, BaseKind::Unknown) => {
            TRAINABLE_FORMATS.iter().chain(&ENCODER_FORMATS).copied().collect()
        }
    };
    if !accepted.contains(&format) {
        let accepted = accepted.join(", ");
        let why = match kind {
            BaseKind::Encoder => format!("the base model is an encoder, which trains on {accepted}"),
            BaseKind::Seq2Seq => {
                format!("the base model is an encoder-decoder (T5), which trains on {accepted} (input → target)")
            }
            BaseKind::Decoder if ENCODER_FORMATS.contains(&format) => {
                format!("the base model is a decoder (causal language model), which trains on {accepted}")
            }
            _ => format!("{} fine-tuning needs {accepted}", method.as_str()),
        };
        return Err(ApiError::new(ErrorCode::InvalidFileFormat, format!("file {id} is a {format} dataset; {why}"))
            .with_param(param));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<JobRequest, ApiError> {
        parse_request(body.as_object().unwrap().clone())
    }

    /// The code and param of the error a body is rejected with.
    fn rejection(body: Value) -> (ErrorCode, String) {
        let err = parse(body).unwrap_err();
        (err.code(), err.param().unwrap_or_default().to_string())
    }

    fn base() -> Value {
        json!({"model": "m", "training_file": "file-1"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut body = base();
        body[field] = value;
        body
    }

    #[test]
    fn a_minimal_request_takes_defaults() {
        let request = parse(json!({"model": "m", "training_file": "file-1"})).unwrap();
        assert_eq!(request.hyperparameters, json!({}));
        assert_eq!((request.suffix, request.seed, request.metadata), (None, None, None));
    }

    #[test]
    fn both_hyperparameter_forms_are_accepted_as_requested() {
        let hyper = json!({"n_epochs": 2, "lora": {"r": 8}});
        let legacy = parse(with("hyperparameters", hyper.clone())).unwrap();
        assert_eq!(legacy.hyperparameters, hyper);
        let method = json!({"type": "supervised", "supervised": {"hyperparameters": hyper.clone()}});
        assert_eq!(parse(with("method", method)).unwrap().hyperparameters, hyper);
        let bare = parse(with("method", json!({"type": "supervised"}))).unwrap();
        assert_eq!(bare.hyperparameters, json!({}));
        let dpo = json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "loss": "ipo"}}});
        let dpo = parse(with("method", dpo)).unwrap();
        assert_eq!((dpo.method, dpo.hyperparameters), (MethodType::Dpo, json!({"beta": 0.2, "loss": "ipo"})));
    }

    #[test]
    fn each_malformed_field_is_named() {
        use ErrorCode::*;
        let cases = [
            (json!({"training_file": "f"}), (InvalidRequest, "model")),
            (json!({"model": "m"}), (InvalidRequest, "training_file")),
            (with("integrations", json!([])), (InvalidRequest, "integrations")),
            (with("validation_file", json!(3)), (InvalidRequest, "validation_file")),
            (with("suffix", json!("a:b")), (InvalidRequest, "suffix")),
            (with("suffix", json!("x".repeat(65))), (InvalidRequest, "suffix")),
            (with("seed", json!(-1)), (InvalidRequest, "seed")),
            (with("seed", json!(1.5)), (InvalidRequest, "seed")),
            (with("metadata", json!({"k": 1})), (InvalidRequest, "metadata.k")),
            (with("metadata", json!(["k"])), (InvalidRequest, "metadata")),
            (with("method", json!({"type": "dpo", "supervised": {}})), (InvalidRequest, "method.supervised")),
            (
                with("method", json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}})),
                (InvalidHyperparameters, "method.dpo.hyperparameters.beta"),
            ),
            (
                with("method", json!({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}})),
                (InvalidHyperparameters, "method.supervised.hyperparameters.beta"),
            ),
            (with("method", json!({"type": "reinforcement"})), (UnsupportedMethod, "method.type")),
            (with("method", json!({"type": "magic"})), (InvalidRequest, "method.type")),
            (with("method", json!({"type": "supervised", "dpo": {}})), (InvalidRequest, "method.dpo")),
            (with("hyperparameters", json!({"epochs": 3})), (InvalidHyperparameters, "hyperparameters")),
            (with("hyperparameters", json!({"n_epochs": 0})), (InvalidHyperparameters, "hyperparameters.n_epochs")),
        ];
        for (body, (code, param)) in cases {
            assert_eq!(rejection(body.clone()), (code, param.to_string()), "{body}");
        }
        let nested =
            with("method", json!({"type": "supervised", "supervised": {"hyperparameters": {"lora": {"r": 0}}}}));
        assert_eq!(rejection(nested), (InvalidHyperparameters, "method.supervised.hyperparameters.lora".to_string()));
    }

    #[test]
    fn hyperparameters_in_both_places_conflict() {
        let mut body = with("hyperparameters", json!({"n_epochs": 1}));
        body["method"] = json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}});
        assert_eq!(rejection(body).0, ErrorCode::ConflictingHyperparameters);
    }

    #[test]
    fn metadata_is_bounded() {
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(rejection(with("metadata", Value::Object(many))).1, "metadata");
        assert_eq!(rejection(with("metadata", json!({"k": "v".repeat(513)}))).1, "metadata.k");
        assert_eq!(rejection(with("metadata", json!({"k".repeat(65): "v"}))).1, "metadata");
        assert!(parse(with("metadata", json!({"team": "search"}))).is_ok());
    }
}
