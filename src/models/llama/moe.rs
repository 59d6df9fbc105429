//! The mixture-of-experts feed-forward layer (Mixtral, Qwen2-MoE, Qwen3-MoE): a router scores the
//! experts per token; each token goes through its top-k experts (SwiGLU MLPs), weighted by their
//! softmax probabilities (renormalized over the k when the model says so). Tokens are dispatched by
//! gathering each expert's rows, so an expert computes only the tokens routed to it, forward and
//! backward; the outputs are gathered back per token and summed with the routing weights.
//! Qwen2-MoE adds a shared expert on every token, scaled by `sigmoid(shared_expert_gate(x))`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor, D};

use super::block::{Apply, Mlp};
use crate::models::common::linear::{Linear, LoraWeights};
use crate::models::common::ops::frozen_linear;
use crate::models::common::params::Param;
use crate::models::common::quantized::quantized_linear;
use crate::models::moe::RoutingStats;
use crate::models::ForwardCtx;

/// Nanoseconds spent in MoE layers' forwards, in all and in the experts' own projections (the
/// rest is routing and dispatch), for `ferrotune bench train`.
static FORWARD_NS: AtomicU64 = AtomicU64::new(0);
static EXPERT_NS: AtomicU64 = AtomicU64::new(0);

/// Adds the time from its start to its drop to a counter.
struct Timed(&'static AtomicU64, Instant);

impl Timed {
    fn start(counter: &'static AtomicU64) -> Self {
        Self(counter, Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.0.fetch_add(self.1.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// `(all, experts)` seconds spent in MoE layers' forwards since the last call (then reset).
pub fn take_forward_seconds() -> (f64, f64) {
    let all = FORWARD_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9;
    (all, EXPERT_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9)
}

/// One stacked expert weight: `(E, out, in)` dense, or per expert its block-quantized parts (QLoRA;
/// the gate and up weights are two parts whose outputs are concatenated).
pub(super) enum ExpertWeights {
    Dense(Param),
    Quantized(Vec<Vec<Arc<QTensor>>>),
}

impl ExpertWeights {
    /// `x · W[e]ᵀ`.
    fn forward(&self, e: usize, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(Param::Frozen(w)) => frozen_linear(x, &w.get(e)?),
            Self::Dense(Param::Trainable(w)) => x.matmul(&w.as_tensor().get(e)?.t()?),
            Self::Quantized(experts) => {
                let parts = experts[e].iter().map(|q| quantized_linear(x, q)).collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, D::Minus1)
            }
        }
    }

    /// The whole stack `(E, out, in)`, dequantized when quantized.
    pub(super) fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(p) => Ok(p.tensor().clone()),
            Self::Quantized(experts) => {
                let stacked = experts
                    .iter()
                    .map(|parts| {
                        let parts = parts.iter().map(|q| q.dequantize(&q.device())).collect::<Result<Vec<_>>>()?;
                        Tensor::cat(&parts, 0)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&stacked, 0)
            }
        }
    }
}

/// PEFT's LoRA on a stacked expert weight (`target_parameters`): `A (r·E, in)`, expert `e`'s rows
/// `e·r .. e·r + r`; `B (out, r·E)`, which PEFT reads as `(out, r, E)`, so expert `e`'s columns are
/// `e, e + E, e + 2E, ...`. Expert `e`'s weight is `W[e] + scale · B_e · A_e`.
pub(super) struct ExpertLora {
    pub(super) a: Param,
    pub(super) b: Param,
    pub(super) r: usize,
    pub(super) scale: f64,
}

impl ExpertLora {
    /// Per-expert factors for one forward: `A (E, r, in)` and `scale · B (E, out, r)`.
    fn factors(&self, experts: usize) -> Result<(Tensor, Tensor)> {
        let (a, b) = (self.a.tensor(), self.b.tensor());
        let a = a.reshape((experts, self.r, a.dim(1)?))?;
        let b = (b.reshape((b.dim(0)?, self.r, experts))?.permute((2, 0, 1))?.contiguous()? * self.scale)?;
        Ok((a, b))
    }

    /// `(E, in, out)`: every expert's `scale · (B_e · A_e)ᵀ`, to fold into a base weight.
    pub(super) fn delta_t(&self, experts: usize) -> Result<Tensor> {
        let (a, b) = self.factors(experts)?;
        a.transpose(1, 2)?.contiguous()?.matmul(&b.transpose(1, 2)?.contiguous()?)
    }
}

/// A stacked projection and its optional LoRA.
pub(super) struct ExpertProj {
    pub(super) weight: ExpertWeights,
    pub(super) lora: Option<ExpertLora>,
}

/// Which expert projection a serving hook is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProjKind {
    GateUp,
    Down,
}

/// Per-row adapters of batched serving: deltas added to an expert projection's output for the rows
/// whose adapter has expert LoRA, and to the router's logits for rows whose adapter trained it.
pub(super) struct MoeHooks<'a> {
    /// `(kind, expert, input rows, their indices in the batch, base output) -> output`.
    #[allow(clippy::type_complexity)]
    pub(super) expert: &'a dyn Fn(ProjKind, usize, &Tensor, &[u32], Tensor) -> Result<Tensor>,
    /// `(input, base logits) -> logits`.
    pub(super) router: &'a dyn Fn(&Tensor, Tensor) -> Result<Tensor>,
}

