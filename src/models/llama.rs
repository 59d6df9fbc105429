//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): embeddings, pre-norm blocks of
//! grouped-query attention and a SwiGLU MLP, final norm, LM head (tied or not).
//!
//! One forward for training (all positions, packed-sequence masks) and one for generation (KV
//! cache). Weights keep transformers' names, so adapters and checkpoints map one to one.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::QTensor;

use candle_core::{DType, Device, Result, Tensor};

use super::bottleneck::Bottleneck;
use super::common::linear::Linear;
use super::common::mask::incremental_causal_mask;
use super::common::params::{Param, TrainableParams};
use super::common::rope::RopeTables;
use super::config::ModelConfig;
use super::prefix::Prefix;
use super::ForwardCtx;

mod block;
mod builder;
mod checkpointed;
pub mod merge;
mod moe;
pub use moe::take_forward_seconds as take_moe_forward_seconds;
mod prefixed;
mod rows;
mod serving_adapter;
use super::common::attention::Logits;
use block::{Attention, Block, FeedForward, NormStyle, Qkv};
use builder::Builder;
pub use checkpointed::Checkpointed;
pub use rows::Row;
pub use serving_adapter::ServingAdapter;

pub use super::adaptation::Adaptation;

pub struct CausalLm {
    pub config: ModelConfig,
    embed: Param,
    layers: Vec<Block>,
    norm: Param,
    /// `None` when tied to the embeddings.
    lm_head: Option<Linear>,
    rope: RopeTables,
    /// Gemma 3: the sliding layers' own RoPE tables.
    local_rope: Option<RopeTables>,
    norm_style: NormStyle,
    /// Prefix-tuning vectors, when the model has them.
    prefix: Option<Prefix>,
    /// The tied output head kept quantized (a GGUF base), used when no gradient is wanted.
    tied_head: Option<Arc<QTensor>>,
    pub trainable: TrainableParams,
    device: Device,
    dtype: DType,
}

pub use super::kv_cache::KvCache;
use super::kv_cache::LayerCache;

/// RoPE tables, mask and per-layer prefix keys/values of a training forward.
struct LayerInputs {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    prefix: Option<Vec<(Tensor, Tensor)>>,
    /// Gemma: the sliding layers' RoPE tables and windowed mask.
    sliding: Option<(Tensor, Tensor, Tensor)>,
}

impl LayerInputs {
    /// Layer `i` of the model over `x`.
    fn forward(&self, layer: &Block, i: usize, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let prefix = self.prefix.as_ref().map(|kv| &kv[i]);
        match &self.sliding {
            Some((cos, sin, mask)) if layer.window.is_some() => layer.forward(x, cos, sin, mask, None, prefix, ctx),
            _ => layer.forward(x, &self.cos, &self.sin, &self.mask, None, prefix, ctx),
        }
    }
}

impl CausalLm {
    /// Builds the model from transformers-named `weights` (consumed), training per `adaptation`.
    pub fn new(config: ModelConfig, weights: HashMap<String, Tensor>, adaptation: Adaptation<'_>) -> Result<Self> {
        Self::with_quantized(config, weights, HashMap::new(), adaptation)
    }

