//! `x · Wᵀ` for a q4_1 weight (ggml's block format: per 32 weights an f16 scale `d`, an f16 minimum
//! `m` and 16 bytes of 4-bit values, weight `j` in the low nibble of byte `j`, weight `j + 16` in the
//! high nibble; `w = q·d + m`). candle's own q4_1 kernel is scalar.
//!
//! Two kernels, both AVX2 (with FMA and F16C) when the CPU has them:
//! - up to [`INTEGER_ROWS`] input rows (decoding), the activations are quantized per block of 32
//!   to 8-bit integers with one f32 scale, and each block's dot product is an integer one
//!   (`maddubs`: unsigned 4-bit weights × signed 8-bit activations), as llama.cpp does for q4_1 ×
//!   q8_1. The minimum's term uses the block's exact f32 sum. Decoding is bound by reading the
//!   weights; this keeps the arithmetic per weight byte small enough not to become the bound.
//! - more rows (prefill, QLoRA training) keep the activations in f32, so the result equals the
//!   dequantized matmul up to rounding.

use candle_core::{Result, Tensor};
use half::f16;
use rayon::prelude::*;

pub const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 20;
/// Up to this many input rows, activations are quantized to 8 bits (see the module docs).
pub const INTEGER_ROWS: usize = 16;

/// Input rows quantized per block of 32: `q = round(x / d)` with `d = max|x| / 127`, plus the
/// block's exact sum of `x`.
struct Quantized8 {
    q: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

fn quantize_rows(x: &[f32]) -> Quantized8 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(x: &[f32]) -> Quantized8 {
            quantize_rows_generic(x)
        }
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA; compiled for them, rounding is one instruction
            // instead of a libm call per value.
            return unsafe { fast(x) };
        }
    }
    quantize_rows_generic(x)
}

#[inline(always)]
fn quantize_rows_generic(x: &[f32]) -> Quantized8 {
    let blocks = x.len() / BLOCK;
    let (mut q, mut scales, mut sums) = (vec![0i8; x.len()], Vec::with_capacity(blocks), Vec::with_capacity(blocks));
    for (block, out) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (o, v) in out.iter_mut().zip(block) {
            *o = (v * inv).round_ties_even() as i8;
        }
        scales.push(d);
        sums.push(block.iter().sum());
    }
    Quantized8 { q, scales, sums }
}

/// `x (m × k)` times the transpose of the q4_1 matrix `w_bytes` (`n` rows of `k` weights), into
/// `(m × n)`.
pub fn matmul(x: &[f32], m: usize, k: usize, w_bytes: &[u8], n: usize) -> Vec<f32> {
    let blocks = k / BLOCK;
    debug_assert_eq!(w_bytes.len(), n * blocks * BLOCK_BYTES);
    // Σx per block of every input row, for the `m` (minimum) term.
    let sums: Vec<f32> = x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect();
    let integer = (m <= INTEGER_ROWS && avx2()).then(|| quantize_rows(x));
    let row_bytes = blocks * BLOCK_BYTES;
    let kernel = |rows: &[u8]| {
        let count = rows.len() / row_bytes;
        let mut out = vec![0f32; count * m];
        for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
            for i in 0..m {
                let at = i * blocks..(i + 1) * blocks;
                out[r * m + i] = match &integer {
                    // SAFETY: `integer` is only made when the CPU has AVX2, FMA and F16C.
                    Some(q) => unsafe {
                        dot_q8_avx2(row, &q.q[i * k..(i + 1) * k], &q.scales[at.clone()], &q.sums[at])
                    },
                    None => dot(row, &x[i * k..(i + 1) * k], &sums[at]),
                };
            }
        }
        out
    };
    // One thread: no hand-off to the pool (a context switch per layer and token otherwise).
    let columns: Vec<Vec<f32>> = if rayon::current_num_threads() <= 1 {
        vec![kernel(w_bytes)]
    } else {
        w_bytes.par_chunks(row_bytes * 64).map(kernel).collect()
    };
    let mut result = vec![0f32; m * n];
    let mut row = 0;
    for chunk in columns {
        let count = chunk.len() / m.max(1);
        for r in 0..count {
            for i in 0..m {
                result[i * n + row + r] = chunk[r * m + i];
            }
        }
        row += count;
    }
    result
}

/// AVX2 and FMA, plus F16C for the blocks' f16 scales.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::fastmath::avx2() && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            return unsafe { dot_avx2(row, x, sums) };
        }
    }
    dot_scalar(row, x, sums)
}

/// One weight row against one row of 8-bit activations (`q`, per-block `scales` and exact `sums`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_avx2(row: &[u8], q: &[i8], scales: &[f32], sums: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut minimum = _mm_setzero_ps();
    let nibbles = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([block[0], block[1], block[2], block[3]])));
        let bytes = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
        // Weights 0..16 from the low nibbles, 16..32 from the high ones: the activations' order.
        let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), nibbles);
        let a = _mm256_loadu_si256(q.as_ptr().add(b * BLOCK) as *const __m256i);
        // u8 × i8 pairs summed to i16 (at most 2·15·127, no saturation), then pairs to i32.
        let products = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
        let d = _mm256_set1_ps(_mm_cvtss_f32(dm) * scales[b]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), d, acc);
        // m · Σx in lane 1 (lane 0 holds d · Σx, unused).
        minimum = _mm_fmadd_ps(dm, _mm_set1_ps(sums[b]), minimum);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut tail = [0f32; 4];
    _mm_storeu_ps(tail.as_mut_ptr(), minimum);
    lanes.iter().sum::<f32>() + tail[1]
}

