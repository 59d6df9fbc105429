//! `POST /v1/files`: a streaming multipart upload, validated while it streams.
//!
//! The file's bytes go to artifact storage and, on a blocking thread, through the dataset
//! validator at the same time, so nothing holds the whole file. The object is committed and the
//! record written only once the file is complete and, for `fine-tune`, valid; otherwise the upload
//! is aborted and nothing is stored.

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header;
use axum::Json;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::error::{ApiError, ErrorCode};
use super::extract::Caller;
use super::files::FileObject;
use super::state::AppState;
use crate::db::FileRecord;
use crate::domain::dataset::{DatasetValidator, Limits, Outcome};
use crate::domain::file::{FilePurpose, FileStatus};
use crate::ids::{new_id, unix_now};
use crate::storage::Upload;

/// Chunks queued for the validator before the upload waits for it (backpressure).
const VALIDATOR_QUEUE: usize = 32;
/// Room for multipart boundaries and the small fields around the file.
const MULTIPART_OVERHEAD: u64 = 64 << 10;
const MAX_FILENAME_CHARS: usize = 255;

pub async fn create_file(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> Result<Json<FileObject>, ApiError> {
    let max_upload = state.config.max_upload_bytes;
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_upload + MULTIPART_OVERHEAD) {
        return Err(too_large(max_upload));
    }
    let multipart = Multipart::from_request(request, &state)
        .await
        .map_err(|rejection| ApiError::new(ErrorCode::InvalidMultipart, rejection.body_text()))?;
    let received = receive(&state, &caller, multipart).await?;
    let file = finish(&state, &caller, received).await?;
    tracing::info!(file = %file.id, bytes = file.bytes, format = ?file.format, "file uploaded");
    Ok(Json(file.into()))
}

/// A file that has been streamed to storage but not yet committed.
struct Incoming {
    filename: String,
    id: String,
    storage_key: String,
    upload: Box<dyn Upload>,
    bytes: u64,
    validation: Option<Validation>,
}

struct Received {
    purpose: FilePurpose,
    file: Incoming,
}

