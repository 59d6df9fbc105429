//! Building a [`super::CausalLm`] from transformers-named weights: which tensors train under
//! each adaptation, block-quantized linears (QLoRA), and new or loaded LoRA weights.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Result, Tensor};

use super::Adaptation;
use crate::models::linear::{Linear, LinearWeight, LoraWeights};
use crate::models::params::{Param, TrainableParams};
use crate::models::weights::take;
use crate::peft::lora::LoraPlan;

pub(super) struct Builder<'a> {
    pub(super) weights: HashMap<String, Tensor>,
    /// Linear weights kept block-quantized (QLoRA), by transformers' name.
    pub(super) quantized: HashMap<String, Arc<QTensor>>,
    /// A tensor of the model's device and dtype (new adapter weights are made like it).
    pub(super) like: Tensor,
    pub(super) adaptation: Adaptation<'a>,
    pub(super) trainable: TrainableParams,
    pub(super) lora_init: crate::rng::Rng,
}

impl Builder<'_> {
    fn full(&self) -> bool {
        matches!(self.adaptation, Adaptation::Full)
    }

    /// A norm or embedding weight: trainable in full fine-tuning (and norms when LoRA asks).
    pub(super) fn param(&mut self, name: &str, shape: &[usize], decay: bool) -> Result<Param> {
        let mut tensor = take(&mut self.weights, name, shape)?;
        // A loaded adapter may carry trained norms (PEFT `modules_to_save`).
        if let Adaptation::Lora(LoraPlan { loaded: Some(loaded), .. }) = self.adaptation {
            if let Some(saved) = loaded.get(&format!("base_model.model.{name}")) {
                tensor = saved.to_device(tensor.device())?.to_dtype(tensor.dtype())?;
            }
        }
        // PEFT matches `modules_to_save` by suffix, so its `norm` also covers Qwen3's per-head
        // `q_norm`/`k_norm`: LoRA's trained norms are every module whose name ends in `norm`.
        let is_norm = name.ends_with("norm.weight");
        let train = self.full() || (is_norm && matches!(self.adaptation, Adaptation::Lora(p) if p.train_norms));
        if train {
            self.trainable.add(name, &tensor, decay)
        } else {
            Ok(Param::Frozen(tensor))
        }
    }

    pub(super) fn linear(&mut self, module: &str, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
        let weight_name = format!("{module}.weight");
        let weight = if let Some(q) = self.quantized.remove(&weight_name) {
            if q.shape().dims2()? != (out_f, in_f) {
                candle_core::bail!("{weight_name} has shape {:?}, expected ({out_f}, {in_f})", q.shape());
            }
            if self.full() {
                candle_core::bail!("full fine-tuning needs dense weights, but {weight_name} is quantized");
            }
            LinearWeight::Quantized(q)
        } else {
            let weight = take(&mut self.weights, &weight_name, &[out_f, in_f])?;
            LinearWeight::Dense(if self.full() {
                self.trainable.add(weight_name, &weight, true)?
            } else {
                Param::Frozen(weight)
            })
        };
        let bias = if bias {
            let name = format!("{module}.bias");
            let tensor = take(&mut self.weights, &name, &[out_f])?;
            Some(if self.full() { self.trainable.add(name, &tensor, false)? } else { Param::Frozen(tensor) })
        } else {
            None
        };
        let lora = match self.adaptation {
            Adaptation::Lora(plan) if plan.targets(module) => {
                let like = self.like.clone();
                Some(self.lora(plan, module, in_f, out_f, &like)?)
            }
            _ => None,
        };
        Ok(Linear { weight, bias, lora })
    }

    fn lora(&mut self, plan: &LoraPlan, module: &str, in_f: usize, out_f: usize, like: &Tensor) -> Result<LoraWeights> {
        let (a_name, b_name) = crate::peft::lora::peft_names(module);
        let (a, b) = plan.initial_weights(module, in_f, out_f, &mut self.lora_init, like)?;
        let (a, b) = if plan.trainable {
            (self.trainable.add(a_name, &a, true)?, self.trainable.add(b_name, &b, true)?)
        } else {
            (Param::Frozen(a), Param::Frozen(b))
        };
        Ok(LoraWeights { a, b, scale: plan.config.scale(), dropout: plan.config.dropout })
    }
}
