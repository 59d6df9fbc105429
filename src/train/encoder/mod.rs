//! Training encoders (BERT, MiniLM, RoBERTa) for sequence classification, token classification
//! and sentence embeddings: the task follows from the training file's format. Same optimizer,
//! schedules, accumulation, clipping, evaluation, early stopping and exact-resume checkpoints as
//! the decoder trainer (`super::run`), with the task's own loss and validation metrics.

mod batch;
pub mod metrics;
mod output;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::checkpoint::{self, TrainState};
use super::config::{Method, TrainConfig};
use super::eval::EvalMetrics;
use super::optimizer::{AdamW, AdamWConfig};
use super::run::clip_global_norm;
use super::schedule::Schedule;
use super::{Control, Observer, Progress, StopReason, Summary, TrainError};
use crate::data::dataset::{load_jsonl, split_validation, LoadedDataset};
use crate::data::encoder::{encode_task_dataset, label_set, EncodeCounts, EncoderTokenizer, TaskExample};
use crate::domain::dataset::DatasetFormat;
use crate::models::adaptation::Adaptation;
use crate::models::bert::{Encoder, EncoderConfig, Task};
use crate::models::bottleneck::BottleneckPlan;
use crate::models::ForwardCtx;
use crate::peft::lora::LoraPlan;
use crate::rng::Rng;
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
    let train_data = load_jsonl(&config.train_file)?;
    let task = task_for(&train_data).ok_or_else(|| {
        TrainError::Config(format!(
            "{} datasets do not train an encoder ({}); use classification, token_classification or embedding data",
            train_data.format.human_name(),
            encoder_config.model_type
        ))
    })?;
    let (train_data, validation_data) = match &config.validation_file {
        Some(path) => {
            let validation = load_jsonl(path)?;
            if validation.format != train_data.format {
                return Err(TrainError::Config(format!(
                    "the validation file holds {} data, the training file {}",
                    validation.format.human_name(),
                    train_data.format.human_name()
                )));
            }
            (train_data, Some(validation))
        }
        None if config.validation_fraction > 0.0 => {
            let (train, held_out) = split_validation(train_data, config.validation_fraction, config.seed);
            (train, Some(held_out))
        }
        None => (train_data, None),
    };
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
    let prepared = prepare(config, &device)?;
    let (steps_per_epoch, total_steps, schedule) = Schedule::for_run(config, prepared.train.len());
    let mut run = Run {
        config,
        optimizer: AdamW::new(AdamWConfig { weight_decay: config.weight_decay, ..Default::default() }),
        state: TrainState::new(config.seed),
        schedule,
        prepared,
        total_steps,
        steps_per_epoch,
        best: None,
        last_eval: None,
        last_checkpoint: None,
    };
    if let Some(dir) = &config.resume_from {
        let loaded = checkpoint::load(dir, &device)?;
        run.prepared.model.trainable.restore(&loaded.trainable)?;
        run.optimizer.restore(loaded.optimizer_step, &loaded.moments)?;
        run.state = loaded.state;
        run.last_checkpoint = Some(dir.clone());
    }
    let stop = run.epochs(observer)?;
    run.finish(stop)
}

struct Run<'a> {
    config: &'a TrainConfig,
    prepared: Prepared,
    optimizer: AdamW,
    state: TrainState,
    schedule: Schedule,
    total_steps: u64,
    steps_per_epoch: u64,
    /// The trainable weights at the best validation score (kept when early stopping is on).
    best: Option<HashMap<String, Tensor>>,
    last_eval: Option<EvalMetrics>,
    last_checkpoint: Option<std::path::PathBuf>,
}

