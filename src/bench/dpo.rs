//! `ferrotune bench train --method dpo|dpo-full`: timed DPO steps (sigmoid loss, β 0.1) on
//! synthetic pairs, through the trainer's own preference path. Each of `batch` pairs is two rows
//! of `seq` SplitMix64 tokens sharing their first half (the prompt); only the second half (the
//! answer) is scored. The reference log-probabilities are computed before timing, as the trainer
//! does before its first step.

use std::time::Instant;

use candle_core::DType;
use serde_json::{json, Value};

use crate::data::packing::Sequence;
use crate::models::llama::CausalLm;
use crate::models::ForwardCtx;
use crate::rng::splitmix64;
use crate::train::batch::make_batch;
use crate::train::grads::batch_gradients;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::preference::{
    pair_reference, pair_rows, preference_loss, reference_log_probs, sequence_log_probs, DpoSettings,
};

/// What the timed steps measured.
pub struct DpoRun {
    pub tokens_per_s: f64,
    pub step_ms_median: f64,
    pub loss_first: f32,
    pub loss_last: f32,
}

/// Four batches of `b` pairs (step i uses batch i % 4), interleaved chosen/rejected.
fn pairs(b: usize, t: usize, vocab: u64, seed: u64) -> Vec<Vec<Sequence>> {
    let half = t / 2;
    (0..4u64)
        .map(|j| {
            let mut draw = (j * (3 * b * t) as u64..).map(|k| (splitmix64(seed, k) % vocab) as u32);
            let mut rows = Vec::with_capacity(2 * b);
            for _ in 0..b {
                let prompt: Vec<u32> = draw.by_ref().take(half).collect();
                for _ in 0..2 {
                    let mut ids = prompt.clone();
                    ids.extend(draw.by_ref().take(t - half));
                    let loss_mask = (0..t).map(|i| u8::from(i >= half)).collect();
                    rows.push(Sequence {
                        input_ids: ids,
                        loss_mask,
                        positions: (0..t as u32).collect(),
                        segments: vec![0; t],
                    });
                }
            }
            rows
        })
        .collect()
}

pub fn run(
    model: &CausalLm,
    (b, t, steps, warmup): (usize, usize, usize, usize),
    vocab: u64,
    seed: u64,
    checkpointing: bool,
) -> anyhow::Result<DpoRun> {
    let batches = pairs(b, t, vocab, seed);
    let settings = DpoSettings { beta: Some(0.1), ..Default::default() };
    let references = batches
        .iter()
        .map(|rows| crate::train::on_pool(|| reference_log_probs(model, rows, b)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let all: Vec<usize> = (0..b).collect();
    let chosen_tokens = b * (t - t / 2);
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let (mut loss_first, mut loss_last, mut times) = (0.0f32, 0.0f32, Vec::new());
    for step in 0..warmup + steps {
        let (rows, reference) = (&batches[step % 4], pair_reference(&references[step % 4], &all));
        let started = Instant::now();
        let value = crate::train::on_pool(|| -> anyhow::Result<f32> {
            let batch = make_batch(&pair_rows(rows, &all), model.config.sliding_window, model.device(), DType::F32)?;
            let ctx = ForwardCtx::inference();
            let head = |hidden: &candle_core::Tensor| {
                let (logps, counts, _) = sequence_log_probs(model, hidden, &batch, b, &ctx)?;
                let (loss, _) = preference_loss(&settings, &logps, &reference, &counts, b, chosen_tokens)?;
                Ok((loss, ()))
            };
            let inputs = (&batch.input_ids, &batch.positions, &batch.mask);
            let out = batch_gradients(model, inputs, &ctx, checkpointing, head)?;
            optimizer.step(&model.trainable.params, &out.grads.into_iter().collect(), 1e-4)?;
            Ok(out.loss as f32)
        })?;
        if step == 0 {
            loss_first = value;
        }
        loss_last = value;
        if step >= warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    Ok(DpoRun {
        tokens_per_s: (2 * b * t * steps) as f64 / total.max(1e-9),
        step_ms_median: times.get(times.len() / 2).copied().unwrap_or(0.0) * 1e3,
        loss_first,
        loss_last,
    })
}

/// The figures in the JSON line `bench train` prints.
pub fn figures(run: &DpoRun) -> Value {
    json!({
        "tokens_per_s": run.tokens_per_s, "step_ms_median": run.step_ms_median,
        "loss_first": run.loss_first, "loss_last": run.loss_last, "pairs": true,
    })
}
