//! The fine-tuning jobs API (OpenAI-compatible): the job object, listing, retrieval and the
//! client's actions (cancel, pause, resume). Creation is in `jobs_create`, events and checkpoints
//! in `job_events`. Handlers only record what the client asked; executors move jobs along.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{ApiQuery, Caller};
use super::state::AppState;
use crate::db::{DbError, JobRecord, NewEvent};
use crate::domain::hyperparameters::{MethodType, DPO_HYPERPARAMETERS};
use crate::domain::job::{JobAction, JobStatus};

/// Items per page of jobs, events and checkpoints unless `limit` says otherwise.
const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

/// OpenAI's `fine_tuning.job`, plus `progress` and `queue_position`.
#[derive(Debug, Serialize)]
pub struct JobObject {
    id: String,
    object: &'static str,
    created_at: i64,
    finished_at: Option<i64>,
    model: String,
    fine_tuned_model: Option<String>,
    organization_id: String,
    status: String,
    training_file: String,
    validation_file: Option<String>,
    result_files: Value,
    trained_tokens: Option<i64>,
    error: Value,
    hyperparameters: Value,
    method: Value,
    seed: i64,
    suffix: Option<String>,
    metadata: Value,
    estimated_finish: Option<i64>,
    integrations: Vec<Value>,
    user_provided_suffix: Option<String>,
    progress: Progress,
    /// 1-based place in the queue; null unless `queued`.
    queue_position: Option<i64>,
    /// The host and device that ran (or runs) the job, e.g. `gpu-node-1 (cuda:0)`.
    executor: Option<String>,
}

#[derive(Debug, Serialize)]
struct Progress {
    step: i64,
    total_steps: Option<i64>,
    epoch: Option<f64>,
}

/// The API's view of a job row.
pub(super) async fn render_job(state: &AppState, job: JobRecord) -> Result<JobObject, ApiError> {
    let queue_position = match job.status() {
        JobStatus::Queued => state.store.queue_position(&job.id).await?,
        _ => None,
    };
    let mut method = parse_column("method", &job.method)?;
    let kind = MethodType::of(&method);
    let hyperparameters = shown_hyperparameters(&parse_column("hyperparameters", &job.hyperparameters)?, kind);
    // Both places show the same (resolved once validated) values, as OpenAI's jobs do.
    if let Some(settings) = method.get_mut(kind.as_str()).and_then(Value::as_object_mut) {
        settings.insert("hyperparameters".into(), hyperparameters.clone());
    }
    let optional = |column, text: &Option<String>| text.as_deref().map(|t| parse_column(column, t)).transpose();
    Ok(JobObject {
        object: "fine_tuning.job",
        created_at: job.created_at,
        finished_at: job.finished_at,
        fine_tuned_model: job.fine_tuned_model,
        organization_id: job.project_id,
        status: job.status,
        training_file: job.training_file,
        validation_file: job.validation_file,
        result_files: parse_column("result_files", &job.result_files)?,
        trained_tokens: job.trained_tokens,
        error: optional("error", &job.error)?.unwrap_or(Value::Null),
        hyperparameters,
        method,
        seed: job.seed,
        user_provided_suffix: job.suffix.clone(),
        suffix: job.suffix,
        metadata: optional("metadata", &job.metadata)?.unwrap_or(Value::Null),
        estimated_finish: job.estimated_finish,
        integrations: Vec::new(),
        progress: Progress { step: job.step, total_steps: job.total_steps, epoch: job.epoch },
        queue_position,
        executor: job.executor,
        id: job.id,
        model: job.model,
    })
}

/// OpenAI's hyperparameters, then ours (the fields of `HyperparametersRequest`).
const OPENAI_HYPERPARAMETERS: [&str; 3] = ["n_epochs", "batch_size", "learning_rate_multiplier"];
const OUR_HYPERPARAMETERS: [&str; 19] = [
    "router_aux_loss_coef",
    "training_type",
    "adapter_size",
    "prefix_length",
    "prefix_projection",
    "quantization",
    "lora",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "max_seq_len",
    "packing",
    "gradient_checkpointing",
    "eval_interval",
    "early_stopping",
    "n_checkpoints",
];

