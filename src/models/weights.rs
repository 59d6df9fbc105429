//! Loading Hugging Face safetensors (one file, or shards listed in `model.safetensors.index.json`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};

/// Every tensor of the model in `dir`, converted to `dtype`, by transformers' names.
pub fn load_model_weights(dir: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
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

/// Takes a required tensor out of `weights`, checking its shape.
pub fn take(weights: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Tensor> {
    let tensor = weights.remove(name).ok_or_else(|| candle_core::Error::Msg(format!("missing weight {name}")))?;
    if tensor.dims() != shape {
        candle_core::bail!("weight {name} has shape {:?}, expected {shape:?}", tensor.dims());
    }
    Ok(tensor)
}
