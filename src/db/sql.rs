//! `SqlStore`: the connection pool, dialect and migrations.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

use super::{DbError, Store};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// The store over a sqlx `Any` pool of either backend.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(super) pool: AnyPool,
    dialect: Dialect,
}

impl SqlStore {
    /// Connects to `url` (creating a SQLite file and its directory when missing). Does not migrate.
    #[tracing::instrument(skip_all, fields(dialect))]
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(DbError::UnsupportedUrl(redact_url(url)));
        };
        tracing::Span::current().record("dialect", tracing::field::debug(dialect));
        let url = match dialect {
            Dialect::Sqlite => prepare_sqlite_url(url)?,
            Dialect::Postgres => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let mut pool = AnyPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(10));
        if dialect == Dialect::Sqlite {
            pool = pool.after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; PRAGMA synchronous = NORMAL;")
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = pool.connect_with(options).await?;
        if dialect == Dialect::Sqlite {
            // WAL lets readers proceed during writes; the mode is stored in the database file.
            pool.execute("PRAGMA journal_mode = WAL").await?;
        }
        Ok(Self { pool, dialect })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn ping(&self) -> Result<(), DbError> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn migrate(&self) -> Result<(), DbError> {
        match self.dialect {
            Dialect::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
            Dialect::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
    }

    fn dialect(&self) -> Dialect {
        self.dialect
    }
}

/// Creates the directory of a SQLite file and asks SQLite to create the file (`mode=rwc`).
fn prepare_sqlite_url(url: &str) -> Result<String, DbError> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:" && !path.is_empty() {
        if let Some(parent) = std::path::Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
    }
    Ok(match query {
        "" => format!("sqlite://{path}?mode=rwc"),
        q if q.contains("mode=") => url.to_string(),
        q => format!("sqlite://{path}?{q}&mode=rwc"),
    })
}

/// The URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://me:secret@db/x"), "postgres://me:***@db/x");
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }
}
