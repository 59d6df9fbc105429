//! Moving a job's files between artifact storage and the executor's work directory.

use std::path::Path;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::storage::{put_stream, ArtifactStore, StorageError};

/// Uploads every regular file directly inside `dir` to `<prefix>/<name>`; returns the names.
pub async fn upload_dir(storage: &dyn ArtifactStore, dir: &Path, prefix: &str) -> Result<Vec<String>, StorageError> {
    let mut names = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        if !entry.file_type().await?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let file = tokio::fs::File::open(entry.path()).await?;
        put_stream(storage, &format!("{prefix}/{name}"), Box::pin(ReaderStream::with_capacity(file, 1 << 20))).await?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Downloads `key` to `path` (written whole, then renamed into place).
pub async fn download(storage: &dyn ArtifactStore, key: &str, path: &Path) -> Result<(), StorageError> {
    let mut download = storage.get(key).await?;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let partial = path.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial).await?;
    while let Some(chunk) = download.body.next().await {
        file.write_all(&chunk?).await?;
    }
    file.sync_all().await?;
    tokio::fs::rename(&partial, path).await?;
    Ok(())
}

/// Downloads `<prefix>/<name>` for each name into `dir`.
pub async fn download_files(
    storage: &dyn ArtifactStore,
    prefix: &str,
    names: &[String],
    dir: &Path,
) -> Result<(), StorageError> {
    for name in names {
        download(storage, &format!("{prefix}/{name}"), &dir.join(name)).await?;
    }
    Ok(())
}
