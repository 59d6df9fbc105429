//! Vectorizable `exp`, row max/sum and softmax for the fused training kernels (softmax inside
//! attention, cross-entropy over the vocabulary, SwiGLU's sigmoid).
//!
//! libm's `expf` is a scalar call per element: a callgrind profile of a tiny-llama LoRA step
//! counted 14% of all instructions in it. This `exp` is Cephes' single-precision polynomial
//! (S. L. Moshier, Cephes Math Library, `expf.c`: range reduction by `n = round(x·log2 e)` with
//! ln 2 split in two constants, a degree-5 polynomial for `e^r`, then `2^n` built from the exponent
//! bits). Relative error below 3e-7 (the unit test checks it against `f32::exp`). With AVX2 and FMA
//! (detected at run time) eight lanes at a time with intrinsics; LLVM did not vectorize the plain
//! loops (clamping and the underflow test became branches). Elsewhere a scalar loop.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this, `e^x` is under the smallest normal f32: the result is 0.
const MIN_X: f32 = -87.336_55;
/// Above this, `2^n` would overflow the exponent bits: clamped (e^88.3 ≈ 2.1e38).
const MAX_X: f32 = 88.3;

#[inline(always)]
fn exp1(x: f32) -> f32 {
    let clamped = x.clamp(MIN_X, MAX_X);
    let n = (clamped * LOG2E).round_ties_even();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < MIN_X {
        0.0
    } else {
        y * scale
    }
}

#[inline]
fn max_generic(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    rest.iter().fold(lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max), |m, &v| m.max(v))
}

/// `x ← e^(x − shift)`, returning the sum of the results.
fn exp_shifted_sum_generic(x: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = exp1(c[i] - shift);
            lanes[i] += c[i];
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp1(*v - shift);
        sum += *v;
    }
    sum
}

/// `out ← e^(x − shift)`, returning the sum of the results.
fn exp_shifted_into_generic(x: &[f32], out: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (xc, oc) = (x.chunks_exact(8), out.chunks_exact_mut(8));
    let (xr, split) = (xc.remainder(), x.len() - x.len() % 8);
    for (x, o) in xc.zip(oc) {
        for i in 0..8 {
            o[i] = exp1(x[i] - shift);
            lanes[i] += o[i];
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for (x, o) in xr.iter().zip(&mut out[split..]) {
        *o = exp1(x - shift);
        sum += *o;
    }
    sum
}

fn sigmoid_generic(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + exp1(-x));
    }
}

/// Eight lanes of [`exp1`] with AVX2 and FMA (the same constants; FMA rounds once where the
/// scalar version rounds twice).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{exp1, LN2_HI, LN2_LO, LOG2E, MAX_X, MIN_X};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(MIN_X));
        let c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(MIN_X)), _mm256_set1_ps(MAX_X));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            c,
            _mm256_set1_ps(LOG2E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), c));
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for k in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(k));
        }
        let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_andnot_ps(below, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum8(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_into(x: &[f32], out: &mut [f32], shift: f32) -> f32 {
        let n = x.len().min(out.len());
        let (mut acc, s) = (_mm256_setzero_ps(), _mm256_set1_ps(shift));
        let mut i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = sum8(acc);
        for j in i..n {
            out[j] = exp1(x[j] - shift);
            sum += out[j];
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        let (mut acc, s) = (_mm256_setzero_ps(), _mm256_set1_ps(shift));
        let mut i = 0;
        while i + 8 <= x.len() {
            let p = x.as_mut_ptr().add(i);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), s));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = sum8(acc);
        for v in &mut x[i..] {
            *v = exp1(*v - shift);
            sum += *v;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let neg = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(x.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_div_ps(one, _mm256_add_ps(one, exp8(neg))));
            i += 8;
        }
        for j in i..n {
            out[j] = 1.0 / (1.0 + exp1(-x[j]));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(x: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= x.len() {
            acc = _mm256_max_ps(acc, _mm256_loadu_ps(x.as_ptr().add(i)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        x[i..].iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

macro_rules! dispatch {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $generic:ident;)*) => {
        $(
            #[inline]
            pub fn $name($($arg: $ty),*) $(-> $ret)? {
                #[cfg(target_arch = "x86_64")]
                {
                    if avx2() {
                        // SAFETY: the CPU has AVX2 and FMA.
                        return unsafe { avx2::$name($($arg),*) };
                    }
                }
                $generic($($arg),*)
            }
        )*
    };
}

dispatch! {
    fn max(x: &[f32]) -> f32 => max_generic;
    fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 => exp_shifted_sum_generic;
    fn exp_shifted_into(x: &[f32], out: &mut [f32], shift: f32) -> f32 => exp_shifted_into_generic;
    fn sigmoid(x: &[f32], out: &mut [f32]) => sigmoid_generic;
}

/// `x ← x · by`.
pub fn scale(x: &mut [f32], by: f32) {
    x.iter_mut().for_each(|v| *v *= by);
}

/// Whether the CPU has AVX2 and FMA (the kernels here and in `q4_1` are compiled for them).
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A vector of `n` f32 that the caller overwrites entirely before reading (no zero fill: zeroing
/// fresh buffers was about a tenth of a training step's instructions under callgrind).
#[allow(clippy::uninit_vec)]
pub fn for_overwrite(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: any bit pattern is a valid f32, and every caller writes each element before it
    // reads it (the same contract as candle's `alloc_uninit`).
    unsafe { v.set_len(n) };
    v
}

/// Softmax of one row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    let m = max(row);
    let sum = exp_shifted_sum(row, m);
    scale(row, 1.0 / sum);
}

/// `(max, ln Σ e^(x − max))` of a row, with `scratch` (as long as `row`) for the exponentials.
pub fn max_and_log_sum(row: &[f32], scratch: &mut [f32]) -> (f32, f32) {
    let m = max(row);
    (m, exp_shifted_into(row, scratch, m).ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulps_of_libm_and_exact_at_the_edges() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp1(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp1(0.0), 1.0);
        assert_eq!(exp1(-1e9), 0.0);
        assert_eq!(exp1(f32::NEG_INFINITY), 0.0);
        assert!(exp1(1e9).is_finite());
        // The dispatched loops (AVX2 where present) agree with the scalar formula.
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 5.0).collect();
        let mut row = values.clone();
        let sum = exp_shifted_sum(&mut row, 1.5);
        for (r, v) in row.iter().zip(&values) {
            assert!((r - (v - 1.5).exp()).abs() <= 3e-7 * (v - 1.5).exp());
        }
        assert!((sum - row.iter().sum::<f32>()).abs() < 1e-4);
        assert_eq!(max(&values), values[36]);
        let mut sig = vec![0f32; values.len()];
        sigmoid(&values, &mut sig);
        assert!(sig.iter().zip(&values).all(|(s, v)| (s - 1.0 / (1.0 + (-v).exp())).abs() < 1e-6));
    }

    #[test]
    fn softmax_and_log_sum_match_the_plain_formulas() {
        let row: Vec<f32> = (0..50).map(|i| ((i * 7919) % 23) as f32 * 0.5 - 4.0).collect();
        let mut soft = row.clone();
        softmax_in_place(&mut soft);
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = row.iter().map(|x| (x - m).exp()).sum();
        for (s, x) in soft.iter().zip(&row) {
            assert!((s - (x - m).exp() / total).abs() < 1e-6);
        }
        let mut scratch = vec![0f32; row.len()];
        let (got_max, log_sum) = max_and_log_sum(&row, &mut scratch);
        assert_eq!(got_max, m);
        assert!((log_sum - total.ln()).abs() < 1e-5);
    }
}
