//! Prefix tuning (Li & Liang 2021): `prefix_length` trainable key/value vectors per layer, seen by
//! every token's attention as if they came before the input; the base stays frozen. Optionally
//! reparameterised during training as PEFT does (`prefix_projection`): an embedding of the
//! virtual tokens through `Linear → tanh → Linear`.
//!
//! Saved in PEFT's prefix-tuning format: `adapter_config.json` with `peft_type: PREFIX_TUNING`
//! and `adapter_model.safetensors` holding `prompt_embeddings`, `(num_virtual_tokens,
//! num_layers · 2 · kv_heads · head_dim)` (the projection, if any, already applied: PEFT's
//! inference form). As in PEFT with transformers, layer `i`'s keys are row block `2i` and its
//! values `2i + 1` (heads × head_dim each); the prefix keys are used as stored (not rotated), and
//! the real tokens' positions start after the prefix.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor};
use serde_json::json;

use super::common::linear::{Linear, LinearWeight};
use super::common::params::{Param, TrainableParams};
use super::config::ModelConfig;
use super::ForwardCtx;

#[derive(Debug, Clone)]
pub struct PrefixPlan {
    pub length: usize,
    /// Train through an MLP with this hidden width (PEFT's `encoder_hidden_size`).
    pub projection: Option<usize>,
    pub seed: u64,
    pub trainable: bool,
    /// A saved adapter's `prompt_embeddings`.
    pub loaded: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub enum Prefix {
    /// The key/value table itself, `(length, layers · 2 · kv_dim)`.
    Direct(Param),
    /// An embedding `(length, hidden)` through `up(tanh(down(·)))`.
    Projected { embedding: Param, down: Linear, up: Linear },
}

fn width(config: &ModelConfig) -> usize {
    config.num_layers * 2 * config.num_kv_heads * config.head_dim
}

impl Prefix {
    pub fn build(
        plan: &PrefixPlan,
        config: &ModelConfig,
        like: &Tensor,
        rng: &mut crate::rng::Rng,
        trainable: &mut TrainableParams,
    ) -> Result<Self> {
        let (n, w, h) = (plan.length, width(config), config.hidden_size);
        let mut param = |name: &str, shape: &[usize], values: Vec<f32>, decay: bool| -> Result<Param> {
            let t = Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())?;
            if plan.trainable {
                trainable.add(format!("prefix.{name}"), &t, decay)
            } else {
                Ok(Param::Frozen(t))
            }
        };
        if let Some(loaded) = &plan.loaded {
            if loaded.dims() != [n, w] {
                candle_core::bail!("prompt_embeddings has shape {:?}; this model needs ({n}, {w})", loaded.dims());
            }
            let values = loaded.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
            return Ok(Self::Direct(param("embedding", &[n, w], values, false)?));
        }
        // PEFT initialises the embedding like torch's nn.Embedding: standard normal.
        let mut normal = |count: usize, scale: f32| -> Vec<f32> {
            (0..count)
                .map(|_| {
                    let (u1, u2) = (rng.next_f32().max(1e-7), rng.next_f32());
                    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos() * scale
                })
                .collect()
        };
        match plan.projection {
            None => Ok(Self::Direct(param("embedding", &[n, w], normal(n * w, 1.0), false)?)),
            Some(p) => {
                let embedding = param("embedding", &[n, h], normal(n * h, 1.0), false)?;
                let (bd, bu) = (1.0 / (h as f32).sqrt(), 1.0 / (p as f32).sqrt());
                let uniform = |count: usize, bound: f32, rng: &mut dyn FnMut() -> f32| -> Vec<f32> {
                    (0..count).map(|_| (rng() * 2.0 - 1.0) * bound).collect()
                };
                let mut draw = || rng.next_f32();
                let down_w = uniform(p * h, bd, &mut draw);
                let down_b = uniform(p, bd, &mut draw);
                let up_w = uniform(w * p, bu, &mut draw);
                let up_b = uniform(w, bu, &mut draw);
                let linear = |weight: Param, bias: Param| Linear {
                    weight: LinearWeight::Dense(weight),
                    bias: Some(bias),
                    lora: None,
                };
                let down =
                    linear(param("down.weight", &[p, h], down_w, true)?, param("down.bias", &[p], down_b, false)?);
                let up = linear(param("up.weight", &[w, p], up_w, true)?, param("up.bias", &[w], up_b, false)?);
                Ok(Self::Projected { embedding, down, up })
            }
        }
    }

