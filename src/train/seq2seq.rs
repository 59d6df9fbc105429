//! Training encoder-decoders (T5) on `prompt_completion` data, as transformers' seq2seq examples
//! do: the prompt (with the tokenizer's `</s>`) is the encoder's input, the completion (with
//! `</s>`) the labels, and the decoder reads the labels shifted right after the decoder start
//! token. Full fine-tuning or LoRA (PEFT's `SEQ_2_SEQ_LM`), on the shared task loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

use super::config::{Method, TrainConfig};
use super::eval::EvalMetrics;
use super::files::{copy_tokenizer_files, save_tensors, write_json, write_peft_lora};
use super::task_loop::{BatchSize, TaskData, TaskModel};
use super::{Observer, Summary, TrainError};
use crate::data::dataset::LoadedDataset;
use crate::data::encoder::EncoderTokenizer;
use crate::domain::dataset::DatasetFormat;
use crate::models::adaptation::Adaptation;
use crate::models::common::ops::masked_cross_entropy_sum;
use crate::models::common::params::TrainableParams;
use crate::models::t5::{T5Config, T5};
use crate::models::ForwardCtx;
use crate::peft::lora::{LoraConfig, LoraPlan};

/// PEFT's task type of a LoRA adapter on an encoder-decoder.
pub const PEFT_TASK_TYPE: &str = "SEQ_2_SEQ_LM";

/// One training example: the encoder's input and the decoder's labels, both ending in `</s>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqExample {
    pub input: Vec<u32>,
    pub labels: Vec<u32>,
}

pub struct Seq2SeqBatch {
    input_ids: Tensor,
    attention_mask: Tensor,
    decoder_input_ids: Tensor,
    /// `(b·t)` u32, 0 where unscored.
    labels: Tensor,
    /// `(b·t)` f32, 1 where scored.
    label_mask: Tensor,
    host_labels: Vec<u32>,
    host_mask: Vec<f32>,
    scored: usize,
    tokens: usize,
}

impl BatchSize for Seq2SeqBatch {
    fn scored(&self) -> usize {
        self.scored
    }
    fn tokens(&self) -> usize {
        self.tokens
    }
}

/// Refuses settings that do not apply to encoder-decoders, naming the field.
fn check_settings(config: &TrainConfig) -> Result<(), TrainError> {
    let refuse =
        |what: &str| Err(TrainError::Config(format!("{what} is not supported on encoder-decoder (T5) models")));
    match config.method {
        Method::Full | Method::Lora => {}
        other => return refuse(&format!("method {}", format!("{other:?}").to_lowercase())),
    }
    if config.dpo.is_some() {
        return refuse("dpo");
    }
    if config.gradient_checkpointing {
        return refuse("gradient_checkpointing");
    }
    if config.packing {
        return refuse("packing");
    }
    if config.lora.train_norms || config.lora.train_router || !config.lora.target_parameters.is_empty() {
        return refuse("lora train_norms, train_router and target_parameters");
    }
    if let Some(metric) = config.early_stopping.as_ref().and_then(|r| r.metric.as_deref()).filter(|m| *m != "loss") {
        return Err(TrainError::Config(format!(
            "early_stopping.metric {metric:?} is not a metric of sequence-to-sequence training; use loss"
        )));
    }
    Ok(())
}

/// Trains a T5-family model per `config`, reporting to `observer`.
pub fn train(config: &TrainConfig, observer: &mut dyn Observer) -> Result<Summary, TrainError> {
    config.validate().map_err(TrainError::Config)?;
    check_settings(config)?;
    let device = config.device.open().map_err(|e| TrainError::Config(e.to_string()))?;
    let t5_config =
        T5Config::from_file(&config.model.join("config.json")).map_err(|e| TrainError::Model(e.to_string()))?;
    let tokenizer = EncoderTokenizer::from_dir(&config.model)?;
    let (train_data, validation_data) = super::task_loop::load_splits(config)?;
    if train_data.format != DatasetFormat::PromptCompletion {
        return Err(TrainError::Config(format!(
            "{} datasets do not train an encoder-decoder; use prompt_completion data ({{\"prompt\", \"completion\"}})",
            train_data.format.human_name()
        )));
    }
    let (train, truncated) = encode(&tokenizer, &train_data, config.max_seq_len)?;
    let validation = match &validation_data {
        Some(data) => encode(&tokenizer, data, config.max_seq_len)?.0,
        None => Vec::new(),
    };
    let lora_plan = LoraPlan {
        config: config.lora.lora_config(),
        seed: config.seed,
        trainable: true,
        train_norms: false,
        loaded: None,
    };
    let adaptation = match config.method {
        Method::Lora => Adaptation::Lora(&lora_plan),
        _ => Adaptation::Full,
    };
    let weights = crate::models::weights::load_model_weights(&config.model, DType::F32, &device)?;
    let model = T5::new(t5_config, weights, adaptation)?;
    if model.trainable.count() == 0 {
        return Err(TrainError::Config(
            "lora target_modules match no linear layer of this T5 model (its linears: q, k, v, o, wi or wi_0/wi_1, wo)"
                .into(),
        ));
    }
    let data = TaskData { examples: train.len(), train, validation, truncated };
    super::task_loop::train(config, Trainee { model, base: config.model.clone() }, data, observer)
}

