//! Encoder-only transformers (BERT, MiniLM, RoBERTa / XLM-R) with their task heads: sequence
//! classification (BERT's pooler + classifier, RoBERTa's two-layer head), token classification,
//! and sentence embeddings by mean pooling (as sentence-transformers).
//!
//! Post-norm blocks as in transformers' `BertLayer`: self-attention (biased q/k/v over the padding
//! mask) → dense → dropout → LayerNorm(x + ·), then intermediate dense → GELU → dense → dropout →
//! LayerNorm(· + attended). Attention uses the fused CPU kernel with an identity rotation, except
//! in training with attention-probability dropout, which needs the probabilities formed. Weights keep
//! transformers' names (`bert.encoder.layer.0.attention.self.query.weight`, `classifier.weight`),
//! so PEFT adapters and saved models map one to one.

mod builder;
pub mod config;
mod export;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};

use super::adaptation::Adaptation;
use super::bottleneck::Bottleneck;
use super::common::builder::Builder;
use super::common::linear::Linear;
use super::common::params::{Param, TrainableParams};
use super::ForwardCtx;
pub use config::EncoderConfig;

/// What the encoder is trained or served for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// One label per input (or input pair), from these labels (id order).
    Classification { labels: Vec<String> },
    /// One label per word (the first sub-token of each), from these labels.
    TokenClassification { labels: Vec<String> },
    /// Sentence embeddings: the mean of the last hidden states over real tokens.
    Embedding,
}

impl Task {
    pub fn labels(&self) -> Option<&[String]> {
        match self {
            Self::Classification { labels } | Self::TokenClassification { labels } => Some(labels),
            Self::Embedding => None,
        }
    }

    /// transformers' class for this task on `model_type`.
    pub fn architecture(&self, model_type: &str) -> String {
        let family = if model_type == "bert" {
            "Bert"
        } else if model_type == "roberta" {
            "Roberta"
        } else {
            "XLMRoberta"
        };
        match self {
            Self::Classification { .. } => format!("{family}ForSequenceClassification"),
            Self::TokenClassification { .. } => format!("{family}ForTokenClassification"),
            Self::Embedding => format!("{family}Model"),
        }
    }

    /// PEFT's `task_type`.
    pub fn peft_task_type(&self) -> &'static str {
        match self {
            Self::Classification { .. } => "SEQ_CLS",
            Self::TokenClassification { .. } => "TOKEN_CLS",
            Self::Embedding => "FEATURE_EXTRACTION",
        }
    }
}

/// A batch of encoder inputs, right-padded to one length.
pub struct EncoderInput {
    /// `(b, t)` u32.
    pub input_ids: Tensor,
    /// `(b, t)` u32: segment A (0) or B (1).
    pub token_type_ids: Tensor,
    /// `(b, t)` u32 position ids.
    pub positions: Tensor,
    /// `(b, t)` f32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(b, 1, t, t)` f32 additive: a large negative number on padding keys.
    pub key_bias: Tensor,
}

impl EncoderInput {
    /// Pads `rows` of `(ids, type ids)` to the longest with `pad_id`.
    pub fn new(rows: &[(&[u32], &[u32])], config: &EncoderConfig, device: &Device) -> Result<Self> {
        let b = rows.len();
        let t = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0).max(1);
        let (mut ids, mut types) = (vec![config.pad_token_id; b * t], vec![0u32; b * t]);
        let offset = config.position_offset() as u32;
        // RoBERTa numbers padding positions with the padding index; BERT counts on.
        let mut positions: Vec<u32> =
            (0..b * t).map(|i| if offset == 0 { (i % t) as u32 } else { config.pad_token_id }).collect();
        let mut mask = vec![0f32; b * t];
        for (r, (row_ids, row_types)) in rows.iter().enumerate() {
            for (j, (&id, &ty)) in row_ids.iter().zip(row_types.iter()).enumerate() {
                ids[r * t + j] = id;
                types[r * t + j] = ty;
                positions[r * t + j] = offset + j as u32;
                mask[r * t + j] = 1.0;
            }
        }
        let mut bias = vec![0f32; b * t * t];
        for r in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if mask[r * t + j] == 0.0 {
                        bias[(r * t + i) * t + j] = -1e9;
                    }
                }
            }
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            token_type_ids: Tensor::from_vec(types, (b, t), device)?,
            positions: Tensor::from_vec(positions, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            key_bias: Tensor::from_vec(bias, (b, 1, t, t), device)?,
        })
    }
}

pub(crate) struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::common::ops::layer_norm(x, self.weight.tensor(), self.bias.tensor(), self.eps)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    /// Bottleneck adapters on the attention output and the feed-forward output (Houlsby).
    adapters: Option<(Bottleneck, Bottleneck)>,
}

pub(crate) enum Head {
    None,
    /// BERT: `tanh(pooler(h[CLS]))` → dropout → classifier.
    Pooled {
        pooler: Linear,
        classifier: Linear,
    },
    /// RoBERTa: dropout → `tanh(dense(h[CLS]))` → dropout → out_proj.
    Roberta {
        dense: Linear,
        out_proj: Linear,
    },
    /// Per token: dropout → classifier.
    Token {
        classifier: Linear,
    },
}

