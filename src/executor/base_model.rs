//! Finding a model's files on this machine: a configured directory as is, an object-storage
//! prefix downloaded once into a local cache, or, for a job that continues from one of its
//! project's fine-tuned models, that model as a Hugging Face directory (its stored files, or its
//! adapter merged into its own base), made once.

use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, ModelSource};
use crate::db::Store;
use crate::domain::model_name::parse_fine_tuned_name;
use crate::storage::ArtifactStore;

/// Marks a cache directory as completely made.
const COMPLETE: &str = ".complete";

/// Where the models a request may name come from.
#[derive(Clone, Copy)]
pub struct ModelSources<'a> {
    pub catalog: &'a Catalog,
    pub storage: &'a dyn ArtifactStore,
    /// The fine-tuned models (`ft:` names) of this project, or none (base models only).
    pub fine_tuned: Option<(&'a dyn Store, &'a str)>,
}

/// The local directory holding `name`'s Hugging Face files, fetching or making them under
/// `cache` when needed. Errors are for the user: the model cannot be used.
pub async fn local_model_dir(sources: ModelSources<'_>, name: &str, cache: &Path) -> Result<PathBuf, String> {
    if name.starts_with("ft:") {
        return Box::pin(fine_tuned_dir(sources, name, cache)).await;
    }
    match sources.catalog.get(name).map(|m| &m.source) {
        Some(ModelSource::Directory(dir)) => Ok(dir.clone()),
        Some(ModelSource::Storage(prefix)) => {
            download_once(sources.storage, prefix.trim_end_matches('/'), &cache.join(cache_name(name)))
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

/// A fine-tuned model as a full model directory: a fully fine-tuned model's stored files, or a
/// LoRA adapter merged into its base (itself resolved the same way, so chains work). The record
/// is read every time, so a deleted model is refused even where its files are still cached.
async fn fine_tuned_dir(sources: ModelSources<'_>, name: &str, cache: &Path) -> Result<PathBuf, String> {
    let Some((store, project)) = sources.fine_tuned else {
        return Err(format!("{name} is a fine-tuned model; only base models can be used here"));
    };
    let parsed = parse_fine_tuned_name(name).ok_or_else(|| format!("{name} is not a fine-tuned model name"))?;
    if parsed.checkpoint_step.is_some() {
        return Err(format!("{name} is a checkpoint; start from its job's fine-tuned model instead"));
    }
    let record = store
        .get_model(project, &parsed.model)
        .await
        .map_err(|e| format!("could not look up {name}: {e}"))?
        .ok_or_else(|| format!("the fine-tuned model {name} does not exist (it may have been deleted)"))?;
    let dir = cache.join("fine-tuned").join(cache_name(name));
    let key = record.storage_key.trim_end_matches('/');
    match record.method.as_str() {
        "full" => download_once(sources.storage, key, &dir)
            .await
            .map_err(|e| format!("could not fetch the fine-tuned model {name} from storage: {e}")),
        "lora" => {
            if dir.join(COMPLETE).exists() {
                return Ok(dir);
            }
            let base = Box::pin(local_model_dir(sources, &record.base_model, cache)).await?;
            let adapter = tempfile::tempdir().map_err(|e| e.to_string())?;
            let names = [crate::peft::adapter::CONFIG_FILE, crate::peft::adapter::WEIGHTS_FILE].map(String::from);
            super::artifacts::download_files(sources.storage, key, &names, adapter.path())
                .await
                .map_err(|e| format!("could not fetch the adapter of {name} from storage: {e}"))?;
            tokio::task::spawn_blocking(move || {
                build_once(&dir, |staging| crate::train::output::merge_adapter_dir(&base, adapter.path(), staging))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("could not merge the adapter of {name} into its base: {e}"))
        }
        other => Err(format!(
            "{name} is a {other} adapter: it adds layers or positions that cannot be merged into the base \
             weights, so no job can start from it"
        )),
    }
}

/// A GGUF file's directory form (config, tokenizer, a link to the weights), made once.
fn materialize_once(file: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    build_once(dir, |staging| crate::models::gguf::materialize(file, staging))
}

/// Makes `dir` with `build` once: beside it first, then renamed into place, so a concurrent
/// reader never sees half of it (a concurrent maker's copy is as good).
fn build_once(dir: &Path, build: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<PathBuf> {
    if dir.join(COMPLETE).exists() {
        return Ok(dir.to_path_buf());
    }
    let staging = dir.with_extension(format!("partial-{}", crate::ids::random_alphanumeric(6)));
    if let Err(err) = build(&staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(err);
    }
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
    download_once_with(storage, prefix, dir, "config.json").await
}

/// [`download_once`] of a stored directory that must hold `required` (`adapter_config.json` for an
/// adapter).
pub(crate) async fn download_once_with(
    storage: &dyn ArtifactStore,
    prefix: &str,
    dir: &Path,
    required: &str,
) -> Result<PathBuf, crate::storage::StorageError> {
    if dir.join(COMPLETE).exists() {
        return Ok(dir.to_path_buf());
    }
    let names = storage.list(prefix).await?;
    if !names.iter().any(|n| n == required) {
        return Err(crate::storage::StorageError::NotFound(format!("{prefix}/{required}")));
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