fn dot_scalar(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
        let xs = &x[b * BLOCK..(b + 1) * BLOCK];
        let mut s = 0f32;
        for j in 0..16 {
            let q = block[4 + j];
            s += f32::from(q & 0x0F) * xs[j] + f32::from(q >> 4) * xs[j + 16];
        }
        total += d * s + m * sums[b];
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut minimum = 0f32;
    let mask = _mm_set1_epi8(0x0F);
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        // d and m, two f16, converted together.
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([block[0], block[1], block[2], block[3]])));
        let d = _mm_cvtss_f32(scales);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1));
        let bytes = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        let to_f32 = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        let (lo0, lo1) = (to_f32(lo), to_f32(_mm_srli_si128(lo, 8)));
        let (hi0, hi1) = (to_f32(hi), to_f32(_mm_srli_si128(hi, 8)));
        let xp = x.as_ptr().add(b * BLOCK);
        let mut t = _mm256_mul_ps(lo0, _mm256_loadu_ps(xp));
        t = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(xp.add(8)), t);
        t = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(xp.add(16)), t);
        t = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(xp.add(24)), t);
        acc = _mm256_fmadd_ps(t, _mm256_set1_ps(d), acc);
        minimum += m * sums[b];
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum::<f32>() + minimum
}

/// Whether `tensor`'s storage layout suits [`matmul`] (k a multiple of the block).
pub fn fits(k: usize) -> bool {
    k.is_multiple_of(BLOCK)
}

/// Convenience for tests: the kernel on tensors.
pub fn matmul_tensors(x: &Tensor, w_bytes: &[u8], n: usize) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let values: Vec<f32> = x.flatten_all()?.to_vec1()?;
    Tensor::from_vec(matmul(&values, m, k, w_bytes, n), (m, n), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    #[test]
    fn equals_the_dequantized_matmul() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (70, 96), &device).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let dense = q.dequantize(&device).unwrap();
        // More rows than the 8-bit path takes: f32 activations.
        let x = Tensor::randn(0f32, 1.0, (INTEGER_ROWS + 3, 96), &device).unwrap();
        let expected = x.matmul(&dense.t().unwrap()).unwrap();
        let got = matmul_tensors(&x, &q.data().unwrap(), 70).unwrap();
        let err: f32 =
            (got - &expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(err < 1e-4, "{err}");
        // The scalar path agrees too.
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let sums: Vec<f32> = xs.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect();
        let data = q.data().unwrap();
        let row = &data[..3 * BLOCK_BYTES];
        let reference: f32 = expected.get(0).unwrap().get(0).unwrap().to_scalar().unwrap();
        assert!((dot_scalar(row, &xs[..96], &sums[..3]) - reference).abs() < 1e-4);
    }

    /// What the 8-bit path computes, written plainly: per block `d_w·d_x·Σ q_w·q_x + m_w·Σx`.
    fn integer_model(row: &[u8], x: &Quantized8, i: usize, k: usize) -> f32 {
        let blocks = k / BLOCK;
        let mut total = 0f32;
        for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
            let q = &x.q[i * k + b * BLOCK..];
            let dot: i32 = (0..16)
                .map(|j| {
                    i32::from(block[4 + j] & 0x0F) * i32::from(q[j])
                        + i32::from(block[4 + j] >> 4) * i32::from(q[j + 16])
                })
                .sum();
            total += d * x.scales[i * blocks + b] * dot as f32 + m * x.sums[i * blocks + b];
        }
        total
    }

    /// Few rows take the 8-bit activation path: it computes exactly the integer formula, which
    /// stays within the activations' quantization error of the dequantized matmul.
    #[test]
    fn decoding_rows_with_8_bit_activations_stay_close_to_the_dequantized_matmul() {
        if !avx2() {
            return;
        }
        let device = Device::Cpu;
        let (n, k) = (300, 576);
        let w = Tensor::randn(0f32, 0.05, (n, k), &device).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let (dense, data) = (q.dequantize(&device).unwrap(), q.data().unwrap());
        for m in [1, 3, INTEGER_ROWS] {
            let x = Tensor::randn(0.2f32, 1.0, (m, k), &device).unwrap();
            let expected = x.matmul(&dense.t().unwrap()).unwrap();
            let got = matmul_tensors(&x, &data, n).unwrap();
            let abs_max =
                |t: &Tensor| -> f32 { t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap() };
            let scale = abs_max(&expected);
            let err = abs_max(&(&got - &expected).unwrap());
            assert!(err / scale < 2e-2, "m {m}: {err} of {scale}");
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let quantized = quantize_rows(&xs);
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..m {
                for r in [0, 1, n / 2, n - 1] {
                    let model = integer_model(
                        &data[r * (k / BLOCK) * BLOCK_BYTES..][..(k / BLOCK) * BLOCK_BYTES],
                        &quantized,
                        i,
                        k,
                    );
                    assert!(
                        (got[i * n + r] - model).abs() < 1e-4 * scale,
                        "row {i}, column {r}: {} vs {model}",
                        got[i * n + r]
                    );
                }
            }
        }
    }
}