/// Tokenizes `prompt_completion` records; returns them and how many were cut to `max_len`.
pub fn encode(
    tokenizer: &EncoderTokenizer,
    data: &LoadedDataset,
    max_len: usize,
) -> Result<(Vec<Seq2SeqExample>, usize), TrainError> {
    let mut truncated = 0;
    let mut out = Vec::with_capacity(data.len());
    for (record, line) in data.records.iter().zip(&data.lines) {
        let text = |field: &str| {
            record.get(field).and_then(Value::as_str).ok_or_else(|| {
                TrainError::Config(format!("line {line}: {field} must be a string in prompt_completion data"))
            })
        };
        let input = tokenizer.encode_text(text("prompt")?, None, max_len)?;
        let labels = tokenizer.encode_text(text("completion")?, None, max_len)?;
        truncated += usize::from(input.truncated || labels.truncated);
        out.push(Seq2SeqExample { input: input.ids, labels: labels.ids });
    }
    Ok((out, truncated))
}

/// Pads `rows` into a batch: inputs with `pad` and a mask, labels with unscored positions, and the
/// decoder inputs shifted right after `start`.
pub fn make_batch(
    rows: &[&Seq2SeqExample],
    pad: u32,
    start: u32,
    device: &Device,
) -> candle_core::Result<Seq2SeqBatch> {
    let b = rows.len();
    let s = rows.iter().map(|r| r.input.len()).max().unwrap_or(1).max(1);
    let t = rows.iter().map(|r| r.labels.len()).max().unwrap_or(1).max(1);
    let (mut ids, mut mask) = (vec![pad; b * s], vec![0f32; b * s]);
    let (mut decoder, mut labels, mut label_mask) = (vec![pad; b * t], vec![0u32; b * t], vec![0f32; b * t]);
    for (r, row) in rows.iter().enumerate() {
        ids[r * s..r * s + row.input.len()].copy_from_slice(&row.input);
        mask[r * s..r * s + row.input.len()].fill(1.0);
        for (j, &label) in row.labels.iter().enumerate() {
            labels[r * t + j] = label;
            label_mask[r * t + j] = 1.0;
            decoder[r * t + j] = if j == 0 { start } else { row.labels[j - 1] };
        }
    }
    let scored = rows.iter().map(|r| r.labels.len()).sum();
    let tokens = rows.iter().map(|r| r.input.len() + r.labels.len()).sum();
    Ok(Seq2SeqBatch {
        input_ids: Tensor::from_vec(ids, (b, s), device)?,
        attention_mask: Tensor::from_vec(mask, (b, s), device)?,
        decoder_input_ids: Tensor::from_vec(decoder, (b, t), device)?,
        labels: Tensor::from_vec(labels.clone(), b * t, device)?,
        label_mask: Tensor::from_vec(label_mask.clone(), b * t, device)?,
        host_labels: labels,
        host_mask: label_mask,
        scored,
        tokens,
    })
}

/// The summed cross-entropy over the batch's labels, and how many the model predicts right.
pub fn batch_loss(model: &T5, batch: &Seq2SeqBatch, ctx: &ForwardCtx) -> candle_core::Result<(Tensor, usize)> {
    let logits = model.forward(&batch.input_ids, &batch.attention_mask, &batch.decoder_input_ids, ctx)?;
    let flat = logits.reshape(((), model.config.vocab_size))?;
    let loss = masked_cross_entropy_sum(&flat, &batch.labels, &batch.label_mask)?;
    let guesses: Vec<u32> = flat.detach().argmax(D::Minus1)?.to_vec1()?;
    let correct =
        guesses.iter().zip(&batch.host_labels).zip(&batch.host_mask).filter(|((g, l), m)| **m > 0.0 && g == l).count();
    Ok((loss, correct))
}

struct Trainee {
    model: T5,
    base: PathBuf,
}

impl TaskModel for Trainee {
    type Example = Seq2SeqExample;
    type Batch = Seq2SeqBatch;

