//! Loading what [`super::Inference`] caches: models into engines, adapters into serving form.
//! Files come from the catalog's directories or from artifact storage; parsing and building run
//! on blocking threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};

use super::{Inference, ServeError, WeightsSource};
use crate::data::tokenizer::ChatTokenizer;
use crate::infer::engine::Engine;
use crate::models::llama::{Adaptation, CausalLm, ServingAdapter};
use crate::models::weights::load_inference_model;
use crate::peft::adapter::load_adapter;

async fn base_dir(inference: &Inference, project: Option<&str>, name: &str) -> Result<PathBuf, ServeError> {
    inference.model_dir(project, name).await.map_err(ServeError::NotSupported)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, ServeError> {
    Ok(tokio::task::spawn_blocking(f).await.context("a model loading task failed")??)
}

/// A GGUF base is served as it is stored on the CPU: quantized, with the quantized kernels.
fn read_model(dir: &Path, adaptation: Adaptation<'_>, device: &Device) -> anyhow::Result<CausalLm> {
    Ok(load_inference_model(dir, adaptation, device)?)
}

/// Generation needs a decoder: an encoder is refused with where it is served instead.
fn refuse_encoder(dir: &Path, name: &str) -> Result<(), ServeError> {
    if crate::models::bert::config::is_encoder_dir(dir) {
        return Err(ServeError::NotSupported(format!(
            "{name} is an encoder model, which does not generate text; use POST /v1/embeddings or \
             POST /v1/classifications"
        )));
    }
    if crate::models::t5::config::is_seq2seq_dir(dir) {
        return Err(ServeError::NotSupported(format!(
            "{name} is an encoder-decoder (T5) model; POST /v1/completions serves it"
        )));
    }
    Ok(())
}

pub async fn base_engine(inference: &Inference, project: Option<&str>, name: &str) -> Result<Engine, ServeError> {
    let dir = base_dir(inference, project, name).await?;
    refuse_encoder(&dir, name)?;
    let started = std::time::Instant::now();
    let settings = inference.settings.clone();
    let device = inference.device.clone();
    let name_owned = name.to_string();
    let engine = blocking(move || {
        let model =
            read_model(&dir, Adaptation::None, &device).with_context(|| format!("loading base model {name_owned}"))?;
        let tokenizer = ChatTokenizer::from_dir(&dir)?;
        Ok(Engine::start(&name_owned, model, tokenizer, settings.engine)?)
    })
    .await?;
    tracing::info!(model = name, ms = started.elapsed().as_millis() as u64, "loaded a base model for inference");
    Ok(engine)
}

/// A fully fine-tuned model: its stored model directory, or the base with a checkpoint's weights.
pub async fn full_engine(
    inference: &Inference,
    id: &str,
    base: &str,
    project: &str,
    source: &WeightsSource,
) -> Result<Engine, ServeError> {
    let id_owned = id.to_string();
    let device = inference.device.clone();
    match source {
        WeightsSource::Stored { prefix } => {
            let cache = inference.settings.work_dir.join("served-models").join(cache_name(id));
            let dir = crate::executor::download_once(inference.storage.as_ref(), prefix.trim_end_matches('/'), &cache)
                .await
                .context("fetching the fine-tuned model from storage")?;
            refuse_encoder(&dir, id)?;
            // Outputs carry their tokenizer; the base is only looked for when one does not.
            let tokenizer_dir = match dir.join("tokenizer.json").exists() {
                true => dir.clone(),
                false => base_dir(inference, Some(project), base).await?,
            };
            let settings = inference.settings.clone();
            blocking(move || {
                let model = read_model(&dir, Adaptation::None, &device)?;
                let tokenizer = ChatTokenizer::from_dir(&tokenizer_dir)?;
                Ok(Engine::start(&id_owned, model, tokenizer, settings.engine)?)
            })
            .await
        }
        WeightsSource::Checkpoint { prefix, .. } => {
            let base = base_dir(inference, Some(project), base).await?;
            let trainable = fetch_checkpoint(inference, prefix).await?;
            let settings = inference.settings.clone();
            blocking(move || {
                let model = read_model(&base, Adaptation::Full, &device)?;
                model.trainable.restore(&trainable).context("the checkpoint does not fit its base model")?;
                let tokenizer = ChatTokenizer::from_dir(&base)?;
                Ok(Engine::start(&id_owned, model, tokenizer, settings.engine)?)
            })
            .await
        }
    }
}

/// A LoRA adapter (a job's PEFT output or a LoRA checkpoint), checked against `engine`'s model.
pub async fn adapter(
    inference: &Inference,
    engine: &Engine,
    base: &str,
    source: &WeightsSource,
) -> Result<ServingAdapter, ServeError> {
    let started = std::time::Instant::now();
    enum Kind {
        Lora(crate::peft::lora::LoraConfig),
        Bottleneck(usize),
        Prefix,
        /// A prefix checkpoint: the trainable tensors, projected through its MLP if it has one.
        PrefixCheckpoint(usize, bool),
    }
    let (config, tensors) = match source {
        WeightsSource::Stored { prefix } => {
            let work = tempfile::tempdir().context("a scratch directory for the adapter")?;
            let names = ["adapter_config.json", "adapter_model.safetensors"].map(String::from);
            crate::executor::download_files(
                inference.storage.as_ref(),
                prefix.trim_end_matches('/'),
                &names,
                work.path(),
            )
            .await
            .context("fetching the adapter from storage")?;
            let device = engine.model.device().clone();
            blocking(move || {
                if crate::models::prefix::is_prefix_dir(work.path()) {
                    let table = crate::models::prefix::load(work.path(), &device)?;
                    return Ok((Kind::Prefix, HashMap::from([("prompt_embeddings".to_string(), table)])));
                }
                if crate::models::bottleneck::is_bottleneck_dir(work.path()) {
                    let (size, tensors) = crate::models::bottleneck::load(work.path(), &device)?;
                    return Ok((Kind::Bottleneck(size), tensors));
                }
                let (config, _norms, tensors) = load_adapter(work.path(), &device)?;
                Ok((Kind::Lora(config), tensors))
            })
            .await?
        }
        WeightsSource::Checkpoint { prefix, plan } if plan.prefix_length.is_some() => (
            Kind::PrefixCheckpoint(plan.prefix_length.unwrap_or(16), plan.prefix_projection),
            fetch_checkpoint(inference, prefix).await?,
        ),
        WeightsSource::Checkpoint { prefix, plan } if plan.adapter_size.is_some() => {
            (Kind::Bottleneck(plan.adapter_size.unwrap_or(64)), fetch_checkpoint(inference, prefix).await?)
        }
        WeightsSource::Checkpoint { prefix, plan } => {
            let lora = plan.lora.as_ref().context("a LoRA checkpoint without LoRA settings")?;
            let trainable = fetch_checkpoint(inference, prefix).await?;
            let tensors = trainable
                .into_iter()
                .map(|(k, v)| if k.starts_with("base_model.") { (k, v) } else { (format!("base_model.model.{k}"), v) })
                .collect();
            // As the job trained and saved it (mixture-of-experts targets converted as PEFT does).
            let config = lora.lora_config_for(&engine.model.config).map_err(anyhow::Error::msg)?;
            (Kind::Lora(config), tensors)
        }
    };
    let model = engine.model.clone();
    let adapter = blocking(move || {
        match config {
            Kind::Lora(config) => ServingAdapter::from_peft(&model, &config, &tensors),
            Kind::Bottleneck(size) => ServingAdapter::from_bottleneck(&model, size, tensors),
            Kind::Prefix => ServingAdapter::from_prefix(&model, &tensors["prompt_embeddings"]),
            Kind::PrefixCheckpoint(length, projected) => {
                let table = crate::models::prefix::table_from_trainables(&model.config, length, projected, tensors)?;
                ServingAdapter::from_prefix(&model, &table)
            }
        }
        .context("the adapter does not fit its base model")
    })
    .await?;
    tracing::info!(
        base,
        bytes = adapter.bytes(),
        ms = started.elapsed().as_millis() as u64,
        "loaded an adapter for inference"
    );
    Ok(adapter)
}

async fn fetch_checkpoint(inference: &Inference, prefix: &str) -> Result<HashMap<String, Tensor>, ServeError> {
    let work = tempfile::tempdir().context("a scratch directory for the checkpoint")?;
    let names = ["trainable.safetensors".to_string()];
    crate::executor::download_files(inference.storage.as_ref(), prefix.trim_end_matches('/'), &names, work.path())
        .await
        .context("fetching the checkpoint from storage")?;
    let device = inference.device.clone();
    blocking(move || Ok(candle_core::safetensors::load(work.path().join("trainable.safetensors"), &device)?)).await
}

fn cache_name(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

/// An encoder engine for `target` (see [`Inference::encoder`]).
pub async fn encoder_engine(
    inference: &Inference,
    target: &super::Target,
    purpose: super::encoder::Purpose,
) -> Result<super::encoder::EncoderEngine, ServeError> {
    use super::encoder::Weights;
    let not_encoder = |name: &str| {
        ServeError::NotSupported(format!(
            "{name} is a decoder (causal language) model; embeddings and classifications are served for encoder \
             models (BERT family); use /v1/chat/completions or /v1/completions"
        ))
    };
    let (name, weights) = local_weights(inference, target, "task.json").await?;
    let model_dir = match &weights {
        Weights::Model(dir) | Weights::Adapter { base: dir, .. } | Weights::Checkpoint { base: dir, .. } => dir.clone(),
    };
    if !crate::models::bert::config::is_encoder_dir(&model_dir) {
        return Err(not_encoder(&name));
    }
    // A task that does not fit the purpose is the user's mistake, not a failure to load.
    let config = crate::models::bert::EncoderConfig::from_file(&model_dir.join("config.json"))
        .map_err(|e| ServeError::Internal(e.into()))?;
    let task_dir = match &weights {
        Weights::Model(dir) | Weights::Adapter { adapter: dir, .. } | Weights::Checkpoint { dir, .. } => dir.clone(),
    };
    super::encoder::task_of(&task_dir, &config, purpose)
        .map_err(|why| ServeError::NotSupported(format!("{name}: {why}")))?;
    let device = inference.device.clone();
    let started = std::time::Instant::now();
    let engine = blocking(move || super::encoder::load(&name, weights, purpose, &device)).await?;
    tracing::info!(model = engine.name, ms = started.elapsed().as_millis() as u64, "loaded an encoder for inference");
    Ok(engine)
}

/// Where `target`'s weights are on this machine (fetched from storage once): a model directory, an
/// adapter over its base, or a checkpoint (`checkpoint_file` marks a complete download) over its
/// base; with the name it is served under.
async fn local_weights(
    inference: &Inference,
    target: &super::Target,
    checkpoint_file: &str,
) -> Result<(String, super::Weights), ServeError> {
    use super::{Target, Weights};
    Ok(match target {
        Target::Base { name } => (name.clone(), Weights::Model(base_dir(inference, None, name).await?)),
        Target::Adapter { id, base, project, source: WeightsSource::Checkpoint { prefix, plan } }
        | Target::Full { id, base, project, source: WeightsSource::Checkpoint { prefix, plan } } => {
            let base = base_dir(inference, Some(project), base).await?;
            let cache = inference.settings.work_dir.join("served-models").join(cache_name(id));
            let storage = inference.storage.as_ref();
            let dir =
                crate::executor::download_once_with(storage, prefix.trim_end_matches('/'), &cache, checkpoint_file)
                    .await
                    .context("fetching the checkpoint from storage")?;
            (id.clone(), Weights::Checkpoint { base, dir, plan: plan.clone() })
        }
        Target::Full { id, source: WeightsSource::Stored { prefix }, .. } => {
            let cache = inference.settings.work_dir.join("served-models").join(cache_name(id));
            let dir = crate::executor::download_once(inference.storage.as_ref(), prefix.trim_end_matches('/'), &cache)
                .await
                .context("fetching the fine-tuned model from storage")?;
            (id.clone(), Weights::Model(dir))
        }
        Target::Adapter { id, base, project, source: WeightsSource::Stored { prefix } } => {
            let base = base_dir(inference, Some(project), base).await?;
            let cache = inference.settings.work_dir.join("served-models").join(cache_name(id));
            let storage = inference.storage.as_ref();
            let adapter = crate::executor::download_once_with(
                storage,
                prefix.trim_end_matches('/'),
                &cache,
                "adapter_config.json",
            )
            .await
            .context("fetching the adapter from storage")?;
            (id.clone(), Weights::Adapter { base, adapter })
        }
    })
}

/// The generation engine of an encoder-decoder `target` (see [`Inference::seq2seq`]).
pub async fn seq2seq_engine(
    inference: &Inference,
    target: &super::Target,
) -> Result<super::seq2seq::Seq2SeqEngine, ServeError> {
    let (name, weights) = local_weights(inference, target, "trainable.safetensors").await?;
    let device = inference.device.clone();
    let settings = inference.settings.engine;
    let started = std::time::Instant::now();
    let engine = blocking(move || {
        let (model, tokenizer) = super::seq2seq::load(weights, &device)?;
        super::seq2seq::Seq2SeqEngine::start(&name, model, tokenizer, settings)
    })
    .await?;
    tracing::info!(model = engine.name, ms = started.elapsed().as_millis() as u64, "loaded a T5 model for inference");
    Ok(engine)
}

/// Whether `target` is an encoder-decoder: the base model at the root of its lineage is (a job
/// continuing from a fine-tuned model keeps its architecture).
pub async fn is_seq2seq(inference: &Inference, target: &super::Target) -> Result<bool, ServeError> {
    use super::Target;
    let base = match target {
        Target::Base { name } => name,
        Target::Adapter { base, .. } | Target::Full { base, .. } => base,
    };
    let root = crate::domain::model_name::root_base_model(base);
    let dir = base_dir(inference, None, root).await?;
    Ok(tokio::task::spawn_blocking(move || crate::models::t5::config::is_seq2seq_dir(&dir)).await.unwrap_or(false))
}
