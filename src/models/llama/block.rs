//! One decoder layer: pre-norm grouped-query attention and a gated MLP (SwiGLU, or Gemma's
//! tanh-GELU; separate or fused projections), with Gemma's norms after each sublayer too, each
//! optionally followed by a bottleneck adapter, for the training forward (fused attention when it
//! applies) and the cached generation forward.

use candle_core::{Result, Tensor, D};

use crate::models::bottleneck::Bottleneck;
use crate::models::common::attention::Logits;
use crate::models::common::linear::Linear;
use crate::models::common::ops::{apply_rope, repeat_kv, rms_norm};
use crate::models::common::params::Param;
use crate::models::kv_cache::LayerCache;
use crate::models::ForwardCtx;

use super::moe::{Moe, MoeHooks};

/// Applies one linear module (by its PEFT name) to an input: plainly in training, with each row's
/// adapter delta in batched serving.
pub(super) type Apply<'a> = dyn Fn(&'static str, &Linear, &Tensor) -> Result<Tensor> + 'a;

/// The query, key and value projections: three linears, or Phi-3's one `qkv_proj` whose output
/// holds the queries, keys and values in that order.
pub(super) enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The MLP's gate and up projections: two linears, or Phi-3's one `gate_up_proj` (gate first).
pub(super) enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

pub(super) struct Attention {
    pub(super) qkv: Qkv,
    pub(super) o: Linear,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// Qwen3's and Gemma 3's RMSNorm over each query and key head (weights of `head_dim`), before
    /// RoPE.
    pub(super) qk_norm: Option<(Param, Param)>,
    pub(super) norm: NormStyle,
    pub(super) logits: Logits,
}

/// How the layer's RMSNorms scale: by `w`, or (Gemma) by `1 + w`.
#[derive(Debug, Clone, Copy)]
pub(super) struct NormStyle {
    pub(super) eps: f64,
    pub(super) offset: f64,
}

impl NormStyle {
    pub(super) fn apply(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        if self.offset == 0.0 {
            rms_norm(x, weight, self.eps)
        } else {
            rms_norm(x, &(weight + self.offset)?, self.eps)
        }
    }
}

pub(super) struct Mlp {
    pub(super) gate_up: GateUp,
    pub(super) down: Linear,
    /// Gemma: the gate goes through tanh-approximated GELU instead of SiLU.
    pub(super) gelu: bool,
}

impl Mlp {
    /// `down(act(gate(x)) · up(x))`.
    pub(super) fn forward(&self, x: &Tensor, apply: &Apply<'_>) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (apply("gate_proj", gate, x)?, apply("up_proj", up, x)?),
            GateUp::Fused(linear) => {
                let both = apply("gate_up_proj", linear, x)?;
                let half = both.dim(D::Minus1)? / 2;
                (both.narrow(D::Minus1, 0, half)?, both.narrow(D::Minus1, half, half)?)
            }
        };
        let gated = if self.gelu { (gate.gelu()? * up)? } else { crate::models::common::fused::swiglu(&gate, &up)? };
        apply("down_proj", &self.down, &gated)
    }

    /// The linears under `paths` (gate, up, fused gate-up, down).
    fn linears(&self, [gate_path, up_path, fused_path, down_path]: [&'static str; 4]) -> Vec<(&'static str, &Linear)> {
        let mut out = match &self.gate_up {
            GateUp::Separate { gate, up } => vec![(gate_path, gate), (up_path, up)],
            GateUp::Fused(gate_up) => vec![(fused_path, gate_up)],
        };
        out.push((down_path, &self.down));
        out
    }
}

/// A layer's feed-forward part: a gated MLP, or a mixture of experts.
pub(super) enum FeedForward {
    Dense(Box<Mlp>),
    Moe(Box<Moe>),
}

