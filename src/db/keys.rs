//! Projects and API keys. Keys are stored as SHA-256 digests only (see `domain::api_key`).

use async_trait::async_trait;

use super::{DbError, SqlStore};
use crate::ids::{new_id, unix_now};

/// The project of anonymous requests (created by the first migration).
pub const DEFAULT_PROJECT_ID: &str = "proj-default";

/// How stale `last_used_at` may get before a request refreshes it (saves a write per request).
const LAST_USED_RESOLUTION_SECS: i64 = 60;

/// What the caller provides to create a key; the secret itself never reaches the store.
pub struct NewApiKey<'a> {
    pub project_name: &'a str,
    pub name: &'a str,
    pub key_hash: &'a str,
    pub display_prefix: &'a str,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRecord {
    pub id: String,
    pub project_id: String,
    pub project_name: String,
    pub name: String,
    pub display_prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[async_trait]
pub trait KeyStore {
    /// Creates the key, and its project when new, in one transaction.
    async fn create_api_key(&self, key: NewApiKey<'_>) -> Result<ApiKeyRecord, DbError>;
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, DbError>;
    /// Revokes a key; `false` when no active key has that id.
    async fn revoke_api_key(&self, id: &str) -> Result<bool, DbError>;
    /// The project of an active key with this hash, if any; records the use.
    async fn authenticate(&self, key_hash: &str) -> Result<Option<String>, DbError>;
    /// Whether any key (revoked or not) was ever created: then anonymous access is off.
    async fn any_keys_configured(&self) -> Result<bool, DbError>;
}

const KEY_COLUMNS: &str = "k.id, k.project_id, p.name AS project_name, k.name, k.display_prefix, \
     k.created_at, k.last_used_at, k.revoked_at";

#[async_trait]
impl KeyStore for SqlStore {
    #[tracing::instrument(skip_all, fields(project = key.project_name))]
    async fn create_api_key(&self, key: NewApiKey<'_>) -> Result<ApiKeyRecord, DbError> {
        let now = unix_now();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO projects (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
            .bind(new_id("proj"))
            .bind(key.project_name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let id = new_id("key");
        sqlx::query(
            "INSERT INTO api_keys (id, project_id, name, display_prefix, key_hash, created_at) \
             SELECT $1, id, $2, $3, $4, $5 FROM projects WHERE name = $6",
        )
        .bind(&id)
        .bind(key.name)
        .bind(key.display_prefix)
        .bind(key.key_hash)
        .bind(now)
        .bind(key.project_name)
        .execute(&mut *tx)
        .await?;
        let record = sqlx::query_as::<_, ApiKeyRecord>(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN projects p ON p.id = k.project_id WHERE k.id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(record)
    }

    #[tracing::instrument(skip_all)]
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, DbError> {
        Ok(sqlx::query_as::<_, ApiKeyRecord>(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN projects p ON p.id = k.project_id ORDER BY k.created_at, k.id"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip(self))]
    async fn revoke_api_key(&self, id: &str) -> Result<bool, DbError> {
        let result = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(unix_now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    #[tracing::instrument(skip_all)]
    async fn authenticate(&self, key_hash: &str) -> Result<Option<String>, DbError> {
        let row: Option<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT id, project_id, last_used_at FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some((key_id, project_id, last_used)) = row else {
            return Ok(None);
        };
        let now = unix_now();
        if last_used.is_none_or(|t| now - t >= LAST_USED_RESOLUTION_SECS) {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(&key_id)
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(project_id))
    }

    async fn any_keys_configured(&self) -> Result<bool, DbError> {
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys").fetch_one(&self.pool).await?;
        Ok(count > 0)
    }
}
