//! Fine-tuning jobs, their events and checkpoints; the queue that executors claim from.
//!
//! Claiming is one atomic statement on both backends (Postgres: `FOR UPDATE SKIP LOCKED`;
//! SQLite: writes are serialised), and a claim is a lease that the executor renews. A job whose
//! lease lapses goes back to the queue and resumes from its last checkpoint elsewhere.

use async_trait::async_trait;
use serde_json::Value;

pub use super::job_records::{CheckpointRecord, EventRecord, JobOutcome, JobProgress, JobRecord, Lease, NewEvent};
use super::{DbError, Dialect, SqlStore, Store};
use crate::domain::job::JobStatus;
use crate::ids::{new_id, unix_now};

#[async_trait]
pub trait JobStore {
    /// Inserts a job with its first event, in one transaction.
    async fn insert_job(&self, job: &JobRecord, event: NewEvent) -> Result<(), DbError>;
    async fn get_job(&self, project_id: &str, id: &str) -> Result<Option<JobRecord>, DbError>;
    /// The job by id alone, for executors.
    async fn job_by_id(&self, id: &str) -> Result<Option<JobRecord>, DbError>;
    /// Newest first; up to `limit + 1` rows; `None` when `after` is not a job of the project.
    async fn list_jobs(
        &self,
        project_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<JobRecord>>, DbError>;
    /// Moves the job from one of `from` to `to` and records `event`; false when its status was
    /// not in `from` (nothing changes then).
    async fn transition(&self, id: &str, from: &[JobStatus], to: JobStatus, event: NewEvent) -> Result<bool, DbError>;
    /// Marks a running (or pausing) job for `cancel` or `pause`; false when it is neither.
    async fn request_action(&self, id: &str, action: &str, to: JobStatus, event: NewEvent) -> Result<bool, DbError>;
    /// Stores resolved hyperparameters and totals after validation, and queues the job.
    async fn finish_validation(&self, id: &str, hyperparameters: &str, event: NewEvent) -> Result<bool, DbError>;
    /// Atomically takes the oldest job in `status` (`queued` or `validating_files`) for `owner`.
    async fn claim_job(&self, status: JobStatus, owner: &str, lease_secs: i64) -> Result<Option<JobRecord>, DbError>;
    async fn renew_lease(&self, id: &str, owner: &str, lease_secs: i64) -> Result<Lease, DbError>;
    /// What `renew_lease` tells, read without renewing: whether `owner` still holds the job and
    /// what the client asked for.
    async fn job_control(&self, id: &str, owner: &str) -> Result<Lease, DbError>;
    /// Records which executor (host and device) runs the job `owner` holds.
    async fn record_executor(&self, id: &str, owner: &str, executor: &str) -> Result<bool, DbError>;
    /// Requeues running or validating jobs whose lease has lapsed; returns their ids.
    async fn requeue_expired(&self) -> Result<Vec<String>, DbError>;
    /// Records a running job's progress and the step's metrics event in one transaction, only
    /// while `owner` holds the job: an executor that lost its lease writes neither, so the
    /// metrics events are those of the attempts that own the job's history.
    async fn record_progress(
        &self,
        id: &str,
        owner: &str,
        progress: JobProgress,
        event: NewEvent,
    ) -> Result<bool, DbError>;
    /// Ends a job held by `owner`: its status, fine-tuned model, results file, error and event,
    /// all in one transaction. False when the job is no longer held by `owner`.
    async fn complete_job(&self, id: &str, owner: &str, outcome: JobOutcome) -> Result<bool, DbError>;
    async fn add_event(&self, job_id: &str, event: NewEvent) -> Result<EventRecord, DbError>;
    /// Events in creation order after `after` (an event id); newest `limit` when `after` is absent.
    async fn list_events(&self, job_id: &str, after: Option<&str>, limit: u32) -> Result<Vec<EventRecord>, DbError>;
    async fn add_checkpoint(
        &self,
        job_id: &str,
        step: i64,
        metrics: &Value,
        storage_key: &str,
    ) -> Result<CheckpointRecord, DbError>;
    /// Newest first.
    async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>, DbError>;
    /// 1-based place in the queue of a queued job.
    async fn queue_position(&self, id: &str) -> Result<Option<i64>, DbError>;
}

const JOB_COLUMNS: &str = "id, project_id, model, training_file, validation_file, status, method, hyperparameters, \
     suffix, seed, metadata, fine_tuned_model, trained_tokens, error, result_files, step, total_steps, epoch, \
     estimated_finish, requested_action, lease_owner, lease_expires_at, attempts, executor, created_at, started_at, \
     finished_at";
const EVENT_COLUMNS: &str = "id, job_id, level, type, message, data, created_at";
const CHECKPOINT_COLUMNS: &str = "id, job_id, step_number, metrics, storage_key, created_at";

async fn insert_event<'c, E>(executor: E, job_id: &str, event: &NewEvent) -> Result<EventRecord, DbError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    Ok(sqlx::query_as::<_, EventRecord>(&format!(
        "INSERT INTO job_events (id, job_id, level, type, message, data, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {EVENT_COLUMNS}"
    ))
    .bind(new_id("ftevent"))
    .bind(job_id)
    .bind(event.level)
    .bind(event.kind)
    .bind(&event.message)
    .bind(event.data.as_ref().map(Value::to_string))
    .bind(unix_now())
    .fetch_one(executor)
    .await?)
}

