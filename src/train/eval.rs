//! Validation: loss, mean token accuracy and perplexity over held-out sequences, without dropout.

use candle_core::{Result, D};
use serde::Serialize;

use super::batch::{make_batch, prediction_logits};
use crate::data::packing::Sequence;
use crate::models::common::ops::masked_cross_entropy_sum;
use crate::models::llama::CausalLm;
use crate::models::ForwardCtx;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub mean_token_accuracy: f64,
    pub perplexity: f64,
    pub tokens: usize,
    /// Preference runs: the pair metrics (`loss` above is then the preference loss, accuracy and
    /// perplexity are of the chosen answers' tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<super::preference::PreferenceMetrics>,
    /// Encoder runs: the task's metrics (accuracy, F1, recall@k).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<super::encoder::metrics::TaskMetrics>,
}

pub fn evaluate(model: &CausalLm, sequences: &[Sequence], batch_size: usize) -> Result<EvalMetrics> {
    let ctx = ForwardCtx::inference();
    let (mut loss_sum, mut correct, mut tokens) = (0.0f64, 0usize, 0usize);
    for chunk in sequences.chunks(batch_size) {
        let rows: Vec<&Sequence> = chunk.iter().collect();
        let batch = make_batch(&rows, model.config.sliding_window, model.device(), model.dtype())?;
        if batch.trained_tokens == 0 {
            continue;
        }
        let hidden = model.forward_hidden(&batch.input_ids, &batch.positions, &batch.mask, &ctx)?;
        let logits = prediction_logits(&model.logits(&hidden, &ctx)?)?.detach();
        let sum = masked_cross_entropy_sum(&logits, &batch.targets, &batch.target_mask)?;
        loss_sum += f64::from(sum.to_scalar::<f32>()?);
        let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        correct += predicted
            .iter()
            .zip(&batch.host_targets)
            .zip(&batch.host_mask)
            .filter(|((p, t), m)| **m == 1 && p == t)
            .count();
        tokens += batch.trained_tokens;
    }
    let loss = loss_sum / tokens.max(1) as f64;
    Ok(EvalMetrics {
        loss,
        mean_token_accuracy: correct as f64 / tokens.max(1) as f64,
        perplexity: loss.exp(),
        tokens,
        preference: None,
        task: None,
    })
}
