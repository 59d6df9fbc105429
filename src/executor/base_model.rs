//! Finding a base model's files on this machine: a configured directory as is, or an
//! object-storage prefix downloaded once into a local cache.

use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, ModelSource};
use crate::storage::ArtifactStore;

/// Marks a cache directory as completely downloaded.
const COMPLETE: &str = ".complete";

/// The local directory holding `name`'s Hugging Face files, downloading them into `cache` when
/// the model lives in artifact storage. Errors are for the user: the model cannot be used.
pub async fn local_model_dir(
    catalog: &Catalog,
    storage: &dyn ArtifactStore,
    name: &str,
    cache: &Path,
) -> Result<PathBuf, String> {
    match catalog.get(name).map(|m| &m.source) {
        Some(ModelSource::Directory(dir)) => Ok(dir.clone()),
        Some(ModelSource::Storage(prefix)) => {
            download_once(storage, prefix.trim_end_matches('/'), &cache.join(cache_name(name)))
                .await
                .map_err(|e| format!("could not fetch base model {name} from storage: {e}"))
        }
        Some(ModelSource::Gguf(file)) => {
            let dir = cache.join(cache_name(name));
            let file = file.clone();
            tokio::task::spawn_blocking(move || materialize_once(&file, &dir))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("base model {name}: {e}"))
        }
        Some(ModelSource::Hub(id)) => Err(format!(
            "base model {name} is the Hugging Face Hub model {id}; this deployment cannot download from the Hub: \
             download it and configure its directory instead"
        )),
        None => Err(format!("base model {name} is not configured on this machine")),
    }
}

/// A GGUF file's directory form (config, tokenizer, a link to the weights), made once.
fn materialize_once(file: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.join(COMPLETE).exists() {
        return Ok(dir.to_path_buf());
    }
    let staging = dir.with_extension(format!("partial-{}", crate::ids::random_alphanumeric(6)));
    crate::models::gguf::materialize(file, &staging)?;
    std::fs::write(staging.join(COMPLETE), b"")?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::rename(&staging, dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(dir.to_path_buf())
}

fn cache_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

pub(crate) async fn download_once(
    storage: &dyn ArtifactStore,
    prefix: &str,
    dir: &Path,
) -> Result<PathBuf, crate::storage::StorageError> {
    if dir.join(COMPLETE).exists() {
        return Ok(dir.to_path_buf());
    }
    let names = storage.list(prefix).await?;
    if !names.iter().any(|n| n == "config.json") {
        return Err(crate::storage::StorageError::NotFound(format!("{prefix}/config.json")));
    }
    // Download beside the target and rename, so a concurrent reader never sees half a model.
    let staging = dir.with_extension(format!("partial-{}", crate::ids::random_alphanumeric(6)));
    super::artifacts::download_files(storage, prefix, &names, &staging).await?;
    tokio::fs::write(staging.join(COMPLETE), b"").await?;
    if let Some(parent) = dir.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    if tokio::fs::rename(&staging, dir).await.is_err() {
        // Another executor finished first; its copy is as good.
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    Ok(dir.to_path_buf())
}