/// OpenAI's three hyperparameters always (`"auto"` until resolved), then any of ours that are
/// set. Whatever else the stored object holds (an executor's totals) is not a hyperparameter.
/// A DPO job also shows OpenAI's `beta`, and whichever of ours it set.
fn shown_hyperparameters(stored: &Value, method: MethodType) -> Value {
    let mut shown = Map::new();
    let openai: &[&str] = match method {
        MethodType::Supervised => &OPENAI_HYPERPARAMETERS,
        MethodType::Dpo => &["n_epochs", "batch_size", "learning_rate_multiplier", "beta"],
    };
    for &key in openai {
        let value = stored.get(key).filter(|v| !v.is_null()).cloned().unwrap_or_else(|| json!("auto"));
        shown.insert(key.into(), value);
    }
    let dpo_extras = DPO_HYPERPARAMETERS.iter().filter(|&&k| k != "beta" && method == MethodType::Dpo);
    for &key in OUR_HYPERPARAMETERS.iter().chain(dpo_extras) {
        if let Some(value) = stored.get(key).filter(|v| !v.is_null()) {
            let value = if key == "lora" { shown_lora(value) } else { value.clone() };
            shown.insert(key.into(), value);
        }
    }
    Value::Object(shown)
}

/// The LoRA settings a client can send; an executor's internal ones (`train_norms`) stay inside.
fn shown_lora(stored: &Value) -> Value {
    const FIELDS: [&str; 7] =
        ["r", "alpha", "dropout", "target_modules", "use_rslora", "target_parameters", "train_router"];
    let shown =
        FIELDS.iter().filter_map(|&key| stored.get(key).filter(|v| !v.is_null()).map(|v| (key.into(), v.clone())));
    Value::Object(shown.collect())
}

fn parse_column(column: &'static str, text: &str) -> Result<Value, ApiError> {
    serde_json::from_str(text).map_err(|e| {
        ApiError::internal(DbError::Corrupt { table: "fine_tuning_jobs", detail: format!("{column}: {e}") })
    })
}

/// `limit` of a page: 1 to 100, 20 when absent.
pub(super) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, format!("`limit` must be between 1 and {MAX_PAGE}"))
            .with_param("limit"));
    }
    Ok(limit)
}

pub(super) fn invalid_cursor(what: &str) -> ApiError {
    ApiError::new(ErrorCode::InvalidCursor, format!("`after` names no {what}")).with_param("after")
}

/// The caller's job; another project's job is indistinguishable from a missing one.
pub(super) async fn find_job(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    state.store.get_job(&caller.project_id, id).await?.ok_or_else(|| {
        ApiError::new(ErrorCode::JobNotFound, format!("no such fine-tuning job: {id}")).with_param("fine_tuning_job_id")
    })
}

/// `GET /v1/fine_tuning/jobs?after&limit&metadata[k]=v`
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let mut after = None;
    let mut limit = None;
    let mut filters = BTreeMap::new();
    for (key, value) in query {
        if key == "after" {
            after = Some(value);
        } else if key == "limit" {
            let parsed = value.parse().map_err(|_| {
                ApiError::new(ErrorCode::InvalidQuery, format!("`limit` must be an integer, not {value:?}"))
                    .with_param("limit")
            })?;
            limit = Some(parsed);
        } else if let Some(name) = key.strip_prefix("metadata[").and_then(|k| k.strip_suffix(']')) {
            filters.insert(name.to_string(), value);
        }
    }
    let limit = page_limit(limit)?;
    // Filters apply in Rust, so pages are read until `limit + 1` jobs match or none are left.
    let mut matched = Vec::new();
    let mut cursor = after;
    loop {
        let rows = state
            .store
            .list_jobs(&caller.project_id, cursor.as_deref(), limit)
            .await?
            .ok_or_else(|| invalid_cursor("fine-tuning job of this project"))?;
        let exhausted = rows.len() <= limit as usize;
        cursor = rows.last().map(|job| job.id.clone());
        matched.extend(rows.into_iter().filter(|job| metadata_matches(job, &filters)));
        if exhausted || matched.len() > limit as usize {
            break;
        }
    }
    let has_more = matched.len() > limit as usize;
    matched.truncate(limit as usize);
    let mut data = Vec::with_capacity(matched.len());
    for job in matched {
        data.push(render_job(&state, job).await?);
    }
    Ok(Json(json!({ "object": "list", "data": data, "has_more": has_more })))
}

fn metadata_matches(job: &JobRecord, filters: &BTreeMap<String, String>) -> bool {
    if filters.is_empty() {
        return true;
    }
    let metadata: Value = job.metadata.as_deref().and_then(|m| serde_json::from_str(m).ok()).unwrap_or_default();
    filters.iter().all(|(key, value)| metadata.get(key).and_then(Value::as_str) == Some(value.as_str()))
}