pub(super) struct Moe {
    /// `(E, hidden)`.
    pub(super) router: Param,
    /// LoRA on the router's weight.
    pub(super) router_lora: Option<LoraWeights>,
    pub(super) gate_up: ExpertProj,
    pub(super) down: ExpertProj,
    /// Qwen2-MoE: the shared expert and its `(1, hidden)` gate.
    pub(super) shared: Option<(Mlp, Linear)>,
    pub(super) experts: usize,
    pub(super) top_k: usize,
    pub(super) norm_topk: bool,
}

impl Moe {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        apply: &Apply<'_>,
        hooks: Option<&MoeHooks<'_>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let _timed = Timed::start(&FORWARD_NS);
        let dims = x.dims().to_vec();
        let hidden = *dims.last().expect("rank >= 1");
        let x2 = x.reshape(((), hidden))?;
        let n = x2.dim(0)?;
        let mut logits = match &self.router {
            Param::Frozen(w) => frozen_linear(&x2, w)?,
            Param::Trainable(w) => x2.matmul(&w.as_tensor().t()?)?,
        };
        if let Some(lora) = self.router_lora.as_ref().filter(|_| ctx.adapters_on()) {
            let down = x2.matmul(&lora.a.tensor().t()?)?;
            logits = (logits + down.matmul(&(lora.b.tensor() * lora.scale)?.t()?)?)?;
        }
        if let Some(hooks) = hooks {
            logits = (hooks.router)(&x2, logits)?;
        }
        // As transformers: the softmax in f32 whatever the model's dtype.
        let probs = crate::models::common::fused::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let picked = top_k(&probs.to_vec2::<f32>()?, self.top_k);
        self.record(&probs, &picked, ctx)?;
        let index = Tensor::from_slice(&picked, (n, self.top_k), x.device())?;
        let mut weights = probs.gather(&index, 1)?;
        if self.norm_topk {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        // Each expert's tokens, and where each (token, slot) lands among the experts' outputs.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts];
        let mut slots: Vec<Vec<usize>> = vec![Vec::new(); self.experts];
        for (i, &e) in picked.iter().enumerate() {
            rows[e as usize].push((i / self.top_k) as u32);
            slots[e as usize].push(i);
        }
        let factors = |lora: &Option<ExpertLora>| lora.as_ref().map(|l| l.factors(self.experts)).transpose();
        let (gate_up_lora, down_lora) = match ctx.adapters_on() {
            true => (factors(&self.gate_up.lora)?, factors(&self.down.lora)?),
            false => (None, None),
        };
        let mut outputs = Vec::with_capacity(self.experts);
        let mut position = vec![0u32; n * self.top_k];
        let mut offset = 0usize;
        for e in 0..self.experts {
            if rows[e].is_empty() {
                continue;
            }
            let index = Tensor::from_slice(&rows[e], rows[e].len(), x.device())?;
            let input = x2.index_select(&index, 0)?;
            let timed = Timed::start(&EXPERT_NS);
            let project = |proj: &ExpertProj, lora: &Option<(Tensor, Tensor)>, kind: ProjKind, input: &Tensor| {
                let mut y = proj.weight.forward(e, input)?;
                if let Some((a, b)) = lora {
                    // PEFT's parameter LoRA has no dropout.
                    y = (y + input.matmul(&a.get(e)?.t()?)?.matmul(&b.get(e)?.t()?)?)?;
                }
                match hooks {
                    Some(hooks) => (hooks.expert)(kind, e, input, &rows[e], y),
                    None => Ok(y),
                }
            };
            let both = project(&self.gate_up, &gate_up_lora, ProjKind::GateUp, &input)?;
            let half = both.dim(1)? / 2;
            let gated = crate::models::common::fused::swiglu(&both.narrow(1, 0, half)?, &both.narrow(1, half, half)?)?;
            outputs.push(project(&self.down, &down_lora, ProjKind::Down, &gated)?);
            drop(timed);
            for (k, &slot) in slots[e].iter().enumerate() {
                position[slot] = (offset + k) as u32;
            }
            offset += rows[e].len();
        }
        let all = Tensor::cat(&outputs, 0)?;
        let position = Tensor::from_vec(position, n * self.top_k, x.device())?;
        let per_slot = all.index_select(&position, 0)?.reshape((n, self.top_k, hidden))?;
        let weights = weights.to_dtype(x.dtype())?.unsqueeze(2)?;
        let mut out = per_slot.broadcast_mul(&weights)?.sum(1)?;
        if let Some((mlp, gate)) = &self.shared {
            let shared = {
                let _timed = Timed::start(&EXPERT_NS);
                mlp.forward(&x2, apply)?
            };
            let g = apply("shared_expert_gate", gate, &x2)?;
            // sigmoid(g) = 1 / (1 + exp(-g)), from differentiable ops.
            let sigmoid = (g.neg()?.exp()? + 1.0)?.recip()?;
            out = (out + shared.broadcast_mul(&sigmoid)?)?;
        }
        out.reshape(dims)
    }

