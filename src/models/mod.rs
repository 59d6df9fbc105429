//! Trainable decoder-only language models (the Llama family), written on candle-core with
//! differentiable ops, loading Hugging Face configs and safetensors. No HTTP, no SQL.

pub mod attention;
pub mod bottleneck;
pub mod config;
pub mod fastmath;
pub mod fused;
pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mask;
pub mod ops;
pub mod params;
pub mod prefix;
pub mod q4_1;
pub mod quantized;
pub mod rope;
pub mod weights;

use std::cell::RefCell;

use candle_core::{Result, Tensor};

use crate::rng::Rng;

/// Per-forward state: whether dropout is active, the generator it draws from, and whether the
/// adapters take part.
pub struct ForwardCtx {
    dropout_rng: Option<RefCell<Rng>>,
    adapters_off: bool,
}

impl ForwardCtx {
    /// No dropout: evaluation and generation.
    pub fn inference() -> Self {
        Self { dropout_rng: None, adapters_off: false }
    }

    /// The base model alone: no dropout, and LoRA, bottleneck and prefix adapters are skipped, so
    /// the same weights give the frozen model's outputs (DPO's reference policy, without a copy).
    pub fn base_only() -> Self {
        Self { dropout_rng: None, adapters_off: true }
    }

    /// Dropout active, drawing masks from `rng` (its state advances).
    pub fn training(rng: Rng) -> Self {
        Self { dropout_rng: Some(RefCell::new(rng)), adapters_off: false }
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
        Self { dropout_rng: state.map(RefCell::new), adapters_off: false }
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
