//! Fine-tuned models: one row per model a job produced; the weights live in artifact storage
//! under `storage_key`. Base models are not here (they come from the catalog).

use async_trait::async_trait;

use super::{DbError, SqlStore};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ModelRecord {
    /// The public name, `ft:<base>:<project>:<suffix>:<job>`.
    pub id: String,
    pub project_id: String,
    pub job_id: Option<String>,
    pub base_model: String,
    /// How it was trained (`lora` or `full`), i.e. what lies under `storage_key`.
    pub method: String,
    pub storage_key: String,
    pub created_at: i64,
}

#[async_trait]
pub trait ModelStore {
    async fn insert_model(&self, model: &ModelRecord) -> Result<(), DbError>;
    /// The project's fine-tuned models, oldest first.
    async fn list_models(&self, project_id: &str) -> Result<Vec<ModelRecord>, DbError>;
    async fn get_model(&self, project_id: &str, id: &str) -> Result<Option<ModelRecord>, DbError>;
    /// Deletes the row and returns it, so the caller can delete the stored weights.
    async fn delete_model(&self, project_id: &str, id: &str) -> Result<Option<ModelRecord>, DbError>;
}

const MODEL_COLUMNS: &str = "id, project_id, job_id, base_model, method, storage_key, created_at";

/// Inserts a model row with any executor (the pool, or the transaction that ends its job).
pub(super) async fn insert_model_in<'c, E>(executor: E, model: &ModelRecord) -> Result<(), DbError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(&format!("INSERT INTO models ({MODEL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"))
        .bind(&model.id)
        .bind(&model.project_id)
        .bind(&model.job_id)
        .bind(&model.base_model)
        .bind(&model.method)
        .bind(&model.storage_key)
        .bind(model.created_at)
        .execute(executor)
        .await?;
    Ok(())
}

#[async_trait]
impl ModelStore for SqlStore {
    #[tracing::instrument(skip_all, fields(model = %model.id))]
    async fn insert_model(&self, model: &ModelRecord) -> Result<(), DbError> {
        insert_model_in(&self.pool, model).await
    }

    #[tracing::instrument(skip(self))]
    async fn list_models(&self, project_id: &str) -> Result<Vec<ModelRecord>, DbError> {
        Ok(sqlx::query_as::<_, ModelRecord>(&format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE project_id = $1 ORDER BY seq"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip(self))]
    async fn get_model(&self, project_id: &str, id: &str) -> Result<Option<ModelRecord>, DbError> {
        Ok(sqlx::query_as::<_, ModelRecord>(&format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE project_id = $1 AND id = $2"
        ))
        .bind(project_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip(self))]
    async fn delete_model(&self, project_id: &str, id: &str) -> Result<Option<ModelRecord>, DbError> {
        // One statement, so two concurrent deletes cannot both claim the row.
        Ok(sqlx::query_as::<_, ModelRecord>(&format!(
            "DELETE FROM models WHERE project_id = $1 AND id = $2 RETURNING {MODEL_COLUMNS}"
        ))
        .bind(project_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }
}
