//! Turns packed or padded sequences into model inputs and next-token targets.

use candle_core::{DType, Device, Result, Tensor};

use crate::data::packing::Sequence;
use crate::models::common::mask::packed_causal_mask;
use crate::models::llama::CausalLm;
use crate::models::ForwardCtx;

/// Padding's segment id: padding attends only to itself and is never a target.
const PAD_SEGMENT: u32 = u32::MAX;

pub struct Batch {
    /// `(b, t)`
    pub input_ids: Tensor,
    /// `(b, t)` positions, restarting at every packed example.
    pub positions: Tensor,
    /// `(b, 1, t, t)` additive attention mask.
    pub mask: Tensor,
    /// `(b·(t−1))` the token each position predicts.
    pub targets: Tensor,
    /// `(b·(t−1))` 1 where that prediction is trained.
    pub target_mask: Tensor,
    /// Host copy of `targets`/`target_mask`, for accuracy.
    pub host_targets: Vec<u32>,
    pub host_mask: Vec<u8>,
    pub trained_tokens: usize,
    /// Tokens that are not padding.
    pub tokens: usize,
    /// Per position (`b·t`, row-major): 1 for a token, 0 for padding (what the mixture-of-experts
    /// load-balancing loss counts).
    pub real: Vec<f32>,
}

/// Builds a batch, cutting padding columns that every row has at its end.
pub fn make_batch(rows: &[&Sequence], window: Option<usize>, device: &Device, dtype: DType) -> Result<Batch> {
    let used = rows.iter().map(|s| s.segments.iter().rposition(|&g| g != PAD_SEGMENT).map_or(0, |i| i + 1)).max();
    let t = used.unwrap_or(0).max(2);
    let b = rows.len();
    let (mut ids, mut positions, mut segments) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::new());
    let (mut targets, mut mask) = (Vec::with_capacity(b * (t - 1)), Vec::with_capacity(b * (t - 1)));
    let mut tokens = 0;
    for row in rows {
        ids.extend_from_slice(&row.input_ids[..t]);
        positions.extend_from_slice(&row.positions[..t]);
        segments.extend_from_slice(&row.segments[..t]);
        tokens += row.segments[..t].iter().filter(|&&g| g != PAD_SEGMENT).count();
        for i in 0..t - 1 {
            targets.push(row.input_ids[i + 1]);
            mask.push(row.loss_mask[i + 1]);
        }
    }
    let trained_tokens = mask.iter().filter(|&&m| m == 1).count();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        positions: Tensor::from_vec(positions, (b, t), device)?,
        mask: packed_causal_mask(&segments, b, t, window, device)?.to_dtype(dtype)?,
        targets: Tensor::from_vec(targets.clone(), b * (t - 1), device)?,
        target_mask: Tensor::from_vec(mask.iter().map(|&m| f32::from(m)).collect::<Vec<_>>(), b * (t - 1), device)?,
        host_targets: targets,
        host_mask: mask,
        trained_tokens,
        tokens,
        real: segments.iter().map(|&g| if g == PAD_SEGMENT { 0.0 } else { 1.0 }).collect(),
    })
}

/// Logits of the positions that predict a next token: `(b, t, v)` → `(b·(t−1), v)`.
pub fn prediction_logits(logits: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))
}

/// The logits and targets of the batch's trained positions only, with those positions' indices
/// into the `(b·(t−1))` predictions (row `i / (t−1)`): with a large vocabulary and prompts that
/// are not trained, the output head over every position would dominate a step.
pub fn trained_logits(
    model: &CausalLm,
    hidden: &Tensor,
    batch: &Batch,
    ctx: &ForwardCtx,
) -> Result<(Tensor, Tensor, Vec<u32>)> {
    let (b, t, h) = hidden.dims3()?;
    let predicting = hidden.narrow(1, 0, t - 1)?.reshape((b * (t - 1), h))?;
    let index: Vec<u32> = batch.host_mask.iter().enumerate().filter(|(_, &m)| m == 1).map(|(i, _)| i as u32).collect();
    let selected = Tensor::from_vec(index.clone(), index.len(), model.device())?;
    let logits = model.logits(&predicting.index_select(&selected, 0)?, ctx)?;
    Ok((logits, batch.targets.index_select(&selected, 0)?, index))
}
