//! Fused CPU kernels with hand-written backward passes for the hottest element-wise blocks of
//! training: softmax over the last dimension, RMSNorm, LayerNorm, SwiGLU's `silu(gate) · up` and
//! the masked cross-entropy. Each is one graph node instead of two to ten, which saves the autograd
//! bookkeeping (a zeroed gradient buffer and an add per node) and the intermediate activations.
//! Other dtypes and devices use the composite ops. Attention has its own module (`attention`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Softmax over the last dimension; differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension; differentiable in both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 || !x.device().is_cpu() {
        return super::ops::rms_norm_composite(x, weight, eps);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dimension (biased variance);
/// differentiable in all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if !f32_cpu(x) || !f32_cpu(weight) || !f32_cpu(bias) {
        return super::ops::layer_norm_composite(x, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps: eps as f32 })
}

/// `silu(gate) · up`, element-wise; differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || !gate.device().is_cpu() || gate.dims() != up.dims() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `gelu_tanh(gate) · up` (T5 v1.1 / Flan-T5's gated-GELU, transformers' `gelu_new`), element-wise;
/// differentiable in both.
pub fn gated_gelu_tanh(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || !gate.device().is_cpu() || gate.dims() != up.dims() {
        return gate.gelu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, GatedGeluTanh)
}

/// Summed cross-entropy `Σ mask · (logsumexp(logits) − logits[label])` of `logits (n, vocab)`
/// against `labels (n)` u32, weighted by `mask (n)`; differentiable in `logits`.
pub fn masked_cross_entropy_sum(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || !logits.device().is_cpu() {
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
        return (picked * mask)?.sum_all()?.neg();
    }
    let labels: Vec<u32> = labels.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let weights: Vec<f32> = mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    if labels.len() != n
        || weights.len() != n
        || labels.iter().zip(&weights).any(|(&l, &w)| w != 0.0 && l as usize >= vocab)
    {
        candle_core::bail!(
            "cross-entropy: {n} rows of {vocab} logits, {} labels, {} weights",
            labels.len(),
            weights.len()
        );
    }
    logits.contiguous()?.apply_op1(CrossEntropy { labels, weights })?.sum_all()
}

