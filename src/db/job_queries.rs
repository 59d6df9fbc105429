//! Read-only job queries the API needs beyond the queue contract in `jobs`: events paged newest
//! first, events from the very first one (for streams), and project names (for model names).

use async_trait::async_trait;

use super::{DbError, EventRecord, SqlStore};

#[async_trait]
pub trait JobQueryStore {
    /// Newest first, older than `before` (an event id of this job); up to `limit + 1` rows (the
    /// extra one says there are more). `None` when `before` is not an event of the job.
    async fn list_events_before(
        &self,
        job_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<EventRecord>>, DbError>;
    /// Oldest first, newer than `after` (an event id of this job), or from the first event.
    async fn list_events_after(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, DbError>;
    /// The name of a project, which fine-tuned model names carry.
    async fn project_name(&self, project_id: &str) -> Result<Option<String>, DbError>;
}

const EVENT_COLUMNS: &str = "id, job_id, level, type, message, data, created_at";

impl SqlStore {
    async fn event_seq(&self, job_id: &str, event_id: &str) -> Result<Option<i64>, DbError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT seq FROM job_events WHERE job_id = $1 AND id = $2")
            .bind(job_id)
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(seq,)| seq))
    }
}

#[async_trait]
impl JobQueryStore for SqlStore {
    #[tracing::instrument(skip(self))]
    async fn list_events_before(
        &self,
        job_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<EventRecord>>, DbError> {
        let cursor = match before {
            None => i64::MAX,
            Some(before) => match self.event_seq(job_id, before).await? {
                Some(seq) => seq,
                None => return Ok(None),
            },
        };
        let rows = sqlx::query_as::<_, EventRecord>(&format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        ))
        .bind(job_id)
        .bind(cursor)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(rows))
    }

    #[tracing::instrument(skip(self))]
    async fn list_events_after(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, DbError> {
        let cursor = match after {
            None => 0,
            // An unknown cursor lists nothing rather than everything.
            Some(after) => self.event_seq(job_id, after).await?.unwrap_or(i64::MAX),
        };
        Ok(sqlx::query_as::<_, EventRecord>(&format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(job_id)
        .bind(cursor)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn project_name(&self, project_id: &str) -> Result<Option<String>, DbError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT name FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(name,)| name))
    }
}
