//! The training loop: epochs of seeded shuffles, optimizer steps over accumulated micro-batches,
//! evaluation, early stopping, checkpoints and the final output.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::batch::{make_batch, trained_logits};
use super::checkpoint::{self, ReferenceLogps, TrainState};
use super::config::TrainConfig;
use super::eval::{evaluate, EvalMetrics};
use super::grads::batch_gradients;
use super::optimizer::{AdamW, AdamWConfig};
use super::preference::{
    evaluate_pairs, pair_reference, pair_rows, preference_loss, reference_log_probs, sequence_log_probs, DpoSettings,
    MetricSums, PreferenceMetrics,
};
use super::schedule::Schedule;
use super::setup::{prepare, Prepared};
use super::{output, Control, Observer, Progress, StopReason, Summary, TrainError};
use crate::models::common::ops::masked_cross_entropy_sum;
use crate::models::moe::load_balancing_loss;
use crate::models::ForwardCtx;
use crate::rng::Rng;

/// Trains per `config`, reporting to `observer`. Runs on the calling thread: use
/// [`super::spawn_training`] to get a thread with a large enough stack.
pub fn train(config: &TrainConfig, observer: &mut dyn Observer) -> Result<Summary, TrainError> {
    if crate::models::bert::config::is_encoder_dir(&config.model) {
        return super::encoder::train(config, observer);
    }
    if crate::models::t5::config::is_seq2seq_dir(&config.model) {
        return super::seq2seq::train(config, observer);
    }
    let device = config.device.open().map_err(|e| TrainError::Config(e.to_string()))?;
    let prepared = prepare(config, &device)?;
    let (steps_per_epoch, total_steps, schedule) = Schedule::for_run(config, prepared.items());
    let mut run = Run {
        config,
        optimizer: AdamW::new(AdamWConfig { weight_decay: config.weight_decay, ..Default::default() }),
        state: TrainState::new(config.seed),
        best: None,
        last_eval: None,
        last_checkpoint: None,
        prepared,
        schedule,
        total_steps,
        steps_per_epoch,
        reference: ReferenceLogps::default(),
        step_preference: None,
        step_router_aux_loss: None,
    };
    let resumed = config.resume_from.as_ref().map(|dir| Ok::<_, TrainError>((dir, checkpoint::load(dir, &device)?)));
    let mut resumed = resumed.transpose()?;
    if config.dpo.is_some_and(|d| d.needs_reference()) {
        // Before any trained weights are restored: for full fine-tuning the reference is the
        // model as loaded.
        run.reference = match resumed.as_mut().and_then(|(_, loaded)| loaded.reference.take()) {
            Some(reference) => reference,
            None => super::on_pool(|| run.compute_reference())?,
        };
    }
    if let Some((dir, loaded)) = resumed {
        run.resume(dir, loaded)?;
    }
    let stop = run.epochs(observer)?;
    run.finish(stop)
}

struct Run<'a> {
    config: &'a TrainConfig,
    prepared: Prepared,
    optimizer: AdamW,
    state: TrainState,
    /// The trainable weights at the best validation loss (kept when early stopping is on).
    best: Option<HashMap<String, Tensor>>,
    last_eval: Option<EvalMetrics>,
    last_checkpoint: Option<std::path::PathBuf>,
    schedule: Schedule,
    total_steps: u64,
    steps_per_epoch: u64,
    /// Preference runs: the reference policy's log-probability of every sequence.
    reference: ReferenceLogps,
    /// Preference runs: the last step's pair metrics.
    step_preference: Option<PreferenceMetrics>,
    /// Mixture-of-experts models: the last step's load-balancing loss.
    step_router_aux_loss: Option<f64>,
}

/// What one optimizer step's forward and backward passes gave.
struct StepOut {
    grads: HashMap<String, Tensor>,
    loss: f64,
    /// Predictions the argmax got right, of `scored` positions.
    correct: usize,
    scored: usize,
    /// Positions the loss covered, and tokens that are not padding.
    trained: usize,
    tokens: usize,
    preference: Option<PreferenceMetrics>,
    /// Mixture-of-experts models: the load-balancing loss, averaged over the micro-batches by
    /// their trained tokens.
    router_aux_loss: Option<f64>,
}