/// Each row's log-probability of its label, `log_softmax(logits)[label]`, of `logits (n, vocab)`
/// against `labels (n)` u32: `(n)`, differentiable in `logits` (the fused cross-entropy, negated).
pub fn label_log_probs(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || !logits.device().is_cpu() {
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        return log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1);
    }
    let labels: Vec<u32> = labels.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    if labels.len() != n || labels.iter().any(|&l| l as usize >= vocab) {
        candle_core::bail!("label log-probs: {n} rows of {vocab} logits, {} labels", labels.len());
    }
    logits.contiguous()?.apply_op1(CrossEntropy { labels, weights: vec![1.0; n] })?.neg()
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("fused op: expected f32") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused op: expected a contiguous tensor"),
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let dim = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = super::fastmath::for_overwrite(x.len());
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(y, x)| {
            y.copy_from_slice(x);
            super::fastmath::softmax_in_place(y);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// dx = y · (g − Σ g·y)
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // Detached: a gradient built from graph nodes would keep the whole forward graph alive
        // (through the optimizer's moments, across steps).
        let (y, g) = (&y.detach(), &g.detach());
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let w = contiguous_f32(s2, l2)?;
        let dim = w.len();
        if l1.dims().last() != Some(&dim) {
            candle_core::bail!("fused-rms-norm: weight of {dim} for input {:?}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(y, x)| {
            let mean = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let r = 1.0 / (mean + self.eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With r = 1/√(mean(x²)+ε) and x̂ = x·r: dw = Σ_rows g·x̂; dx = r·(g·w − x̂·mean(g·w·x̂)).
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (&x.detach(), &w.detach(), &g.detach());
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(self.eps))?.sqrt()?.recip()?;
        let x_hat = x.broadcast_mul(&r)?;
        let hidden = w.dim(0)?;
        let dw = (g * &x_hat)?.reshape(((), hidden))?.sum(0)?;
        let gw = g.broadcast_mul(w)?;
        let dot = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
        let dx = (gw - x_hat.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let dim = w.len();
        if l1.dims().last() != Some(&dim) || b.len() != dim {
            candle_core::bail!("fused-layer-norm: weight {dim} and bias {} for input {:?}", b.len(), l1.dims());
        }
        let mut out = super::fastmath::for_overwrite(x.len());
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(y, x)| {
            let mean = x.iter().sum::<f32>() / dim as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
            let r = 1.0 / (var + self.eps).sqrt();
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * r * w + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With x̂ = (x − mean)·r, r = 1/√(var+ε): db = Σ_rows g, dw = Σ_rows g·x̂,
    /// dx = r·(g·w − mean(g·w) − x̂·mean(g·w·x̂)).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (&x.detach(), &w.detach(), &g.detach());
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + f64::from(self.eps))?.sqrt()?.recip()?;
        let x_hat = centered.broadcast_mul(&r)?;
        let hidden = w.dim(0)?;
        let dw = (g * &x_hat)?.reshape(((), hidden))?.sum(0)?;
        let db = g.reshape(((), hidden))?.sum(0)?;
        let gw = g.broadcast_mul(w)?;
        let mean_gw = gw.mean_keepdim(D::Minus1)?;
        let dot = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_sub(&mean_gw)? - x_hat.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Elements per parallel task of the gated element-wise ops.
const CHUNK: usize = 4096;

/// The forward of a gated element-wise op: `kernel(gate, up, out)` over chunks, in parallel.
fn gated_forward(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    kernel: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let (gate, up) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
    let mut out = super::fastmath::for_overwrite(gate.len());
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(y, (x, u))| kernel(x, u, y));
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// The backward of a gated element-wise op: `kernel(gate, up, g, d_gate, d_up)` over chunks, in
/// parallel.
fn gated_backward(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    kernel: impl Fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]) + Sync,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (gate_v, up_v): (Vec<f32>, Vec<f32>) = (gate.flatten_all()?.to_vec1()?, up.flatten_all()?.to_vec1()?);
    let g: Vec<f32> = g.contiguous()?.flatten_all()?.to_vec1()?;
    let (mut d_gate, mut d_up) = (super::fastmath::for_overwrite(g.len()), super::fastmath::for_overwrite(g.len()));
    d_gate.par_chunks_mut(CHUNK).zip(d_up.par_chunks_mut(CHUNK)).enumerate().for_each(|(chunk, (dg, du))| {
        let at = chunk * CHUNK;
        let range = at..at + dg.len();
        kernel(&gate_v[range.clone()], &up_v[range.clone()], &g[range], dg, du);
    });
    let device = gate.device();
    Ok((Some(Tensor::from_vec(d_gate, gate.shape(), device)?), Some(Tensor::from_vec(d_up, up.shape(), device)?)))
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        gated_forward(s1, l1, s2, l2, |x, u, y| {
            super::fastmath::sigmoid(x, y);
            for ((y, &x), &u) in y.iter_mut().zip(x).zip(u) {
                *y *= x * u;
            }
        })
    }

    /// d gate = g · up · σ(gate)·(1 + gate·(1 − σ(gate))); d up = g · silu(gate).
    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        gated_backward(gate, up, g, |x, u, g, dg, du| {
            // σ(gate) into d_up first, then both gradients from it.
            super::fastmath::sigmoid(x, du);
            for ((((dg, du), &x), &u), &g) in dg.iter_mut().zip(du.iter_mut()).zip(x).zip(u).zip(g) {
                let s = *du;
                *du = g * x * s;
                *dg = g * u * s * (1.0 + x * (1.0 - s));
            }
        })
    }
}

/// `sqrt(2/π)`, and the cubic coefficient of the tanh GELU.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// `t = tanh(c·(x + a·x³))` of each `x`, as `2·σ(2·inner) − 1` with the vectorised sigmoid
/// (`scratch` holds the doubled inner term).
fn gelu_tanh_inner(x: &[f32], scratch: &mut [f32], t: &mut [f32]) {
    for (s, &x) in scratch.iter_mut().zip(x) {
        *s = 2.0 * GELU_C * (x + GELU_A * x * x * x);
    }
    super::fastmath::sigmoid(scratch, t);
    for t in t.iter_mut() {
        *t = 2.0 * *t - 1.0;
    }
}

struct GatedGeluTanh;

impl CustomOp2 for GatedGeluTanh {
    fn name(&self) -> &'static str {
        "fused-gated-gelu-tanh"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        gated_forward(s1, l1, s2, l2, |x, u, y| {
            let mut t = vec![0f32; x.len()];
            gelu_tanh_inner(x, y, &mut t);
            for (((y, &x), &u), &t) in y.iter_mut().zip(x).zip(u).zip(&t) {
                *y = 0.5 * x * (1.0 + t) * u;
            }
        })
    }

    /// With t = tanh(c·(x + a·x³)): gelu' = ½(1 + t) + ½·x·(1 − t²)·c·(1 + 3a·x²);
    /// d gate = g · up · gelu'(gate); d up = g · gelu(gate).
    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        gated_backward(gate, up, g, |x, u, g, dg, du| {
            // tanh of the inner term into d_up first, then both gradients from it.
            gelu_tanh_inner(x, dg, du);
            for ((((dg, du), &x), &u), &g) in dg.iter_mut().zip(du.iter_mut()).zip(x).zip(u).zip(g) {
                let t = *du;
                let derivative = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x);
                *du = g * 0.5 * x * (1.0 + t);
                *dg = g * u * derivative;
            }
        })
    }
}

