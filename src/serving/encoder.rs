//! Serving encoders: embeddings (mean-pooled, L2-normalized, as sentence-transformers) and
//! classification (per-label probabilities of a sequence, or per-token labels with character
//! offsets). Each served model gets an engine: a thread of its own that owns the model and
//! answers requests in batches: whatever has queued while it worked is run together, inputs
//! sorted by length and cut into batches, so that concurrent callers share forward passes and
//! no tokio worker ever runs the model.

use std::path::Path;
use std::sync::mpsc;

use anyhow::Context;
use candle_core::{DType, Device, D};
use tokio::sync::oneshot;

pub use super::Weights;
use crate::data::encoder::{Encoded, EncoderTokenizer};
use crate::models::adaptation::Adaptation;
use crate::models::bert::{Encoder, EncoderConfig, EncoderInput, Task};
use crate::models::ForwardCtx;

/// Inputs run together at most (rows of one forward pass).
const MAX_BATCH: usize = 32;

/// What an engine is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Embedding,
    Classification,
}

/// One input's result.
#[derive(Debug, Clone)]
pub enum Output {
    Embedding(Vec<f32>),
    /// Probabilities per label, in label order.
    Sequence(Vec<f32>),
    /// Per token (special tokens excluded): label probabilities and the token's byte span.
    Tokens(Vec<(Vec<f32>, (usize, usize))>),
}

struct Request {
    inputs: Vec<Encoded>,
    reply: oneshot::Sender<anyhow::Result<Vec<Output>>>,
}

pub struct EncoderEngine {
    pub name: String,
    pub task: Task,
    pub max_tokens: usize,
    pub hidden_size: usize,
    tokenizer: EncoderTokenizer,
    queue: mpsc::Sender<Request>,
}

impl EncoderEngine {
    /// Starts the engine's thread over `model`.
    pub fn start(name: &str, model: Encoder, tokenizer: EncoderTokenizer) -> anyhow::Result<Self> {
        let (queue, requests) = mpsc::channel::<Request>();
        let (task, max_tokens, hidden_size) = (model.task.clone(), model.config.max_tokens(), model.config.hidden_size);
        std::thread::Builder::new()
            .name(format!("ferrotune-encoder-{name}"))
            .stack_size(64 << 20)
            .spawn(move || serve(model, requests))
            .context("starting an encoder engine thread")?;
        Ok(Self { name: name.to_string(), task, max_tokens, hidden_size, tokenizer, queue })
    }

    pub fn tokenizer(&self) -> &EncoderTokenizer {
        &self.tokenizer
    }

    /// Runs `inputs` (already tokenized) and returns one output each, in order.
    pub async fn run(&self, inputs: Vec<Encoded>) -> anyhow::Result<Vec<Output>> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Request { inputs, reply }).map_err(|_| anyhow::anyhow!("the encoder engine stopped"))?;
        answer.await.context("the encoder engine stopped")?
    }
}