    fn trainable(&self) -> &TrainableParams {
        &self.model.trainable
    }
    fn device(&self) -> &Device {
        self.model.device()
    }
    fn make_batch(&self, rows: &[&Seq2SeqExample]) -> candle_core::Result<Seq2SeqBatch> {
        let c = &self.model.config;
        make_batch(rows, c.pad_token_id, c.decoder_start_token_id, self.model.device())
    }
    fn batch_loss(&self, batch: &Seq2SeqBatch, ctx: &ForwardCtx) -> candle_core::Result<(Tensor, usize)> {
        batch_loss(&self.model, batch, ctx)
    }
    fn evaluate(&self, examples: &[Seq2SeqExample], batch_size: usize) -> Result<EvalMetrics, TrainError> {
        evaluate(&self.model, examples, batch_size)
    }
    fn checkpoint_files(&self, _dir: &Path) -> Result<(), TrainError> {
        Ok(())
    }
    fn write_output(&self, config: &TrainConfig) -> Result<PathBuf, TrainError> {
        write_output(&self.model, &self.base, config)
    }
}

/// Validation loss, token accuracy and perplexity over `examples`, without dropout.
pub fn evaluate(model: &T5, examples: &[Seq2SeqExample], batch_size: usize) -> Result<EvalMetrics, TrainError> {
    let ctx = ForwardCtx::inference();
    let (mut loss_sum, mut scored, mut correct) = (0.0f64, 0usize, 0usize);
    let c = &model.config;
    for chunk in examples.chunks(batch_size.max(1)) {
        let rows: Vec<&Seq2SeqExample> = chunk.iter().collect();
        let batch = make_batch(&rows, c.pad_token_id, c.decoder_start_token_id, model.device())?;
        let (loss, right) = batch_loss(model, &batch, &ctx)?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?);
        scored += batch.scored;
        correct += right;
    }
    let loss = loss_sum / scored.max(1) as f64;
    Ok(EvalMetrics {
        loss,
        mean_token_accuracy: correct as f64 / scored.max(1) as f64,
        perplexity: loss.exp(),
        tokens: scored,
        preference: None,
        task: None,
    })
}

/// A transformers model directory (full fine-tuning) or a PEFT LoRA adapter, with the base's
/// tokenizer files.
fn write_output(model: &T5, base: &Path, config: &TrainConfig) -> Result<PathBuf, TrainError> {
    let dir = config.output_dir.clone();
    match config.method {
        Method::Lora => {
            let tensors = model.trainable.snapshot()?;
            write_adapter_dir(&config.lora.lora_config(), tensors, base, &base.display().to_string(), &dir)?
        }
        _ => write_model_dir(model, base, &dir)?,
    }
    Ok(dir)
}

/// `model`, each LoRA adapter folded into its linear, as a transformers
/// `T5ForConditionalGeneration` directory with the tokenizer files of the base in `base_dir`.
pub fn write_model_dir(model: &T5, base_dir: &Path, dir: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    let mut document = model.config.raw.clone();
    document["architectures"] = serde_json::json!(["T5ForConditionalGeneration"]);
    write_json(&dir.join("config.json"), &document)?;
    save_tensors(&dir.join("model.safetensors"), model.merged_tensors()?.into_iter().collect())?;
    copy_tokenizer_files(base_dir, dir)
}

/// A LoRA run's trainable `tensors` as a PEFT `SEQ_2_SEQ_LM` adapter on the base `base_name`,
/// with the tokenizer files of the base in `base_dir`.
pub fn write_adapter_dir(
    lora: &LoraConfig,
    tensors: HashMap<String, Tensor>,
    base_dir: &Path,
    base_name: &str,
    dir: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    write_peft_lora(dir, lora, base_name, PEFT_TASK_TYPE, &[], tensors)?;
    copy_tokenizer_files(base_dir, dir)
}

/// A T5 LoRA adapter directory folded into its base, written as a model directory at `out` (a job
/// continuing from a fine-tuned T5 trains on this).
pub fn merge_adapter_dir(base: &Path, adapter: &Path, out: &Path) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let (lora, _, tensors) = crate::peft::adapter::load_adapter(adapter, &device)?;
    let plan = LoraPlan { config: lora, seed: 0, trainable: false, train_norms: false, loaded: Some(tensors) };
    let config = T5Config::from_file(&base.join("config.json"))?;
    let weights = crate::models::weights::load_model_weights(base, DType::F32, &device)?;
    let model = T5::new(config, weights, Adaptation::Lora(&plan))?;
    write_model_dir(&model, base, out)?;
    Ok(())
}
