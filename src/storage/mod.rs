//! Artifact storage: the bytes of files, checkpoints and models, behind one [`ArtifactStore`] trait.
//! Implementations: a local directory (the default) and S3-compatible object storage.
//!
//! Everything streams: uploads go through an [`Upload`] that is either committed (the object
//! appears whole) or aborted (nothing remains), so a failed upload never leaves a partial object.

mod local;
mod s3;
pub mod tar;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

pub use local::LocalStore;
pub use s3::{S3Settings, S3Store};

/// A stream of object bytes.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object `{0}` not found")]
    NotFound(String),
    #[error("invalid object key `{0}`")]
    InvalidKey(String),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("object storage error: {0}")]
    S3(String),
    #[error("invalid storage configuration: {0}")]
    Config(String),
}

/// A stored object, ready to stream.
pub struct Download {
    pub size: u64,
    pub body: ByteStream,
}

#[async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Where objects go, for logs (`/var/lib/ferrotune/artifacts`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
    /// Starts writing `key`; the object is visible only after [`Upload::commit`].
    async fn begin_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError>;
    async fn get(&self, key: &str) -> Result<Download, StorageError>;
    /// Deletes `key`; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Whether the storage is reachable and writable, for readiness checks.
    async fn check(&self) -> Result<(), StorageError>;
    /// Names of the objects directly under `prefix` (a key without a trailing `/`), sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
}

/// An object being written. Dropping it without `commit` discards what was written.
#[async_trait]
pub trait Upload: Send {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError>;
    /// Makes the object visible, whole; returns its size.
    async fn commit(self: Box<Self>) -> Result<u64, StorageError>;
    /// Discards everything written.
    async fn abort(self: Box<Self>) -> Result<(), StorageError>;
}

/// Writes a whole stream to `key`, aborting the upload on any error.
pub async fn put_stream(store: &dyn ArtifactStore, key: &str, mut body: ByteStream) -> Result<u64, StorageError> {
    let mut upload = store.begin_upload(key).await?;
    while let Some(chunk) = body.next().await {
        let written = match chunk {
            Ok(chunk) => upload.write(chunk).await,
            Err(err) => Err(err.into()),
        };
        if let Err(err) = written {
            let _ = upload.abort().await;
            return Err(err);
        }
    }
    upload.commit().await
}

/// Where artifacts are stored, parsed from `--storage-url`.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageSettings {
    Local(PathBuf),
    S3(S3Settings),
}

impl StorageSettings {
    /// `s3://bucket/prefix`, `file:///path` or a plain path.
    pub fn parse(
        url: &str,
        endpoint: Option<String>,
        region: Option<String>,
        force_path_style: bool,
    ) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(!bucket.is_empty(), "storage URL `{url}` names no bucket");
            let prefix = prefix.trim_matches('/');
            Ok(Self::S3(S3Settings {
                bucket: bucket.to_string(),
                prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
                endpoint,
                region,
                force_path_style,
            }))
        } else if let Some(path) = url.strip_prefix("file://") {
            Ok(Self::Local(PathBuf::from(path)))
        } else {
            anyhow::ensure!(!url.contains("://"), "unsupported storage URL `{url}` (use a path, file:// or s3://)");
            Ok(Self::Local(PathBuf::from(url)))
        }
    }
}

/// Opens the configured store.
pub async fn open(settings: &StorageSettings) -> Result<Arc<dyn ArtifactStore>, StorageError> {
    Ok(match settings {
        StorageSettings::Local(root) => Arc::new(LocalStore::open(root.clone()).await?),
        StorageSettings::S3(s3) => Arc::new(S3Store::open(s3).await?),
    })
}

/// Keys are relative `/`-separated paths of `[A-Za-z0-9._-]` segments, never `.` or `..`.
pub(crate) fn validate_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls_parse() {
        let s3 = StorageSettings::parse("s3://bucket/some/prefix/", None, None, true).unwrap();
        match s3 {
            StorageSettings::S3(s) => {
                assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("bucket", "some/prefix/"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            StorageSettings::parse("file:///data", None, None, false).unwrap(),
            StorageSettings::Local("/data".into())
        );
        assert!(StorageSettings::parse("gs://x", None, None, false).is_err());
    }

    #[test]
    fn keys_cannot_escape_the_root() {
        assert!(validate_key("files/proj-1/file-abc").is_ok());
        for bad in ["", "/abs", "a/../b", "a//b", "a/./b", "sp ace"] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }
}
