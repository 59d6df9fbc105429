//! The base models this deployment offers, by name: a local Hugging Face directory, a GGUF file,
//! an object-storage prefix, or a Hugging Face Hub id. Configured by a YAML file and/or flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where a base model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory with config.json, safetensors and tokenizer files.
    Directory(PathBuf),
    /// A GGUF file (trainable once quantized bases are supported).
    Gguf(PathBuf),
    /// A prefix in artifact storage holding a Hugging Face directory's files.
    Storage(String),
    /// A Hugging Face Hub id, downloaded into the cache on first use.
    Hub(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModel {
    pub name: String,
    pub source: ModelSource,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: BTreeMap<String, BaseModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    path: Option<PathBuf>,
    gguf: Option<PathBuf>,
    storage: Option<String>,
    hub: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    models: Vec<FileEntry>,
}

impl Catalog {
    /// Reads `models: [{name, path | gguf | storage | hub}]`; relative paths are resolved against
    /// the file's folder.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the model catalog {}: {e}", path.display()))?;
        let file: CatalogFile =
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("model catalog {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut catalog = Self::default();
        for entry in file.models {
            let source = match (entry.path, entry.gguf, entry.storage, entry.hub) {
                (Some(p), None, None, None) => ModelSource::Directory(base.join(p)),
                (None, Some(p), None, None) => ModelSource::Gguf(base.join(p)),
                (None, None, Some(prefix), None) => ModelSource::Storage(prefix),
                (None, None, None, Some(id)) => ModelSource::Hub(id),
                _ => anyhow::bail!("model {:?}: give exactly one of path, gguf, storage or hub", entry.name),
            };
            catalog.add(&entry.name, source)?;
        }
        Ok(catalog)
    }

    /// Parses `NAME=PATH` (a directory, or a `.gguf` file).
    pub fn add_flag(&mut self, flag: &str) -> anyhow::Result<()> {
        let (name, path) =
            flag.split_once('=').ok_or_else(|| anyhow::anyhow!("--base-model takes NAME=PATH, not {flag:?}"))?;
        let path = PathBuf::from(path);
        let source = if path.extension().is_some_and(|e| e == "gguf") {
            ModelSource::Gguf(path)
        } else {
            ModelSource::Directory(path)
        };
        self.add(name, source)
    }

    pub fn add(&mut self, name: &str, source: ModelSource) -> anyhow::Result<()> {
        let valid = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with("ft:")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        anyhow::ensure!(valid, "invalid base model name {name:?} (letters, digits, - _ . / only; not ft:)");
        if let ModelSource::Directory(dir) = &source {
            anyhow::ensure!(
                dir.join("config.json").exists(),
                "base model {name}: {} has no config.json",
                dir.display()
            );
        }
        if let ModelSource::Gguf(file) = &source {
            anyhow::ensure!(file.is_file(), "base model {name}: {} is not a file", file.display());
        }
        self.models.insert(name.to_string(), BaseModel { name: name.to_string(), source });
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&BaseModel> {
        self.models.get(name)
    }

    pub fn list(&self) -> impl Iterator<Item = &BaseModel> {
        self.models.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_files_define_models() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tiny")).unwrap();
        std::fs::write(dir.path().join("tiny/config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("smol.gguf"), "GGUF").unwrap();
        let file = dir.path().join("models.yaml");
        std::fs::write(&file, "models:\n  - {name: tiny, path: tiny}\n  - {name: smol, gguf: smol.gguf}\n  - {name: remote, hub: org/model}\n").unwrap();
        let mut catalog = Catalog::from_file(&file).unwrap();
        assert_eq!(catalog.get("tiny").unwrap().source, ModelSource::Directory(dir.path().join("tiny")));
        assert_eq!(catalog.get("smol").unwrap().source, ModelSource::Gguf(dir.path().join("smol.gguf")));
        catalog.add_flag(&format!("again={}", dir.path().join("tiny").display())).unwrap();
        assert_eq!(catalog.list().count(), 4);
        assert!(catalog.add_flag("no-equals").is_err());
        assert!(catalog.add("ft:x", ModelSource::Hub("a/b".into())).is_err());
        assert!(catalog.add_flag(&format!("missing={}", dir.path().join("nope").display())).is_err());
    }
}
