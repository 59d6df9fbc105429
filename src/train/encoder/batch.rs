//! Encoder batches and their losses: cross-entropy over sequence labels or scored tokens, and the
//! in-batch-negatives contrastive loss of sentence-transformers' `MultipleNegativesRankingLoss`
//! (cosine similarities × 20, cross-entropy towards each anchor's own positive).

use candle_core::{DType, Device, Result, Tensor, D};

use crate::data::encoder::{Target, TaskExample, IGNORE};
use crate::models::bert::{Encoder, EncoderConfig, EncoderInput, Task};
use crate::models::common::ops::masked_cross_entropy_sum;
use crate::models::ForwardCtx;

/// sentence-transformers' default similarity scale for `MultipleNegativesRankingLoss`.
pub const CONTRASTIVE_SCALE: f64 = 20.0;

pub struct TaskBatch {
    pub input: EncoderInput,
    /// Embedding pairs: the positives.
    pub positives: Option<EncoderInput>,
    /// Classification: one id per row; token classification: one per position (row-major),
    /// 0 where unscored.
    pub labels: Tensor,
    pub label_mask: Tensor,
    pub host_labels: Vec<u32>,
    pub host_mask: Vec<f32>,
    /// Positions (or rows, or pairs) the loss covers.
    pub scored: usize,
    /// Tokens of the inputs, padding excluded.
    pub tokens: usize,
}

pub fn make_batch(rows: &[&TaskExample], config: &EncoderConfig, device: &Device) -> Result<TaskBatch> {
    let inputs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (&r.input.ids[..], &r.input.type_ids[..])).collect();
    let input = EncoderInput::new(&inputs, config, device)?;
    let mut tokens: usize = rows.iter().map(|r| r.input.ids.len()).sum();
    let (mut host_labels, mut host_mask, mut positives) = (Vec::new(), Vec::new(), None);
    match &rows.first().map(|r| &r.target) {
        Some(Target::Tags(_)) => {
            let t = input.input_ids.dim(1)?;
            for row in rows {
                let Target::Tags(tags) = &row.target else { candle_core::bail!("mixed targets in a batch") };
                for j in 0..t {
                    let tag = tags.get(j).copied().unwrap_or(IGNORE);
                    host_labels.push(if tag == IGNORE { 0 } else { tag as u32 });
                    host_mask.push(if tag == IGNORE { 0.0 } else { 1.0 });
                }
            }
        }
        Some(Target::Positive(_)) => {
            let pos: Vec<(&[u32], &[u32])> = rows
                .iter()
                .map(|r| match &r.target {
                    Target::Positive(p) => Ok((&p.ids[..], &p.type_ids[..])),
                    _ => candle_core::bail!("mixed targets in a batch"),
                })
                .collect::<Result<_>>()?;
            tokens += pos.iter().map(|(ids, _)| ids.len()).sum::<usize>();
            positives = Some(EncoderInput::new(&pos, config, device)?);
            host_labels = (0..rows.len() as u32).collect();
            host_mask = vec![1.0; rows.len()];
        }
        _ => {
            for row in rows {
                let Target::Label(label) = row.target else { candle_core::bail!("mixed targets in a batch") };
                host_labels.push(label);
                host_mask.push(1.0);
            }
        }
    }
    let scored = host_mask.iter().filter(|&&m| m > 0.0).count();
    Ok(TaskBatch {
        labels: Tensor::new(host_labels.as_slice(), device)?,
        label_mask: Tensor::new(host_mask.as_slice(), device)?,
        input,
        positives,
        host_labels,
        host_mask,
        scored,
        tokens,
    })
}

/// What a forward over a batch gives: the summed loss (a graph node), the logits it came from
/// (detached, `(scored rows, classes)`), and how many the argmax got right.
pub struct BatchLoss {
    pub loss_sum: Tensor,
    pub logits: Tensor,
    pub correct: usize,
}

/// The task's summed loss over `batch` (divide by the scored count of the whole step).
pub fn batch_loss(model: &Encoder, batch: &TaskBatch, ctx: &ForwardCtx) -> Result<BatchLoss> {
    let hidden = model.hidden(&batch.input, ctx)?;
    let logits = match &model.task {
        Task::Embedding => {
            let positives = batch.positives.as_ref().ok_or_else(|| candle_core::Error::Msg("no positives".into()))?;
            let anchors = normalize(&Encoder::mean_pool(&hidden, &batch.input.attention_mask)?)?;
            let positive_hidden = model.hidden(positives, ctx)?;
            let positives = normalize(&Encoder::mean_pool(&positive_hidden, &positives.attention_mask)?)?;
            (anchors.matmul(&positives.t()?)? * CONTRASTIVE_SCALE)?
        }
        Task::Classification { .. } => model.logits(&hidden, ctx)?,
        Task::TokenClassification { .. } => {
            let logits = model.logits(&hidden, ctx)?;
            let classes = logits.dim(D::Minus1)?;
            logits.reshape(((), classes))?
        }
    };
    let loss_sum = masked_cross_entropy_sum(&logits, &batch.labels, &batch.label_mask)?;
    let logits = logits.detach();
    let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let correct = predicted
        .iter()
        .zip(&batch.host_labels)
        .zip(&batch.host_mask)
        .filter(|((p, l), m)| **m > 0.0 && p == l)
        .count();
    Ok(BatchLoss { loss_sum, logits, correct })
}

/// Rows scaled to unit L2 norm (as torch's `F.normalize`, eps 1e-12).
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Mean-pooled, normalized embeddings of `batch`'s inputs (and of its positives), detached.
pub fn embed(model: &Encoder, input: &EncoderInput) -> Result<Tensor> {
    let hidden = model.hidden(input, &ForwardCtx::inference())?;
    normalize(&Encoder::mean_pool(&hidden, &input.attention_mask)?)?.detach().to_dtype(DType::F32)
}
