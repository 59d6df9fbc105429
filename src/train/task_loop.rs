//! The training loop of the task models (encoders, encoder-decoders): epochs of seeded shuffles,
//! AdamW steps over accumulated micro-batches with clipping and the schedule, evaluation and early
//! stopping on loss or a task metric (keeping the best weights), exact-resume checkpoints, pause
//! and cancel. A model says how a micro-batch is made and scored, how validation is measured and
//! what its checkpoints and output hold ([`TaskModel`]); the loop does the rest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::eval::EvalMetrics;
use super::optimizer::{AdamW, AdamWConfig};
use super::run::clip_global_norm;
use super::schedule::Schedule;
use super::{Control, Observer, Progress, StopReason, Summary, TrainError};
use crate::data::dataset::{load_jsonl, split_validation, LoadedDataset};
use crate::models::common::params::TrainableParams;
use crate::models::ForwardCtx;
use crate::rng::Rng;

/// A micro-batch's size for the loss's normalisation and the throughput figures.
pub trait BatchSize {
    /// Positions (or rows, or pairs) the loss covers.
    fn scored(&self) -> usize;
    /// Input tokens, padding excluded.
    fn tokens(&self) -> usize;
}

/// What the loop needs of a model.
pub trait TaskModel: Send {
    type Example: Send + Sync;
    type Batch: BatchSize;

    fn trainable(&self) -> &TrainableParams;
    fn device(&self) -> &candle_core::Device;
    fn make_batch(&self, rows: &[&Self::Example]) -> candle_core::Result<Self::Batch>;
    /// The summed loss over the batch's scored positions, and how many of them were predicted right.
    fn batch_loss(&self, batch: &Self::Batch, ctx: &ForwardCtx) -> candle_core::Result<(Tensor, usize)>;
    /// Validation loss and metrics over `examples`, without dropout.
    fn evaluate(&self, examples: &[Self::Example], batch_size: usize) -> Result<EvalMetrics, TrainError>;
    /// Files a checkpoint needs besides the trainable weights (what an encoder's head means).
    fn checkpoint_files(&self, dir: &Path) -> Result<(), TrainError>;
    /// Writes the trained model or adapter; returns its directory.
    fn write_output(&self, config: &TrainConfig) -> Result<PathBuf, TrainError>;
}

/// The encoded training and validation examples, and the counts the summary reports.
pub struct TaskData<E> {
    pub train: Vec<E>,
    pub validation: Vec<E>,
    pub examples: usize,
    pub truncated: usize,
}

/// The training file and the validation data: the validation file (which must hold the same
/// format), else a seeded `validation_fraction` of the training file, else none.
pub fn load_splits(config: &TrainConfig) -> Result<(LoadedDataset, Option<LoadedDataset>), TrainError> {
    let train_data = load_jsonl(&config.train_file)?;
    Ok(match &config.validation_file {
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
    })
}

/// Trains `model` on `data` per `config` (resuming from `config.resume_from`), reporting to
/// `observer`.
pub fn train<M: TaskModel>(
    config: &TrainConfig,
    model: M,
    data: TaskData<M::Example>,
    observer: &mut dyn Observer,
) -> Result<Summary, TrainError> {
    let (steps_per_epoch, total_steps, schedule) = Schedule::for_run(config, data.train.len());
    let mut run = Run {
        config,
        optimizer: AdamW::new(AdamWConfig { weight_decay: config.weight_decay, ..Default::default() }),
        state: TrainState::new(config.seed),
        schedule,
        model,
        data,
        total_steps,
        steps_per_epoch,
        best: None,
        last_eval: None,
        last_checkpoint: None,
    };
    if let Some(dir) = &config.resume_from {
        let loaded = checkpoint::load(dir, run.model.device())?;
        run.model.trainable().restore(&loaded.trainable)?;
        run.optimizer.restore(loaded.optimizer_step, &loaded.moments)?;
        run.state = loaded.state;
        run.last_checkpoint = Some(dir.clone());
    }
    let stop = run.epochs(observer)?;
    run.finish(stop)
}