/// `GET /v1/fine_tuning/jobs/{fine_tuning_job_id}`
pub async fn retrieve_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobObject>, ApiError> {
    let job = find_job(&state, &caller, &id).await?;
    Ok(Json(render_job(&state, job).await?))
}

pub async fn cancel_job(state: State<AppState>, caller: Caller, id: Path<String>) -> Result<Json<JobObject>, ApiError> {
    act(state, caller, id, JobAction::Cancel).await
}

pub async fn pause_job(state: State<AppState>, caller: Caller, id: Path<String>) -> Result<Json<JobObject>, ApiError> {
    act(state, caller, id, JobAction::Pause).await
}

pub async fn resume_job(state: State<AppState>, caller: Caller, id: Path<String>) -> Result<Json<JobObject>, ApiError> {
    act(state, caller, id, JobAction::Resume).await
}

/// Applies a client action. A job an executor holds is only asked: an executor of this process
/// gets the request at once, another within `executor::CONTROL_POLL`, and acts before its next
/// step;
/// any other moves at once. Every update is conditional on the status read here, so a job that
/// changed in between is not overwritten: the action is tried again on the new status (a job
/// that moved from validating to queued can still be cancelled), and answers 409 only when the
/// new status does not allow it.
async fn act(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    action: JobAction,
) -> Result<Json<JobObject>, ApiError> {
    // A status changes a handful of times in a job's life; three reads cover any race.
    for _ in 0..3 {
        let job = find_job(&state, &caller, &id).await?;
        if apply(&state, &job, action).await? {
            let job = find_job(&state, &caller, &id).await?;
            return Ok(Json(render_job(&state, job).await?));
        }
    }
    let job = find_job(&state, &caller, &id).await?;
    Err(invalid_state(action, &job.status))
}

/// One conditional attempt at `action` on `job` as read; false when its status changed meanwhile.
async fn apply(state: &AppState, job: &JobRecord, action: JobAction) -> Result<bool, ApiError> {
    use JobStatus::*;
    let current = job.status();
    let target = current.after(action).ok_or_else(|| invalid_state(action, current.as_str()))?;
    let cancel_pending = job.requested_action.as_deref() == Some("cancel");
    let store = &state.store;
    Ok(match (action, current) {
        (JobAction::Cancel, Running | Pausing) if cancel_pending => true,
        (JobAction::Cancel, Running | Pausing) => {
            let asked =
                store.request_action(&job.id, "cancel", current, NewEvent::message("Cancellation requested")).await?;
            if asked {
                state.job_signals.deliver(&job.id, "cancel");
            }
            asked
        }
        (JobAction::Pause, Running) if cancel_pending => {
            return Err(ApiError::new(ErrorCode::InvalidJobState, "cannot pause a job that is being cancelled"));
        }
        (JobAction::Pause, Running) => {
            let event = NewEvent::message("Pause requested; the job pauses once its checkpoint is saved");
            let asked = store.request_action(&job.id, "pause", target, event).await?;
            if asked {
                state.job_signals.deliver(&job.id, "pause");
            }
            asked
        }
        _ => {
            let event = match action {
                JobAction::Cancel => "Job cancelled",
                JobAction::Pause => "Job paused",
                JobAction::Resume => "Job resumed and queued",
            };
            store.transition(&job.id, &[current], target, NewEvent::message(event)).await?
        }
    })
}

fn invalid_state(action: JobAction, status: &str) -> ApiError {
    let verb = match action {
        JobAction::Cancel => "cancel",
        JobAction::Pause => "pause",
        JobAction::Resume => "resume",
    };
    ApiError::new(ErrorCode::InvalidJobState, format!("cannot {verb} a job whose status is {status}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_lora_settings_are_not_shown() {
        let stored = json!({"lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear",
            "use_rslora": false, "train_norms": false}});
        let shown = shown_hyperparameters(&stored, MethodType::Supervised);
        assert_eq!(
            shown["lora"],
            json!({"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear", "use_rslora": false})
        );
    }

    #[test]
    fn unresolved_hyperparameters_show_auto_and_only_the_extras_that_are_set() {
        let stored = json!({"batch_size": 4, "packing": true, "lora": null, "total_steps": 12});
        let shown = shown_hyperparameters(&stored, MethodType::Supervised);
        assert_eq!(
            shown,
            json!({"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": "auto", "packing": true})
        );
    }
}
