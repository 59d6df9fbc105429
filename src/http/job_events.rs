//! A job's events (paged newest first, or streamed as server-sent events) and its checkpoints.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller};
use super::jobs::{find_job, invalid_cursor, page_limit};
use super::state::AppState;
use crate::db::{DbError, EventRecord, JobRecord};
use crate::domain::model_name::checkpoint_model_name;

/// How often a stream looks for new events.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Events read per query while streaming.
const STREAM_BATCH: u32 = 100;

#[derive(Debug, Deserialize)]
pub struct EventParams {
    after: Option<String>,
    limit: Option<u32>,
    stream: Option<bool>,
}

/// OpenAI's `fine_tuning.job.event`.
#[derive(Debug, Serialize)]
struct EventObject {
    id: String,
    object: &'static str,
    created_at: i64,
    level: String,
    message: String,
    #[serde(rename = "type")]
    kind: String,
    data: Value,
}

impl From<EventRecord> for EventObject {
    fn from(event: EventRecord) -> Self {
        // `data` is written by the service as JSON; anything else is shown as the raw text.
        let data = event.data.map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d))).unwrap_or(Value::Null);
        Self {
            id: event.id,
            object: "fine_tuning.job.event",
            created_at: event.created_at,
            level: event.level,
            message: event.message,
            kind: event.kind,
            data,
        }
    }
}

/// `GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/events`: newest first, `after` an event id
/// (the page continues with older events); with `stream=true`, a server-sent event stream.
pub async fn list_job_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<EventParams>,
) -> Result<Response, ApiError> {
    let job = find_job(&state, &caller, &id).await?;
    if params.stream == Some(true) {
        // A reconnecting EventSource resumes after the last event it saw.
        let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        return Ok(stream_events(state, job, resume).into_response());
    }
    let limit = page_limit(params.limit)?;
    let mut rows = state
        .store
        .list_events_before(&job.id, params.after.as_deref(), limit)
        .await?
        .ok_or_else(|| invalid_cursor("event of this job"))?;
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let data: Vec<EventObject> = rows.into_iter().map(EventObject::from).collect();
    Ok(Json(json!({ "object": "list", "data": data, "has_more": has_more })).into_response())
}

/// The events so far, oldest first, then new ones as they come; `[DONE]` once the job has
/// ended and every event is sent. Dropping the response (the client left) stops the polling.
fn stream_events(
    state: AppState,
    job: JobRecord,
    cursor: Option<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let tail = Tail { state, project_id: job.project_id, job_id: job.id, cursor, pending: VecDeque::new() };
    let events = futures::stream::unfold(Some(tail), |tail| async move {
        let mut tail = tail?;
        loop {
            if let Some(event) = tail.pending.pop_front() {
                tail.cursor = Some(event.id.clone());
                let data = serde_json::to_string(&EventObject::from(event.clone())).unwrap_or_default();
                return Some((Ok(Event::default().id(event.id).data(data)), Some(tail)));
            }
            match tail.fetch().await {
                Ok(Fetched::Events) => {}
                Ok(Fetched::Nothing) => tokio::time::sleep(POLL_INTERVAL).await,
                Ok(Fetched::Finished) => return Some((Ok(Event::default().data("[DONE]")), None)),
                Err(err) => {
                    tracing::error!(job = %tail.job_id, error = %err, "event stream ended by a database error");
                    return None;
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

struct Tail {
    state: AppState,
    project_id: String,
    job_id: String,
    /// The last event sent.
    cursor: Option<String>,
    pending: VecDeque<EventRecord>,
}

enum Fetched {
    Events,
    Nothing,
    Finished,
}

impl Tail {
    async fn fetch(&mut self) -> Result<Fetched, DbError> {
        // Status first: a job's final event is written with its final status, so once the
        // status is terminal every event it will have is visible to the read that follows.
        let job = self.state.store.get_job(&self.project_id, &self.job_id).await?;
        let ended = job.is_none_or(|job| job.status().is_terminal());
        let batch = self.state.store.list_events_after(&self.job_id, self.cursor.as_deref(), STREAM_BATCH).await?;
        Ok(match (batch.is_empty(), ended) {
            (false, _) => {
                self.pending.extend(batch);
                Fetched::Events
            }
            (true, true) => Fetched::Finished,
            (true, false) => Fetched::Nothing,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct PageParams {
    after: Option<String>,
    limit: Option<u32>,
}

/// OpenAI's `fine_tuning.job.checkpoint`.
#[derive(Debug, Serialize)]
struct CheckpointObject {
    id: String,
    object: &'static str,
    created_at: i64,
    fine_tuned_model_checkpoint: String,
    fine_tuning_job_id: String,
    metrics: Value,
    step_number: i64,
}

/// `GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints`: newest first.
pub async fn list_job_checkpoints(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<PageParams>,
) -> Result<Json<Value>, ApiError> {
    let job = find_job(&state, &caller, &id).await?;
    let limit = page_limit(params.limit)? as usize;
    let checkpoints = state.store.list_checkpoints(&job.id).await?;
    let start = match &params.after {
        None => 0,
        Some(after) => {
            checkpoints.iter().position(|c| &c.id == after).ok_or_else(|| invalid_cursor("checkpoint of this job"))? + 1
        }
    };
    let model = super::models::job_model_name(&state, &job).await?;
    let page: Vec<CheckpointObject> = checkpoints
        .into_iter()
        .skip(start)
        .take(limit + 1)
        .map(|checkpoint| {
            let mut metrics = match serde_json::from_str(&checkpoint.metrics) {
                Ok(Value::Object(metrics)) => metrics,
                _ => Default::default(),
            };
            metrics.insert("step".into(), json!(checkpoint.step_number));
            CheckpointObject {
                id: checkpoint.id,
                object: "fine_tuning.job.checkpoint",
                created_at: checkpoint.created_at,
                fine_tuned_model_checkpoint: checkpoint_model_name(&model, checkpoint.step_number),
                fine_tuning_job_id: checkpoint.job_id,
                metrics: Value::Object(metrics),
                step_number: checkpoint.step_number,
            }
        })
        .collect();
    let has_more = page.len() > limit;
    let data: Vec<CheckpointObject> = page.into_iter().take(limit).collect();
    Ok(Json(json!({ "object": "list", "data": data, "has_more": has_more })))
}
