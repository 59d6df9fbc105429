//! T5-family encoder-decoders (T5, T5 v1.1, Flan-T5, mT5) as transformers' `T5ForConditionalGeneration`.
//!
//! Pre-norm blocks with T5's LayerNorm (an RMSNorm without bias or mean): the encoder block is
//! self-attention then feed-forward, the decoder block adds cross-attention over the encoder's
//! output between them. Attention is not scaled by `1/sqrt(d)`; each stack's first block owns a
//! learned relative position bias `(buckets, heads)` that every block of the stack adds to its
//! self-attention logits (bidirectional buckets in the encoder, past-only in the decoder).
//! Feed-forward is `wo(act(wi·x))`, or `wo(act(wi_0·x) ⊙ wi_1·x)` for the gated variants.
//! The output head is the shared embedding unless the checkpoint holds its own `lm_head.weight`
//! (T5 v1.1, Flan-T5); original T5 scales the decoder's output by `d_model^-0.5` before it
//! (`scale_decoder_outputs`). Dropout sits after the embeddings, on attention
//! probabilities, inside the feed-forward, on every sub-layer's output and after each stack's
//! final norm, as in transformers. Weights keep transformers' names
//! (`encoder.block.0.layer.0.SelfAttention.q.weight`), so PEFT adapters map one to one.

pub mod config;
mod export;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use super::adaptation::Adaptation;
use super::common::builder::Builder;
use super::common::linear::{Linear, LinearWeight};
use super::common::params::{Param, TrainableParams};
use super::ForwardCtx;
pub use config::T5Config;
use config::{relative_bucket, Activation};

/// The additive logit of a key that must not be attended to.
const MASKED: f32 = -1e9;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

enum FeedForward {
    Plain { wi: Linear, wo: Linear },
    Gated { wi_0: Linear, wi_1: Linear, wo: Linear },
}

struct Block {
    self_attention: Attention,
    self_norm: Param,
    /// The decoder's attention over the encoder output, with its norm.
    cross: Option<(Attention, Param)>,
    feed_forward: FeedForward,
    ff_norm: Param,
}

struct Stack {
    blocks: Vec<Block>,
    /// `(buckets, heads)`, owned by the stack's first block.
    relative_bias: Param,
    final_norm: Param,
    /// The encoder's buckets look both ways; the decoder's only back.
    bidirectional: bool,
}

pub struct T5 {
    pub config: T5Config,
    shared: Param,
    encoder: Stack,
    decoder: Stack,
    /// The shared embedding when tied, else `lm_head`.
    lm_head: Linear,
    /// Whether the output head is the shared embedding (no separate `lm_head.weight`).
    pub tied_head: bool,
    pub trainable: TrainableParams,
    device: Device,
}

/// What the decoder keeps between incremental calls: each block's self-attention keys and
/// values so far and its keys and values of the encoder output, computed once.
pub struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    /// `(b, 1, 1, s)`: the encoder's padding, for cross-attention.
    cross_bias: Tensor,
    /// Decoder positions already processed.
    pub len: usize,
}

