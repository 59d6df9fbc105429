//! Building a model from transformers-named weights: which tensors train under each adaptation,
//! LoRA on the linears, and new task heads initialised as transformers does (normal(0, 0.02)
//! weights, zero biases). Shared by the architectures that are not Llama-family decoders.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::linear::{Linear, LinearWeight, LoraWeights};
use super::params::{Param, TrainableParams};
use crate::models::adaptation::Adaptation;
use crate::models::weights::take;
use crate::peft::lora::{peft_names, LoraPlan};
use crate::rng::Rng;

/// transformers' `initializer_range` default, the standard deviation of new head weights.
const INIT_STD: f32 = 0.02;

pub struct Builder<'a> {
    pub weights: HashMap<String, Tensor>,
    /// A tensor of the weights' dtype and device, for new tensors.
    pub like: Tensor,
    pub adaptation: Adaptation<'a>,
    pub trainable: TrainableParams,
    pub rng: Rng,
}

impl Builder<'_> {
    fn full(&self) -> bool {
        matches!(self.adaptation, Adaptation::Full)
    }

    /// A backbone tensor (embedding, norm): trained only in full fine-tuning.
    pub fn param(&mut self, name: &str, shape: &[usize], decay: bool) -> Result<Param> {
        let tensor = take(&mut self.weights, name, shape)?;
        if self.full() {
            self.trainable.add(name, &tensor, decay)
        } else {
            Ok(Param::Frozen(tensor))
        }
    }

    /// A backbone linear with its bias, and a LoRA adapter when the plan targets it.
    pub fn linear(&mut self, module: &str, in_f: usize, out_f: usize) -> Result<Linear> {
        self.linear_with(module, in_f, out_f, true)
    }

    /// A backbone linear without a bias (T5), with LoRA when the plan targets it.
    pub fn linear_no_bias(&mut self, module: &str, in_f: usize, out_f: usize) -> Result<Linear> {
        self.linear_with(module, in_f, out_f, false)
    }

    fn linear_with(&mut self, module: &str, in_f: usize, out_f: usize, with_bias: bool) -> Result<Linear> {
        let weight = self.param(&format!("{module}.weight"), &[out_f, in_f], true)?;
        let bias = if with_bias { Some(self.param(&format!("{module}.bias"), &[out_f], false)?) } else { None };
        let lora = match self.adaptation {
            Adaptation::Lora(plan) if plan.targets(module) => Some(self.lora(plan, module, in_f, out_f)?),
            _ => None,
        };
        Ok(Linear { weight: LinearWeight::Dense(weight), bias, lora })
    }

    fn lora(&mut self, plan: &LoraPlan, module: &str, in_f: usize, out_f: usize) -> Result<LoraWeights> {
        let (a_name, b_name) = peft_names(module);
        let like = self.like.clone();
        let (a, b) = plan.initial_weights(module, in_f, out_f, &mut self.rng, &like, plan.config.rank_for(module))?;
        let (a, b) = if plan.trainable {
            (self.trainable.add(a_name, &a, true)?, self.trainable.add(b_name, &b, true)?)
        } else {
            (Param::Frozen(a), Param::Frozen(b))
        };
        Ok(LoraWeights { a, b, scale: plan.config.scale_for(module), dropout: plan.config.dropout })
    }

    /// A task-head linear: the checkpoint's (or a saved adapter's, PEFT `modules_to_save`) when its
    /// shape fits, else new. Trained under every training adaptation; frozen for inference.
    pub fn head_linear(&mut self, module: &str, in_f: usize, out_f: usize) -> Result<Linear> {
        let mut make = |suffix: &str, shape: &[usize]| -> Result<Param> {
            let name = format!("{module}.{suffix}");
            let saved = match self.adaptation {
                Adaptation::Lora(LoraPlan { loaded: Some(loaded), .. }) => {
                    loaded.get(&format!("base_model.model.{name}")).cloned()
                }
                Adaptation::Bottleneck(plan) => plan.loaded.as_ref().and_then(|l| l.get(&name).cloned()),
                _ => None,
            };
            let from_base = self.weights.remove(&name).filter(|t| t.dims() == shape);
            let tensor = match saved.or(from_base) {
                Some(t) if t.dims() == shape => t.to_device(self.like.device())?.to_dtype(self.like.dtype())?,
                Some(t) => candle_core::bail!("head tensor {name} has shape {:?}, expected {shape:?}", t.dims()),
                None => {
                    let values: Vec<f32> = match suffix {
                        "weight" => (0..shape.iter().product()).map(|_| normal(&mut self.rng) * INIT_STD).collect(),
                        _ => vec![0.0; shape.iter().product()],
                    };
                    Tensor::from_vec(values, shape, self.like.device())?.to_dtype(self.like.dtype())?
                }
            };
            let train = match self.adaptation {
                Adaptation::None => false,
                Adaptation::Full => true,
                Adaptation::Lora(plan) => plan.trainable,
                Adaptation::Bottleneck(plan) => plan.trainable,
                Adaptation::Prefix(plan) => plan.trainable,
            };
            if train {
                self.trainable.add(name, &tensor, suffix == "weight")
            } else {
                Ok(Param::Frozen(tensor))
            }
        };
        let weight = make("weight", &[out_f, in_f])?;
        let bias = make("bias", &[out_f])?;
        Ok(Linear { weight: LinearWeight::Dense(weight), bias: Some(bias), lora: None })
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut Rng) -> f32 {
    let u1 = rng.next_f32().max(f32::MIN_POSITIVE);
    let u2 = rng.next_f32();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}