pub struct Encoder {
    pub config: EncoderConfig,
    pub task: Task,
    /// The backbone's weight-name prefix: `bert.` / `roberta.` under a task head, empty for the
    /// bare model (embeddings).
    root: String,
    word_embeddings: Param,
    position_embeddings: Param,
    token_type_embeddings: Param,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    head: Head,
    pub trainable: TrainableParams,
    device: Device,
}

impl Encoder {
    /// Builds the encoder for `task` from `weights` (transformers names, with or without the
    /// backbone prefix), training per `adaptation` (`Prefix` is refused: it is a decoder method).
    pub fn new(
        config: EncoderConfig,
        task: Task,
        weights: HashMap<String, Tensor>,
        adaptation: Adaptation<'_>,
    ) -> Result<Self> {
        let root = match task {
            Task::Embedding => String::new(),
            _ => format!("{}.", config.backbone_prefix()),
        };
        let weights = normalize_names(weights, &config, &root);
        let probe = weights
            .get(&format!("{root}embeddings.word_embeddings.weight"))
            .ok_or_else(|| candle_core::Error::Msg("missing word embeddings".into()))?;
        let (device, like) = (probe.device().clone(), probe.narrow(0, 0, 1)?);
        let seed = match adaptation {
            Adaptation::Lora(plan) => plan.seed,
            Adaptation::Bottleneck(plan) => plan.seed,
            Adaptation::Prefix(_) => candle_core::bail!("prefix tuning applies to decoder models, not encoders"),
            _ => 0,
        };
        let mut b = Builder {
            weights,
            like,
            adaptation,
            trainable: TrainableParams::default(),
            rng: crate::rng::Rng::derive(seed, "encoder-init"),
        };
        let (h, c) = (config.hidden_size, &config);
        let e = format!("{root}embeddings");
        let word_embeddings = b.param(&format!("{e}.word_embeddings.weight"), &[c.vocab_size, h], true)?;
        let position_embeddings =
            b.param(&format!("{e}.position_embeddings.weight"), &[c.max_position_embeddings, h], true)?;
        let token_type_embeddings =
            b.param(&format!("{e}.token_type_embeddings.weight"), &[c.type_vocab_size, h], true)?;
        let embedding_norm = b.layer_norm(&format!("{e}.LayerNorm"), h, c.layer_norm_eps)?;
        let mut adapter_rng = match adaptation {
            Adaptation::Bottleneck(plan) => Some(crate::rng::Rng::derive(plan.seed, "bottleneck-init")),
            _ => None,
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("{root}encoder.layer.{i}");
            let adapters = match (adaptation, adapter_rng.as_mut()) {
                (Adaptation::Bottleneck(plan), Some(rng)) => {
                    let like = b.like.clone();
                    Some((
                        Bottleneck::build(plan, &format!("{p}.attn_adapter"), h, &like, rng, &mut b.trainable)?,
                        Bottleneck::build(plan, &format!("{p}.mlp_adapter"), h, &like, rng, &mut b.trainable)?,
                    ))
                }
                _ => None,
            };
            layers.push(Layer {
                query: b.linear(&format!("{p}.attention.self.query"), h, h)?,
                key: b.linear(&format!("{p}.attention.self.key"), h, h)?,
                value: b.linear(&format!("{p}.attention.self.value"), h, h)?,
                attention_out: b.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: b.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, c.layer_norm_eps)?,
                intermediate: b.linear(&format!("{p}.intermediate.dense"), h, c.intermediate_size)?,
                output: b.linear(&format!("{p}.output.dense"), c.intermediate_size, h)?,
                output_norm: b.layer_norm(&format!("{p}.output.LayerNorm"), h, c.layer_norm_eps)?,
                adapters,
            });
        }
        let head = b.head(&task, &config.model_type, &root, h)?;
        Ok(Self {
            config,
            task,
            root,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_norm,
            layers,
            head,
            trainable: b.trainable,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The backbone's weight-name prefix (`bert.`, or empty for the bare model).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The last hidden states `(b, t, hidden)`.
    pub fn hidden(&self, input: &EncoderInput, ctx: &ForwardCtx) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = input.input_ids.dims2()?;
        let embed = |table: &Param, ids: &Tensor| table.tensor().embedding(&ids.flatten_all()?);
        let x = ((embed(&self.word_embeddings, &input.input_ids)?
            + embed(&self.position_embeddings, &input.positions)?)?
            + embed(&self.token_type_embeddings, &input.token_type_ids)?)?
        .reshape((b, t, c.hidden_size))?;
        let mut x = ctx.dropout(&self.embedding_norm.forward(&x)?, c.hidden_dropout)?;
        let d = c.head_dim();
        // The fused attention rotates queries and keys; cos 1 and sin 0 leave them as they are.
        let cos = Tensor::ones((b, 1, t, d), DType::F32, &self.device)?;
        let sin = Tensor::zeros((b, 1, t, d), DType::F32, &self.device)?;
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, &input.key_bias, c, ctx)?;
        }
        Ok(x)
    }

    /// The task head's logits: `(b, labels)` for sequence classification, `(b, t, labels)` for
    /// token classification.
    pub fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let p = self.config.classifier_dropout;
        let cls = || hidden.narrow(1, 0, 1)?.squeeze(1);
        match &self.head {
            Head::None => candle_core::bail!("an embedding model has no classification head"),
            Head::Pooled { pooler, classifier } => {
                let pooled = pooler.forward(&cls()?, ctx)?.tanh()?;
                classifier.forward(&ctx.dropout(&pooled, p)?, ctx)
            }
            Head::Roberta { dense, out_proj } => {
                let x = dense.forward(&ctx.dropout(&cls()?, p)?, ctx)?.tanh()?;
                out_proj.forward(&ctx.dropout(&x, p)?, ctx)
            }
            Head::Token { classifier } => classifier.forward(&ctx.dropout(hidden, p)?, ctx),
        }
    }

    /// Mean of `hidden` over real tokens: `(b, hidden)` (sentence-transformers' mean pooling).
    pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mask = attention_mask.unsqueeze(D::Minus1)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
        summed.broadcast_div(&counts)
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        key_bias: &Tensor,
        c: &EncoderConfig,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let heads = |y: Tensor| y.reshape((b, t, c.num_heads, c.head_dim()));
        let q = heads(self.query.forward(x, ctx)?)?;
        let k = heads(self.key.forward(x, ctx)?)?;
        let v = heads(self.value.forward(x, ctx)?)?;
        let logits = super::common::attention::Logits::standard(c.head_dim());
        // Dropout on the attention probabilities (training) needs them materialised: the fused
        // kernel never forms them.
        let drops = ctx.drops() && c.attention_dropout > 0.0;
        let attended = if super::common::attention::supported(&q) && !drops {
            super::common::attention::attention(&q, &k, &v, cos, sin, key_bias, logits)?
        } else {
            composite_attention(&q, &k, &v, key_bias, logits, ctx, c.attention_dropout)?
        };
        let mut attended = self.attention_out.forward(&attended.reshape((b, t, h))?, ctx)?;
        let adapters = self.adapters.as_ref().filter(|_| ctx.adapters_on());
        if let Some((adapter, _)) = adapters {
            attended = adapter.forward(&attended, ctx)?;
        }
        let attended = self.attention_norm.forward(&(ctx.dropout(&attended, c.hidden_dropout)? + x)?)?;
        let inner = self.intermediate.forward(&attended, ctx)?;
        let inner = match c.activation {
            config::Activation::GeluErf => inner.gelu_erf()?,
            config::Activation::GeluTanh => inner.gelu()?,
            config::Activation::Relu => inner.relu()?,
        };
        let mut out = self.output.forward(&inner, ctx)?;
        if let Some((_, adapter)) = adapters {
            out = adapter.forward(&out, ctx)?;
        }
        self.output_norm.forward(&(ctx.dropout(&out, c.hidden_dropout)? + attended)?)
    }
}

