//! The models API (OpenAI-compatible): the catalog's base models, which everyone sees, and the
//! caller's fine-tuned models, which only their project sees and may delete.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::Caller;
use super::state::AppState;
use crate::catalog::BaseModel;
use crate::db::{CheckpointRecord, JobRecord, ModelRecord};
use crate::domain::model_name::{fine_tuned_model_name, parse_fine_tuned_name};

/// OpenAI's `model`, plus `root` and `parent` (the base a fine-tuned model came from).
#[derive(Debug, Serialize)]
pub struct ModelObject {
    id: String,
    object: &'static str,
    created: i64,
    owned_by: String,
    root: String,
    parent: Option<String>,
}

impl From<&BaseModel> for ModelObject {
    fn from(base: &BaseModel) -> Self {
        Self {
            id: base.name.clone(),
            object: "model",
            created: 0,
            owned_by: "ferrotune".into(),
            root: base.name.clone(),
            parent: None,
        }
    }
}

impl From<ModelRecord> for ModelObject {
    fn from(model: ModelRecord) -> Self {
        Self {
            id: model.id,
            object: "model",
            created: model.created_at,
            owned_by: model.project_id,
            root: crate::domain::model_name::root_base_model(&model.base_model).to_string(),
            parent: Some(model.base_model),
        }
    }
}

/// `GET /v1/models`: base models first, then the project's fine-tuned models, oldest first.
pub async fn list_models(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let mut data: Vec<ModelObject> = state.catalog.list().map(ModelObject::from).collect();
    let tuned = state.store.list_models(&caller.project_id).await?;
    data.extend(tuned.into_iter().map(ModelObject::from));
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `GET /v1/models/{model}` (a name with `/` must be sent as `%2F`): a base model, a fine-tuned
/// model, or a checkpoint (`…:ckpt-step-N`, whose `parent` is its job's model), as chat takes them.
pub async fn retrieve_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    if let Some(base) = state.catalog.get(&name) {
        return Ok(Json(base.into()));
    }
    if parse_fine_tuned_name(&name).is_some_and(|p| p.checkpoint_step.is_some()) {
        let (job, checkpoint) =
            find_checkpoint(&state, &caller.project_id, &name).await?.ok_or_else(|| model_not_found(&name))?;
        return Ok(Json(ModelObject {
            id: name,
            object: "model",
            created: checkpoint.created_at,
            owned_by: job.project_id.clone(),
            root: crate::domain::model_name::root_base_model(&job.model).to_string(),
            parent: Some(job_model_name(&state, &job).await?),
        }));
    }
    let model = state.store.get_model(&caller.project_id, &name).await?.ok_or_else(|| model_not_found(&name))?;
    Ok(Json(model.into()))
}

/// The fine-tuned model a job makes (or made): its name is fixed when the job is created.
pub(super) async fn job_model_name(state: &AppState, job: &JobRecord) -> Result<String, ApiError> {
    if let Some(model) = &job.fine_tuned_model {
        return Ok(model.clone());
    }
    let project = state.store.project_name(&job.project_id).await?.unwrap_or_else(|| job.project_id.clone());
    Ok(fine_tuned_model_name(&job.model, &project, job.suffix.as_deref(), &job.id))
}

/// The job and checkpoint a `…:ckpt-step-N` name of the project refers to. The whole name must
/// be the job's model name plus the step: a name that only ends in a job's id is no checkpoint.
pub(super) async fn find_checkpoint(
    state: &AppState,
    project_id: &str,
    name: &str,
) -> Result<Option<(JobRecord, CheckpointRecord)>, ApiError> {
    let Some(parsed) = parse_fine_tuned_name(name) else { return Ok(None) };
    let Some(step) = parsed.checkpoint_step else { return Ok(None) };
    let Some(job) = state.store.get_job(project_id, &parsed.job_id).await? else { return Ok(None) };
    if job_model_name(state, &job).await? != parsed.model {
        return Ok(None);
    }
    let checkpoints = state.store.list_checkpoints(&job.id).await?;
    Ok(checkpoints.into_iter().find(|c| c.step_number == step).map(|checkpoint| (job, checkpoint)))
}

/// `DELETE /v1/models/{model}`: a fine-tuned model of the caller's project, and its weights.
pub async fn delete_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if state.catalog.get(&name).is_some() {
        return Err(ApiError::new(
            ErrorCode::ModelNotOwned,
            format!("{name} is a base model of this deployment; only fine-tuned models can be deleted"),
        )
        .with_param("model"));
    }
    // Models trained from this one are served and downloaded on top of it.
    let children: Vec<String> = state
        .store
        .list_models(&caller.project_id)
        .await?
        .into_iter()
        .filter(|m| m.base_model == name)
        .map(|m| m.id)
        .collect();
    if !children.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ModelInUse,
            format!("{name} is the base of {}; delete those models first", children.join(", ")),
        )
        .with_param("model"));
    }
    let model = state.store.delete_model(&caller.project_id, &name).await?.ok_or_else(|| model_not_found(&name))?;
    // The row is gone first, so nothing can load a half-deleted model; leftovers are only logged.
    let prefix = model.storage_key.trim_end_matches('/');
    let files = state.storage.list(prefix).await.unwrap_or_else(|err| {
        tracing::warn!(model = %model.id, error = %err, "could not list a deleted model's files");
        Vec::new()
    });
    for file in files {
        let key = format!("{prefix}/{file}");
        if let Err(err) = state.storage.delete(&key).await {
            tracing::warn!(model = %model.id, key, error = %err, "deleted a model record but not its stored file");
        }
    }
    Ok(Json(json!({ "id": model.id, "object": "model", "deleted": true })))
}

/// Also what another project's model looks like: indistinguishable from a missing one.
fn model_not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::ModelNotFound, format!("no such model: {name}")).with_param("model")
}