    /// As [`CausalLm::new`], with some linear weights kept block-quantized (`quantized`, by
    /// transformers' name): frozen, for QLoRA or inference.
    pub fn with_quantized(
        config: ModelConfig,
        weights: HashMap<String, Tensor>,
        quantized: HashMap<String, Arc<QTensor>>,
        adaptation: Adaptation<'_>,
    ) -> Result<Self> {
        let (mut weights, mut quantized) = (weights, quantized);
        if let Some(moe) = &config.moe {
            super::moe::to_stacked(moe, config.num_layers, &mut weights, &mut quantized)?;
        }
        let embed_probe = weights
            .get("model.embed_tokens.weight")
            .ok_or_else(|| candle_core::Error::Msg("missing embeddings".into()))?;
        let (device, dtype) = (embed_probe.device().clone(), embed_probe.dtype());
        let like = embed_probe.narrow(0, 0, 1)?;
        let lora_init = match adaptation {
            Adaptation::Lora(plan) => crate::rng::Rng::derive(plan.seed, "lora-init"),
            Adaptation::Bottleneck(plan) => crate::rng::Rng::derive(plan.seed, "bottleneck-init"),
            Adaptation::Prefix(plan) => crate::rng::Rng::derive(plan.seed, "prefix-init"),
            _ => crate::rng::Rng::new(0),
        };
        let mut b = Builder { weights, quantized, like, adaptation, trainable: TrainableParams::default(), lora_init };
        let (h, v) = (config.hidden_size, config.vocab_size);
        let (q_out, kv_out) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
        let inter = config.intermediate_size;
        let norm = NormStyle { eps: config.rms_norm_eps, offset: config.norm_offset() };
        let embed = b.param("model.embed_tokens.weight", &[v, h], true)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        let gemma = config.gemma.is_some();
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Block {
                input_norm: b.param(&format!("{p}.input_layernorm.weight"), &[h], false)?,
                attention: Attention {
                    qkv: if config.fused_projections {
                        Qkv::Fused(b.linear(
                            &format!("{p}.self_attn.qkv_proj"),
                            h,
                            q_out + 2 * kv_out,
                            config.qkv_bias,
                        )?)
                    } else {
                        Qkv::Separate {
                            q: b.linear(&format!("{p}.self_attn.q_proj"), h, q_out, config.qkv_bias)?,
                            k: b.linear(&format!("{p}.self_attn.k_proj"), h, kv_out, config.qkv_bias)?,
                            v: b.linear(&format!("{p}.self_attn.v_proj"), h, kv_out, config.qkv_bias)?,
                        }
                    },
                    o: b.linear(&format!("{p}.self_attn.o_proj"), q_out, h, config.o_bias)?,
                    heads: config.num_heads,
                    kv_heads: config.num_kv_heads,
                    head_dim: config.head_dim,
                    qk_norm: match config.qk_norm {
                        true => Some((
                            b.param(&format!("{p}.self_attn.q_norm.weight"), &[config.head_dim], false)?,
                            b.param(&format!("{p}.self_attn.k_norm.weight"), &[config.head_dim], false)?,
                        )),
                        false => None,
                    },
                    norm,
                    logits: Logits {
                        scale: config.attention_scale() as f32,
                        softcap: config.attention_softcap().map(|c| c as f32),
                    },
                },
                post_norm: match gemma {
                    true => b.param(&format!("{p}.pre_feedforward_layernorm.weight"), &[h], false)?,
                    false => b.param(&format!("{p}.post_attention_layernorm.weight"), &[h], false)?,
                },
                output_norms: match gemma {
                    true => Some((
                        b.param(&format!("{p}.post_attention_layernorm.weight"), &[h], false)?,
                        b.param(&format!("{p}.post_feedforward_layernorm.weight"), &[h], false)?,
                    )),
                    false => None,
                },
                mlp: match config.moe.as_ref().filter(|m| m.is_sparse(i)) {
                    Some(moe) => FeedForward::Moe(Box::new(b.moe(i, &config, moe)?)),
                    None => FeedForward::Dense(Box::new(b.mlp(&format!("{p}.mlp"), &config, inter)?)),
                },
                window: config.layer_window(i),
                adapters: match b.adaptation {
                    Adaptation::Bottleneck(plan) => {
                        let like = b.like.clone();
                        let attn = Bottleneck::build(
                            plan,
                            &format!("{p}.attn_adapter"),
                            h,
                            &like,
                            &mut b.lora_init,
                            &mut b.trainable,
                        )?;
                        let mlp = Bottleneck::build(
                            plan,
                            &format!("{p}.mlp_adapter"),
                            h,
                            &like,
                            &mut b.lora_init,
                            &mut b.trainable,
                        )?;
                        Some((attn, mlp))
                    }
                    _ => None,
                },
            });
        }
        let final_norm = b.param("model.norm.weight", &[h], false)?;
        let tied_head = if config.tie_word_embeddings { b.quantized.remove("lm_head.weight") } else { None };
        let lm_head = if config.tie_word_embeddings {
            b.weights.remove("lm_head.weight");
            None
        } else {
            Some(b.linear("lm_head", h, v, false)?)
        };
        let rope = RopeTables::new(&config, config.max_position_embeddings, &device)?;
        let local_rope = RopeTables::local(&config, config.max_position_embeddings, &device)?;
        let prefix = match b.adaptation {
            Adaptation::Prefix(plan) => {
                let like = b.like.clone();
                Some(Prefix::build(plan, &config, &like, &mut b.lora_init, &mut b.trainable)?)
            }
            _ => None,
        };
        if let Adaptation::Lora(plan) = b.adaptation {
            // PEFT refuses such a configuration too ("Target modules ... not found").
            let targeted = layers.iter().flat_map(Block::linears).any(|(_, l)| l.lora.is_some())
                || lm_head.as_ref().is_some_and(|l| l.lora.is_some())
                || layers.iter().any(|layer| match &layer.mlp {
                    FeedForward::Moe(moe) => {
                        moe.router_lora.is_some() || moe.gate_up.lora.is_some() || moe.down.lora.is_some()
                    }
                    FeedForward::Dense(_) => false,
                });
            if !targeted {
                candle_core::bail!(
                    "lora target_modules {} match no linear module of this {} model (its modules: {}, lm_head)",
                    serde_json::to_string(&plan.config.target_modules).unwrap_or_default(),
                    config.model_type,
                    config.linear_modules().join(", ")
                );
            }
        }
        Ok(Self {
            config,
            embed,
            layers,
            norm: final_norm,
            lm_head,
            rope,
            local_rope,
            norm_style: norm,
            prefix,
            tied_head,
            trainable: b.trainable,
            device,
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Hidden states of every position: `input_ids`, `positions` `(b, t)` u32, `mask` `(b, 1, t, t)`.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        let inputs = self.layer_inputs(positions, mask, ctx)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = inputs.forward(layer, i, &x, ctx)?;
        }
        self.final_norm(&x)
    }

    /// The norm after the last layer.
    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm_style.apply(x, self.norm.tensor())
    }

    /// What every decoder layer of a training forward takes besides its input. With a prefix,
    /// every token also sees the prefix, which comes before position 0.
    fn layer_inputs(&self, positions: &Tensor, mask: &Tensor, ctx: &ForwardCtx) -> Result<LayerInputs> {
        // Gemma's sliding layers: the same causal mask, closed beyond the window.
        let windowed = match &self.config.gemma {
            Some(g) if g.sliding_layers.iter().any(|&s| s) => {
                Some(super::common::mask::windowed(mask, positions, g.window)?)
            }
            _ => None,
        };
        let prefix = self.prefix.as_ref().filter(|_| ctx.adapters_on());
        let kv = prefix.map(|p| p.layers(&self.config, ctx)).transpose()?;
        let n = kv.as_ref().and_then(|kv| kv.first()).map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        // With a prefix, the tokens come after it (positions n, n + 1, ...) and see it, within
        // their window when they have one (as transformers sees a prefix in the KV cache).
        let (mask, windowed, positions) = match n {
            0 => (mask.clone(), windowed, positions.clone()),
            n => {
                let gemma_window = self.config.gemma.as_ref().map(|g| g.window);
                let mask = super::common::mask::with_prefix(mask, positions, n, self.config.sliding_window)?;
                let windowed = match windowed {
                    Some(windowed) => Some(super::common::mask::with_prefix(&windowed, positions, n, gemma_window)?),
                    None => None,
                };
                (mask, windowed, (positions + n as f64)?)
            }
        };
        let (cos, sin) = self.rope.at(&positions, self.dtype)?;
        let sliding = match windowed {
            Some(windowed) => {
                let (local_cos, local_sin) = self.sliding_tables(&positions, &cos, &sin)?;
                Some((local_cos, local_sin, windowed))
            }
            None => None,
        };
        Ok(LayerInputs { cos, sin, mask, prefix: kv, sliding })
    }

    /// cos and sin at `positions` for Gemma's sliding layers: Gemma 3's local tables, or the
    /// model's (`cos`, `sin`).
    fn sliding_tables(&self, positions: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.local_rope {
            Some(rope) => rope.at(positions, self.dtype),
            None => Ok((cos.clone(), sin.clone())),
        }
    }

    /// Vocabulary logits for hidden states `(..., hidden)`.
    pub fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let logits = match (&self.lm_head, &self.tied_head) {
            (Some(head), _) => head.forward(hidden, ctx)?,
            (None, Some(q)) if !hidden.track_op() && !self.embed.is_trainable() => {
                super::common::quantized::quantized_linear(hidden, q)?
            }
            (None, _) => hidden.broadcast_matmul(&self.embed.tensor().t()?)?,
        };
        // Gemma 2: the output logits soft-capped, `c · tanh(x / c)`.
        match self.config.gemma.as_ref().and_then(|g| g.final_softcap) {
            Some(c) => (logits / c)?.tanh()? * c,
            None => Ok(logits),
        }
    }

    /// Feeds `input_ids (1, t)` after the cached tokens; returns the logits of the last position `(1, vocab)`.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let past = cache.len;
        if past + t > self.rope.max_positions() {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                past + t,
                self.rope.max_positions()
            );
        }
        let positions = Tensor::arange(past as u32, (past + t) as u32, &self.device)?.unsqueeze(0)?;
        let (cos, sin) = self.rope.at(&positions, self.dtype)?;
        let mask = incremental_causal_mask(past, t, self.config.sliding_window, &self.device)?.to_dtype(self.dtype)?;
        // Gemma's sliding layers: their window, and Gemma 3's local RoPE.
        let sliding = match &self.config.gemma {
            Some(g) => {
                let (cos, sin) = self.sliding_tables(&positions, &cos, &sin)?;
                let mask = incremental_causal_mask(past, t, Some(g.window), &self.device)?.to_dtype(self.dtype)?;
                Some((cos, sin, mask))
            }
            None => None,
        };
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let ctx = ForwardCtx::inference();
        if let (Some(prefix), 0) = (&self.prefix, past) {
            return self.forward_cached_after(&prefix.layers(&self.config, &ctx)?, input_ids, cache);
        }
        let mut x = self.embed(input_ids)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let max = self.rope.max_positions();
            let (cos, sin, mask) = match &sliding {
                Some((cos, sin, mask)) if layer.window.is_some() => (cos, sin, mask),
                _ => (&cos, &sin, &mask),
            };
            x = layer.forward(&x, cos, sin, mask, Some((slot, max)), None, &ctx)?;
        }
        cache.len += t;
        let last = x.narrow(1, t - 1, 1)?;
        let hidden = self.final_norm(&last)?;
        self.logits(&hidden, &ctx)?.squeeze(1)
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        self.embed_rows(&flat)?.reshape((b, t, self.config.hidden_size))
    }

    /// Embedding rows of `ids` (flat), times Gemma's `sqrt(hidden)` (rounded to the model's
    /// dtype first, as transformers does).
    fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let rows = self.embed.tensor().index_select(ids, 0)?;
        match self.config.embed_scale() {
            Some(scale) => rows * f64::from(scale as f32),
            None => Ok(rows),
        }
    }

    /// The base weights by transformers' names (for merging and saving a full model).
    pub fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.tensor().clone())];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, norm) in layer.norms() {
                out.push((format!("{p}.{name}.weight"), norm.tensor().clone()));
            }
        }
        for (module, linear) in self.linear_modules() {
            out.push((format!("{module}.weight"), linear.weight.dense()?));
            if let Some(bias) = &linear.bias {
                out.push((format!("{module}.bias"), bias.tensor().clone()));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if let FeedForward::Moe(moe) = &layer.mlp {
                let (gate_up, down) = super::moe::stacked_names(i);
                out.push((format!("model.layers.{i}.mlp.gate.weight"), moe.router.tensor().clone()));
                out.push((gate_up, moe.gate_up.weight.dense()?));
                out.push((down, moe.down.weight.dense()?));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.tensor().clone()));
        Ok(out)
    }

    /// Every expert LoRA's weight delta `(E, out, in)` by the stacked weight's name, for merging.
    pub fn expert_deltas(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let FeedForward::Moe(moe) = &layer.mlp else { continue };
            let (gate_up, down) = super::moe::stacked_names(i);
            for (name, proj) in [(gate_up, &moe.gate_up), (down, &moe.down)] {
                if let Some(lora) = &proj.lora {
                    out.push((name, lora.delta_t(moe.experts)?.transpose(1, 2)?.contiguous()?));
                }
            }
        }
        Ok(out)
    }

    /// Every linear module with its transformers path, for merging adapters.
    pub fn linear_modules(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (path, linear) in layer.linears() {
                out.push((format!("model.layers.{i}.{path}"), linear));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }
}
