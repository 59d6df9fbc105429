//! A local directory as artifact storage. Uploads are written to `.uploads/` under the root,
//! synced, then renamed into place, so readers never see a partial object.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio_util::io::ReaderStream;

use super::{validate_key, ArtifactStore, Download, StorageError, Upload};

const UPLOADS_DIR: &str = ".uploads";
const WRITE_BUFFER: usize = 1 << 20;
const READ_CHUNK: usize = 256 << 10;
const STALE_UPLOAD_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) the directory and clears uploads that a crash left behind
    /// (only old ones: another process may share the directory and be uploading now).
    pub async fn open(root: PathBuf) -> Result<Self, StorageError> {
        let uploads = root.join(UPLOADS_DIR);
        tokio::fs::create_dir_all(&uploads).await?;
        let mut entries = tokio::fs::read_dir(&uploads).await?;
        while let Some(entry) = entries.next_entry().await? {
            let stale = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_UPLOAD_AGE);
            if stale {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
        Ok(Self { root })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

#[async_trait]
impl ArtifactStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    async fn begin_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
        let target = self.path_of(key)?;
        let temp = self.root.join(UPLOADS_DIR).join(format!("{}.part", uuid::Uuid::new_v4()));
        let file = tokio::fs::File::create(&temp).await?;
        Ok(Box::new(LocalUpload {
            file: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
            temp,
            target,
            written: 0,
            committed: false,
        }))
    }

    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        let path = self.path_of(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound(key.to_string()))
            }
            Err(err) => return Err(err.into()),
        };
        let size = file.metadata().await?.len();
        Ok(Download { size, body: Box::pin(ReaderStream::with_capacity(file, READ_CHUNK)) })
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match tokio::fs::remove_file(self.path_of(key)?).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let dir = self.path_of(prefix)?;
        let mut names = Vec::new();
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(err) => return Err(err.into()),
        };
        while let Some(entry) = entries.next_entry().await? {
            if entry.file_type().await?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    async fn check(&self) -> Result<(), StorageError> {
        let probe = self.root.join(UPLOADS_DIR).join(format!("ready-{}", uuid::Uuid::new_v4()));
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await?;
        Ok(())
    }
}

struct LocalUpload {
    /// `None` once committed or aborted.
    file: Option<BufWriter<tokio::fs::File>>,
    temp: PathBuf,
    target: PathBuf,
    written: u64,
    committed: bool,
}

#[async_trait]
impl Upload for LocalUpload {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        let file = self.file.as_mut().expect("upload already finished");
        file.write_all(&chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<u64, StorageError> {
        let mut file = self.file.take().expect("upload already finished");
        file.flush().await?;
        file.get_ref().sync_all().await?;
        drop(file);
        if let Some(parent) = self.target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&self.temp, &self.target).await?;
        self.committed = true;
        sync_dir(self.target.parent()).await;
        Ok(self.written)
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.file.take();
        tokio::fs::remove_file(&self.temp).await?;
        Ok(())
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        // Not committed (aborted, failed, or the request was dropped): discard the partial file.
        if !self.committed {
            self.file.take();
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Makes a rename durable; best effort (not every filesystem allows opening a directory).
async fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir {
        if let Ok(handle) = tokio::fs::File::open(dir).await {
            let _ = handle.sync_all().await;
        }
    }
}
