//! Liveness, readiness and the OpenAPI document.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The OpenAPI description of this server, as committed in `openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// `GET /health`: the process is up.
pub async fn alive() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /ready`: the database and artifact storage answer. Failures are logged, not shown.
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let database = tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()).await;
    let database_ok = matches!(database, Ok(Ok(())));
    if !database_ok {
        tracing::warn!(result = ?database.map(|r| r.map_err(|e| e.to_string())), "database is not ready");
    }
    let storage = tokio::time::timeout(CHECK_TIMEOUT, state.storage.check()).await;
    let storage_ok = matches!(storage, Ok(Ok(())));
    if !storage_ok {
        tracing::warn!(result = ?storage.map(|r| r.map_err(|e| e.to_string())), "artifact storage is not ready");
    }
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if database_ok && storage_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "unavailable" },
        "database": word(database_ok),
        "storage": word(storage_ok),
    });
    (status, Json(body))
}

/// `GET /openapi.yaml`
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}
