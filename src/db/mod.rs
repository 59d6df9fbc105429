//! The database: one [`Store`] trait, implemented over Postgres and SQLite by [`SqlStore`],
//! chosen from the URL scheme. Each resource has its own sub-trait and file.
//!
//! Queries are runtime-checked SQL written once for both dialects (`$n` placeholders work in both);
//! where the dialects differ, `SqlStore` branches on its [`Dialect`]. The store knows nothing of HTTP.

mod files;
mod job_queries;
mod job_records;
mod jobs;
mod keys;
mod model_queries;
mod sql;

use async_trait::async_trait;

pub use files::{FileListQuery, FileRecord, FileStore, ListOrder};
pub use job_queries::JobQueryStore;
pub use jobs::{CheckpointRecord, EventRecord, JobOutcome, JobProgress, JobRecord, JobStore, Lease, NewEvent};
pub use keys::{ApiKeyRecord, KeyStore, NewApiKey, DEFAULT_PROJECT_ID};
pub use model_queries::{ModelRecord, ModelStore};
pub use sql::{Dialect, SqlStore};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL `{0}` (use postgres://... or sqlite://...)")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("could not prepare the database directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt row in `{table}`: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

/// Everything the service keeps in its database.
#[async_trait]
pub trait Store: KeyStore + FileStore + JobStore + JobQueryStore + ModelStore + Send + Sync + 'static {
    /// A round trip to the database, for readiness checks.
    async fn ping(&self) -> Result<(), DbError>;
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), DbError>;
    fn dialect(&self) -> Dialect;
}
