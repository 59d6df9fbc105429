//! LoRA, bottleneck and prefix adapters prepared for batched serving over a shared base model
//! ([`super::rows`]): each adapter's tensors checked against the model and laid out for the
//! serving forward (LoRA factors transposed with the scale folded in, per-layer norms, expert and
//! router deltas of mixture-of-experts layers).

use std::collections::{HashMap, HashSet};

use candle_core::{Result, Tensor};

use super::block::FeedForward;
use super::{CausalLm, Linear};
use crate::models::bottleneck::{Bottleneck, BottleneckPlan};
use crate::peft::lora::{peft_names, LoraConfig};

/// One LoRA pair ready for inference: `delta = x · a_t · b_t`, the scale folded into `b_t`.
#[derive(Debug, Clone)]
pub(super) struct LoraPair {
    /// (in, r)
    pub(super) a_t: Tensor,
    /// (r, out), times the adapter's scale
    pub(super) b_t: Tensor,
}

#[derive(Debug, Clone, Default)]
pub(super) struct LayerAdapter {
    /// By module name (`q_proj`, `qkv_proj`, ...). A mixture-of-experts router (`gate`) or
    /// shared-expert gate the adapter saved whole is here as the pair `(W − W_base)ᵀ, I`.
    pub(super) linears: HashMap<&'static str, LoraPair>,
    /// Expert LoRA (PEFT `target_parameters`) per expert: gate-up, down.
    pub(super) experts: [Vec<LoraPair>; 2],
    /// Norms the adapter trained, by their path under the layer (`input_layernorm`,
    /// `self_attn.q_norm`, ...: [`super::block::Block::norms`]).
    pub(super) norms: HashMap<&'static str, Tensor>,
}

impl LayerAdapter {
    pub(super) fn norm(&self, name: &str) -> Option<&Tensor> {
        self.norms.get(name)
    }
}

/// A PEFT LoRA adapter prepared for serving over a shared base model.
#[derive(Debug, Clone)]
pub struct ServingAdapter {
    /// Prefix-tuning keys and values per layer `(1, kv, n, hd)`, put in a new sequence's cache.
    pub(super) prefix: Vec<(Tensor, Tensor)>,
    /// Bottleneck adapters (after attention, after the MLP) per layer, for bottleneck models.
    pub(super) bottlenecks: Vec<(Bottleneck, Bottleneck)>,
    pub(super) layers: Vec<LayerAdapter>,
    pub(super) norm: Option<Tensor>,
    pub(super) lm_head: Option<LoraPair>,
    pub(super) bytes: usize,
}