    /// The load-balancing statistics of this layer, when the forward collects them.
    fn record(&self, probs: &Tensor, picked: &[u32], ctx: &ForwardCtx) -> Result<()> {
        if !ctx.collects_routing() {
            return Ok(());
        }
        let n = probs.dim(0)?;
        ctx.record_routing(|weights| {
            let weight = |t: usize| weights.map_or(1.0, |w| w.get(t).copied().unwrap_or(0.0));
            let mut counts = vec![0f64; self.experts];
            for (i, &e) in picked.iter().enumerate() {
                counts[e as usize] += f64::from(weight(i / self.top_k));
            }
            let prob_sums = match weights {
                None => probs.sum(0)?,
                Some(w) => {
                    let w = Tensor::from_slice(w, w.len(), probs.device())?;
                    w.unsqueeze(0)?.matmul(probs)?.squeeze(0)?
                }
            };
            let rows = (0..n).map(|t| f64::from(weight(t))).sum();
            Ok(RoutingStats { prob_sums, counts, rows })
        })
    }
}

/// Each row's `k` largest entries' indices, largest first (ties to the lower index), flattened.
fn top_k(probs: &[Vec<f32>], k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(probs.len() * k);
    for row in probs {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        out.extend_from_slice(&order[..k]);
    }
    out
}