fn serve(model: Encoder, requests: mpsc::Receiver<Request>) {
    while let Ok(first) = requests.recv() {
        let mut pending = vec![first];
        while let Ok(more) = requests.try_recv() {
            pending.push(more);
        }
        // Every input of every pending request, shortest first, in batches.
        let mut all: Vec<(usize, usize, &Encoded)> = Vec::new();
        for (r, request) in pending.iter().enumerate() {
            all.extend(request.inputs.iter().enumerate().map(|(i, e)| (r, i, e)));
        }
        all.sort_by_key(|(_, _, e)| e.ids.len());
        let mut results: Vec<Vec<Option<Output>>> = pending.iter().map(|r| vec![None; r.inputs.len()]).collect();
        let mut failure = None;
        for chunk in all.chunks(MAX_BATCH) {
            let encoded: Vec<&Encoded> = chunk.iter().map(|(_, _, e)| *e).collect();
            match run_batch(&model, &encoded) {
                Ok(outputs) => {
                    for ((r, i, _), output) in chunk.iter().zip(outputs) {
                        results[*r][*i] = Some(output);
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        for (request, outputs) in pending.into_iter().zip(results) {
            let answer = match &failure {
                Some(e) => Err(anyhow::anyhow!("encoder forward failed: {e}")),
                None => outputs.into_iter().map(|o| o.context("an input got no output")).collect(),
            };
            let _ = request.reply.send(answer);
        }
    }
}

fn run_batch(model: &Encoder, encoded: &[&Encoded]) -> candle_core::Result<Vec<Output>> {
    let rows: Vec<(&[u32], &[u32])> = encoded.iter().map(|e| (&e.ids[..], &e.type_ids[..])).collect();
    let input = EncoderInput::new(&rows, &model.config, model.device())?;
    let ctx = ForwardCtx::inference();
    let hidden = model.hidden(&input, &ctx)?;
    match &model.task {
        Task::Embedding => {
            let pooled = crate::train::encoder::normalize(&Encoder::mean_pool(&hidden, &input.attention_mask)?)?;
            let vectors: Vec<Vec<f32>> = pooled.to_dtype(DType::F32)?.to_vec2()?;
            Ok(vectors.into_iter().map(Output::Embedding).collect())
        }
        Task::Classification { .. } => {
            let probs = candle_nn::ops::softmax(&model.logits(&hidden, &ctx)?, D::Minus1)?;
            let probs: Vec<Vec<f32>> = probs.to_dtype(DType::F32)?.to_vec2()?;
            Ok(probs.into_iter().map(Output::Sequence).collect())
        }
        Task::TokenClassification { .. } => {
            let probs = candle_nn::ops::softmax(&model.logits(&hidden, &ctx)?, D::Minus1)?;
            let probs: Vec<Vec<Vec<f32>>> = probs.to_dtype(DType::F32)?.to_vec3()?;
            Ok(probs
                .into_iter()
                .zip(encoded)
                .map(|(rows, e)| {
                    let tokens = rows
                        .into_iter()
                        .zip(&e.offsets)
                        .zip(&e.words)
                        .take(e.ids.len())
                        .filter(|((_, _), word)| word.is_some())
                        .map(|((p, &span), _)| (p, span))
                        .collect();
                    Output::Tokens(tokens)
                })
                .collect())
        }
    }
}

/// The task a served model directory was trained for (`task.json`), or, for a base model, what
/// its config says: a classification head with labels, else an embedding model.
pub fn task_of(dir: &Path, config: &EncoderConfig, purpose: Purpose) -> Result<Task, String> {
    let trained = crate::train::encoder::read_task_file(dir);
    let task = match trained {
        Some(task) => task,
        None => match (purpose, config.saved_labels()) {
            (Purpose::Embedding, _) => Task::Embedding,
            (Purpose::Classification, Some(labels)) => {
                let token = config.raw["architectures"].as_array().is_some_and(|a| {
                    a.iter().any(|x| x.as_str().is_some_and(|s| s.ends_with("ForTokenClassification")))
                });
                if token {
                    Task::TokenClassification { labels }
                } else {
                    Task::Classification { labels }
                }
            }
            (Purpose::Classification, None) => {
                return Err("the model has no classification head: fine-tune it on classification or \
                            token_classification data first"
                    .into())
            }
        },
    };
    match (purpose, &task) {
        (Purpose::Embedding, Task::Embedding)
        | (Purpose::Classification, Task::Classification { .. })
        | (Purpose::Classification, Task::TokenClassification { .. }) => Ok(task),
        (Purpose::Embedding, _) => Err("the model was fine-tuned for classification; POST /v1/classifications serves \
                                        it (embeddings come from base encoders and embedding fine-tunes)"
            .into()),
        (Purpose::Classification, Task::Embedding) => {
            Err("the model was fine-tuned for embeddings; POST /v1/embeddings serves it".into())
        }
    }
}

/// Loads the encoder of `weights` for `purpose` and starts its engine (blocking).
pub fn load(name: &str, weights: Weights, purpose: Purpose, device: &Device) -> anyhow::Result<EncoderEngine> {
    let (model, tokenizer) =
        load_model(&weights, |dir, config| task_of(dir, config, purpose).map_err(anyhow::Error::msg), device)?;
    EncoderEngine::start(name, model, tokenizer)
}

/// The encoder of `weights` with its tokenizer (blocking). `task` reads what the model was
/// trained for from the directory holding its `task.json` (the model, adapter or checkpoint) and
/// the base's config.
pub fn load_model(
    weights: &Weights,
    task: impl FnOnce(&Path, &EncoderConfig) -> anyhow::Result<Task>,
    device: &Device,
) -> anyhow::Result<(Encoder, EncoderTokenizer)> {
    if let Weights::Checkpoint { base, dir, plan } = weights {
        return load_checkpoint(base, dir, plan, task, device);
    }
    let (model_dir, adapter_dir) = match weights {
        Weights::Model(dir) => (dir.clone(), None),
        Weights::Adapter { base, adapter } => (base.clone(), Some(adapter.clone())),
        Weights::Checkpoint { .. } => unreachable!("handled above"),
    };
    let config = EncoderConfig::from_file(&model_dir.join("config.json"))?;
    let task_dir = adapter_dir.as_deref().unwrap_or(&model_dir);
    let task = task(task_dir, &config)?;
    let base_weights = crate::models::weights::load_model_weights(&model_dir, DType::F32, device)?;
    let model = match &adapter_dir {
        None => Encoder::new(config, task, base_weights, Adaptation::None)?,
        Some(dir) if crate::models::bottleneck::is_bottleneck_dir(dir) => {
            let (size, tensors) = crate::models::bottleneck::load(dir, device)?;
            let plan = crate::models::bottleneck::BottleneckPlan {
                adapter_size: size,
                seed: 0,
                trainable: false,
                loaded: Some(tensors),
            };
            Encoder::new(config, task, base_weights, Adaptation::Bottleneck(&plan))?
        }
        Some(dir) => {
            let (lora, _, tensors) = crate::peft::adapter::load_adapter(dir, device)?;
            let plan = crate::peft::lora::LoraPlan {
                config: lora,
                seed: 0,
                trainable: false,
                train_norms: false,
                loaded: Some(tensors),
            };
            Encoder::new(config, task, base_weights, Adaptation::Lora(&plan))?
        }
    };
    let tokenizer = EncoderTokenizer::from_dir(task_dir).or_else(|_| EncoderTokenizer::from_dir(&model_dir))?;
    Ok((model, tokenizer))
}

/// A checkpoint: the base with the checkpoint's trainable tensors, as the job trained them (its
/// plan says LoRA, bottleneck or full).
fn load_checkpoint(
    base: &Path,
    dir: &Path,
    plan: &crate::executor::plan::JobPlan,
    task: impl FnOnce(&Path, &EncoderConfig) -> anyhow::Result<Task>,
    device: &Device,
) -> anyhow::Result<(Encoder, EncoderTokenizer)> {
    let config = EncoderConfig::from_file(&base.join("config.json"))?;
    let task = task(dir, &config)?;
    let weights = crate::models::weights::load_model_weights(base, DType::F32, device)?;
    let trainable = candle_core::safetensors::load(dir.join("trainable.safetensors"), device)?;
    let model = if let Some(lora) = &plan.lora {
        let tensors = trainable
            .into_iter()
            .map(|(k, v)| if k.starts_with("base_model.") { (k, v) } else { (format!("base_model.model.{k}"), v) })
            .collect();
        let plan = crate::peft::lora::LoraPlan {
            config: lora.lora_config(),
            seed: 0,
            trainable: false,
            train_norms: false,
            loaded: Some(tensors),
        };
        Encoder::new(config, task, weights, Adaptation::Lora(&plan))?
    } else if let Some(size) = plan.adapter_size {
        let plan = crate::models::bottleneck::BottleneckPlan {
            adapter_size: size,
            seed: 0,
            trainable: false,
            loaded: Some(trainable),
        };
        Encoder::new(config, task, weights, Adaptation::Bottleneck(&plan))?
    } else {
        let model = Encoder::new(config, task, weights, Adaptation::Full)?;
        model.trainable.restore(&trainable).context("the checkpoint does not fit its base model")?;
        model
    };
    Ok((model, EncoderTokenizer::from_dir(base)?))
}

/// Byte offsets in `text` to character offsets (what clients index strings by).
pub fn char_offset(text: &str, byte: usize) -> usize {
    text.char_indices().take_while(|(i, _)| *i < byte).count()
}
