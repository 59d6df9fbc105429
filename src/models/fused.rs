//! Fused CPU kernels with hand-written backward passes for the two hottest element-wise blocks
//! of training: softmax over the last dimension and RMSNorm. Each is one graph node instead of
//! five or six, which saves the autograd bookkeeping (a zeroed gradient buffer and an add per
//! node) and the intermediate activations. Other dtypes and devices use the composite ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
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
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(y, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
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
    }
}
