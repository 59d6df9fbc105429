//! A linear layer over a frozen or trainable weight, with an optional LoRA adapter applied
//! unmerged: `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`.

use candle_core::{Result, Tensor};

use super::ops::frozen_linear;
use super::params::Param;
use super::ForwardCtx;

#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// (r, in_features)
    pub a: Param,
    /// (out_features, r)
    pub b: Param,
    pub scale: f64,
    pub dropout: f32,
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub lora: Option<LoraWeights>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut y = match &self.weight {
            Param::Frozen(w) => frozen_linear(x, w)?,
            Param::Trainable(w) => x.broadcast_matmul(&w.as_tensor().t()?)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias.tensor())?;
        }
        if let Some(lora) = &self.lora {
            let input = ctx.dropout(x, lora.dropout)?;
            let down = input.broadcast_matmul(&lora.a.tensor().t()?)?;
            let up = down.broadcast_matmul(&lora.b.tensor().t()?)?;
            y = (y + (up * lora.scale)?)?;
        }
        Ok(y)
    }

    pub fn out_features(&self) -> usize {
        self.weight.tensor().dims()[0]
    }
}
