//! Training encoders (BERT, MiniLM, RoBERTa) for sequence classification, token classification
//! and sentence embeddings: the task follows from the training file's format. Same optimizer,
//! schedules, accumulation, clipping, evaluation, early stopping and exact-resume checkpoints as
//! the decoder trainer (`super::run`), with the task's own loss and validation metrics.

mod batch;
pub mod metrics;
pub mod output;

use candle_core::{DType, Tensor};

use super::config::{Method, TrainConfig};
use super::eval::EvalMetrics;
use super::task_loop::{BatchSize, TaskData, TaskModel};
use super::{Observer, Summary, TrainError};
use crate::data::dataset::LoadedDataset;
use crate::data::encoder::{encode_task_dataset, label_set, EncodeCounts, EncoderTokenizer, TaskExample};
use crate::domain::dataset::DatasetFormat;
use crate::models::adaptation::Adaptation;
use crate::models::bert::{Encoder, EncoderConfig, Task};
use crate::models::bottleneck::BottleneckPlan;
use crate::models::common::params::TrainableParams;
use crate::models::ForwardCtx;
use crate::peft::lora::LoraPlan;
pub use batch::{embed, normalize, CONTRASTIVE_SCALE};
use metrics::TaskMetrics;
pub use output::{read_task_file, write_encoder_output};

/// The task a training file's format asks of an encoder; `None` for a decoder format.
pub fn task_for(data: &LoadedDataset) -> Option<Task> {
    match data.format {
        DatasetFormat::Classification => Some(Task::Classification { labels: label_set(data) }),
        DatasetFormat::TokenClassification => Some(Task::TokenClassification { labels: label_set(data) }),
        DatasetFormat::Embedding => Some(Task::Embedding),
        _ => None,
    }
}

/// Refuses settings that do not apply to encoders, naming the field.
fn check_settings(config: &TrainConfig) -> Result<(), TrainError> {
    let refuse = |what: &str| Err(TrainError::Config(format!("{what} does not apply to encoder models")));
    match config.method {
        Method::Qlora => return refuse("method qlora (a quantized base)"),
        Method::Prefix => return refuse("method prefix"),
        _ => {}
    }
    if config.dpo.is_some() {
        return refuse("dpo");
    }
    if config.gradient_checkpointing {
        return refuse("gradient_checkpointing");
    }
    if config.lora.train_norms || config.lora.train_router || !config.lora.target_parameters.is_empty() {
        return refuse("lora train_norms, train_router and target_parameters");
    }
    Ok(())
}

struct Prepared {
    model: Encoder,
    train: Vec<TaskExample>,
    validation: Vec<TaskExample>,
    counts: EncodeCounts,
}

fn prepare(config: &TrainConfig, device: &candle_core::Device) -> Result<Prepared, TrainError> {
    config.validate().map_err(TrainError::Config)?;
    check_settings(config)?;
    let encoder_config =
        EncoderConfig::from_file(&config.model.join("config.json")).map_err(|e| TrainError::Model(e.to_string()))?;
    let tokenizer = EncoderTokenizer::from_dir(&config.model)?;
    let (train_data, validation_data) = super::task_loop::load_splits(config)?;
    let task = task_for(&train_data).ok_or_else(|| {
        TrainError::Config(format!(
            "{} datasets do not train an encoder ({}); use classification, token_classification or embedding data",
            train_data.format.human_name(),
            encoder_config.model_type
        ))
    })?;
    if let Some(rule) = &config.early_stopping {
        if let Some(metric) = rule.metric.as_deref().filter(|m| *m != "loss") {
            if !TaskMetrics::names(&task).contains(&metric) {
                return Err(TrainError::Config(format!(
                    "early_stopping.metric {metric:?} is not a metric of this task; use loss or one of {}",
                    TaskMetrics::names(&task).join(", ")
                )));
            }
        }
    }
    let labels = task.labels().map(<[String]>::to_vec).unwrap_or_default();
    if task.labels().is_some() && labels.len() < 2 {
        return Err(TrainError::Config(format!(
            "the training file has {} distinct label(s); classification needs at least 2",
            labels.len()
        )));
    }
    let max_len = config.max_seq_len.min(encoder_config.max_tokens());
    let (train, counts) = encode_task_dataset(&tokenizer, &train_data, &labels, max_len)?;
    let validation = match &validation_data {
        Some(data) => encode_task_dataset(&tokenizer, data, &labels, max_len)?.0,
        None => Vec::new(),
    };
    let lora_plan = LoraPlan {
        config: config.lora.lora_config(),
        seed: config.seed,
        trainable: true,
        train_norms: false,
        loaded: None,
    };
    let bottleneck_plan =
        BottleneckPlan { adapter_size: config.adapter_size, seed: config.seed, trainable: true, loaded: None };
    let adaptation = match config.method {
        Method::Lora => Adaptation::Lora(&lora_plan),
        Method::Bottleneck => Adaptation::Bottleneck(&bottleneck_plan),
        _ => Adaptation::Full,
    };
    let weights = crate::models::weights::load_model_weights(&config.model, DType::F32, device)?;
    let model = Encoder::new(encoder_config, task, weights, adaptation)?;
    Ok(Prepared { model, train, validation, counts })
}

