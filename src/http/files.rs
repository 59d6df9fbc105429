//! The Files API (OpenAI-compatible): list, retrieve, delete and download. Uploads are in `upload`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{ApiQuery, Caller};
use super::state::AppState;
use crate::db::{FileListQuery, FileRecord, ListOrder};
use crate::domain::file::FilePurpose;
use crate::storage::StorageError;

/// Files listed per page unless `limit` says otherwise (OpenAI's default and maximum).
const MAX_LIST_LIMIT: u32 = 10_000;

/// A file as the API shows it: OpenAI's fields plus the detected dataset `format` and `examples`.
#[derive(Debug, Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub status_details: Option<String>,
    pub format: Option<String>,
    pub examples: Option<i64>,
}

impl From<FileRecord> for FileObject {
    fn from(file: FileRecord) -> Self {
        Self {
            id: file.id,
            object: "file",
            bytes: file.bytes,
            created_at: file.created_at,
            expires_at: None,
            filename: file.filename,
            purpose: file.purpose,
            status: file.status,
            status_details: file.status_details,
            format: file.format,
            examples: file.examples,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    after: Option<String>,
    limit: Option<u32>,
    order: Option<String>,
    purpose: Option<String>,
}

pub async fn list_files(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = params.limit.unwrap_or(MAX_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, format!("`limit` must be between 1 and {MAX_LIST_LIMIT}"))
            .with_param("limit"));
    }
    let order = match params.order.as_deref() {
        None | Some("desc") => ListOrder::Desc,
        Some("asc") => ListOrder::Asc,
        Some(other) => {
            return Err(ApiError::new(ErrorCode::InvalidQuery, format!("`order` must be asc or desc, not {other:?}"))
                .with_param("order"))
        }
    };
    if let Some(purpose) = &params.purpose {
        if FilePurpose::parse(purpose).is_none() {
            return Err(
                ApiError::new(ErrorCode::InvalidPurpose, format!("unknown purpose {purpose:?}")).with_param("purpose")
            );
        }
    }
    let query = FileListQuery { after: params.after, limit, order, purpose: params.purpose };
    let Some(mut rows) = state.store.list_files(&caller.project_id, &query).await? else {
        return Err(
            ApiError::new(ErrorCode::InvalidCursor, "`after` names no file of this project").with_param("after")
        );
    };
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let first_id = rows.first().map(|f| f.id.clone());
    let last_id = rows.last().map(|f| f.id.clone());
    let data: Vec<FileObject> = rows.into_iter().map(FileObject::from).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    })))
}

pub async fn retrieve_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(find_file(&state, &caller, &id).await?.into()))
}

pub async fn delete_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let file = state.store.delete_file(&caller.project_id, &id).await?.ok_or_else(|| file_not_found(&id))?;
    // The row is gone first, so no record ever points at missing bytes; a failure here only
    // leaves an orphaned object, which is logged.
    if let Err(err) = state.storage.delete(&file.storage_key).await {
        tracing::warn!(file = %file.id, error = %err, "deleted a file record but not its stored bytes");
    }
    Ok(Json(json!({ "id": file.id, "object": "file", "deleted": true })))
}

pub async fn download_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let file = find_file(&state, &caller, &id).await?;
    let download = match state.storage.get(&file.storage_key).await {
        Ok(download) => download,
        // `DELETE /v1/files/{id}` removes the row, then the bytes: bytes gone under this request
        // mean the file was deleted meanwhile. Bytes missing behind a row that is still there are
        // a fault of ours.
        Err(StorageError::NotFound(_)) if state.store.get_file(&caller.project_id, &id).await?.is_none() => {
            return Err(file_not_found(&id))
        }
        Err(err) => return Err(err.into()),
    };
    let disposition = format!("attachment; filename=\"{}\"", file.filename.replace(['"', '\\', '\r', '\n'], "_"));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, download.size.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(download.body),
    )
        .into_response())
}

async fn find_file(state: &AppState, caller: &Caller, id: &str) -> Result<FileRecord, ApiError> {
    state.store.get_file(&caller.project_id, id).await?.ok_or_else(|| file_not_found(id))
}

/// Also what another project's file looks like: indistinguishable from a missing one.
fn file_not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::FileNotFound, format!("no such file: {id}")).with_param("file_id")
}
