//! Trainable models written on candle-core with differentiable ops, loading Hugging Face configs
//! and safetensors: one folder per architecture (`llama`: the Llama-family decoders with their
//! config, mixture of experts, GGUF loading and prefix tuning; `bert`: encoders and task heads)
//! over the pieces in `common`. Depends on `peft` for LoRA settings, never the other way. No HTTP,
//! no SQL.

pub mod adaptation;
pub mod bert;
pub mod bottleneck;
pub mod common;
pub mod config;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod moe;
pub mod prefix;
pub mod t5;
pub mod weights;

use std::cell::RefCell;

use candle_core::{Result, Tensor};

use crate::rng::Rng;

/// Per-forward state: whether dropout is active, the generator it draws from, and whether the
/// adapters take part.
pub struct ForwardCtx {
    dropout_rng: Option<RefCell<Rng>>,
    adapters_off: bool,
    /// Mixture-of-experts layers' routing, kept when asked for (the load-balancing loss).
    routing: Option<RefCell<Routing>>,
}

/// What [`ForwardCtx::collect_routing`] gathers.
struct Routing {
    /// Per token of the forward (`b·t`, row-major), 1 where it counts, 0 for padding; `None`: all.
    weights: Option<Vec<f32>>,
    stats: Vec<moe::RoutingStats>,
}

impl ForwardCtx {
    /// No dropout: evaluation and generation.
    pub fn inference() -> Self {
        Self { dropout_rng: None, adapters_off: false, routing: None }
    }

    /// The base model alone: no dropout, and LoRA, bottleneck and prefix adapters are skipped, so
    /// the same weights give the frozen model's outputs (DPO's reference policy, without a copy).
    pub fn base_only() -> Self {
        Self { dropout_rng: None, adapters_off: true, routing: None }
    }

    /// Dropout active, drawing masks from `rng` (its state advances).
    pub fn training(rng: Rng) -> Self {
        Self { dropout_rng: Some(RefCell::new(rng)), adapters_off: false, routing: None }
    }

    /// Keeps every MoE layer's routing statistics over the tokens whose `weights` are 1 (all tokens
    /// when `None`), for [`moe::load_balancing_loss`].
    pub fn collect_routing(mut self, weights: Option<Vec<f32>>) -> Self {
        self.routing = Some(RefCell::new(Routing { weights, stats: Vec::new() }));
        self
    }

    /// Whether routing statistics are wanted.
    pub fn collects_routing(&self) -> bool {
        self.routing.is_some()
    }

    /// Records one MoE layer's routing: `stats` gets the per-token weights (see
    /// [`ForwardCtx::collect_routing`]).
    pub fn record_routing(&self, stats: impl FnOnce(Option<&[f32]>) -> Result<moe::RoutingStats>) -> Result<()> {
        let Some(routing) = &self.routing else { return Ok(()) };
        let mut routing = routing.borrow_mut();
        let recorded = stats(routing.weights.as_deref())?;
        routing.stats.push(recorded);
        Ok(())
    }

    /// The routing statistics recorded so far (emptied).
    pub fn take_routing(&self) -> Vec<moe::RoutingStats> {
        self.routing.as_ref().map(|r| std::mem::take(&mut r.borrow_mut().stats)).unwrap_or_default()
    }

    /// Whether dropout is active (training).
    pub fn drops(&self) -> bool {
        self.dropout_rng.is_some()
    }

    /// Whether adapters are applied in this forward.
    pub fn adapters_on(&self) -> bool {
        !self.adapters_off
    }

    /// The dropout generator's state now (`None` without dropout), to replay this forward from
    /// here with [`ForwardCtx::replay`].
    pub fn rng_state(&self) -> Option<Rng> {
        self.dropout_rng.as_ref().map(|rng| rng.borrow().clone())
    }

    /// A context that draws the same dropout masks as the one `state` was taken from.
    pub fn replay(state: Option<Rng>) -> Self {
        Self { dropout_rng: state.map(RefCell::new), adapters_off: false, routing: None }
    }

    /// The generator's state after this forward, to carry to the next step.
    pub fn into_rng(self) -> Option<Rng> {
        self.dropout_rng.map(RefCell::into_inner)
    }

    /// Inverted dropout with probability `p`; the identity outside training.
    pub fn dropout(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        let Some(rng) = &self.dropout_rng else { return Ok(x.clone()) };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - p);
        let mut rng = rng.borrow_mut();
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.next_f32() < p { 0.0 } else { keep }).collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}
