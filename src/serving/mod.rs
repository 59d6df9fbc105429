//! What the inference endpoints serve from: one generation engine per loaded model, shared by
//! every LoRA adapter on it, and the adapters themselves, loaded lazily from artifact storage into
//! a cache bounded by a memory budget (least recently used out first).
//!
//! Which model a name means, and whether the caller may use it, is decided per request by the
//! HTTP layer ([`Target`]); this module only loads and caches. Loading (disk, storage, weights)
//! runs on blocking threads, generation on each engine's own thread.

mod cache;
pub mod encoder;
mod load;
pub mod seq2seq;

use std::path::PathBuf;
use std::sync::Arc;

use cache::LruCells;

use crate::catalog::Catalog;
use crate::executor::plan::JobPlan;
use crate::infer::engine::{Engine, EngineSettings};
use crate::models::llama::ServingAdapter;
use crate::storage::ArtifactStore;

#[derive(Debug, Clone)]
pub struct InferenceSettings {
    pub engine: EngineSettings,
    /// Memory for loaded LoRA adapters; the least recently used go first beyond it.
    pub adapter_cache_bytes: usize,
    /// Models (bases and fully fine-tuned models) kept loaded at once.
    pub max_models: usize,
    /// Where base and fine-tuned models fetched from storage are cached.
    pub work_dir: PathBuf,
    /// Where engines decode (weights, KV caches and adapters live there).
    pub device: crate::device::DeviceSpec,
}

/// Where a fine-tuned model's weights are.
#[derive(Debug, Clone)]
pub enum WeightsSource {
    /// The stored output of a finished job (a PEFT adapter, or a model directory).
    Stored { prefix: String },
    /// A checkpoint's trainable tensors, and the plan of the job that wrote it.
    Checkpoint { prefix: String, plan: Box<JobPlan> },
}

/// Where the weights of an encoder or encoder-decoder being served are, on this machine.
#[derive(Debug, Clone)]
pub enum Weights {
    /// A model directory (a base, or a fully fine-tuned output).
    Model(PathBuf),
    /// An adapter directory (LoRA or bottleneck) over a base directory.
    Adapter { base: PathBuf, adapter: PathBuf },
    /// A checkpoint directory (`trainable.safetensors`, and an encoder's `task.json`) of a job run
    /// with `plan`.
    Checkpoint { base: PathBuf, dir: PathBuf, plan: Box<crate::executor::plan::JobPlan> },
}

/// What a requested model name resolved to (after the caller's access was checked).
#[derive(Debug, Clone)]
pub enum Target {
    /// A base model of the catalog.
    Base { name: String },
    /// An adapter, served over its base's engine. The base is a catalog model or, for a job that
    /// continued from a fine-tuned model, that model (of `project`).
    Adapter { id: String, base: String, project: String, source: WeightsSource },
    /// A fully fine-tuned model or checkpoint, with an engine of its own.
    Full { id: String, base: String, project: String, source: WeightsSource },
}

/// Why a model cannot be served; the message is for the user.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    NotSupported(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub struct Inference {
    catalog: Arc<Catalog>,
    /// Where the fine-tuned models that others were trained from are looked up.
    store: Arc<dyn crate::db::Store>,
    storage: Arc<dyn ArtifactStore>,
    settings: InferenceSettings,
    device: candle_core::Device,
    engines: LruCells<Engine>,
    adapters: LruCells<ServingAdapter>,
    /// Encoder engines (embeddings, classification), one per model and purpose.
    encoders: LruCells<encoder::EncoderEngine>,
    /// Encoder-decoder (T5) generation engines, one per model, adapter or checkpoint.
    seq2seq: LruCells<seq2seq::Seq2SeqEngine>,
}

impl Inference {
    /// Opens the serving device, or says why it cannot be used.
    pub fn new(
        catalog: Arc<Catalog>,
        store: Arc<dyn crate::db::Store>,
        storage: Arc<dyn ArtifactStore>,
        settings: InferenceSettings,
    ) -> Result<Self, crate::device::DeviceError> {
        let device = settings.device.open()?;
        Ok(Self {
            catalog,
            store,
            storage,
            settings,
            device,
            engines: LruCells::new(),
            adapters: LruCells::new(),
            encoders: LruCells::new(),
            seq2seq: LruCells::new(),
        })
    }

