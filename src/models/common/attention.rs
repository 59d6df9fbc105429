//! Fused causal self-attention for training on the CPU in f32: RoPE on queries and keys, grouped-
//! query scores, the additive mask, softmax and the value product as one graph node, with a
//! hand-written backward.
//!
//! The composite version is about twenty graph nodes per layer (head transposes and copies, RoPE,
//! `repeat_kv`, two batched matmuls, scale, mask, softmax), each with its own activation kept for
//! backward and its own zeroed-and-added gradient buffer. Here queries, keys and values stay in
//! the projections' `(b, t, heads, d)` layout (the strided gemm reads them in place), the output
//! is written straight into the `(b, t, heads·d)` layout that `o_proj` takes, and nothing `t × t`
//! outlives a call: backward recomputes each head's probabilities, as flash attention does.
//!
//! Backward, per head, with S = scale·Q·Kᵀ + mask, P = softmax(S), O = P·V and upstream dO:
//! dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = scale·dS·K, dK += scale·dSᵀ·Q
//! (the sums run over the query heads that share a key/value head), then RoPE's transpose.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Whether [`attention`] can run on these inputs (f32 on the CPU).
pub fn supported(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}

/// How attention logits are formed from `q·k`: times `scale` (usually `1/sqrt(d)`), then, with a
/// soft-cap `c` (Gemma 2), `c · tanh(x / c)`, before the mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Logits {
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl Logits {
    /// `1/sqrt(d)`, uncapped.
    pub fn standard(head_dim: usize) -> Self {
        Self { scale: 1.0 / (head_dim as f32).sqrt(), softcap: None }
    }

    /// The same on a tensor of `q·kᵀ` (the composite paths).
    pub fn apply(&self, scores: &Tensor) -> Result<Tensor> {
        let scores = (scores * self.scale as f64)?;
        match self.softcap {
            Some(c) => (scores / c as f64)?.tanh()? * c as f64,
            None => Ok(scores),
        }
    }
}

/// Attention of `q (b, t, heads, d)` over `k`, `v` `(b, t, kv_heads, d)`, rotating `q` and `k` by
/// `cos`/`sin` `(b, 1, t, d)` (transformers' `rotate_half` convention), forming the logits as
/// `logits` says and adding `mask` `(b or 1, 1, t, t)`. Returns `(b, t, heads·d)`. Differentiable
/// in `q`, `k` and `v`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    logits: Logits,
) -> Result<Tensor> {
    let (b, t, heads, d) = q.dims4()?;
    let (kb, kt, kv_heads, kd) = k.dims4()?;
    if (kb, kt, kd) != (b, t, d) || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 || d % 2 != 0 {
        candle_core::bail!("fused attention: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    }
    let (mb, _, mt, ms) = mask.dims4()?;
    if (mb != 1 && mb != b) || mt != t || ms != t || cos.elem_count() != b * t * d || sin.elem_count() != b * t * d {
        candle_core::bail!(
            "fused attention: mask {:?} or rope {:?} does not fit q {:?}",
            mask.dims(),
            cos.dims(),
            q.dims()
        );
    }
    let op = Attention {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
        mask: mask.to_dtype(DType::F32)?.contiguous()?.detach(),
        dims: Dims { b, t, heads, kv_heads, d, mask_batched: mb == b && b > 1 },
        logits,
    };
    let out = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    out.reshape((b, t, heads * d))
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    mask_batched: bool,
}

impl Dims {
    /// Offset of row `(batch, position 0, head)` in a `(b, t, n, d)` buffer.
    fn at(&self, batch: usize, n: usize, head: usize) -> usize {
        (batch * self.t * n + head) * self.d
    }
}

struct Attention {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    dims: Dims,
    logits: Logits,
}

/// A pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the raw field).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

fn slice_of<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("fused attention: expected f32") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused attention: expected a contiguous tensor"),
    }
}

/// A contiguous f32 CPU tensor's values.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1()
}

/// Rotates each `d`-wide row of `x (b, t, n, d)` by its position's cos/sin; `inverse` applies the
/// transpose (for gradients).
fn rope(x: &[f32], cos: &[f32], sin: &[f32], dims: &Dims, n: usize, inverse: bool) -> Vec<f32> {
    let d = dims.d;
    let half = d / 2;
    let mut out = super::fastmath::for_overwrite(x.len());
    out.par_chunks_mut(n * d).zip(x.par_chunks(n * d)).enumerate().for_each(|(row, (out, x))| {
        let (c, s) = (&cos[row * d..(row + 1) * d], &sin[row * d..(row + 1) * d]);
        for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            for i in 0..half {
                let (lo, hi) = (x[i], x[i + half]);
                if inverse {
                    // y = R·x with y_lo = lo·c − hi·s, y_hi = hi·c + lo·s (per-index c, s).
                    o[i] = lo * c[i] + hi * s[i + half];
                    o[i + half] = hi * c[i + half] - lo * s[i];
                } else {
                    o[i] = lo * c[i] - hi * s[i];
                    o[i + half] = hi * c[i + half] + lo * s[i + half];
                }
            }
        }
    });
    out
}

