//! The HTTP API: the route table, middleware and one file per resource.
//!
//! [`ROUTES`] is the single list of routes: the router is built from it and the OpenAPI test
//! compares it with `openapi.yaml`, so a route cannot exist undocumented.

mod chat;
mod completions;
mod encoders;
pub mod error;
pub mod extract;
mod files;
mod health;
mod inference;
mod job_base;
mod job_events;
mod jobs;
mod jobs_create;
mod model_content;
mod models;
pub mod state;
mod upload;

use std::collections::BTreeMap;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Method, Request, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{self, MethodRouter};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use error::{ApiError, ErrorCode};
pub use health::OPENAPI_YAML;
use state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Every route: (method, path in OpenAPI/axum syntax).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/openapi.yaml"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("DELETE", "/v1/models/{model}"),
    ("GET", "/v1/models/{model}/content"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/classifications"),
];

fn handler(method: &str, path: &str) -> MethodRouter<AppState> {
    match (method, path) {
        ("GET", "/health") => routing::get(health::alive),
        ("GET", "/ready") => routing::get(health::ready),
        ("GET", "/openapi.yaml") => routing::get(health::openapi),
        ("POST", "/v1/files") => routing::post(upload::create_file).layer(DefaultBodyLimit::disable()),
        ("GET", "/v1/files") => routing::get(files::list_files),
        ("GET", "/v1/files/{file_id}") => routing::get(files::retrieve_file),
        ("DELETE", "/v1/files/{file_id}") => routing::delete(files::delete_file),
        ("GET", "/v1/files/{file_id}/content") => routing::get(files::download_file),
        ("POST", "/v1/fine_tuning/jobs") => routing::post(jobs_create::create_job),
        ("GET", "/v1/fine_tuning/jobs") => routing::get(jobs::list_jobs),
        ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}") => routing::get(jobs::retrieve_job),
        ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel") => routing::post(jobs::cancel_job),
        ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause") => routing::post(jobs::pause_job),
        ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume") => routing::post(jobs::resume_job),
        ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events") => routing::get(job_events::list_job_events),
        ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints") => {
            routing::get(job_events::list_job_checkpoints)
        }
        ("GET", "/v1/models") => routing::get(models::list_models),
        ("GET", "/v1/models/{model}") => routing::get(models::retrieve_model),
        ("DELETE", "/v1/models/{model}") => routing::delete(models::delete_model),
        ("GET", "/v1/models/{model}/content") => routing::get(model_content::download_model),
        ("POST", "/v1/chat/completions") => routing::post(chat::create_chat_completion),
        ("POST", "/v1/completions") => routing::post(completions::create_completion),
        ("POST", "/v1/embeddings") => routing::post(encoders::create_embeddings),
        ("POST", "/v1/classifications") => routing::post(encoders::create_classifications),
        _ => unreachable!("route {method} {path} is in ROUTES but has no handler"),
    }
}

/// The full application router with its middleware.
pub fn router(state: AppState) -> Router {
    let mut by_path: BTreeMap<&str, MethodRouter<AppState>> = BTreeMap::new();
    for &(method, path) in ROUTES {
        let route = handler(method, path);
        let merged = match by_path.remove(path) {
            Some(existing) => existing.merge(route),
            None => route,
        };
        by_path.insert(path, merged);
    }
    let mut router = Router::new();
    for (path, route) in by_path {
        router = router.route(path, route.fallback(method_not_allowed));
    }
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    router
        .fallback(route_not_found)
        .layer(DefaultBodyLimit::max(state.config.max_json_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let id = request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, format!("unknown route: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path()))
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal(anyhow::anyhow!("a request handler panicked")).into_response()
}