impl ServingAdapter {
    /// Checks `tensors` (PEFT names) against `model` and prepares them. Every LoRA tensor must
    /// belong to a module of the model with the right shape: an adapter trained for another base
    /// is an error, not garbage output.
    pub fn from_peft(model: &CausalLm, config: &LoraConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let mut used: HashSet<String> = HashSet::new();
        let mut bytes = 0usize;
        let mut pair = |module: &str, linear: &Linear| -> Result<Option<LoraPair>> {
            if !config.targets(module) {
                return Ok(None);
            }
            let (a_name, b_name) = peft_names(module);
            let (Some(a), Some(b)) = (tensors.get(&a_name), tensors.get(&b_name)) else {
                candle_core::bail!("the adapter targets {module} but has no weights for it");
            };
            let (out_f, in_f) = linear.weight.dims2()?;
            let (r, scale) = (config.rank_for(module), config.scale_for(module));
            if a.dims() != [r, in_f] || b.dims() != [out_f, r] {
                candle_core::bail!(
                    "adapter weights for {module} have shapes {:?} and {:?}; this base model needs ({r}, {in_f}) and \
                     ({out_f}, {r})",
                    a.dims(),
                    b.dims(),
                );
            }
            used.insert(a_name);
            used.insert(b_name);
            bytes += (a.elem_count() + b.elem_count()) * 4;
            let like = model.embed.tensor();
            let a_t = a.to_device(like.device())?.to_dtype(like.dtype())?.t()?.contiguous()?;
            let b_t = (b.to_device(like.device())?.to_dtype(like.dtype())?.t()?.contiguous()? * scale)?;
            Ok(Some(LoraPair { a_t, b_t }))
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, block) in model.layers.iter().enumerate() {
            let mut layer = LayerAdapter::default();
            for (path, linear) in block.linears() {
                if let Some(lora) = pair(&format!("model.layers.{i}.{path}"), linear)? {
                    layer.linears.insert(path.rsplit('.').next().unwrap_or(path), lora);
                }
            }
            layers.push(layer);
        }
        let lm_head = match &model.lm_head {
            Some(head) => pair("lm_head", head)?,
            None => None,
        };
        let like = model.embed.tensor();
        for (i, (layer, block)) in layers.iter_mut().zip(&model.layers).enumerate() {
            let FeedForward::Moe(moe) = &block.mlp else { continue };
            let p = format!("model.layers.{i}.mlp");
            let (gate_up_name, down_name) = crate::models::moe::stacked_names(i);
            let (lora_gate_up, lora_down) =
                (config.targets_parameter(&gate_up_name), config.targets_parameter(&down_name));
            let gate_up_module = if lora_down { format!("{p}.experts.base_layer") } else { format!("{p}.experts") };
            for (slot, targeted, module, proj) in
                [(0, lora_gate_up, gate_up_module, &moe.gate_up), (1, lora_down, format!("{p}.experts"), &moe.down)]
            {
                if !targeted {
                    continue;
                }
                let dims = proj.weight.dense()?.dims().to_vec();
                let param = if slot == 0 { &gate_up_name } else { &down_name };
                let (r, scale) = (config.rank_for(param), config.scale_for(param));
                let (out_f, in_f, experts) = (dims[1], dims[2], moe.experts);
                let (a_name, b_name) = peft_names(&module);
                let (Some(a), Some(b)) = (tensors.get(&a_name), tensors.get(&b_name)) else {
                    candle_core::bail!("the adapter targets {module} but has no weights for it");
                };
                if a.dims() != [r * experts, in_f] || b.dims() != [out_f, r * experts] {
                    candle_core::bail!(
                        "adapter weights for {module} have shapes {:?} and {:?}; this base model needs ({}, {in_f}) \
                         and ({out_f}, {})",
                        a.dims(),
                        b.dims(),
                        r * experts,
                        r * experts
                    );
                }
                used.insert(a_name);
                used.insert(b_name);
                bytes += (a.elem_count() + b.elem_count()) * 4;
                let a = a.to_device(like.device())?.to_dtype(like.dtype())?.reshape((experts, r, in_f))?;
                let b = b.to_device(like.device())?.to_dtype(like.dtype())?.reshape((out_f, r, experts))?;
                layer.experts[slot] = (0..experts)
                    .map(|e| {
                        let a_t = a.get(e)?.t()?.contiguous()?;
                        let b_t = (b.narrow(2, e, 1)?.squeeze(2)?.t()?.contiguous()? * scale)?;
                        Ok(LoraPair { a_t, b_t })
                    })
                    .collect::<Result<_>>()?;
            }
            // LoRA on the router's weight (PEFT `target_parameters: ["gate.weight"]`).
            if config.targets_parameter(&format!("{p}.gate.weight")) {
                let module = format!("{p}.gate");
                let (a_name, b_name) = peft_names(&module);
                let (r, scale) = (config.rank_for(&module), config.scale_for(&module));
                let (experts, h) = moe.router.tensor().dims2()?;
                let (Some(a), Some(b)) = (tensors.get(&a_name), tensors.get(&b_name)) else {
                    candle_core::bail!("the adapter targets {module} but has no weights for it");
                };
                if a.dims() != [r, h] || b.dims() != [experts, r] {
                    candle_core::bail!("adapter weights for {module} have shapes {:?} and {:?}", a.dims(), b.dims());
                }
                used.insert(a_name);
                used.insert(b_name);
                bytes += (a.elem_count() + b.elem_count()) * 4;
                let a_t = a.to_device(like.device())?.to_dtype(like.dtype())?.t()?.contiguous()?;
                let b_t = (b.to_device(like.device())?.to_dtype(like.dtype())?.t()?.contiguous()? * scale)?;
                layer.linears.insert("gate", LoraPair { a_t, b_t });
            }
            // Routers (and Qwen2-MoE's shared-expert gate) saved whole: their difference from the
            // base, applied like a LoRA pair with an identity second factor.
            let mut whole = vec![("gate", format!("{p}.gate.weight"), moe.router.tensor().clone())];
            if let Some((_, gate)) = &moe.shared {
                whole.push(("shared_expert_gate", format!("{p}.shared_expert_gate.weight"), gate.weight.dense()?));
            }
            for (key, name, base) in whole {
                let saved = format!("base_model.model.{name}");
                let Some(t) = tensors.get(&saved) else { continue };
                if t.dims() != base.dims() {
                    candle_core::bail!("adapter weight {name} has shape {:?}, expected {:?}", t.dims(), base.dims());
                }
                if layer.linears.contains_key(key) {
                    candle_core::bail!("the adapter has both LoRA weights for and a saved copy of {name}");
                }
                used.insert(saved);
                bytes += t.elem_count() * 4;
                let delta = (t.to_device(like.device())?.to_dtype(like.dtype())? - &base)?;
                let out_f = base.dim(0)?;
                let identity = Tensor::eye(out_f, like.dtype(), like.device())?;
                layer.linears.insert(key, LoraPair { a_t: delta.t()?.contiguous()?, b_t: identity });
            }
        }
        let mut norm_override = |name: &str, like: &Tensor| -> Result<Option<Tensor>> {
            let key = format!("base_model.model.{name}");
            let Some(t) = tensors.get(&key) else { return Ok(None) };
            if t.dims() != like.dims() {
                candle_core::bail!("adapter norm {name} has shape {:?}, expected {:?}", t.dims(), like.dims());
            }
            used.insert(key);
            bytes += t.elem_count() * 4;
            Ok(Some(t.to_device(like.device())?.to_dtype(like.dtype())?))
        };
        for (i, (layer, block)) in layers.iter_mut().zip(&model.layers).enumerate() {
            for (name, base) in block.norms() {
                if let Some(trained) = norm_override(&format!("model.layers.{i}.{name}.weight"), base.tensor())? {
                    layer.norms.insert(name, trained);
                }
            }
        }
        let norm = norm_override("model.norm.weight", model.norm.tensor())?;
        let mut extra: Vec<&str> = tensors.keys().filter(|k| !used.contains(*k)).map(String::as_str).collect();
        if !extra.is_empty() {
            extra.sort_unstable();
            candle_core::bail!(
                "the adapter has {} tensor(s) this base model has no place for, e.g. {:?}",
                extra.len(),
                &extra[..extra.len().min(3)]
            );
        }
        Ok(Self { prefix: Vec::new(), bottlenecks: Vec::new(), layers, norm, lm_head, bytes })
    }