    /// The key/value table `(length, layers · 2 · kv_dim)` (what PEFT saves).
    pub fn table(&self, ctx: &ForwardCtx) -> Result<Tensor> {
        match self {
            Self::Direct(p) => Ok(p.tensor().clone()),
            Self::Projected { embedding, down, up } => up.forward(&down.forward(embedding.tensor(), ctx)?.tanh()?, ctx),
        }
    }

    /// Per layer, keys and values `(1, kv_heads, length, head_dim)`.
    pub fn layers(&self, config: &ModelConfig, ctx: &ForwardCtx) -> Result<Vec<(Tensor, Tensor)>> {
        let table = self.table(ctx)?;
        split_table(&table, config)
    }
}

/// `(length, layers·2·kv·hd)` → per layer `(1, kv, length, hd)` keys and values.
pub fn split_table(table: &Tensor, config: &ModelConfig) -> Result<Vec<(Tensor, Tensor)>> {
    let n = table.dim(0)?;
    let (kv, hd) = (config.num_kv_heads, config.head_dim);
    // (n, L·2, kv, hd) → (L·2, kv, n, hd)
    let t = table.reshape((n, config.num_layers * 2, kv, hd))?.permute((1, 2, 0, 3))?.contiguous()?;
    (0..config.num_layers).map(|i| Ok((t.get(2 * i)?.unsqueeze(0)?, t.get(2 * i + 1)?.unsqueeze(0)?))).collect()
}

/// The key/value table from a checkpoint's trainable tensors (`prefix.embedding`, and with a
/// projection `prefix.{down,up}.{weight,bias}`).
pub fn table_from_trainables(
    config: &ModelConfig,
    length: usize,
    projected: bool,
    tensors: HashMap<String, Tensor>,
) -> Result<Tensor> {
    let get = |name: &str| {
        tensors
            .get(&format!("prefix.{name}"))
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("no prefix.{name}")))
    };
    let embedding = get("embedding")?;
    if embedding.dim(0)? != length {
        candle_core::bail!("the checkpoint's prefix has {} virtual tokens, not {length}", embedding.dim(0)?);
    }
    if !projected {
        return Ok(embedding);
    }
    let linear = |w: Tensor, b: Tensor| Linear {
        weight: LinearWeight::Dense(Param::Frozen(w)),
        bias: Some(Param::Frozen(b)),
        lora: None,
    };
    let down = linear(get("down.weight")?, get("down.bias")?);
    let up = linear(get("up.weight")?, get("up.bias")?);
    let table = Prefix::Projected { embedding: Param::Frozen(embedding), down, up }.table(&ForwardCtx::inference())?;
    if table.dim(1)? != width(config) {
        candle_core::bail!("the checkpoint's prefix does not fit this model");
    }
    Ok(table)
}

/// Writes the prefix in PEFT's prefix-tuning format.
pub fn save(dir: &Path, config: &ModelConfig, length: usize, base_model: &str, table: &Tensor) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let document = json!({
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": length,
        "token_dim": config.num_kv_heads * config.head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_kv_heads,
        "num_layers": config.num_layers,
        "encoder_hidden_size": config.hidden_size,
        "prefix_projection": false,
        "inference_mode": true,
        "revision": null,
    });
    crate::peft::adapter::write_config(dir, &document, "prefix", base_model)?;
    let tensors = HashMap::from([("prompt_embeddings".to_string(), table.to_device(&Device::Cpu)?.contiguous()?)]);
    candle_core::safetensors::save(&tensors, dir.join(crate::peft::adapter::WEIGHTS_FILE))
}

/// Whether `dir` holds a prefix-tuning adapter.
pub fn is_prefix_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(crate::peft::adapter::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["peft_type"] == "PREFIX_TUNING")
}

/// Reads a saved prefix: its table `(num_virtual_tokens, layers · 2 · kv_dim)`.
pub fn load(dir: &Path, device: &Device) -> Result<Tensor> {
    if !is_prefix_dir(dir) {
        candle_core::bail!("not a prefix-tuning adapter");
    }
    let mut tensors = candle_core::safetensors::load(dir.join(crate::peft::adapter::WEIGHTS_FILE), device)?;
    tensors.remove("prompt_embeddings").ok_or_else(|| candle_core::Error::Msg("no prompt_embeddings".into()))
}