impl T5 {
    /// Builds the model from `weights` (transformers names), training per `adaptation` (full or
    /// LoRA; bottleneck and prefix adapters are refused).
    pub fn new(config: T5Config, weights: HashMap<String, Tensor>, adaptation: Adaptation<'_>) -> Result<Self> {
        let seed = match adaptation {
            Adaptation::Lora(plan) => plan.seed,
            Adaptation::Bottleneck(_) => candle_core::bail!("bottleneck adapters are not supported on T5 models"),
            Adaptation::Prefix(_) => candle_core::bail!("prefix tuning is not supported on T5 models"),
            _ => 0,
        };
        let (weights, tied) = normalize_names(weights, config.tie_word_embeddings)?;
        let probe =
            weights.get("shared.weight").ok_or_else(|| candle_core::Error::Msg("missing shared.weight".into()))?;
        let (device, like) = (probe.device().clone(), probe.narrow(0, 0, 1)?);
        let mut b = Builder {
            weights,
            like,
            adaptation,
            trainable: TrainableParams::default(),
            rng: crate::rng::Rng::derive(seed, "t5-init"),
        };
        let c = &config;
        let shared = b.param("shared.weight", &[c.vocab_size, c.d_model], true)?;
        let encoder = build_stack(&mut b, c, "encoder", c.num_layers, false)?;
        let decoder = build_stack(&mut b, c, "decoder", c.num_decoder_layers, true)?;
        let lm_head = if tied {
            Linear { weight: LinearWeight::Dense(shared.clone()), bias: None, lora: None }
        } else {
            b.linear_no_bias("lm_head", c.d_model, c.vocab_size)?
        };
        Ok(Self { config, shared, encoder, decoder, lm_head, tied_head: tied, trainable: b.trainable, device })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The encoder's last hidden states `(b, s, d_model)` for `input_ids (b, s)` u32 with
    /// `attention_mask (b, s)` f32 (1 real, 0 padding).
    pub fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let x = self.embed(input_ids)?;
        let mut x = ctx.dropout(&x, self.config.dropout)?;
        let bias = self.position_bias(&self.encoder, s, s, 0)?.broadcast_add(&padding_bias(attention_mask, b, s)?)?;
        for block in &self.encoder.blocks {
            let h = self.norm(&x, &block.self_norm)?;
            let (k, v) = self.keys_values(&block.self_attention, &h, ctx)?;
            let attended = self.attend(&block.self_attention, &h, &k, &v, &bias, ctx)?;
            x = (x + ctx.dropout(&attended, self.config.dropout)?)?;
            x = self.feed_forward(block, &x, ctx)?;
        }
        ctx.dropout(&self.norm(&x, &self.encoder.final_norm)?, self.config.dropout)
    }

    /// A decoder cache over an encoder output `(b, s, d_model)` and its `attention_mask (b, s)`.
    pub fn start_decoding(&self, encoded: &Tensor, attention_mask: &Tensor, ctx: &ForwardCtx) -> Result<DecoderCache> {
        let (b, s, _) = encoded.dims3()?;
        let cross_kv = self
            .decoder
            .blocks
            .iter()
            .map(|block| {
                let (attention, _) = block.cross.as_ref().expect("decoder blocks have cross-attention");
                self.keys_values(attention, encoded, ctx)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderCache {
            self_kv: vec![None; self.decoder.blocks.len()],
            cross_kv,
            cross_bias: padding_bias(attention_mask, b, s)?,
            len: 0,
        })
    }

    /// The decoder's final hidden states `(b, n, d_model)` for the next `n` decoder inputs
    /// `ids (b, n)`, after the `cache.len` already in `cache` (which grows by `n`).
    pub fn decode(&self, ids: &Tensor, cache: &mut DecoderCache, ctx: &ForwardCtx) -> Result<Tensor> {
        let (_, n) = ids.dims2()?;
        let past = cache.len;
        let x = self.embed(ids)?;
        let mut x = ctx.dropout(&x, self.config.dropout)?;
        let causal = crate::models::common::mask::incremental_causal_mask(past, n, None, &self.device)?;
        let bias = self.position_bias(&self.decoder, n, past + n, past)?.broadcast_add(&causal)?;
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let h = self.norm(&x, &block.self_norm)?;
            let (k, v) = self.keys_values(&block.self_attention, &h, ctx)?;
            let (k, v) = match cache.self_kv[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            let attended = self.attend(&block.self_attention, &h, &k, &v, &bias, ctx)?;
            cache.self_kv[i] = Some((k, v));
            x = (x + ctx.dropout(&attended, self.config.dropout)?)?;
            let (cross, cross_norm) = block.cross.as_ref().expect("decoder blocks have cross-attention");
            let h = self.norm(&x, cross_norm)?;
            let (ck, cv) = &cache.cross_kv[i];
            let attended = self.attend(cross, &h, ck, cv, &cache.cross_bias, ctx)?;
            x = (x + ctx.dropout(&attended, self.config.dropout)?)?;
            x = self.feed_forward(block, &x, ctx)?;
        }
        cache.len += n;
        ctx.dropout(&self.norm(&x, &self.decoder.final_norm)?, self.config.dropout)
    }

    /// Vocabulary logits `(…, vocab)` of decoder hidden states.
    pub fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let hidden = if self.config.scale_decoder_outputs {
            (hidden * (self.config.d_model as f64).powf(-0.5))?
        } else {
            hidden.clone()
        };
        self.lm_head.forward(&hidden, ctx)
    }