    /// A prefix-tuning adapter (its key/value table, as PEFT saves it) for serving over `model`.
    pub fn from_prefix(model: &CausalLm, table: &Tensor) -> Result<Self> {
        let c = &model.config;
        let width = c.num_layers * 2 * c.num_kv_heads * c.head_dim;
        if table.rank() != 2 || table.dim(1)? != width {
            candle_core::bail!("prompt_embeddings has shape {:?}; this model needs (n, {width})", table.dims());
        }
        let like = model.embed.tensor();
        let table = table.to_device(like.device())?.to_dtype(like.dtype())?;
        let prefix = crate::models::prefix::split_table(&table, c)?;
        let bytes = table.elem_count() * 4;
        Ok(Self {
            prefix,
            bottlenecks: Vec::new(),
            layers: vec![LayerAdapter::default(); c.num_layers],
            norm: None,
            lm_head: None,
            bytes,
        })
    }

    /// Bottleneck adapters (see `models::bottleneck`) prepared for serving over `model`.
    pub fn from_bottleneck(model: &CausalLm, adapter_size: usize, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let count = tensors.len();
        let bytes = tensors.values().map(|t| t.elem_count() * 4).sum();
        let plan = BottleneckPlan { adapter_size, seed: 0, trainable: false, loaded: Some(tensors) };
        let (mut rng, mut unused) =
            (crate::rng::Rng::new(0), crate::models::common::params::TrainableParams::default());
        let like = model.embed.tensor();
        let h = model.config.hidden_size;
        let mut bottlenecks = Vec::with_capacity(model.layers.len());
        for i in 0..model.layers.len() {
            let p = format!("model.layers.{i}");
            let attn = Bottleneck::build(&plan, &format!("{p}.attn_adapter"), h, like, &mut rng, &mut unused)?;
            let mlp = Bottleneck::build(&plan, &format!("{p}.mlp_adapter"), h, like, &mut rng, &mut unused)?;
            bottlenecks.push((attn, mlp));
        }
        if count != model.layers.len() * 8 {
            candle_core::bail!(
                "the adapter has {count} tensors; a bottleneck adapter for this model has {}",
                model.layers.len() * 8
            );
        }
        Ok(Self {
            prefix: Vec::new(),
            bottlenecks,
            layers: vec![LayerAdapter::default(); model.layers.len()],
            norm: None,
            lm_head: None,
            bytes,
        })
    }

    /// Positions the adapter's prefix takes before the prompt (prefix tuning), else 0.
    pub fn prefix_len(&self) -> usize {
        self.prefix.first().map_or(0, |(k, _)| k.dims().get(2).copied().unwrap_or(0))
    }

    /// Memory held by the adapter's tensors.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
