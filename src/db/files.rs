//! Uploaded files: metadata rows; the bytes live in artifact storage under `storage_key`.

use async_trait::async_trait;

use super::{DbError, SqlStore};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct FileRecord {
    pub id: String,
    pub project_id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub status: String,
    pub status_details: Option<String>,
    pub format: Option<String>,
    pub examples: Option<i64>,
    pub storage_key: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListOrder {
    Asc,
    #[default]
    Desc,
}

#[derive(Debug, Clone, Default)]
pub struct FileListQuery {
    /// Only files after this one (in `order`).
    pub after: Option<String>,
    pub limit: u32,
    pub order: ListOrder,
    pub purpose: Option<String>,
}

#[async_trait]
pub trait FileStore {
    async fn insert_file(&self, file: &FileRecord) -> Result<(), DbError>;
    async fn get_file(&self, project_id: &str, id: &str) -> Result<Option<FileRecord>, DbError>;
    /// Up to `limit + 1` files (the extra one tells the caller there are more), or `None`
    /// when `after` names no file of the project.
    async fn list_files(&self, project_id: &str, query: &FileListQuery) -> Result<Option<Vec<FileRecord>>, DbError>;
    /// Deletes the row and returns it, so the caller can delete the stored bytes.
    async fn delete_file(&self, project_id: &str, id: &str) -> Result<Option<FileRecord>, DbError>;
}

/// Inserts a file row with any executor (a pool, or a transaction that writes more).
pub(super) async fn insert_file_in<'c, E>(executor: E, file: &FileRecord) -> Result<(), DbError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(&format!("INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"))
        .bind(&file.id)
        .bind(&file.project_id)
        .bind(&file.filename)
        .bind(&file.purpose)
        .bind(file.bytes)
        .bind(&file.status)
        .bind(&file.status_details)
        .bind(&file.format)
        .bind(file.examples)
        .bind(&file.storage_key)
        .bind(file.created_at)
        .execute(executor)
        .await?;
    Ok(())
}

const FILE_COLUMNS: &str = "id, project_id, filename, purpose, bytes, status, status_details, format, \
     examples, storage_key, created_at";

#[async_trait]
impl FileStore for SqlStore {
    #[tracing::instrument(skip_all, fields(file = %file.id))]
    async fn insert_file(&self, file: &FileRecord) -> Result<(), DbError> {
        insert_file_in(&self.pool, file).await
    }

    #[tracing::instrument(skip(self))]
    async fn get_file(&self, project_id: &str, id: &str) -> Result<Option<FileRecord>, DbError> {
        Ok(sqlx::query_as::<_, FileRecord>(&format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE project_id = $1 AND id = $2"
        ))
        .bind(project_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip(self))]
    async fn list_files(&self, project_id: &str, query: &FileListQuery) -> Result<Option<Vec<FileRecord>>, DbError> {
        let cursor = match &query.after {
            None => None,
            Some(after) => {
                let seq: Option<(i64,)> = sqlx::query_as("SELECT seq FROM files WHERE project_id = $1 AND id = $2")
                    .bind(project_id)
                    .bind(after)
                    .fetch_optional(&self.pool)
                    .await?;
                match seq {
                    Some((seq,)) => Some(seq),
                    None => return Ok(None),
                }
            }
        };
        let (comparison, direction) = match query.order {
            ListOrder::Asc => (">", "ASC"),
            ListOrder::Desc => ("<", "DESC"),
        };
        let mut sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE project_id = $1");
        let mut next = 2;
        if cursor.is_some() {
            sql += &format!(" AND seq {comparison} ${next}");
            next += 1;
        }
        if query.purpose.is_some() {
            sql += &format!(" AND purpose = ${next}");
            next += 1;
        }
        sql += &format!(" ORDER BY seq {direction} LIMIT ${next}");
        let mut select = sqlx::query_as::<_, FileRecord>(&sql).bind(project_id);
        if let Some(seq) = cursor {
            select = select.bind(seq);
        }
        if let Some(purpose) = &query.purpose {
            select = select.bind(purpose);
        }
        let rows = select.bind(i64::from(query.limit) + 1).fetch_all(&self.pool).await?;
        Ok(Some(rows))
    }

    #[tracing::instrument(skip(self))]
    async fn delete_file(&self, project_id: &str, id: &str) -> Result<Option<FileRecord>, DbError> {
        // One statement, so two concurrent deletes cannot both claim the row.
        Ok(sqlx::query_as::<_, FileRecord>(&format!(
            "DELETE FROM files WHERE project_id = $1 AND id = $2 RETURNING {FILE_COLUMNS}"
        ))
        .bind(project_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }
}
