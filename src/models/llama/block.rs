//! One decoder layer: pre-norm grouped-query attention and a SwiGLU MLP, each optionally followed
//! by a bottleneck adapter, for the training forward (fused attention when it applies) and the
//! cached generation forward.

use candle_core::{Result, Tensor};

use crate::models::bottleneck::Bottleneck;
use crate::models::kv_cache::LayerCache;
use crate::models::linear::Linear;
use crate::models::ops::{apply_rope, repeat_kv, rms_norm};
use crate::models::params::Param;
use crate::models::ForwardCtx;

pub(super) struct Attention {
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// Qwen3's RMSNorm over each query and key head (weights of `head_dim`), before RoPE.
    pub(super) qk_norm: Option<(Param, Param)>,
    pub(super) eps: f64,
}

pub(super) struct Mlp {
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
}

pub(super) struct Block {
    pub(super) input_norm: Param,
    pub(super) attention: Attention,
    pub(super) post_norm: Param,
    pub(super) mlp: Mlp,
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
        eps: f64,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let normed = rms_norm(x, self.input_norm.tensor(), eps)?;
        let mut attended = self.attention.forward(&normed, cos, sin, mask, cache, prefix, ctx)?;
        let adapters = self.adapters.as_ref().filter(|_| ctx.adapters_on());
        if let Some((adapter, _)) = adapters {
            attended = adapter.forward(&attended, ctx)?;
        }
        let x = (x + attended)?;
        let normed = rms_norm(&x, self.post_norm.tensor(), eps)?;
        let mlp = &self.mlp;
        let gated = crate::models::fused::swiglu(&mlp.gate.forward(&normed, ctx)?, &mlp.up.forward(&normed, ctx)?)?;
        let mut out = mlp.down.forward(&gated, ctx)?;
        if let Some((_, adapter)) = adapters {
            out = adapter.forward(&out, ctx)?;
        }
        x + out
    }

    pub(super) fn linears(&self) -> [(&'static str, &Linear); 7] {
        let a = &self.attention;
        [
            ("q_proj", &a.q),
            ("k_proj", &a.k),
            ("v_proj", &a.v),
            ("o_proj", &a.o),
            ("gate_proj", &self.mlp.gate),
            ("up_proj", &self.mlp.up),
            ("down_proj", &self.mlp.down),
        ]
    }
}

impl Attention {
    /// Queries and keys (any layout with the head dimension last) through their per-head norms,
    /// where the architecture has them.
    pub(super) fn head_norms(&self, q: Tensor, k: Tensor) -> Result<(Tensor, Tensor)> {
        let Some((q_norm, k_norm)) = &self.qk_norm else { return Ok((q, k)) };
        Ok((rms_norm(&q, q_norm.tensor(), self.eps)?, rms_norm(&k, k_norm.tensor(), self.eps)?))
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
        if cache.is_none() && prefix.is_none() && crate::models::attention::supported(x) {
            // Training and evaluation: one fused node over the projections' own layout.
            let split = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim));
            let (q, k) = self.head_norms(
                split(self.q.forward(x, ctx)?, self.heads)?,
                split(self.k.forward(x, ctx)?, self.kv_heads)?,
            )?;
            let v = split(self.v.forward(x, ctx)?, self.kv_heads)?;
            let out = crate::models::attention::attention(&q, &k, &v, cos, sin, mask)?;
            return self.o.forward(&out, ctx);
        }
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let (q, k) = self
            .head_norms(heads(self.q.forward(x, ctx)?, self.heads)?, heads(self.k.forward(x, ctx)?, self.kv_heads)?)?;
        let q = apply_rope(&q, cos, sin)?;
        let mut k = apply_rope(&k, cos, sin)?;
        let mut v = heads(self.v.forward(x, ctx)?, self.kv_heads)?;
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
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = crate::models::fused::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&out, ctx)
    }
}
