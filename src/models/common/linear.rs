//! A linear layer over a frozen or trainable weight, with an optional LoRA adapter applied
//! unmerged: `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Result, Tensor};

use super::ops::frozen_linear;
use super::params::Param;
use super::quantized::quantized_linear;
use crate::models::ForwardCtx;

/// A linear layer's weight: dense (frozen or trained) or frozen and block-quantized (QLoRA).
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Param),
    Quantized(Arc<QTensor>),
}

impl LinearWeight {
    /// `(out_features, in_features)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(p) => p.tensor().dims2(),
            Self::Quantized(q) => q.shape().dims2(),
        }
    }

    /// The weight as a dense tensor (dequantized when quantized).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(p) => Ok(p.tensor().clone()),
            Self::Quantized(q) => q.dequantize(&q.device()),
        }
    }
}

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
    pub weight: LinearWeight,
    pub bias: Option<Param>,
    pub lora: Option<LoraWeights>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut y = match &self.weight {
            LinearWeight::Dense(Param::Frozen(w)) => frozen_linear(x, w)?,
            LinearWeight::Dense(Param::Trainable(w)) => {
                let (out_features, in_features) = w.as_tensor().dims2()?;
                let mut dims = x.dims().to_vec();
                dims.pop();
                dims.push(out_features);
                x.reshape(((), in_features))?.matmul(&w.as_tensor().t()?)?.reshape(dims)?
            }
            LinearWeight::Quantized(q) => quantized_linear(x, q)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias.tensor())?;
        }
        if let Some(lora) = self.lora.as_ref().filter(|_| ctx.adapters_on()) {
            // As 2-D matmuls: a broadcast batched matmul would also sum the adapter's gradient
            // over a broadcast batch dimension in backward.
            let input = ctx.dropout(x, lora.dropout)?;
            let input = input.reshape(((), input.dim(candle_core::D::Minus1)?))?;
            let down = input.matmul(&lora.a.tensor().t()?)?;
            let up = (down.matmul(&(lora.b.tensor() * lora.scale)?.t()?)?).reshape(y.shape())?;
            y = (y + up)?;
        }
        Ok(y)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims2().map_or(0, |(out, _)| out)
    }

    /// The dense weight with the LoRA adapter folded in (`W + scale · B·A`), for writing a merged
    /// model; quantized weights are refused.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let LinearWeight::Dense(weight) = &self.weight else {
            candle_core::bail!("a quantized linear has no dense weight to merge into");
        };
        let weight = weight.tensor();
        match &self.lora {
            None => Ok(weight.clone()),
            Some(lora) => {
                let delta = (lora.b.tensor().matmul(lora.a.tensor())? * lora.scale)?;
                weight + delta.to_dtype(weight.dtype())?
            }
        }
    }
}