/// Per-row `weight · (logsumexp − logit[label])`; backward `g · weight · (softmax − onehot)`.
struct CrossEntropy {
    labels: Vec<u32>,
    weights: Vec<f32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(storage, layout)?;
        let n = self.labels.len();
        let vocab = logits.len() / n.max(1);
        let mut out = vec![0f32; n];
        out.par_iter_mut().zip(logits.par_chunks(vocab)).enumerate().for_each_init(
            || vec![0f32; vocab],
            |scratch, (i, (y, row))| {
                if self.weights[i] != 0.0 {
                    let (max, log_sum) = super::fastmath::max_and_log_sum(row, scratch);
                    *y = self.weights[i] * (max + log_sum - row[self.labels[i] as usize]);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, vocab) = logits.dims2()?;
        let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let mut grad = super::fastmath::for_overwrite(n * vocab);
        grad.par_chunks_mut(vocab).zip(values.par_chunks(vocab)).enumerate().for_each(|(i, (dx, row))| {
            let w = g[i] * self.weights[i];
            if w != 0.0 {
                // dx ← softmax(row) · w, then − w at the label.
                let max = super::fastmath::max(row);
                let sum = super::fastmath::exp_shifted_into(row, dx, max);
                super::fastmath::scale(dx, w / sum);
                dx[self.labels[i] as usize] -= w;
            } else {
                dx.fill(0.0);
            }
        });
        Ok(Some(Tensor::from_vec(grad, (n, vocab), logits.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Forward values and gradients of a weighted sum of `f(x)` equal the composite ops'.
    #[test]
    fn fused_ops_match_the_composite_ops_forward_and_backward() {
        let device = Device::Cpu;
        let x = Var::randn(0f32, 2.0, (3, 5, 16), &device).unwrap();
        let w = Var::randn(1f32, 0.1, 16, &device).unwrap();
        let c = Tensor::randn(0f32, 1.0, (3, 5, 16), &device).unwrap();

        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let composite = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        assert!(max_diff(&fused, &composite) < 1e-6);
        let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composite * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap()) < 1e-5);

        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let composite = super::super::ops::rms_norm_composite(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert!(max_diff(&fused, &composite) < 1e-5);
        let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composite * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap()) < 1e-4);
        assert!(max_diff(gf.get(&w).unwrap(), gc.get(&w).unwrap()) < 1e-4);
        // Gradients must not carry the forward graph: the optimizer keeps them (as moments)
        // across steps, and a tracked one would keep every step's activations alive.
        assert!(!gf.get(&x).unwrap().track_op() && !gf.get(&w).unwrap().track_op());

        let b = Var::randn(0f32, 0.5, 16, &device).unwrap();
        let fused = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let composite =
            super::super::ops::layer_norm_composite(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        assert!(max_diff(&fused, &composite) < 1e-5);
        let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composite * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            assert!(max_diff(gf.get(v).unwrap(), gc.get(v).unwrap()) < 1e-4);
            assert!(!gf.get(v).unwrap().track_op());
        }

        let up = Var::randn(0f32, 1.0, (3, 5, 16), &device).unwrap();
        let fused = swiglu(x.as_tensor(), up.as_tensor()).unwrap();
        let composite = (x.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composite) < 1e-5);
        let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composite * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap()) < 1e-5);
        assert!(max_diff(gf.get(&up).unwrap(), gc.get(&up).unwrap()) < 1e-5);

        let fused = gated_gelu_tanh(x.as_tensor(), up.as_tensor()).unwrap();
        let composite = (x.as_tensor().gelu().unwrap() * up.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composite) < 1e-5);
        let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composite * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap()) < 1e-5);
        assert!(max_diff(gf.get(&up).unwrap(), gc.get(&up).unwrap()) < 1e-5);
        assert!(!gf.get(&x).unwrap().track_op() && !gf.get(&up).unwrap().track_op());
    }

    /// The fused cross-entropy equals log_softmax → gather → mask → sum, value and gradient.
    #[test]
    fn fused_cross_entropy_matches_the_composite_ops() {
        let device = Device::Cpu;
        let logits = Var::randn(0f32, 3.0, (6, 11), &device).unwrap();
        let labels = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &device).unwrap();
        let mask = Tensor::new(&[1f32, 1.0, 0.0, 1.0, 0.5, 1.0], &device).unwrap();
        let fused = masked_cross_entropy_sum(logits.as_tensor(), &labels, &mask).unwrap();
        let log_probs = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let picked = log_probs.gather(&labels.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap();
        let composite = (picked * &mask).unwrap().sum_all().unwrap().neg().unwrap();
        assert!(max_diff(&fused, &composite) < 1e-4, "{fused} {composite}");
        let (f, c) = (fused.backward().unwrap(), composite.backward().unwrap());
        assert!(max_diff(f.get(&logits).unwrap(), c.get(&logits).unwrap()) < 1e-5);
    }
}