impl FeedForward {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        apply: &Apply<'_>,
        hooks: Option<&MoeHooks<'_>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x, apply),
            Self::Moe(moe) => moe.forward(x, apply, hooks, ctx),
        }
    }

    /// The linear modules by their path under the layer.
    fn linears(&self) -> Vec<(&'static str, &Linear)> {
        match self {
            Self::Dense(mlp) => mlp.linears(["mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
            Self::Moe(moe) => match &moe.shared {
                Some((mlp, gate)) => {
                    let mut out = mlp.linears([
                        "mlp.shared_expert.gate_proj",
                        "mlp.shared_expert.up_proj",
                        "mlp.shared_expert.gate_up_proj",
                        "mlp.shared_expert.down_proj",
                    ]);
                    out.push(("mlp.shared_expert_gate", gate));
                    out
                }
                None => Vec::new(),
            },
        }
    }
}

pub(super) struct Block {
    pub(super) input_norm: Param,
    pub(super) attention: Attention,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub(super) post_norm: Param,
    /// Gemma: norms of the attention's and the MLP's outputs (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`).
    pub(super) output_norms: Option<(Param, Param)>,
    pub(super) mlp: FeedForward,
    /// Gemma's sliding layers: the window this layer alone attends within (with its own mask and,
    /// for Gemma 3, its own RoPE tables).
    pub(super) window: Option<usize>,
    /// Bottleneck adapters after the attention and after the MLP.
    pub(super) adapters: Option<(Bottleneck, Bottleneck)>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<(&mut Option<LayerCache>, usize)>,
        prefix: Option<&(Tensor, Tensor)>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let norm = self.attention.norm;
        let normed = norm.apply(x, self.input_norm.tensor())?;
        let mut attended = self.attention.forward(&normed, cos, sin, mask, cache, prefix, ctx)?;
        if let Some((after_attention, _)) = &self.output_norms {
            attended = norm.apply(&attended, after_attention.tensor())?;
        }
        let adapters = self.adapters.as_ref().filter(|_| ctx.adapters_on());
        if let Some((adapter, _)) = adapters {
            attended = adapter.forward(&attended, ctx)?;
        }
        let x = (x + attended)?;
        let normed = norm.apply(&x, self.post_norm.tensor())?;
        let mut out = self.mlp.forward(&normed, &|_, linear: &Linear, x: &Tensor| linear.forward(x, ctx), None, ctx)?;
        if let Some((_, after_mlp)) = &self.output_norms {
            out = norm.apply(&out, after_mlp.tensor())?;
        }
        if let Some((_, adapter)) = adapters {
            out = adapter.forward(&out, ctx)?;
        }
        x + out
    }

    /// The name of the norm before the MLP (`post_norm`).
    pub(super) fn post_norm_name(&self) -> &'static str {
        if self.output_norms.is_some() {
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        }
    }

    /// The layer's norms by their path under the layer (`input_layernorm`, `self_attn.q_norm`, ...).
    pub(super) fn norms(&self) -> Vec<(&'static str, &Param)> {
        let mut out = vec![("input_layernorm", &self.input_norm), (self.post_norm_name(), &self.post_norm)];
        if let Some((after_attention, after_mlp)) = &self.output_norms {
            out.extend([("post_attention_layernorm", after_attention), ("post_feedforward_layernorm", after_mlp)]);
        }
        if let Some((q_norm, k_norm)) = &self.attention.qk_norm {
            out.extend([("self_attn.q_norm", q_norm), ("self_attn.k_norm", k_norm)]);
        }
        out
    }

    /// The layer's linear modules by their path under the layer (`self_attn.q_proj`, ...).
    pub(super) fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut out = match &self.attention.qkv {
            Qkv::Separate { q, k, v } => {
                vec![("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v)]
            }
            Qkv::Fused(qkv) => vec![("self_attn.qkv_proj", qkv)],
        };
        out.push(("self_attn.o_proj", &self.attention.o));
        out.extend(self.mlp.linears());
        out
    }
}

impl Attention {
    /// Queries, keys and values `(..., heads·head_dim)`, `(..., kv_heads·head_dim)` twice.
    pub(super) fn project(&self, x: &Tensor, apply: &Apply<'_>) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            Qkv::Separate { q, k, v } => Ok((apply("q_proj", q, x)?, apply("k_proj", k, x)?, apply("v_proj", v, x)?)),
            Qkv::Fused(linear) => {
                let all = apply("qkv_proj", linear, x)?;
                let (q_width, kv_width) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                let part = |start: usize, width: usize| all.narrow(D::Minus1, start, width)?.contiguous();
                Ok((part(0, q_width)?, part(q_width, kv_width)?, part(q_width + kv_width, kv_width)?))
            }
        }
    }

    /// Queries and keys (any layout with the head dimension last) through their per-head norms,
    /// where the architecture has them.
    pub(super) fn head_norms(&self, q: Tensor, k: Tensor) -> Result<(Tensor, Tensor)> {
        let Some((q_norm, k_norm)) = &self.qk_norm else { return Ok((q, k)) };
        Ok((self.norm.apply(&q, q_norm.tensor())?, self.norm.apply(&k, k_norm.tensor())?))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<(&mut Option<LayerCache>, usize)>,
        prefix: Option<&(Tensor, Tensor)>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, &|_, linear: &Linear, x: &Tensor| linear.forward(x, ctx))?;
        if cache.is_none() && prefix.is_none() && crate::models::common::attention::supported(x) {
            // Training and evaluation: one fused node over the projections' own layout.
            let split = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim));
            let (q, k) = self.head_norms(split(q, self.heads)?, split(k, self.kv_heads)?)?;
            let v = split(v, self.kv_heads)?;
            let out = crate::models::common::attention::attention(&q, &k, &v, cos, sin, mask, self.logits)?;
            return self.o.forward(&out, ctx);
        }
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let (q, k) = self.head_norms(heads(q, self.heads)?, heads(k, self.kv_heads)?)?;
        let q = apply_rope(&q, cos, sin)?;
        let mut k = apply_rope(&k, cos, sin)?;
        let mut v = heads(v, self.kv_heads)?;
        if let Some((slot, max)) = cache {
            (k, v) = LayerCache::append(slot, &k, &v, max)?;
        }
        if let Some((prefix_k, prefix_v)) = prefix {
            let (_, kv, n, d) = prefix_k.dims4()?;
            k = Tensor::cat(&[&prefix_k.broadcast_as((b, kv, n, d))?.contiguous()?, &k], 2)?;
            v = Tensor::cat(&[&prefix_v.broadcast_as((b, kv, n, d))?.contiguous()?, &v], 2)?;
        }
        let groups = self.heads / self.kv_heads;
        let k = repeat_kv(&k, groups)?;
        let v = repeat_kv(&v, groups)?;
        let scores = self.logits.apply(&q.matmul(&k.t()?)?)?.broadcast_add(mask)?;
        let probs = crate::models::common::fused::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&out, ctx)
    }
}