impl Run<'_> {
    fn epochs(&mut self, observer: &mut dyn Observer) -> Result<StopReason, TrainError> {
        let started = Instant::now();
        let steps_at_start = self.state.step;
        while self.state.epoch < self.config.epochs {
            let mut order: Vec<usize> = (0..self.prepared.train.len()).collect();
            Rng::derive(self.config.seed, &format!("epoch-{}", self.state.epoch)).shuffle(&mut order);
            let micro: Vec<&[usize]> = order.chunks(self.config.batch_size).collect();
            let groups: Vec<&[&[usize]]> = micro.chunks(self.config.gradient_accumulation_steps).collect();
            while self.state.next_group < groups.len() {
                if self.state.step >= self.total_steps {
                    return Ok(StopReason::Completed);
                }
                match observer.control() {
                    Control::Continue => {}
                    Control::Cancel => return Ok(StopReason::Cancelled),
                    Control::Pause => {
                        self.checkpoint(observer)?;
                        return Ok(StopReason::Paused);
                    }
                }
                let step_started = Instant::now();
                let group = groups[self.state.next_group];
                let (loss, accuracy, tokens) = super::on_pool(|| self.step(group))?;
                self.state.next_group += 1;
                if self.state.next_group == groups.len() {
                    self.state.epoch += 1;
                    self.state.next_group = 0;
                }
                let epoch_ended = self.state.next_group == 0;
                let interval = self.config.eval_interval;
                let due = if interval > 0 { self.state.step.is_multiple_of(interval) } else { epoch_ended };
                let (eval, stop_early) = if due && !self.prepared.validation.is_empty() {
                    let (metrics, stop) = super::on_pool(|| self.evaluate())?;
                    (Some(metrics), stop)
                } else {
                    (None, false)
                };
                let elapsed = started.elapsed().as_secs_f64();
                let done = (self.state.step - steps_at_start).max(1) as f64;
                observer.progress(&Progress {
                    step: self.state.step,
                    total_steps: self.total_steps,
                    epoch: self.state.step as f64 / self.steps_per_epoch as f64,
                    loss,
                    accuracy,
                    learning_rate: self.schedule.lr(self.state.step - 1),
                    tokens_per_second: tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
                    eta_seconds: elapsed / done * (self.total_steps - self.state.step) as f64,
                    trained_tokens: self.state.trained_tokens,
                    processed_tokens: self.state.processed_tokens,
                    eval,
                    preference: None,
                    router_aux_loss: None,
                });
                if stop_early {
                    return Ok(StopReason::EarlyStopped);
                }
                let every = self.config.checkpoint_interval;
                if every > 0 && self.state.step.is_multiple_of(every) && self.state.step < self.total_steps {
                    self.checkpoint(observer)?;
                }
                if epoch_ended {
                    break;
                }
            }
        }
        Ok(StopReason::Completed)
    }

    /// One optimizer step over a group of micro-batches: (mean loss, accuracy, tokens).
    fn step(&mut self, group: &[&[usize]]) -> Result<(f64, f64, usize), TrainError> {
        let model = &self.prepared.model;
        let batches = group
            .iter()
            .map(|indices| {
                let rows: Vec<&TaskExample> = indices.iter().map(|&i| &self.prepared.train[i]).collect();
                batch::make_batch(&rows, &model.config, model.device())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let scored: usize = batches.iter().map(|b| b.scored).sum();
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut loss_total, mut correct) = (0.0, 0usize);
        for batch in batches.iter().filter(|b| b.scored > 0) {
            let ctx = ForwardCtx::training(self.state.dropout_rng.clone());
            let out = batch::batch_loss(model, batch, &ctx)?;
            let loss = (out.loss_sum / scored as f64)?;
            loss_total += f64::from(loss.to_scalar::<f32>()?);
            correct += out.correct;
            super::run::accumulate(&mut grads, model.trainable.gradients(&loss.backward()?))?;
            if let Some(rng) = ctx.into_rng() {
                self.state.dropout_rng = rng;
            }
        }
        if self.config.max_grad_norm > 0.0 {
            clip_global_norm(&mut grads, self.config.max_grad_norm)?;
        }
        let lr = self.schedule.lr(self.state.step);
        self.optimizer.step(&model.trainable.params, &grads, lr)?;
        self.state.step += 1;
        self.state.trained_tokens += tokens as u64;
        self.state.processed_tokens += tokens as u64;
        self.state.last_loss = Some(loss_total);
        Ok((loss_total, correct as f64 / scored.max(1) as f64, tokens))
    }

    /// Evaluates; returns the metrics and whether early stopping says stop. The watched value is
    /// kept in `best_eval_loss` as "lower is better" (a score's negation).
    fn evaluate(&mut self) -> Result<(EvalMetrics, bool), TrainError> {
        let metrics = evaluate(&self.prepared.model, &self.prepared.validation, self.config.batch_size)?;
        self.last_eval = Some(metrics);
        let Some(rule) = &self.config.early_stopping else {
            return Ok((metrics, false));
        };
        let watched = match rule.metric.as_deref() {
            None | Some("loss") => metrics.loss,
            Some(name) => -metrics.task.and_then(|t| t.get(name)).unwrap_or(f64::NEG_INFINITY),
        };
        let improved = self.state.best_eval_loss.is_none_or(|best| watched < best - rule.min_delta);
        if improved {
            self.state.best_eval_loss = Some(watched);
            self.state.evals_without_improvement = 0;
            self.best = Some(self.prepared.model.trainable.snapshot()?);
        } else {
            self.state.evals_without_improvement += 1;
        }
        Ok((metrics, self.state.evals_without_improvement >= rule.patience))
    }

    fn checkpoint(&mut self, observer: &mut dyn Observer) -> Result<(), TrainError> {
        let dir = self.config.output_dir.join("checkpoints").join(format!("step-{}", self.state.step));
        checkpoint::save(&dir, &self.state, &self.prepared.model.trainable, &self.optimizer, None)?;
        // What the checkpoint's head means, for serving it.
        output::write_task_file(&dir, &self.prepared.model.task)?;
        observer.checkpointed(self.state.step, &dir);
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    fn finish(mut self, stop: StopReason) -> Result<Summary, TrainError> {
        let output = match stop {
            StopReason::Completed | StopReason::EarlyStopped => {
                if let Some(best) = self.best.take() {
                    self.prepared.model.trainable.restore(&best)?;
                }
                Some(write_encoder_output(&self.prepared.model, self.config)?)
            }
            StopReason::Cancelled | StopReason::Paused => None,
        };
        let watches_loss =
            self.config.early_stopping.as_ref().is_none_or(|r| r.metric.as_deref().is_none_or(|m| m == "loss"));
        Ok(Summary {
            steps: self.state.step,
            total_steps: self.total_steps,
            trained_tokens: self.state.trained_tokens,
            processed_tokens: self.state.processed_tokens,
            examples: self.prepared.counts.examples,
            truncated: self.prepared.counts.truncated,
            dropped: 0,
            final_train_loss: self.state.last_loss,
            final_eval: self.last_eval,
            best_eval_loss: self.state.best_eval_loss.filter(|_| watches_loss),
            stop,
            output,
            last_checkpoint: self.last_checkpoint,
        })
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
