//! Tensor operations for training: all differentiable (composite ops), except where a gradient is
//! not wanted. See `shared/notes/candle-training.md`: several fused candle ops have no backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

/// RMSNorm, `x / sqrt(mean(x²) + eps) * weight`, computed in f32 like transformers (one fused
/// node on the CPU in f32, see `fused`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    super::fused::rms_norm(x, weight, eps)
}

/// RMSNorm from composite (differentiable) ops, for dtypes and devices without a fused kernel.
pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// LayerNorm over the last dimension, `(x − mean) / sqrt(var + eps) · weight + bias` with the
/// biased variance (one fused node on the CPU in f32, see `fused`); differentiable.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    super::fused::layer_norm(x, weight, bias, eps)
}

/// LayerNorm from composite (differentiable) ops, computed in f32 (as torch does for f32 input).
pub fn layer_norm_composite(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// From 2 up to this many rows, inference computes `(W · xᵀ)ᵀ` (see `frozen_linear`).
const SMALL_BATCH: usize = 16;

/// `x · Wᵀ` for a frozen `W` (out × in): the backward gives the gradient of `x` only.
///
/// candle's own matmul backward also computes (and keeps until the end of backward) a
/// weight-sized gradient for the frozen operand, which is wasted memory and time for LoRA.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let mut dims = x.dims().to_vec();
    let last = dims.pop().expect("rank >= 1");
    if last != in_features {
        candle_core::bail!("frozen_linear: input has {last} features, weight expects {in_features}");
    }
    let rows: usize = dims.iter().product();
    if !x.track_op() && (2..=SMALL_BATCH).contains(&rows) {
        // Decoding: few rows. `W · xᵀ` (long M, short N) suits the gemm kernels far better than
        // `x · Wᵀ` (short M); the result is the transpose of what we want, made contiguous.
        let out = weight.matmul(&x.reshape((rows, in_features))?.t()?)?.t()?.contiguous()?;
        dims.push(out_features);
        return out.reshape(dims);
    }
    if !x.device().is_cpu() || !x.track_op() {
        // No gradient wanted (inference), or no CPU kernel for the custom op: a plain matmul.
        return x.broadcast_matmul(&weight.t()?);
    }
    let out = x.reshape((rows, in_features))?.apply_op1(FrozenMatmul { weight: weight.clone() })?;
    dims.push(out_features);
    out.reshape(dims)
}

/// `x (m×k) · Wᵀ (k×n)` on CPU storage; backward returns `grad · W` for `x` only.
struct FrozenMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, _) = self.weight.dims2()?;
        let weight_t = self.weight.t()?;
        let (w_storage, w_layout) = weight_t.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else { candle_core::bail!("frozen-matmul: weight is not on the CPU") };
        let out = storage.matmul(w, (1, m, n, k), layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.detach().matmul(&self.weight)?))
    }
}

/// Rotates half of the last dimension, as in transformers' `rotate_half`.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Applies rotary embeddings: `x (b, h, t, d)`, `cos`/`sin` `(b, 1, t, d)`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// Repeats key/value heads for grouped-query attention: `(b, kv, t, d)` → `(b, kv·n, t, d)`.
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, kv, n, t, d))?.reshape((b, kv * n, t, d))
}

/// Summed cross-entropy of `logits (n, vocab)` against `labels (n)` over positions where
/// `mask (n)` is 1 (one fused node on the CPU in f32, see `fused`). Callers divide by the number of
/// trained tokens of the whole (accumulated) batch, so that gradient accumulation equals one large
/// batch.
pub fn masked_cross_entropy_sum(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    super::fused::masked_cross_entropy_sum(logits, labels, mask)
}
