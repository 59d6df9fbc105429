//! Additive attention masks: causal, optionally windowed (Mistral), and block-diagonal for packed
//! sequences so that no token attends across an example boundary.

use candle_core::{DType, Device, Result, Tensor};

/// A large finite negative: a fully masked row must not produce NaN (see the candle notes).
pub const MASKED: f32 = -1e9;

/// `(b, 1, t, t)` mask for training on `segments (b × t)`: token i may attend to token j when
/// j ≤ i, both belong to the same segment (packed example), and i − j < `window`.
pub fn packed_causal_mask(
    segments: &[u32],
    batch: usize,
    seq: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = vec![MASKED; batch * seq * seq];
    for b in 0..batch {
        let seg = &segments[b * seq..(b + 1) * seq];
        for i in 0..seq {
            let row = &mut mask[(b * seq + i) * seq..(b * seq + i + 1) * seq];
            let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
            for j in first..=i {
                if seg[j] == seg[i] {
                    row[j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(mask, (batch, 1, seq, seq), device)
}

/// `(1, 1, t, past + t)` mask for `t` new tokens after `past` cached ones (one sequence).
pub fn incremental_causal_mask(past: usize, new: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let total = past + new;
    let mut mask = vec![MASKED; new * total];
    for i in 0..new {
        let absolute = past + i;
        let first = window.map_or(0, |w| (absolute + 1).saturating_sub(w));
        for j in first..=absolute {
            mask[i * total + j] = 0.0;
        }
    }
    Tensor::from_vec(mask, (1, 1, new, total), device)
}

/// `mask (b or 1, 1, t, t)` also closed to keys `window` or more positions back, by `positions
/// (b, t)` (a packed row's positions restart with each example): a Gemma sliding layer's mask from
/// the model's causal one.
pub fn windowed(mask: &Tensor, positions: &Tensor, window: usize) -> Result<Tensor> {
    let p = positions.to_dtype(DType::F32)?;
    let (b, t) = p.dims2()?;
    let distance = p.unsqueeze(2)?.broadcast_sub(&p.unsqueeze(1)?)?;
    let far = distance.ge(window as f64)?;
    let closed = Tensor::full(MASKED, (b, t, t), p.device())?;
    let open = Tensor::zeros((b, t, t), DType::F32, p.device())?;
    mask.broadcast_add(&far.where_cond(&closed, &open)?.unsqueeze(1)?.to_dtype(mask.dtype())?)
}

/// `mask (b or 1, 1, t, t)` with `n` prefix columns in front: the prefix holds positions
/// `0..n` and the tokens `n + positions`, so a token sees prefix position j when it is fewer than
/// `window` positions back (always, without a window).
pub fn with_prefix(mask: &Tensor, positions: &Tensor, n: usize, window: Option<usize>) -> Result<Tensor> {
    let (mb, _, t, _) = mask.dims4()?;
    let (b, _) = positions.dims2()?;
    let columns = match window {
        None => Tensor::zeros((mb, 1, t, n), mask.dtype(), mask.device())?,
        Some(window) => {
            let query = (positions.to_dtype(DType::F32)? + n as f64)?.unsqueeze(2)?;
            let keys = Tensor::arange(0u32, n as u32, mask.device())?.to_dtype(DType::F32)?.reshape((1, 1, n))?;
            let far = query.broadcast_sub(&keys)?.ge(window as f64)?;
            let closed = Tensor::full(MASKED, (b, t, n), mask.device())?;
            let open = Tensor::zeros((b, t, n), DType::F32, mask.device())?;
            far.where_cond(&closed, &open)?.unsqueeze(1)?.to_dtype(mask.dtype())?
        }
    };
    let (cb, ..) = columns.dims4()?;
    let mask = if cb != mb { mask.broadcast_as((cb, 1, t, t))?.contiguous()? } else { mask.clone() };
    Tensor::cat(&[&columns, &mask], 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(mask: &Tensor) -> Vec<Vec<u8>> {
        let rows: Vec<Vec<f32>> = mask.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        rows.iter().map(|r| r.iter().map(|&v| u8::from(v == 0.0)).collect()).collect()
    }

    #[test]
    fn packed_examples_do_not_see_each_other() {
        let mask = packed_causal_mask(&[0, 0, 1, 1], 1, 4, None, &Device::Cpu).unwrap();
        assert_eq!(allowed(&mask), vec![vec![1, 0, 0, 0], vec![1, 1, 0, 0], vec![0, 0, 1, 0], vec![0, 0, 1, 1]]);
    }

    #[test]
    fn a_sliding_window_limits_how_far_back_a_token_looks() {
        let mask = packed_causal_mask(&[0; 4], 1, 4, Some(2), &Device::Cpu).unwrap();
        assert_eq!(allowed(&mask), vec![vec![1, 0, 0, 0], vec![1, 1, 0, 0], vec![0, 1, 1, 0], vec![0, 0, 1, 1]]);
        let step = incremental_causal_mask(3, 1, Some(2), &Device::Cpu).unwrap();
        assert_eq!(allowed(&step), vec![vec![0, 0, 1, 1]]);
    }
}
