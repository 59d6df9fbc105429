//! The rows and values of the job queue: jobs, events, checkpoints, outcomes, leases.

use serde_json::Value;

use crate::domain::job::JobStatus;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobRecord {
    pub id: String,
    pub project_id: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub status: String,
    /// The `method` object as requested (JSON).
    pub method: String,
    /// Resolved hyperparameters once validated, the requested ones before (JSON).
    pub hyperparameters: String,
    pub suffix: Option<String>,
    pub seed: i64,
    pub metadata: Option<String>,
    pub fine_tuned_model: Option<String>,
    pub trained_tokens: Option<i64>,
    /// `{code, message, param}` (JSON) when failed.
    pub error: Option<String>,
    /// File ids (JSON array).
    pub result_files: String,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub epoch: Option<f64>,
    pub estimated_finish: Option<i64>,
    /// `cancel` or `pause`, asked for while running.
    pub requested_action: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub attempts: i64,
    /// The host and device of the executor that last ran the job (`host (cuda:0)`).
    pub executor: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl JobRecord {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }
}

/// A job event to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub level: &'static str,
    pub kind: &'static str,
    pub message: String,
    pub data: Option<Value>,
}

impl NewEvent {
    pub fn message(message: impl Into<String>) -> Self {
        Self { level: "info", kind: "message", message: message.into(), data: None }
    }

    pub fn metrics(message: impl Into<String>, data: Value) -> Self {
        Self { level: "info", kind: "metrics", message: message.into(), data: Some(data) }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self { level: "error", kind: "message", message: message.into(), data: None }
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EventRecord {
    pub id: String,
    pub job_id: String,
    pub level: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub message: String,
    pub data: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CheckpointRecord {
    pub id: String,
    pub job_id: String,
    pub step_number: i64,
    pub metrics: String,
    pub storage_key: String,
    pub created_at: i64,
}

/// A running job's progress after a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobProgress {
    pub step: i64,
    pub total_steps: i64,
    pub epoch: f64,
    pub estimated_finish: Option<i64>,
}

/// How a job ends (or pauses).
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub status: JobStatus,
    /// OpenAI's `trained_tokens` (billable tokens processed), set when the job succeeds.
    pub trained_tokens: Option<i64>,
    /// The fine-tuned model to register (on success).
    pub model: Option<super::ModelRecord>,
    pub result_file: Option<super::FileRecord>,
    pub error: Option<Value>,
    pub event: NewEvent,
}

/// What an executor learns when it renews its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Still ours; the client may have asked for `cancel` or `pause`.
    Held { requested_action: Option<String> },
    /// Expired and taken back (the job was requeued or finished elsewhere).
    Lost,
}

impl Lease {
    /// From the `requested_action` of the job's row as its owner sees it (no row: not its owner).
    pub(super) fn from_row(row: Option<(Option<String>,)>) -> Self {
        match row {
            Some((requested_action,)) => Self::Held { requested_action },
            None => Self::Lost,
        }
    }
}
