//! Folds LoRA adapters into the base weights: `W' = W + scale · B·A`.

use candle_core::{Result, Tensor};

use crate::models::llama::CausalLm;

/// The model's weights by transformers' names with every adapter merged in.
pub fn merged_tensors(model: &CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = model.base_tensors()?;
    for (module, linear) in model.linear_modules() {
        let Some(lora) = &linear.lora else { continue };
        let delta = (lora.b.tensor().matmul(lora.a.tensor())? * lora.scale)?;
        let name = format!("{module}.weight");
        if let Some(slot) = tensors.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = (&slot.1 + delta.to_dtype(slot.1.dtype())?)?;
        }
    }
    for (name, delta) in model.expert_deltas()? {
        if let Some(slot) = tensors.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = (&slot.1 + delta.to_dtype(slot.1.dtype())?)?;
        }
    }
    Ok(tensors)
}
