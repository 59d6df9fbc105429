//! Loading a model directory's weights: Hugging Face safetensors (one file, or shards listed in
//! `model.safetensors.index.json`), or the GGUF file of a materialized GGUF base
//! ([`super::gguf::materialize`]); dense, or with the linear weights block-quantized (QLoRA).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Tensor};

use super::common::quantized::{quantize, Quantization};
use super::gguf::{self, GGUF_FILE};

/// Block-quantized linear weights by transformers' name.
pub type QuantizedWeights = HashMap<String, Arc<QTensor>>;

/// Whether `dir` is a materialized GGUF base.
pub fn is_gguf_dir(dir: &Path) -> bool {
    dir.join(GGUF_FILE).exists()
}

/// Every tensor of the model in `dir`, converted to `dtype`, by transformers' names (a GGUF base
/// is dequantized).
pub fn load_model_weights(dir: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    if is_gguf_dir(dir) {
        let model = gguf::load(&dir.join(GGUF_FILE)).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut tensors = model.dense;
        for (name, q) in model.quantized {
            tensors.insert(name, q.dequantize(device)?);
        }
        return tensors.into_iter().map(|(k, v)| Ok((k, v.to_device(device)?.to_dtype(dtype)?))).collect();
    }
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", index.display())))?;
        let map = parsed["weight_map"]
            .as_object()
            .ok_or_else(|| candle_core::Error::Msg(format!("{} has no weight_map", index.display())))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut tensors = HashMap::new();
    for file in files {
        for (name, tensor) in candle_core::safetensors::load(&file, device)? {
            tensors.insert(name, tensor.to_dtype(dtype)?);
        }
    }
    Ok(tensors)
}

/// The weights of `dir` with the decoder's linear layers block-quantized (embeddings, norms and
/// the output head stay dense f32): a GGUF base keeps the quantization it has unless another is
/// asked for; a safetensors base is quantized as `quantization` says (q4_0 by default).
pub fn load_quantized_weights(
    dir: &Path,
    quantization: Option<Quantization>,
) -> Result<(HashMap<String, Tensor>, QuantizedWeights)> {
    if is_gguf_dir(dir) {
        let model = gguf::load(&dir.join(GGUF_FILE)).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (dense, mut quantized) = (model.dense, HashMap::new());
        for (name, q) in model.quantized {
            match quantization {
                Some(wanted) if Quantization::from_ggml(q.dtype()) != Some(wanted) => {
                    quantized.insert(name, quantize(&q.dequantize(&Device::Cpu)?, wanted)?);
                }
                _ => {
                    quantized.insert(name, q);
                }
            }
        }
        return Ok((dense, quantized));
    }
    let quantization = quantization.unwrap_or(Quantization::Q4_0);
    let mut dense = load_model_weights(dir, DType::F32, &Device::Cpu)?;
    // The projections, and Mixtral's experts (`block_sparse_moe.experts.N.w1/w2/w3`).
    let mixtral_expert =
        |n: &str| n.contains(".experts.") && [".w1.weight", ".w2.weight", ".w3.weight"].iter().any(|w| n.ends_with(w));
    let names: Vec<String> =
        dense.keys().filter(|n| n.ends_with("_proj.weight") || mixtral_expert(n)).cloned().collect();
    let mut quantized = HashMap::new();
    for name in names {
        let weight = dense.remove(&name).expect("listed above");
        let q = quantize(&weight, quantization).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        quantized.insert(name, q);
    }
    Ok((dense, quantized))
}

/// Takes a required tensor out of `weights`, checking its shape.
pub fn take(weights: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Tensor> {
    let tensor = weights.remove(name).ok_or_else(|| candle_core::Error::Msg(format!("missing weight {name}")))?;
    if tensor.dims() != shape {
        candle_core::bail!("weight {name} has shape {:?}, expected {shape:?}", tensor.dims());
    }
    Ok(tensor)
}

/// A model for inference on `device`. On the CPU a GGUF base keeps its linear weights quantized
/// (served with the quantized kernels); elsewhere every weight is dense f32 on the device (the
/// quantized kernels are CPU code).
pub fn load_inference_model(
    dir: &Path,
    adaptation: super::llama::Adaptation<'_>,
    device: &Device,
) -> Result<super::llama::CausalLm> {
    let config = super::config::ModelConfig::from_file(&dir.join("config.json"))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if device.is_cpu() && is_gguf_dir(dir) {
        let (dense, quantized) = load_quantized_weights(dir, None)?;
        return super::llama::CausalLm::with_quantized(config, dense, quantized, adaptation);
    }
    super::llama::CausalLm::new(config, load_model_weights(dir, DType::F32, device)?, adaptation)
}