/// Trains an encoder per `config`, reporting to `observer`.
pub fn train(config: &TrainConfig, observer: &mut dyn Observer) -> Result<Summary, TrainError> {
    let device = config.device.open().map_err(|e| TrainError::Config(e.to_string()))?;
    let Prepared { model, train, validation, counts } = prepare(config, &device)?;
    let data = TaskData { train, validation, examples: counts.examples, truncated: counts.truncated };
    super::task_loop::train(config, model, data, observer)
}

impl BatchSize for batch::TaskBatch {
    fn scored(&self) -> usize {
        self.scored
    }
    fn tokens(&self) -> usize {
        self.tokens
    }
}

impl TaskModel for Encoder {
    type Example = TaskExample;
    type Batch = batch::TaskBatch;

    fn trainable(&self) -> &TrainableParams {
        &self.trainable
    }
    fn device(&self) -> &candle_core::Device {
        Encoder::device(self)
    }
    fn make_batch(&self, rows: &[&TaskExample]) -> candle_core::Result<batch::TaskBatch> {
        batch::make_batch(rows, &self.config, Encoder::device(self))
    }
    fn batch_loss(&self, batch: &batch::TaskBatch, ctx: &ForwardCtx) -> candle_core::Result<(Tensor, usize)> {
        let out = batch::batch_loss(self, batch, ctx)?;
        Ok((out.loss_sum, out.correct))
    }
    fn evaluate(&self, examples: &[TaskExample], batch_size: usize) -> Result<EvalMetrics, TrainError> {
        evaluate(self, examples, batch_size)
    }
    fn checkpoint_files(&self, dir: &std::path::Path) -> Result<(), TrainError> {
        // What the checkpoint's head means, for serving it.
        output::write_task_file(dir, &self.task)
    }
    fn write_output(&self, config: &TrainConfig) -> Result<std::path::PathBuf, TrainError> {
        write_encoder_output(self, config)
    }
}

/// Validation loss and the task's metrics over `examples`, without dropout.
pub fn evaluate(model: &Encoder, examples: &[TaskExample], batch_size: usize) -> Result<EvalMetrics, TrainError> {
    let ctx = ForwardCtx::inference();
    let (mut loss_sum, mut scored, mut correct) = (0.0f64, 0usize, 0usize);
    let (mut truth, mut predicted) = (Vec::new(), Vec::new());
    let mut sentences: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    let (mut anchors, mut positives) = (Vec::new(), Vec::new());
    for chunk in examples.chunks(batch_size.max(1)) {
        let rows: Vec<&TaskExample> = chunk.iter().collect();
        let batch = batch::make_batch(&rows, &model.config, model.device())?;
        if let (Task::Embedding, Some(pos)) = (&model.task, &batch.positives) {
            anchors.push(embed(model, &batch.input)?);
            positives.push(embed(model, pos)?);
        }
        let out = batch::batch_loss(model, &batch, &ctx)?;
        loss_sum += f64::from(out.loss_sum.to_scalar::<f32>()?);
        scored += batch.scored;
        correct += out.correct;
        let guesses: Vec<u32> = out.logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        match &model.task {
            Task::Classification { .. } => {
                truth.extend(&batch.host_labels);
                predicted.extend(guesses);
            }
            Task::TokenClassification { .. } => {
                let t = batch.input.input_ids.dim(1)?;
                for r in 0..rows.len() {
                    let keep: Vec<usize> = (r * t..(r + 1) * t).filter(|&i| batch.host_mask[i] > 0.0).collect();
                    sentences.push((
                        keep.iter().map(|&i| batch.host_labels[i]).collect(),
                        keep.iter().map(|&i| guesses[i]).collect(),
                    ));
                }
            }
            Task::Embedding => {}
        }
    }
    let loss = loss_sum / scored.max(1) as f64;
    let accuracy = correct as f64 / scored.max(1) as f64;
    let task = match &model.task {
        Task::Classification { .. } => {
            let (accuracy, macro_f1) = metrics::classification(&truth, &predicted);
            TaskMetrics::Classification { accuracy, macro_f1 }
        }
        Task::TokenClassification { labels } => {
            let named: Vec<(Vec<&str>, Vec<&str>)> = sentences
                .iter()
                .map(|(t, p)| {
                    let name = |ids: &[u32]| ids.iter().map(|&i| labels[i as usize].as_str()).collect();
                    (name(t), name(p))
                })
                .collect();
            let (precision, recall, f1) = metrics::entity_scores(&named);
            TaskMetrics::TokenClassification { precision, recall, f1, accuracy }
        }
        Task::Embedding => {
            let a = Tensor::cat(&anchors, 0)?;
            let p = Tensor::cat(&positives, 0)?;
            let similarity: Vec<Vec<f32>> = a.matmul(&p.t()?)?.to_vec2()?;
            let r = metrics::recall_at(&similarity, &[1, 5, 10]);
            TaskMetrics::Embedding { recall_at_1: r[0], recall_at_5: r[1], recall_at_10: r[2] }
        }
    };
    Ok(EvalMetrics {
        loss,
        mean_token_accuracy: accuracy,
        perplexity: loss.exp(),
        tokens: scored,
        preference: None,
        task: Some(task),
    })
}
