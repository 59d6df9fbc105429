//! Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"):
//! after a block's attention and after its MLP, `h + up(swish(down(h)))`, with `down` projecting
//! to `adapter_size` and `up` back, `up` starting at zero so the adapted model starts as the base.
//! The base stays frozen.
//!
//! Saved as `adapter_config.json` (`{"adapter_type": "bottleneck", "adapter_size",
//! "non_linearity": "swish", "placement": ["self_attn", "mlp"], "base_model_name_or_path"}`),
//! `ferrotune.json` (what wrote it) and `adapter_model.safetensors` with tensors named
//! `model.layers.{i}.{attn,mlp}_adapter.{down,up}.{weight,bias}` (weights `(out, in)` as in torch).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor};
use serde_json::json;

use super::common::linear::{Linear, LinearWeight};
use super::common::params::{Param, TrainableParams};
use super::ForwardCtx;

pub const ADAPTER_TYPE: &str = "bottleneck";

/// How a model gets bottleneck adapters: fresh (seeded) and trained, or loaded.
#[derive(Debug, Clone)]
pub struct BottleneckPlan {
    pub adapter_size: usize,
    pub seed: u64,
    pub trainable: bool,
    pub loaded: Option<HashMap<String, Tensor>>,
}

#[derive(Debug, Clone)]
pub struct Bottleneck {
    pub down: Linear,
    pub up: Linear,
}

impl Bottleneck {
    /// `h + up(swish(down(h)))`.
    pub fn forward(&self, h: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let z = self.down.forward(h, ctx)?.silu()?;
        h + self.up.forward(&z, ctx)?
    }

    /// Builds the adapter `prefix` (`model.layers.{i}.attn_adapter`) for width `hidden`.
    pub fn build(
        plan: &BottleneckPlan,
        prefix: &str,
        hidden: usize,
        like: &Tensor,
        rng: &mut crate::rng::Rng,
        trainable: &mut TrainableParams,
    ) -> Result<Self> {
        let a = plan.adapter_size;
        let mut make =
            |name: &str, shape: &[usize], init: &dyn Fn(&mut crate::rng::Rng) -> Vec<f32>| -> Result<Param> {
                let full = format!("{prefix}.{name}");
                let tensor = match &plan.loaded {
                    Some(loaded) => {
                        let t = loaded
                            .get(&full)
                            .ok_or_else(|| candle_core::Error::Msg(format!("adapter has no {full}")))?;
                        if t.dims() != shape {
                            candle_core::bail!("adapter tensor {full} has shape {:?}, expected {shape:?}", t.dims());
                        }
                        t.to_device(like.device())?.to_dtype(like.dtype())?
                    }
                    None => Tensor::from_vec(init(rng), shape, like.device())?.to_dtype(like.dtype())?,
                };
                if plan.trainable {
                    trainable.add(full, &tensor, name.ends_with("weight"))
                } else {
                    Ok(Param::Frozen(tensor))
                }
            };
        let bound = 1.0 / (hidden as f32).sqrt();
        let down_w = make("down.weight", &[a, hidden], &|rng| {
            (0..a * hidden).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect()
        })?;
        let down_b = make("down.bias", &[a], &|_| vec![0.0; a])?;
        let up_w = make("up.weight", &[hidden, a], &|_| vec![0.0; hidden * a])?;
        let up_b = make("up.bias", &[hidden], &|_| vec![0.0; hidden])?;
        Ok(Self {
            down: Linear { weight: LinearWeight::Dense(down_w), bias: Some(down_b), lora: None },
            up: Linear { weight: LinearWeight::Dense(up_w), bias: Some(up_b), lora: None },
        })
    }
}

/// Writes the adapter (its config and tensors).
pub fn save(dir: &Path, adapter_size: usize, base_model: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = json!({
        "adapter_type": ADAPTER_TYPE,
        "adapter_size": adapter_size,
        "non_linearity": "swish",
        "placement": ["self_attn", "mlp"],
        "base_model_name_or_path": base_model,
    });
    crate::peft::adapter::write_config(dir, &config, ADAPTER_TYPE, base_model)?;
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, dir.join(crate::peft::adapter::WEIGHTS_FILE))
}

/// Whether `dir` holds a bottleneck adapter (rather than a PEFT LoRA adapter).
pub fn is_bottleneck_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(crate::peft::adapter::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["adapter_type"] == ADAPTER_TYPE)
}

/// Reads a saved adapter: its size and tensors.
pub fn load(dir: &Path, device: &Device) -> Result<(usize, HashMap<String, Tensor>)> {
    let text = std::fs::read_to_string(dir.join(crate::peft::adapter::CONFIG_FILE))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if value["adapter_type"] != ADAPTER_TYPE {
        candle_core::bail!("not a bottleneck adapter");
    }
    let size = value["adapter_size"].as_u64().ok_or_else(|| candle_core::Error::Msg("no adapter_size".into()))?;
    let tensors = candle_core::safetensors::load(dir.join(crate::peft::adapter::WEIGHTS_FILE), device)?;
    Ok((size as usize, tensors))
}