struct Run<'a, M: TaskModel> {
    config: &'a TrainConfig,
    model: M,
    data: TaskData<M::Example>,
    optimizer: AdamW,
    state: TrainState,
    schedule: Schedule,
    total_steps: u64,
    steps_per_epoch: u64,
    /// The trainable weights at the best validation score (kept when early stopping is on).
    best: Option<HashMap<String, Tensor>>,
    last_eval: Option<EvalMetrics>,
    last_checkpoint: Option<PathBuf>,
}

impl<M: TaskModel> Run<'_, M> {
    fn epochs(&mut self, observer: &mut dyn Observer) -> Result<StopReason, TrainError> {
        let started = Instant::now();
        let steps_at_start = self.state.step;
        while self.state.epoch < self.config.epochs {
            let mut order: Vec<usize> = (0..self.data.train.len()).collect();
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
                let (eval, stop_early) = if due && !self.data.validation.is_empty() {
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
        let model = &self.model;
        let batches = group
            .iter()
            .map(|indices| {
                let rows: Vec<&M::Example> = indices.iter().map(|&i| &self.data.train[i]).collect();
                model.make_batch(&rows)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let scored: usize = batches.iter().map(BatchSize::scored).sum();
        let tokens: usize = batches.iter().map(BatchSize::tokens).sum();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut loss_total, mut correct) = (0.0, 0usize);
        for batch in batches.iter().filter(|b| b.scored() > 0) {
            let ctx = ForwardCtx::training(self.state.dropout_rng.clone());
            let (loss_sum, right) = model.batch_loss(batch, &ctx)?;
            let loss = (loss_sum / scored as f64)?;
            loss_total += f64::from(loss.to_scalar::<f32>()?);
            correct += right;
            super::run::accumulate(&mut grads, model.trainable().gradients(&loss.backward()?))?;
            if let Some(rng) = ctx.into_rng() {
                self.state.dropout_rng = rng;
            }
        }
        if self.config.max_grad_norm > 0.0 {
            clip_global_norm(&mut grads, self.config.max_grad_norm)?;
        }
        let lr = self.schedule.lr(self.state.step);
        self.optimizer.step(&model.trainable().params, &grads, lr)?;
        self.state.step += 1;
        self.state.trained_tokens += tokens as u64;
        self.state.processed_tokens += tokens as u64;
        self.state.last_loss = Some(loss_total);
        Ok((loss_total, correct as f64 / scored.max(1) as f64, tokens))
    }

    /// Evaluates; returns the metrics and whether early stopping says stop. The watched value is
    /// kept in `best_eval_loss` as "lower is better" (a score's negation).
    fn evaluate(&mut self) -> Result<(EvalMetrics, bool), TrainError> {
        let metrics = self.model.evaluate(&self.data.validation, self.config.batch_size)?;
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
            self.best = Some(self.model.trainable().snapshot()?);
        } else {
            self.state.evals_without_improvement += 1;
        }
        Ok((metrics, self.state.evals_without_improvement >= rule.patience))
    }

    fn checkpoint(&mut self, observer: &mut dyn Observer) -> Result<(), TrainError> {
        let dir = self.config.output_dir.join("checkpoints").join(format!("step-{}", self.state.step));
        checkpoint::save(&dir, &self.state, self.model.trainable(), &self.optimizer, None)?;
        self.model.checkpoint_files(&dir)?;
        observer.checkpointed(self.state.step, &dir);
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    fn finish(mut self, stop: StopReason) -> Result<Summary, TrainError> {
        let output = match stop {
            StopReason::Completed | StopReason::EarlyStopped => {
                if let Some(best) = self.best.take() {
                    self.model.trainable().restore(&best)?;
                }
                Some(self.model.write_output(self.config)?)
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
            examples: self.data.examples,
            truncated: self.data.truncated,
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
