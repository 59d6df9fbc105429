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
use crate::db::ModelRecord;

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
            root: model.base_model.clone(),
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

/// `GET /v1/models/{model}` (a name with `/` must be sent as `%2F`).
pub async fn retrieve_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    if let Some(base) = state.catalog.get(&name) {
        return Ok(Json(base.into()));
    }
    let model = state.store.get_model(&caller.project_id, &name).await?.ok_or_else(|| model_not_found(&name))?;
    Ok(Json(model.into()))
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