/// `dst (m×n) = [dst +] beta · lhs (m×k) · rhs (k×n)`, with (row, column) strides, single-threaded.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

impl Attention {
    /// The probabilities `P (t × t)` of head `head` of batch `batch`, into `p`; with a soft-cap and
    /// `slopes`, also `1 − tanh²(x / c)` of every logit (the cap's derivative), into `slopes`.
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        qr: &[f32],
        kr: &[f32],
        mask: &[f32],
        batch: usize,
        head: usize,
        p: &mut [f32],
        slopes: Option<&mut [f32]>,
    ) {
        let Dims { t, heads, kv_heads, d, .. } = self.dims;
        let group = head / (heads / kv_heads);
        let q = &qr[self.dims.at(batch, heads, head)..];
        let k = &kr[self.dims.at(batch, kv_heads, group)..];
        // S = scale · Q · Kᵀ; Kᵀ (d × t) reads K's rows as columns.
        unsafe {
            mm(
                (t, t, d),
                p.as_mut_ptr(),
                t,
                false,
                q.as_ptr(),
                (heads * d, 1),
                k.as_ptr(),
                (1, kv_heads * d),
                self.logits.scale,
            )
        };
        if let Some(c) = self.logits.softcap {
            match slopes {
                Some(slopes) => p.iter_mut().zip(slopes.iter_mut()).for_each(|(s, slope)| {
                    let tanh = (*s / c).tanh();
                    *s = c * tanh;
                    *slope = 1.0 - tanh * tanh;
                }),
                None => p.iter_mut().for_each(|s| *s = c * (*s / c).tanh()),
            }
        }
        let mask = if self.dims.mask_batched { &mask[batch * t * t..(batch + 1) * t * t] } else { &mask[..t * t] };
        for (row, mask) in p.chunks_exact_mut(t).zip(mask.chunks_exact(t)) {
            row.iter_mut().zip(mask).for_each(|(s, m)| *s += m);
            super::fastmath::softmax_in_place(row);
        }
    }

    /// The RoPE tables as flat `(b·t, d)` values.
    fn tables(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((values(&self.cos)?, values(&self.sin)?))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let (q, k, v) = (slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?);
        let (cos, sin) = self.tables()?;
        let (qr, kr) = (
            rope(q, &cos, &sin, &self.dims, self.dims.heads, false),
            rope(k, &cos, &sin, &self.dims, self.dims.kv_heads, false),
        );
        let mask = values(&self.mask)?;
        let Dims { b, t, heads, kv_heads, d, .. } = self.dims;
        // Every head's columns of every row are written by one task's gemm.
        let mut out = super::fastmath::for_overwrite(b * t * heads * d);
        let dst = Shared(out.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each_init(
            || vec![0f32; t * t],
            |p, task| {
                let (batch, head) = (task / heads, task % heads);
                self.probabilities(&qr, &kr, &mask, batch, head, p, None);
                let group = head / (heads / kv_heads);
                let v = &v[self.dims.at(batch, kv_heads, group)..];
                // O = P · V, written into this head's columns of the output rows.
                unsafe {
                    let o = dst.at(self.dims.at(batch, heads, head));
                    mm((t, d, t), o, heads * d, false, p.as_ptr(), (t, 1), v.as_ptr(), (kv_heads * d, 1), 1.0);
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q_t, k_t) = (q, k);
        let (q, k, v, g) = (values(q)?, values(k)?, values(v)?, values(grad)?);
        let (cos, sin) = self.tables()?;
        let (qr, kr) = (
            rope(&q, &cos, &sin, &self.dims, self.dims.heads, false),
            rope(&k, &cos, &sin, &self.dims, self.dims.kv_heads, false),
        );
        let mask = values(&self.mask)?;
        let Dims { b, t, heads, kv_heads, d, .. } = self.dims;
        let per_group = heads / kv_heads;
        let scale = self.logits.scale;
        // dQ is written head by head; dK and dV accumulate over a group's heads.
        let (mut dq, mut dk, mut dv) =
            (super::fastmath::for_overwrite(q.len()), vec![0f32; k.len()], vec![0f32; v.len()]);
        let (dq_p, dk_p, dv_p) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
        // One task per (batch, key/value head): it owns that head's dK and dV and its query heads' dQ.
        let capped = self.logits.softcap.is_some();
        (0..b * kv_heads).into_par_iter().for_each_init(
            || (vec![0f32; t * t], vec![0f32; t * t], vec![0f32; if capped { t * t } else { 0 }]),
            |(p, dp, slopes), task| {
                let (batch, group) = (task / kv_heads, task % kv_heads);
                let kv_at = self.dims.at(batch, kv_heads, group);
                for head in group * per_group..(group + 1) * per_group {
                    self.probabilities(&qr, &kr, &mask, batch, head, p, capped.then_some(&mut slopes[..]));
                    let q_at = self.dims.at(batch, heads, head);
                    let go = g[q_at..].as_ptr();
                    unsafe {
                        // dV += Pᵀ · dO
                        mm((t, d, t), dv_p.at(kv_at), kv_heads * d, true, p.as_ptr(), (1, t), go, (heads * d, 1), 1.0);
                        // dP = dO · Vᵀ
                        mm(
                            (t, t, d),
                            dp.as_mut_ptr(),
                            t,
                            false,
                            go,
                            (heads * d, 1),
                            v[kv_at..].as_ptr(),
                            (1, kv_heads * d),
                            1.0,
                        );
                    }
                    for (dp, p) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                        let dot: f32 = dp.iter().zip(p.iter()).map(|(a, b)| a * b).sum();
                        dp.iter_mut().zip(p.iter()).for_each(|(dp, p)| *dp = p * (*dp - dot));
                    }
                    if capped {
                        // Through the cap: d(c·tanh(x/c))/dx = 1 − tanh²(x/c).
                        dp.iter_mut().zip(slopes.iter()).for_each(|(dp, slope)| *dp *= slope);
                    }
                    unsafe {
                        // dQ = scale · dS · K;  dK += scale · dSᵀ · Q (both on the rotated values).
                        let (k, qh) = (kr[kv_at..].as_ptr(), qr[q_at..].as_ptr());
                        mm(
                            (t, d, t),
                            dq_p.at(q_at),
                            heads * d,
                            false,
                            dp.as_ptr(),
                            (t, 1),
                            k,
                            (kv_heads * d, 1),
                            scale,
                        );
                        mm(
                            (t, d, t),
                            dk_p.at(kv_at),
                            kv_heads * d,
                            true,
                            dp.as_ptr(),
                            (1, t),
                            qh,
                            (heads * d, 1),
                            scale,
                        );
                    }
                }
            },
        );
        let dq = rope(&dq, &cos, &sin, &self.dims, heads, true);
        let dk = rope(&dk, &cos, &sin, &self.dims, kv_heads, true);
        let device = q_t.device();
        Ok((
            Some(Tensor::from_vec(dq, q_t.shape(), device)?),
            Some(Tensor::from_vec(dk, k_t.shape(), device)?),
            Some(Tensor::from_vec(dv, k_t.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var, D};

    use super::*;
    use crate::models::common::ops::{apply_rope, repeat_kv};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The composite computation the model used before: heads first, RoPE, `repeat_kv`, softmax.
    fn composite(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        logits: Logits,
    ) -> Tensor {
        let (b, t, heads, d) = q.dims4().unwrap();
        let kv = k.dims4().unwrap().2;
        let q = apply_rope(&q.transpose(1, 2).unwrap().contiguous().unwrap(), cos, sin).unwrap();
        let k = apply_rope(&k.transpose(1, 2).unwrap().contiguous().unwrap(), cos, sin).unwrap();
        let v = v.transpose(1, 2).unwrap().contiguous().unwrap();
        let (k, v) = (repeat_kv(&k, heads / kv).unwrap(), repeat_kv(&v, heads / kv).unwrap());
        let scores = logits.apply(&q.matmul(&k.t().unwrap()).unwrap()).unwrap().broadcast_add(mask).unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        probs.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, heads * d)).unwrap()
    }

    /// Values and all three gradients equal the composite ops', with grouped-query heads, a
    /// per-sequence (packed) mask and positions that restart inside a row; with the standard
    /// logits and with Gemma 2's (another scale, a soft-cap small enough to bind).
    #[test]
    fn fused_attention_matches_the_composite_ops_forward_and_backward() {
        check_against_composite(Logits::standard(8));
        check_against_composite(Logits { scale: 0.6, softcap: Some(1.5) });
    }

    fn check_against_composite(logits: Logits) {
        let device = Device::Cpu;
        let (b, t, heads, kv, d) = (2, 7, 4, 2, 8);
        let q = Var::randn(0f32, 1.0, (b, t, heads, d), &device).unwrap();
        let k = Var::randn(0f32, 1.0, (b, t, kv, d), &device).unwrap();
        let v = Var::randn(0f32, 1.0, (b, t, kv, d), &device).unwrap();
        // Row 0 is one sequence; row 1 packs two (positions 0..4 then 0..3).
        let positions: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0, 1, 2];
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|&p| (0..d).map(move |i| p as f32 / 10f32.powf((2 * (i % (d / 2))) as f32 / d as f32)))
            .collect();
        let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), (b, 1, t, d), &device).unwrap();
        let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), (b, 1, t, d), &device).unwrap();
        let segments = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1];
        let mask = crate::models::common::mask::packed_causal_mask(&segments, b, t, None, &device).unwrap();

        let fused = attention(&q, &k, &v, &cos, &sin, &mask, logits).unwrap();
        let reference = composite(&q, &k, &v, &cos, &sin, &mask, logits);
        assert!(max_diff(&fused, &reference) < 1e-5, "{}", max_diff(&fused, &reference));

        let c = Tensor::randn(0f32, 1.0, (b, t, heads * d), &device).unwrap();
        let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (reference * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&q, &k, &v] {
            let (f, r) = (gf.get(var).unwrap(), gc.get(var).unwrap());
            assert!(max_diff(f, r) < 1e-4, "{}", max_diff(f, r));
            assert!(!f.track_op());
        }
    }
}