async fn receive(state: &AppState, caller: &Caller, mut multipart: Multipart) -> Result<Received, ApiError> {
    let mut purpose_text: Option<String> = None;
    let mut file: Option<Incoming> = None;
    let result: Result<(), ApiError> = async {
        while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
            match field.name() {
                Some("purpose") => {
                    let text = field.text().await.map_err(multipart_error)?;
                    purpose_text = Some(text.trim().to_string());
                }
                Some("file") => {
                    if file.is_some() {
                        return Err(
                            ApiError::new(ErrorCode::MultipleFiles, "send one `file` per request").with_param("file")
                        );
                    }
                    let filename = clean_filename(field.file_name());
                    let id = new_id("file");
                    let storage_key = format!("files/{}/{id}", caller.project_id);
                    let upload = state.storage.begin_upload(&storage_key).await?;
                    // Validate unless the purpose is already known not to need it.
                    let validate = purpose_text.as_deref().is_none_or(|p| p == FilePurpose::FineTune.as_str());
                    let validation = validate.then(|| Validation::start(state.config.dataset_limits));
                    let entry = file.insert(Incoming { filename, id, storage_key, upload, bytes: 0, validation });
                    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                        entry.bytes += chunk.len() as u64;
                        if entry.bytes > state.config.max_upload_bytes {
                            return Err(too_large(state.config.max_upload_bytes));
                        }
                        if let Some(validation) = &mut entry.validation {
                            validation.feed(chunk.clone()).await;
                        }
                        entry.upload.write(chunk).await?;
                    }
                }
                // Unknown fields are ignored, as OpenAI does.
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    if let Err(err) = result {
        if let Some(file) = file {
            abort(file.upload).await;
        }
        return Err(err);
    }
    let Some(file) = file else {
        return Err(ApiError::new(ErrorCode::MissingFile, "the request has no `file` field").with_param("file"));
    };
    let purpose = match purpose_text.as_deref().map(|p| (p, FilePurpose::parse(p))) {
        Some((_, Some(purpose))) if purpose.is_uploadable() => Ok(purpose),
        None => {
            Err(ApiError::new(ErrorCode::MissingPurpose, "the request has no `purpose` field").with_param("purpose"))
        }
        Some((text, _)) => Err(ApiError::new(
            ErrorCode::InvalidPurpose,
            format!("unknown purpose {text:?}; use fine-tune, assistants, batch, vision, user_data or evals"),
        )
        .with_param("purpose")),
    };
    match purpose {
        Ok(purpose) => Ok(Received { purpose, file }),
        Err(err) => {
            abort(file.upload).await;
            Err(err)
        }
    }
}

/// Judges the dataset, then commits the object and writes the record.
async fn finish(state: &AppState, caller: &Caller, received: Received) -> Result<FileRecord, ApiError> {
    let Received { purpose, file: Incoming { filename, id, storage_key, upload, bytes, validation } } = received;
    let mut record = FileRecord {
        id,
        project_id: caller.project_id.clone(),
        filename,
        purpose: purpose.as_str().to_string(),
        bytes: bytes as i64,
        status: FileStatus::Processed.as_str().to_string(),
        status_details: None,
        format: None,
        examples: None,
        storage_key,
        created_at: unix_now(),
    };
    if purpose == FilePurpose::FineTune {
        let outcome = match validation {
            Some(validation) => validation.finish().await,
            None => Err(ApiError::internal(anyhow::anyhow!("a fine-tune upload was not validated"))),
        };
        match outcome.and_then(dataset_verdict) {
            Ok((format, examples)) => {
                record.format = Some(format);
                record.examples = Some(examples);
            }
            Err(err) => {
                abort(upload).await;
                return Err(err);
            }
        }
    }
    let stored = upload.commit().await?;
    debug_assert_eq!(stored, bytes);
    if let Err(err) = state.store.insert_file(&record).await {
        if let Err(cleanup) = state.storage.delete(&record.storage_key).await {
            tracing::warn!(error = %cleanup, key = %record.storage_key, "could not remove an object after a failed insert");
        }
        return Err(err.into());
    }
    Ok(record)
}

fn dataset_verdict(outcome: Outcome) -> Result<(String, i64), ApiError> {
    match outcome {
        Outcome::Valid(summary) => Ok((summary.format.as_str().to_string(), summary.examples as i64)),
        Outcome::Invalid { problems, total } => {
            let lines: Vec<String> = problems
                .iter()
                .take(5)
                .map(|p| match p.line {
                    Some(line) => format!("line {line}: {}", p.code),
                    None => p.code.to_string(),
                })
                .collect();
            Err(ApiError::new(
                ErrorCode::InvalidDataset,
                format!(
                    "the dataset has {total} problem(s) ({}{}); see `problems`",
                    lines.join(", "),
                    if total > 5 { ", ..." } else { "" }
                ),
            )
            .with_param("file")
            .with_detail("problems", problems)
            .with_detail("total_problems", total))
        }
        Outcome::LineTooLong { line, limit } => {
            Err(ApiError::new(ErrorCode::LineTooLong, format!("line {line} is longer than the limit of {limit} bytes"))
                .with_param("file")
                .with_detail("line", line))
        }
    }
}

/// The validator running on a blocking thread, fed through a bounded channel.
struct Validation {
    chunks: Option<mpsc::Sender<Bytes>>,
    task: JoinHandle<Outcome>,
}

impl Validation {
    fn start(limits: Limits) -> Self {
        let (sender, mut receiver) = mpsc::channel::<Bytes>(VALIDATOR_QUEUE);
        let task = tokio::task::spawn_blocking(move || {
            let mut validator = DatasetValidator::new(limits);
            while let Some(chunk) = receiver.blocking_recv() {
                validator.feed(&chunk);
                if validator.stopped() {
                    break;
                }
            }
            validator.finish()
        });
        Self { chunks: Some(sender), task }
    }

    async fn feed(&mut self, chunk: Bytes) {
        if let Some(sender) = &self.chunks {
            // A closed channel means the validator stopped early; its verdict is final.
            if sender.send(chunk).await.is_err() {
                self.chunks = None;
            }
        }
    }

    async fn finish(self) -> Result<Outcome, ApiError> {
        drop(self.chunks);
        self.task.await.map_err(ApiError::internal)
    }
}

async fn abort(upload: Box<dyn Upload>) {
    if let Err(err) = upload.abort().await {
        tracing::warn!(error = %err, "could not abort an upload");
    }
}

fn multipart_error(err: axum::extract::multipart::MultipartError) -> ApiError {
    if err.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(ErrorCode::PayloadTooLarge, err.body_text());
    }
    ApiError::new(ErrorCode::InvalidMultipart, err.body_text())
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(ErrorCode::FileTooLarge, format!("the file is larger than the limit of {limit} bytes"))
        .with_param("file")
}

/// The last path component of the client's filename, clipped; `upload` when none was given.
fn clean_filename(name: Option<&str>) -> String {
    let base =
        name.and_then(|n| n.rsplit(['/', '\\']).next()).map(str::trim).filter(|n| !n.is_empty()).unwrap_or("upload");
    base.chars().filter(|c| !c.is_control()).take(MAX_FILENAME_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::clean_filename;

    #[test]
    fn filenames_lose_directories_and_control_characters() {
        assert_eq!(clean_filename(Some("../../etc/passwd")), "passwd");
        assert_eq!(clean_filename(Some("C:\\data\\train.jsonl")), "train.jsonl");
        assert_eq!(clean_filename(Some("a\nb.jsonl")), "ab.jsonl");
        assert_eq!(clean_filename(None), "upload");
    }
}