impl SqlStore {
    /// Runs a conditional update of one job and, when it changed the row, records `event`, in
    /// one transaction; returns whether the row changed.
    async fn update_with_event<'q>(
        &self,
        update: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        id: &str,
        event: &NewEvent,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let changed = update.execute(&mut *tx).await?.rows_affected() == 1;
        if changed {
            insert_event(&mut *tx, id, event).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }
}

#[async_trait]
impl JobStore for SqlStore {
    #[tracing::instrument(skip_all, fields(job = %job.id))]
    async fn insert_job(&self, job: &JobRecord, event: NewEvent) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO fine_tuning_jobs ({JOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
             $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)"
        ))
        .bind(&job.id)
        .bind(&job.project_id)
        .bind(&job.model)
        .bind(&job.training_file)
        .bind(&job.validation_file)
        .bind(&job.status)
        .bind(&job.method)
        .bind(&job.hyperparameters)
        .bind(&job.suffix)
        .bind(job.seed)
        .bind(&job.metadata)
        .bind(&job.fine_tuned_model)
        .bind(job.trained_tokens)
        .bind(&job.error)
        .bind(&job.result_files)
        .bind(job.step)
        .bind(job.total_steps)
        .bind(job.epoch)
        .bind(job.estimated_finish)
        .bind(&job.requested_action)
        .bind(&job.lease_owner)
        .bind(job.lease_expires_at)
        .bind(job.attempts)
        .bind(&job.executor)
        .bind(job.created_at)
        .bind(job.started_at)
        .bind(job.finished_at)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut *tx, &job.id, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, project_id: &str, id: &str) -> Result<Option<JobRecord>, DbError> {
        Ok(sqlx::query_as::<_, JobRecord>(&format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE project_id = $1 AND id = $2"
        ))
        .bind(project_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn job_by_id(&self, id: &str) -> Result<Option<JobRecord>, DbError> {
        Ok(sqlx::query_as::<_, JobRecord>(&format!("SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn list_jobs(
        &self,
        project_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<JobRecord>>, DbError> {
        let cursor = match after {
            None => i64::MAX,
            Some(after) => {
                let row: Option<(i64,)> =
                    sqlx::query_as("SELECT seq FROM fine_tuning_jobs WHERE project_id = $1 AND id = $2")
                        .bind(project_id)
                        .bind(after)
                        .fetch_optional(&self.pool)
                        .await?;
                match row {
                    Some((seq,)) => seq,
                    None => return Ok(None),
                }
            }
        };
        let rows = sqlx::query_as::<_, JobRecord>(&format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE project_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        ))
        .bind(project_id)
        .bind(cursor)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(rows))
    }

    #[tracing::instrument(skip(self, event))]
    async fn transition(&self, id: &str, from: &[JobStatus], to: JobStatus, event: NewEvent) -> Result<bool, DbError> {
        let placeholders: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 4)).collect();
        let finished = to.is_terminal().then(unix_now);
        // Leaving `running` (or being requeued) drops the lease and any pending request.
        let sql = format!(
            "UPDATE fine_tuning_jobs SET status = $1, finished_at = COALESCE($2, finished_at), \
             requested_action = NULL, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $3 AND status IN ({})",
            placeholders.join(", ")
        );
        let mut update = sqlx::query(&sql).bind(to.as_str()).bind(finished).bind(id);
        for status in from {
            update = update.bind(status.as_str());
        }
        self.update_with_event(update, id, &event).await
    }

    async fn request_action(&self, id: &str, action: &str, to: JobStatus, event: NewEvent) -> Result<bool, DbError> {
        let update = sqlx::query(
            "UPDATE fine_tuning_jobs SET requested_action = $1, status = $2 WHERE id = $3 \
             AND status IN ('running', 'pausing')",
        )
        .bind(action)
        .bind(to.as_str())
        .bind(id);
        self.update_with_event(update, id, &event).await
    }

    async fn finish_validation(&self, id: &str, hyperparameters: &str, event: NewEvent) -> Result<bool, DbError> {
        let update = sqlx::query(
            "UPDATE fine_tuning_jobs SET status = 'queued', hyperparameters = $1, lease_owner = NULL, \
             lease_expires_at = NULL WHERE id = $2 AND status = 'validating_files'",
        )
        .bind(hyperparameters)
        .bind(id);
        self.update_with_event(update, id, &event).await
    }

    #[tracing::instrument(skip(self))]
    async fn claim_job(&self, status: JobStatus, owner: &str, lease_secs: i64) -> Result<Option<JobRecord>, DbError> {
        let now = unix_now();
        let lock = match self.dialect() {
            Dialect::Postgres => "FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        // Validation keeps its status while claimed; a queued job becomes running.
        let next_status = if status == JobStatus::Queued { JobStatus::Running } else { status };
        // `attempts` counts training runs (validation is not one).
        let sql = format!(
            "UPDATE fine_tuning_jobs SET status = $1, lease_owner = $2, lease_expires_at = $3, \
             attempts = attempts + CASE WHEN $5 = 'queued' THEN 1 ELSE 0 END, \
             started_at = COALESCE(started_at, $4) \
             WHERE id = (SELECT id FROM fine_tuning_jobs WHERE status = $5 AND lease_owner IS NULL \
                         ORDER BY seq LIMIT 1 {lock}) \
               AND status = $5 AND lease_owner IS NULL \
             RETURNING {JOB_COLUMNS}"
        );
        Ok(sqlx::query_as::<_, JobRecord>(&sql)
            .bind(next_status.as_str())
            .bind(owner)
            .bind(now + lease_secs)
            .bind(if status == JobStatus::Queued { Some(now) } else { None })
            .bind(status.as_str())
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn renew_lease(&self, id: &str, owner: &str, lease_secs: i64) -> Result<Lease, DbError> {
        let row: Option<(Option<String>,)> = sqlx::query_as(
            "UPDATE fine_tuning_jobs SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 \
             RETURNING requested_action",
        )
        .bind(unix_now() + lease_secs)
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        Ok(Lease::from_row(row))
    }

    async fn job_control(&self, id: &str, owner: &str) -> Result<Lease, DbError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT requested_action FROM fine_tuning_jobs WHERE id = $1 AND lease_owner = $2")
                .bind(id)
                .bind(owner)
                .fetch_optional(&self.pool)
                .await?;
        Ok(Lease::from_row(row))
    }

    async fn record_executor(&self, id: &str, owner: &str, executor: &str) -> Result<bool, DbError> {
        let update = sqlx::query("UPDATE fine_tuning_jobs SET executor = $1 WHERE id = $2 AND lease_owner = $3")
            .bind(executor)
            .bind(id)
            .bind(owner);
        Ok(update.execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn requeue_expired(&self) -> Result<Vec<String>, DbError> {
        let mut tx = self.pool.begin().await?;
        // A job that will run again shows the progress of the checkpoint it resumes from: what
        // the lapsed attempt did after it is lost. (Right-hand sides read the old row, and the
        // epoch is step / steps per epoch, so it scales with the step.)
        let checkpoint =
            "COALESCE((SELECT MAX(c.step_number) FROM checkpoints c WHERE c.job_id = fine_tuning_jobs.id), 0)";
        let expired: Vec<(String, String)> = sqlx::query_as(&format!(
            "UPDATE fine_tuning_jobs SET \
               status = CASE WHEN requested_action = 'cancel' THEN 'cancelled' \
                             WHEN status = 'validating_files' THEN 'validating_files' \
                             WHEN status = 'pausing' THEN 'paused' ELSE 'queued' END, \
               step = CASE WHEN requested_action = 'cancel' OR status = 'validating_files' THEN step \
                           ELSE {checkpoint} END, \
               epoch = CASE WHEN requested_action = 'cancel' OR status = 'validating_files' OR step = 0 THEN epoch \
                            ELSE epoch * {checkpoint} / step END, \
               estimated_finish = NULL, lease_owner = NULL, lease_expires_at = NULL, requested_action = NULL \
             WHERE lease_owner IS NOT NULL AND lease_expires_at < $1 RETURNING id, status"
        ))
        .bind(unix_now())
        .fetch_all(&mut *tx)
        .await?;
        for (id, status) in &expired {
            let event = NewEvent {
                level: "warn",
                kind: "message",
                message: format!("The executor stopped responding; the job is {status} again and will resume from its last checkpoint"),
                data: None,
            };
            insert_event(&mut *tx, id, &event).await?;
        }
        tx.commit().await?;
        Ok(expired.into_iter().map(|(id, _)| id).collect())
    }

    async fn record_progress(
        &self,
        id: &str,
        owner: &str,
        progress: JobProgress,
        event: NewEvent,
    ) -> Result<bool, DbError> {
        let update = sqlx::query(
            "UPDATE fine_tuning_jobs SET step = $1, total_steps = $2, epoch = $3, estimated_finish = $4 \
             WHERE id = $5 AND lease_owner = $6",
        )
        .bind(progress.step)
        .bind(progress.total_steps)
        .bind(progress.epoch)
        .bind(progress.estimated_finish)
        .bind(id)
        .bind(owner);
        self.update_with_event(update, id, &event).await
    }

    #[tracing::instrument(skip(self, outcome), fields(status = outcome.status.as_str()))]
    async fn complete_job(&self, id: &str, owner: &str, outcome: JobOutcome) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let result_files: Vec<&str> = outcome.result_file.iter().map(|f| f.id.as_str()).collect();
        let changed = sqlx::query(
            "UPDATE fine_tuning_jobs SET status = $1, fine_tuned_model = COALESCE($2, fine_tuned_model), \
             result_files = $3, error = $4, finished_at = $5, lease_owner = NULL, lease_expires_at = NULL, \
             requested_action = NULL, estimated_finish = NULL, trained_tokens = COALESCE($6, trained_tokens) \
             WHERE id = $7 AND lease_owner = $8",
        )
        .bind(outcome.status.as_str())
        .bind(outcome.model.as_ref().map(|m| m.id.clone()))
        .bind(serde_json::to_string(&result_files).unwrap_or_else(|_| "[]".into()))
        .bind(outcome.error.as_ref().map(Value::to_string))
        .bind(outcome.status.is_terminal().then(unix_now))
        .bind(outcome.trained_tokens)
        .bind(id)
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !changed {
            return Ok(false);
        }
        if let Some(model) = &outcome.model {
            super::model_queries::insert_model_in(&mut *tx, model).await?;
        }
        if let Some(file) = &outcome.result_file {
            super::files::insert_file_in(&mut *tx, file).await?;
        }
        insert_event(&mut *tx, id, &outcome.event).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn add_event(&self, job_id: &str, event: NewEvent) -> Result<EventRecord, DbError> {
        insert_event(&self.pool, job_id, &event).await
    }

    async fn list_events(&self, job_id: &str, after: Option<&str>, limit: u32) -> Result<Vec<EventRecord>, DbError> {
        let limit = i64::from(limit);
        let rows = match after {
            Some(after) => {
                sqlx::query_as::<_, EventRecord>(&format!(
                    "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 \
                     AND seq > (SELECT seq FROM job_events WHERE id = $2 AND job_id = $1) ORDER BY seq LIMIT $3"
                ))
                .bind(job_id)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                let mut newest = sqlx::query_as::<_, EventRecord>(&format!(
                    "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 ORDER BY seq DESC LIMIT $2"
                ))
                .bind(job_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                newest.reverse();
                newest
            }
        };
        Ok(rows)
    }

    async fn add_checkpoint(
        &self,
        job_id: &str,
        step: i64,
        metrics: &Value,
        storage_key: &str,
    ) -> Result<CheckpointRecord, DbError> {
        Ok(sqlx::query_as::<_, CheckpointRecord>(&format!(
            "INSERT INTO checkpoints (id, job_id, step_number, metrics, storage_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, step_number) DO UPDATE SET \
             metrics = excluded.metrics, storage_key = excluded.storage_key RETURNING {CHECKPOINT_COLUMNS}"
        ))
        .bind(new_id("ftckpt"))
        .bind(job_id)
        .bind(step)
        .bind(metrics.to_string())
        .bind(storage_key)
        .bind(unix_now())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>, DbError> {
        Ok(sqlx::query_as::<_, CheckpointRecord>(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 ORDER BY step_number DESC"
        ))
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn queue_position(&self, id: &str) -> Result<Option<i64>, DbError> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT COUNT(*) FROM fine_tuning_jobs WHERE status = 'queued' \
             AND seq <= (SELECT seq FROM fine_tuning_jobs WHERE id = $1 AND status = 'queued')",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(n,)| n).filter(|n| *n > 0))
    }
}