    pub fn settings(&self) -> &InferenceSettings {
        &self.settings
    }

    /// The local directory of a catalog base model, or of a fine-tuned model of `project`
    /// (fetched from storage, or merged, into this process's model cache once), or why it cannot
    /// be used (a message for the user).
    pub async fn model_dir(&self, project: Option<&str>, name: &str) -> Result<PathBuf, String> {
        let sources = crate::executor::ModelSources {
            catalog: &self.catalog,
            storage: self.storage.as_ref(),
            fine_tuned: project.map(|p| (self.store.as_ref(), p)),
        };
        crate::executor::local_model_dir(sources, name, &self.settings.work_dir.join("base-models")).await
    }

    /// The engine that runs `target`, loading its model on first use.
    pub async fn engine(&self, target: &Target) -> Result<Arc<Engine>, ServeError> {
        // A fine-tuned base of an adapter is the same model as that model served on its own.
        let key = match target {
            Target::Base { name } => format!("base:{name}"),
            Target::Adapter { base, .. } if base.starts_with("ft:") => format!("full:{base}"),
            Target::Adapter { base, .. } => format!("base:{base}"),
            Target::Full { id, .. } => format!("full:{id}"),
        };
        let load = || async move {
            match target {
                Target::Base { name } => load::base_engine(self, None, name).await,
                Target::Adapter { base, project, .. } => load::base_engine(self, Some(project), base).await,
                Target::Full { id, base, project, source } => load::full_engine(self, id, base, project, source).await,
            }
        };
        let max = self.settings.max_models.max(1);
        self.engines.get_or_load(&key, load, |engines| engines.len() > max).await
    }

    /// The adapter of `target` (none for base and fully fine-tuned models), loaded on first use.
    pub async fn adapter(&self, target: &Target, engine: &Engine) -> Result<Option<Arc<ServingAdapter>>, ServeError> {
        let Target::Adapter { id, base, source, .. } = target else { return Ok(None) };
        let budget = self.settings.adapter_cache_bytes;
        let adapter = self
            .adapters
            .get_or_load(
                id,
                || load::adapter(self, engine, base, source),
                |loaded| loaded.iter().map(|a| a.bytes()).sum::<usize>() > budget,
            )
            .await?;
        Ok(Some(adapter))
    }

    /// The encoder engine serving `target` for `purpose`, loading it on first use; decoders and
    /// models trained for another purpose are refused with the reason.
    pub async fn encoder(
        &self,
        target: &Target,
        purpose: encoder::Purpose,
    ) -> Result<Arc<encoder::EncoderEngine>, ServeError> {
        let key = match target {
            Target::Base { name } => format!("{purpose:?}:base:{name}"),
            Target::Adapter { id, .. } | Target::Full { id, .. } => format!("{purpose:?}:{id}"),
        };
        let max = self.settings.max_models.max(1);
        self.encoders.get_or_load(&key, || load::encoder_engine(self, target, purpose), |e| e.len() > max).await
    }

    /// Whether `target` is an encoder-decoder (T5), served by [`Self::seq2seq`] rather than
    /// [`Self::engine`].
    pub async fn is_seq2seq(&self, target: &Target) -> Result<bool, ServeError> {
        load::is_seq2seq(self, target).await
    }

    /// The encoder-decoder engine serving `target` (its base, adapter or checkpoint merged in at
    /// load), loading it on first use.
    pub async fn seq2seq(&self, target: &Target) -> Result<Arc<seq2seq::Seq2SeqEngine>, ServeError> {
        let key = match target {
            Target::Base { name } => format!("base:{name}"),
            Target::Adapter { id, .. } | Target::Full { id, .. } => id.clone(),
        };
        let max = self.settings.max_models.max(1);
        self.seq2seq.get_or_load(&key, || load::seq2seq_engine(self, target), |e| e.len() > max).await
    }

    /// How many adapters are loaded now (for tests and metrics).
    pub fn loaded_adapters(&self) -> usize {
        self.adapters.loaded()
    }
}