/// Attention from differentiable composite ops, with dropout `p` on the probabilities in
/// training (as transformers' `BertSelfAttention`); also for dtypes and devices without the fused
/// kernel.
fn composite_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    logits: super::common::attention::Logits,
    ctx: &ForwardCtx,
    p: f32,
) -> Result<Tensor> {
    let (b, t, n, d) = q.dims4()?;
    let [q, k, v] = [q, k, v].map(|x| x.transpose(1, 2).and_then(|x| x.contiguous()));
    let (q, k, v) = (q?, k?, v?);
    let scores = logits.apply(&q.matmul(&k.t()?)?)?.broadcast_add(&key_bias.to_dtype(q.dtype())?)?;
    let probs = ctx.dropout(&candle_nn::ops::softmax(&scores, D::Minus1)?, p)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, n * d))
}

/// Checkpoint names brought to the task model's: a bare `BertModel` checkpoint gets the backbone
/// prefix under a head; a task checkpoint loses it for the bare model. Buffers
/// (`embeddings.position_ids`) are dropped.
fn normalize_names(weights: HashMap<String, Tensor>, config: &EncoderConfig, root: &str) -> HashMap<String, Tensor> {
    let backbone = format!("{}.", config.backbone_prefix());
    let bare = !weights.keys().any(|k| k.starts_with(&backbone));
    weights
        .into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, v)| {
            let backbone_part = if bare { Some(k.as_str()) } else { k.strip_prefix(&backbone) };
            match backbone_part {
                Some(rest) if is_backbone(rest) => (format!("{root}{rest}"), v),
                // A head (classifier) stays as it is.
                _ => (k, v),
            }
        })
        .collect()
}

fn is_backbone(name: &str) -> bool {
    name.starts_with("embeddings.") || name.starts_with("encoder.") || name.starts_with("pooler.")
}

#[cfg(test)]
mod tests;