    /// Teacher-forced logits `(b, t, vocab)`: the encoder over `input_ids`/`attention_mask`, the
    /// decoder over `decoder_input_ids (b, t)`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let encoded = self.encode(input_ids, attention_mask, ctx)?;
        let mut cache = self.start_decoding(&encoded, attention_mask, ctx)?;
        let hidden = self.decode(decoder_input_ids, &mut cache, ctx)?;
        self.logits(&hidden, ctx)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.shared.tensor().embedding(&ids.flatten_all()?)?.reshape((b, t, self.config.d_model))
    }

    fn norm(&self, x: &Tensor, weight: &Param) -> Result<Tensor> {
        super::common::ops::rms_norm(x, weight.tensor(), self.config.layer_norm_epsilon)
    }

    /// `(1, heads, q_len, k_len)`: the stack's learned bias for queries at `q_offset..` over keys
    /// at `0..k_len`.
    fn position_bias(&self, stack: &Stack, q_len: usize, k_len: usize, q_offset: usize) -> Result<Tensor> {
        let c = &self.config;
        let buckets: Vec<u32> = (0..q_len)
            .flat_map(|i| {
                (0..k_len).map(move |j| {
                    let relative = j as i64 - (q_offset + i) as i64;
                    relative_bucket(
                        relative,
                        stack.bidirectional,
                        c.relative_attention_num_buckets,
                        c.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, q_len * k_len, &self.device)?;
        stack
            .relative_bias
            .tensor()
            .embedding(&buckets)?
            .reshape((q_len, k_len, c.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// Keys and values `(b, heads, t, d_kv)` of `x (b, t, d_model)`.
    fn keys_values(&self, attention: &Attention, x: &Tensor, ctx: &ForwardCtx) -> Result<(Tensor, Tensor)> {
        Ok((self.split_heads(attention.k.forward(x, ctx)?)?, self.split_heads(attention.v.forward(x, ctx)?)?))
    }

    fn split_heads(&self, y: Tensor) -> Result<Tensor> {
        let (b, t, _) = y.dims3()?;
        y.reshape((b, t, self.config.num_heads, self.config.d_kv))?.transpose(1, 2)?.contiguous()
    }

    /// Unscaled attention of `x`'s queries over `k`/`v` with the additive `bias`, then `o`.
    fn attend(
        &self,
        attention: &Attention,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.split_heads(attention.q.forward(x, ctx)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = super::common::fused::softmax_last_dim(&scores)?;
        let probs = ctx.dropout(&probs, self.config.dropout)?;
        let out = probs.matmul(v)?.transpose(1, 2)?.reshape((b, t, self.config.inner_dim()))?;
        attention.o.forward(&out, ctx)
    }

    /// `x + dropout(ff(norm(x)))`.
    fn feed_forward(&self, block: &Block, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let h = self.norm(x, &block.ff_norm)?;
        let act = |y: Tensor| match self.config.activation {
            Activation::Relu => y.relu(),
            Activation::GeluErf => y.gelu_erf(),
            Activation::GeluTanh => y.gelu(),
            Activation::Silu => y.silu(),
        };
        let inner = match &block.feed_forward {
            FeedForward::Plain { wi, .. } => act(wi.forward(&h, ctx)?)?,
            FeedForward::Gated { wi_0, wi_1, .. } if self.config.activation == Activation::GeluTanh => {
                super::common::fused::gated_gelu_tanh(&wi_0.forward(&h, ctx)?, &wi_1.forward(&h, ctx)?)?
            }
            FeedForward::Gated { wi_0, wi_1, .. } => (act(wi_0.forward(&h, ctx)?)? * wi_1.forward(&h, ctx)?)?,
        };
        let inner = ctx.dropout(&inner, self.config.dropout)?;
        let out = match &block.feed_forward {
            FeedForward::Plain { wo, .. } | FeedForward::Gated { wo, .. } => wo.forward(&inner, ctx)?,
        };
        x + ctx.dropout(&out, self.config.dropout)?
    }
}

/// `(b, 1, 1, s)`: 0 on real tokens, [`MASKED`] on padding.
fn padding_bias(attention_mask: &Tensor, b: usize, s: usize) -> Result<Tensor> {
    ((attention_mask.to_dtype(DType::F32)? - 1.0)? * (-MASKED as f64))?.reshape((b, 1, 1, s))
}

fn build_stack(b: &mut Builder<'_>, c: &T5Config, name: &str, layers: usize, decoder: bool) -> Result<Stack> {
    let (d, inner) = (c.d_model, c.inner_dim());
    let attention = |b: &mut Builder<'_>, module: &str| -> Result<Attention> {
        Ok(Attention {
            q: b.linear_no_bias(&format!("{module}.q"), d, inner)?,
            k: b.linear_no_bias(&format!("{module}.k"), d, inner)?,
            v: b.linear_no_bias(&format!("{module}.v"), d, inner)?,
            o: b.linear_no_bias(&format!("{module}.o"), inner, d)?,
        })
    };
    let relative_bias = b.param(
        &format!("{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        &[c.relative_attention_num_buckets, c.num_heads],
        true,
    )?;
    let mut blocks = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("{name}.block.{i}.layer");
        let self_attention = attention(b, &format!("{p}.0.SelfAttention"))?;
        let self_norm = b.param(&format!("{p}.0.layer_norm.weight"), &[d], false)?;
        let cross = if decoder {
            let attn = attention(b, &format!("{p}.1.EncDecAttention"))?;
            Some((attn, b.param(&format!("{p}.1.layer_norm.weight"), &[d], false)?))
        } else {
            None
        };
        let ff = format!("{p}.{}", if decoder { 2 } else { 1 });
        let feed_forward = if c.gated {
            FeedForward::Gated {
                wi_0: b.linear_no_bias(&format!("{ff}.DenseReluDense.wi_0"), d, c.d_ff)?,
                wi_1: b.linear_no_bias(&format!("{ff}.DenseReluDense.wi_1"), d, c.d_ff)?,
                wo: b.linear_no_bias(&format!("{ff}.DenseReluDense.wo"), c.d_ff, d)?,
            }
        } else {
            FeedForward::Plain {
                wi: b.linear_no_bias(&format!("{ff}.DenseReluDense.wi"), d, c.d_ff)?,
                wo: b.linear_no_bias(&format!("{ff}.DenseReluDense.wo"), c.d_ff, d)?,
            }
        };
        let ff_norm = b.param(&format!("{ff}.layer_norm.weight"), &[d], false)?;
        blocks.push(Block { self_attention, self_norm, cross, feed_forward, ff_norm });
    }
    let final_norm = b.param(&format!("{name}.final_layer_norm.weight"), &[d], false)?;
    Ok(Stack { blocks, relative_bias, final_norm, bidirectional: !decoder })
}

/// One `shared.weight` whichever copy the checkpoint kept (transformers may save the embedding
/// as `encoder.embed_tokens.weight`), the other copies dropped; a tied `lm_head.weight` dropped.
fn normalize_names(mut weights: HashMap<String, Tensor>, tie: bool) -> Result<(HashMap<String, Tensor>, bool)> {
    let copies = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"];
    if !weights.contains_key("shared.weight") {
        let found = copies.iter().find_map(|name| weights.remove(*name));
        let Some(shared) = found.or_else(|| if tie { weights.get("lm_head.weight").cloned() } else { None }) else {
            candle_core::bail!("the checkpoint has no shared embedding (shared.weight)");
        };
        weights.insert("shared.weight".into(), shared);
    }
    for name in copies {
        weights.remove(name);
    }
    // As transformers 5: the head is the shared embedding unless the checkpoint holds a
    // different `lm_head.weight`.
    let tied = match (weights.get("lm_head.weight"), weights.get("shared.weight")) {
        (Some(head), Some(shared)) => same_values(head, shared)?,
        _ => true,
    };
    if tied {
        weights.remove("lm_head.weight");
    }
    Ok((weights, tied))
}

fn same_values(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.shape() != b.shape() {
        return Ok(false);
    }
    let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?;
    Ok(diff.to_scalar::<f32>()? == 0.0)
}

#[cfg(test)]
mod tests;