impl Run<'_> {
    fn compute_reference(&self) -> Result<ReferenceLogps, TrainError> {
        let (model, batch) = (&self.prepared.model, self.config.batch_size);
        Ok(ReferenceLogps {
            train: reference_log_probs(model, &self.prepared.train, batch)?,
            validation: reference_log_probs(model, &self.prepared.validation, batch)?,
        })
    }

    fn resume(&mut self, dir: &std::path::Path, loaded: checkpoint::Loaded) -> Result<(), TrainError> {
        self.prepared.model.trainable.restore(&loaded.trainable)?;
        self.optimizer.restore(loaded.optimizer_step, &loaded.moments)?;
        self.state = loaded.state;
        self.last_checkpoint = Some(dir.to_path_buf());
        Ok(())
    }

    fn epochs(&mut self, observer: &mut dyn Observer) -> Result<StopReason, TrainError> {
        let started = Instant::now();
        let steps_at_start = self.state.step;
        while self.state.epoch < self.config.epochs {
            let epoch = self.state.epoch;
            let mut order: Vec<usize> = (0..self.prepared.items()).collect();
            Rng::derive(self.config.seed, &format!("epoch-{epoch}")).shuffle(&mut order);
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
                let (loss, accuracy, tokens) = self.step(groups[self.state.next_group])?;
                self.state.next_group += 1;
                if self.state.next_group == groups.len() {
                    self.state.epoch += 1;
                    self.state.next_group = 0;
                }
                let tokens_per_second = tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9);
                let epoch_ended = self.state.next_group == 0;
                let interval = self.config.eval_interval;
                let due = if interval > 0 { self.state.step.is_multiple_of(interval) } else { epoch_ended };
                // Evaluated before reporting, so that the step's report carries both losses.
                let (eval, stop_early) = match due && !self.prepared.validation.is_empty() {
                    true => {
                        let (metrics, stop) = self.evaluate()?;
                        (Some(metrics), stop)
                    }
                    false => (None, false),
                };
                let elapsed = started.elapsed().as_secs_f64();
                let done = (self.state.step - steps_at_start).max(1) as f64;
                observer.progress(&Progress {
                    step: self.state.step,
                    total_steps: self.total_steps,
                    epoch: (self.state.step as f64 / self.steps_per_epoch as f64),
                    loss,
                    accuracy,
                    learning_rate: self.schedule.lr(self.state.step - 1),
                    tokens_per_second,
                    eta_seconds: elapsed / done * (self.total_steps - self.state.step) as f64,
                    trained_tokens: self.state.trained_tokens,
                    processed_tokens: self.state.processed_tokens,
                    eval,
                    preference: self.step_preference,
                    router_aux_loss: self.step_router_aux_loss,
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

    /// One optimizer step over a group of micro-batches; returns (mean loss, token accuracy,
    /// tokens seen).
    fn step(&mut self, group: &[&[usize]]) -> Result<(f64, f64, usize), TrainError> {
        // On a pool thread: see `train::pool`.
        super::on_pool(|| self.step_here(group))
    }

    fn step_here(&mut self, group: &[&[usize]]) -> Result<(f64, f64, usize), TrainError> {
        let mut out = match self.config.dpo {
            Some(settings) => self.preference_gradients(group, &settings)?,
            None => self.supervised_gradients(group)?,
        };
        if self.config.max_grad_norm > 0.0 {
            clip_global_norm(&mut out.grads, self.config.max_grad_norm)?;
        }
        let lr = self.schedule.lr(self.state.step);
        self.optimizer.step(&self.prepared.model.trainable.params, &out.grads, lr)?;
        self.state.step += 1;
        self.state.trained_tokens += out.trained as u64;
        self.state.processed_tokens += out.tokens as u64;
        self.state.last_loss = Some(out.loss);
        self.step_preference = out.preference;
        self.step_router_aux_loss = out.router_aux_loss;
        Ok((out.loss, out.correct as f64 / out.scored.max(1) as f64, out.tokens))
    }

    fn supervised_gradients(&mut self, group: &[&[usize]]) -> Result<StepOut, TrainError> {
        let model = &self.prepared.model;
        let batches = group
            .iter()
            .map(|indices| {
                let rows: Vec<_> = indices.iter().map(|&i| &self.prepared.train[i]).collect();
                make_batch(&rows, model.config.sliding_window, model.device(), model.dtype())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let trained: usize = batches.iter().map(|b| b.trained_tokens).sum();
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_total = 0.0;
        let mut correct = 0usize;
        let mut aux_total = None;
        // Mixture of experts: transformers' load-balancing loss joins the objective per micro-batch,
        // weighted by its share of the trained tokens (one micro-batch: `loss + coef · aux`).
        let moe = model.config.moe.as_ref().map(|m| (m.num_experts, self.config.router_aux_loss_coef(m)));
        for batch in batches.iter().filter(|b| b.trained_tokens > 0) {
            let mut ctx = ForwardCtx::training(self.state.dropout_rng.clone());
            if moe.is_some() {
                ctx = ctx.collect_routing(Some(batch.real.clone()));
            }
            let share = batch.trained_tokens as f64 / trained as f64;
            // Only trained positions need logits: with a large vocabulary and prompts that are not
            // trained (chat), the output head over every position would dominate the step.
            let head = |hidden: &Tensor| -> candle_core::Result<_> {
                let (logits, targets, _) = trained_logits(model, hidden, batch, &ctx)?;
                let ones = Tensor::ones(targets.dims1()?, DType::F32, model.device())?;
                let mut loss = (masked_cross_entropy_sum(&logits, &targets, &ones)? / trained as f64)?;
                let lm = f64::from(loss.to_scalar::<f32>()?);
                let mut aux_value = None;
                if let Some((experts, coef)) = moe {
                    if let Some(aux) = load_balancing_loss(&ctx.take_routing(), experts)? {
                        aux_value = Some(f64::from(aux.to_scalar::<f32>()?));
                        if coef > 0.0 {
                            loss = (loss + (aux * (coef * share))?)?;
                        }
                    }
                }
                Ok((loss, (count_correct(&logits, &targets)?, lm, aux_value)))
            };
            let inputs = (&batch.input_ids, &batch.positions, &batch.mask);
            let out = batch_gradients(model, inputs, &ctx, self.config.gradient_checkpointing, head)?;
            let (right, lm, aux) = out.head;
            (loss_total, correct) = (loss_total + lm, correct + right);
            if let Some(aux) = aux {
                aux_total = Some(aux_total.unwrap_or(0.0) + aux * share);
            }
            if let Some(rng) = ctx.into_rng() {
                self.state.dropout_rng = rng;
            }
            accumulate(&mut grads, out.grads)?;
        }
        Ok(StepOut {
            grads,
            loss: loss_total,
            correct,
            scored: trained,
            trained,
            tokens,
            preference: None,
            router_aux_loss: aux_total,
        })
    }

    /// DPO-family step: each micro-batch holds whole pairs (chosen rows, then rejected rows).
    fn preference_gradients(&mut self, group: &[&[usize]], settings: &DpoSettings) -> Result<StepOut, TrainError> {
        let model = &self.prepared.model;
        let train = &self.prepared.train;
        let batches = group
            .iter()
            .map(|pairs| {
                make_batch(&pair_rows(train, pairs), model.config.sliding_window, model.device(), model.dtype())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let group_pairs: usize = group.iter().map(|pairs| pairs.len()).sum();
        let chosen_tokens = |i: usize| train[2 * i].loss_mask.iter().filter(|&&m| m == 1).count();
        let group_chosen: usize = group.iter().flat_map(|pairs| pairs.iter()).map(|&i| chosen_tokens(i)).sum();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut sums, mut correct) = (MetricSums::default(), 0usize);
        for (batch, pairs) in batches.iter().zip(group) {
            let ctx = ForwardCtx::training(self.state.dropout_rng.clone());
            let reference = pair_reference(&self.reference.train, pairs);
            let head = |hidden: &Tensor| -> candle_core::Result<_> {
                let (logps, counts, right) = sequence_log_probs(model, hidden, batch, pairs.len(), &ctx)?;
                let (loss, part) = preference_loss(settings, &logps, &reference, &counts, group_pairs, group_chosen)?;
                Ok((loss, (part, right)))
            };
            let inputs = (&batch.input_ids, &batch.positions, &batch.mask);
            let out = batch_gradients(model, inputs, &ctx, self.config.gradient_checkpointing, head)?;
            sums.add(&out.head.0);
            correct += out.head.1;
            if let Some(rng) = ctx.into_rng() {
                self.state.dropout_rng = rng;
            }
            accumulate(&mut grads, out.grads)?;
        }
        let metrics = sums.means(settings);
        Ok(StepOut {
            grads,
            loss: metrics.loss,
            correct,
            scored: group_chosen,
            trained: batches.iter().map(|b| b.trained_tokens).sum(),
            tokens: batches.iter().map(|b| b.tokens).sum(),
            preference: Some(metrics),
            router_aux_loss: None,
        })
    }

    /// Evaluates; returns the metrics and whether early stopping says stop.
    fn evaluate(&mut self) -> Result<(EvalMetrics, bool), TrainError> {
        let (model, validation, batch) = (&self.prepared.model, &self.prepared.validation, self.config.batch_size);
        let metrics = match &self.config.dpo {
            Some(settings) => {
                let (pairs, correct, tokens) =
                    evaluate_pairs(model, validation, &self.reference.validation, settings, batch)?;
                EvalMetrics {
                    loss: pairs.loss,
                    mean_token_accuracy: correct as f64 / tokens.max(1) as f64,
                    perplexity: pairs.nll_chosen.exp(),
                    tokens,
                    preference: Some(pairs),
                    task: None,
                }
            }
            None => evaluate(model, validation, batch)?,
        };
        self.last_eval = Some(metrics);
        let Some(rule) = &self.config.early_stopping else {
            return Ok((metrics, false));
        };
        let improved = self.state.best_eval_loss.is_none_or(|best| metrics.loss < best - rule.min_delta);
        if improved {
            self.state.best_eval_loss = Some(metrics.loss);
            self.state.evals_without_improvement = 0;
            self.best = Some(self.prepared.model.trainable.snapshot()?);
        } else {
            self.state.evals_without_improvement += 1;
        }
        Ok((metrics, self.state.evals_without_improvement >= rule.patience))
    }

    fn checkpoint(&mut self, observer: &mut dyn Observer) -> Result<(), TrainError> {
        let dir = self.config.output_dir.join("checkpoints").join(format!("step-{}", self.state.step));
        let reference = self.config.dpo.is_some_and(|d| d.needs_reference()).then_some(&self.reference);
        checkpoint::save(&dir, &self.state, &self.prepared.model.trainable, &self.optimizer, reference)?;
        observer.checkpointed(self.state.step, &dir);
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    fn finish(mut self, stop: StopReason) -> Result<Summary, TrainError> {
        let output = match stop {
            StopReason::Completed | StopReason::EarlyStopped => {
                if let Some(best) = self.best.take() {
                    // Early stopping keeps the weights of the best validation loss.
                    self.prepared.model.trainable.restore(&best)?;
                }
                Some(output::write(&self.prepared, self.config)?)
            }
            StopReason::Cancelled | StopReason::Paused => None,
        };
        Ok(Summary {
            steps: self.state.step,
            total_steps: self.total_steps,
            trained_tokens: self.state.trained_tokens,
            processed_tokens: self.state.processed_tokens,
            examples: self.prepared.stats.examples,
            truncated: self.prepared.stats.truncated,
            dropped: self.prepared.stats.dropped,
            final_train_loss: self.state.last_loss,
            final_eval: self.last_eval,
            best_eval_loss: self.state.best_eval_loss,
            stop,
            output,
            last_checkpoint: self.last_checkpoint,
        })
    }
}

/// Adds `part` into `grads`, parameter by parameter.
pub(super) fn accumulate(grads: &mut HashMap<String, Tensor>, part: Vec<(String, Tensor)>) -> candle_core::Result<()> {
    for (name, g) in part {
        let sum = match grads.remove(&name) {
            Some(acc) => (acc + g)?,
            None => g,
        };
        grads.insert(name, sum);
    }
    Ok(())
}

/// How many positions the argmax of `logits` predicts right.
fn count_correct(logits: &Tensor, targets: &Tensor) -> candle_core::Result<usize> {
    let predicted: Vec<u32> = logits.detach().argmax(candle_core::D::Minus1)?.to_vec1()?;
    let targets: Vec<u32> = targets.to_vec1()?;
    Ok(predicted.iter().zip(&targets).filter(|(p, t)| p == t).count())
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (as torch's
/// `clip_grad_norm_`, with its 1e-6 guard); returns the norm before clipping.
pub fn clip_global_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> candle_core::Result<f64> {
    let mut squares = 0.0f64;
    for g in grads.values() {
        squares += f64::from(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let norm = squares.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
