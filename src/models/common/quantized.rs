//! Frozen linear layers kept quantized in memory (QLoRA): the forward multiplies with the
//! quantized weight directly (candle's ggml-style kernels); the backward gives the input gradient
//! through that layer's weight dequantized for the moment it is needed, so the model is never
//! dequantized whole.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

/// The block quantizations a job can ask for (and those GGUF files bring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    Q4_0,
    Q4_1,
    Q4K,
    Q5K,
    Q6K,
    Q8_0,
}

impl Quantization {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q4_k" => Self::Q4K,
            "q5_k" => Self::Q5K,
            "q6_k" => Self::Q6K,
            "q8_0" => Self::Q8_0,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
            Self::Q8_0 => "q8_0",
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            GgmlDType::Q8_0 => Self::Q8_0,
            _ => return None,
        })
    }

    /// Weights per block: a row's length must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }
}

/// Whether every linear layer of `config` can be quantized with `quantization` (rows of
/// `hidden_size`, `num_heads·head_dim` and `intermediate_size` weights).
pub fn check_fits(
    config: &crate::models::config::ModelConfig,
    quantization: Quantization,
) -> std::result::Result<(), String> {
    let block = quantization.block_size();
    for (what, n) in [
        ("hidden_size", config.hidden_size),
        ("num_attention_heads × head_dim", config.num_heads * config.head_dim),
        ("intermediate_size", config.intermediate_size),
    ] {
        if !n.is_multiple_of(block) {
            return Err(format!(
                "{} quantizes blocks of {block} weights, but this model's {what} is {n}, not a multiple of {block}",
                quantization.name()
            ));
        }
    }
    Ok(())
}

/// Quantizes a dense `(out, in)` weight; `in` must be a multiple of the block size.
pub fn quantize(weight: &Tensor, quantization: Quantization) -> Result<Arc<QTensor>> {
    let (_, in_features) = weight.dims2()?;
    if !in_features.is_multiple_of(quantization.block_size()) {
        candle_core::bail!(
            "{} needs rows that are multiples of {} weights; this layer has {in_features}",
            quantization.name(),
            quantization.block_size()
        );
    }
    Ok(Arc::new(QTensor::quantize(
        &weight.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?,
        quantization.ggml(),
    )?))
}

/// `x · Wᵀ` for a frozen quantized `W` (out × in); the backward gives the gradient of `x` only.
pub fn quantized_linear(x: &Tensor, weight: &Arc<QTensor>) -> Result<Tensor> {
    let (out_features, in_features) = weight.shape().dims2()?;
    let mut dims = x.dims().to_vec();
    let last = dims.pop().expect("rank >= 1");
    if last != in_features {
        candle_core::bail!("quantized_linear: input has {last} features, weight expects {in_features}");
    }
    let rows: usize = dims.iter().product();
    let flat = x.reshape((rows, in_features))?.contiguous()?;
    let op = FrozenQMatmul { weight: weight.clone() };
    let out = if x.track_op() {
        flat.apply_op1(op)?
    } else if weight.dtype() == GgmlDType::Q4_1 {
        flat.apply_op1_no_bwd(&op)?
    } else {
        flat.apply_op1_no_bwd(weight.as_ref())?
    };
    dims.push(out_features);
    out.reshape(dims)
}

struct FrozenQMatmul {
    weight: Arc<QTensor>,
}

impl CustomOp1 for FrozenQMatmul {
    fn name(&self) -> &'static str {
        "frozen-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.weight.shape().dims2()?;
        if self.weight.dtype() != GgmlDType::Q4_1 || !super::q4_1::fits(k) {
            return self.weight.cpu_fwd(storage, layout);
        }
        // candle's q4_1 kernel is scalar: ours (f32 activations, AVX2).
        let (m, _) = layout.shape().dims2()?;
        let CpuStorage::F32(values) = storage else { candle_core::bail!("q4_1 matmul: input is not f32") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q4_1 matmul: input is not contiguous")
        };
        let out = super::q4_1::matmul(&values[start..end], m, k, &self.weight.data()?, n);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dense = self.weight.dequantize(arg.device())?;
        Ok(Some(grad_res.detach().matmul(&dense)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn forward_and_input_gradient_match_the_dequantized_dense_layer() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (96, 256), &device).unwrap();
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 256), &device).unwrap()).unwrap();
        for quantization in
            [Quantization::Q8_0, Quantization::Q4_0, Quantization::Q4_1, Quantization::Q4K, Quantization::Q6K]
        {
            let q = quantize(&w, quantization).unwrap();
            let dense = q.dequantize(&device).unwrap();
            let y = quantized_linear(x.as_tensor(), &q).unwrap();
            let reference = x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap();
            // The quantized kernel also quantizes the activations (to 8 bits), hence the tolerance.
            let scale = max_abs(&reference);
            let forward_err = max_abs(&(&y - &reference).unwrap()) / scale;
            assert!(forward_err < 0.02, "{quantization:?}: forward relative error {forward_err}");
            let upstream = Tensor::randn(0f32, 1.0, (2, 3, 96), &device).unwrap();
            let grad = (y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let got = grad.get(x.as_tensor()).unwrap();
            let expected = upstream.broadcast_matmul(&dense).unwrap();
            let grad_err = max_abs(&(got - &expected).unwrap()) / max_abs(&expected);
            assert!(grad_err < 1e-5, "{quantization:?}: the input gradient uses the dequantized weight ({grad_err})");
        }
    }

    #[test]
    fn a_row_length_that_is_not_a_multiple_of_the_block_is_refused() {
        let w = Tensor::zeros((8, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = quantize(&w, Quantization::Q4K).unwrap_err().to_string();
        assert!(err.contains("multiples of 256"), "{err}");
    }
}
