//! Building a [`super::CausalLm`] from transformers-named weights: which tensors train under
//! each adaptation, block-quantized linears (QLoRA), and new or loaded LoRA weights.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Result, Tensor};

use super::block::{GateUp, Mlp};
use super::moe::{ExpertLora, ExpertProj, ExpertWeights, Moe};
use super::Adaptation;
use crate::models::common::linear::{Linear, LinearWeight, LoraWeights};
use crate::models::common::params::{Param, TrainableParams};
use crate::models::config::ModelConfig;
use crate::models::moe::{stacked_names, MoeConfig};
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
        // PEFT's `modules_to_save: ["gate"]` matches by suffix: the router and Qwen2-MoE's
        // `shared_expert_gate` (a linear, whose weight comes through here only when saved whole).
        let is_router = name.ends_with(".mlp.gate.weight") || name.ends_with(".mlp.shared_expert_gate.weight");
        let train = self.full()
            || (is_norm && matches!(self.adaptation, Adaptation::Lora(p) if p.train_norms))
            || (is_router && matches!(self.adaptation, Adaptation::Lora(p) if p.config.train_router));
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
        } else if module.ends_with(".mlp.shared_expert_gate") {
            // Trained or saved whole with the router (see `param`).
            LinearWeight::Dense(self.param(&weight_name, &[out_f, in_f], true)?)
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

    /// A gated MLP under `prefix` (`{prefix}.gate_proj`, ...), fused as Phi-3's when the model is.
    pub(super) fn mlp(&mut self, prefix: &str, config: &ModelConfig, inter: usize) -> Result<Mlp> {
        let (h, bias) = (config.hidden_size, config.mlp_bias);
        Ok(Mlp {
            gate_up: if config.fused_projections {
                GateUp::Fused(self.linear(&format!("{prefix}.gate_up_proj"), h, 2 * inter, bias)?)
            } else {
                GateUp::Separate {
                    gate: self.linear(&format!("{prefix}.gate_proj"), h, inter, bias)?,
                    up: self.linear(&format!("{prefix}.up_proj"), h, inter, bias)?,
                }
            },
            down: self.linear(&format!("{prefix}.down_proj"), inter, h, bias)?,
            gelu: config.gemma.is_some(),
        })
    }

    /// Layer `layer`'s mixture of experts (weights already stacked by [`crate::models::moe::to_stacked`]).
    pub(super) fn moe(&mut self, layer: usize, config: &ModelConfig, moe: &MoeConfig) -> Result<Moe> {
        let (h, inter, experts) = (config.hidden_size, moe.expert_intermediate, moe.num_experts);
        let p = format!("model.layers.{layer}.mlp");
        let router = self.param(&format!("{p}.gate.weight"), &[experts, h], true)?;
        let (gate_up_name, down_name) = stacked_names(layer);
        let gate_up = self.expert_weights(&gate_up_name, layer, moe, &[0, 1], [experts, 2 * inter, h])?;
        let down = self.expert_weights(&down_name, layer, moe, &[2], [experts, h, inter])?;
        // PEFT wraps the two parameters of one module in nested layers: when both are targeted the
        // gate-up adapter is the inner one (`experts.base_layer`), as PEFT 0.21 saves them.
        let (lora_gate_up, lora_down) = match self.adaptation {
            Adaptation::Lora(plan) => {
                (plan.config.targets_parameter(&gate_up_name), plan.config.targets_parameter(&down_name))
            }
            _ => (false, false),
        };
        let gate_up_module = if lora_down { format!("{p}.experts.base_layer") } else { format!("{p}.experts") };
        let gate_up_lora = match lora_gate_up {
            true => Some(self.expert_lora(&gate_up_module, &gate_up_name, experts, h, 2 * inter)?),
            false => None,
        };
        let down_lora = match lora_down {
            true => Some(self.expert_lora(&format!("{p}.experts"), &down_name, experts, inter, h)?),
            false => None,
        };
        // PEFT's LoRA on the router's weight (`target_parameters: ["gate.weight"]`, what Mixtral's
        // and Qwen3-MoE's `gate` target becomes): A `(r, hidden)`, B `(E, r)`.
        let router_lora = match self.adaptation {
            Adaptation::Lora(plan) if plan.config.targets_parameter(&format!("{p}.gate.weight")) => {
                Some(self.lora(plan, &format!("{p}.gate"), h, experts, &self.like.clone())?)
            }
            _ => None,
        };
        let shared = match moe.shared_intermediate {
            Some(size) => Some((
                self.mlp(&format!("{p}.shared_expert"), config, size)?,
                self.linear(&format!("{p}.shared_expert_gate"), h, 1, false)?,
            )),
            None => None,
        };
        Ok(Moe {
            router,
            router_lora,
            gate_up: ExpertProj { weight: gate_up, lora: gate_up_lora },
            down: ExpertProj { weight: down, lora: down_lora },
            shared,
            experts,
            top_k: moe.top_k,
            norm_topk: moe.norm_topk,
        })
    }

    /// A stacked expert weight `name` of `shape`: dense (trained in full fine-tuning), or, when the
    /// per-expert checkpoint weights (`parts` of [`MoeConfig::expert_weight_names`]) are
    /// block-quantized, those.
    fn expert_weights(
        &mut self,
        name: &str,
        layer: usize,
        moe: &MoeConfig,
        parts: &[usize],
        shape: [usize; 3],
    ) -> Result<ExpertWeights> {
        let first = &moe.expert_weight_names(layer, 0)[parts[0]];
        if self.quantized.contains_key(first) {
            if self.full() {
                candle_core::bail!("full fine-tuning needs dense weights, but {first} is quantized");
            }
            let mut experts = Vec::with_capacity(moe.num_experts);
            for e in 0..moe.num_experts {
                let names = moe.expert_weight_names(layer, e);
                let mut quantized = Vec::with_capacity(parts.len());
                for &part in parts {
                    let q = self
                        .quantized
                        .remove(&names[part])
                        .ok_or_else(|| candle_core::Error::Msg(format!("missing quantized weight {}", names[part])))?;
                    quantized.push(q);
                }
                experts.push(quantized);
            }
            return Ok(ExpertWeights::Quantized(experts));
        }
        let weight = take(&mut self.weights, name, &shape)?;
        Ok(ExpertWeights::Dense(if self.full() {
            self.trainable.add(name, &weight, true)?
        } else {
            Param::Frozen(weight)
        }))
    }

    /// PEFT's LoRA of a stacked expert weight (see [`ExpertLora`]) on `module`, new or loaded: A as
    /// `r·E` rows of PEFT's default init, B zero.
    fn expert_lora(
        &mut self,
        module: &str,
        param: &str,
        experts: usize,
        in_f: usize,
        out_f: usize,
    ) -> Result<ExpertLora> {
        let Adaptation::Lora(plan) = self.adaptation else { candle_core::bail!("expert LoRA without a LoRA plan") };
        let r = plan.config.rank_for(param);
        let like = self.like.clone();
        let (a, b) = plan.initial_weights(module, in_f, out_f, &mut self.lora_init, &like, r * experts)?;
        let (a_name, b_name) = crate::peft::lora::peft_names(module);
        let (a, b) = if plan.trainable {
            (self.trainable.add(a_name, &a, true)?, self.trainable.add(b_name, &b, true)?)
        } else {
            (Param::Frozen(a), Param::Frozen(b))
        };
        Ok(ExpertLora { a, b, r, scale: plan.config.scale_for(param) })
    }

    fn lora(&mut self, plan: &LoraPlan, module: &str, in_f: usize, out_f: usize, like: &Tensor) -> Result<LoraWeights> {
        let (a_name, b_name) = crate::peft::lora::peft_names(module);
        let (a, b) =
            plan.initial_weights(module, in_f, out_f, &mut self.lora_init, like, plan.config.rank_for(module))?;
        let (a, b) = if plan.trainable {
            (self.trainable.add(a_name, &a, true)?, self.trainable.add(b_name, &b, true)?)
        } else {
            (Param::Frozen(a), Param::Frozen(b))
        };
        Ok(LoraWeights { a, b, scale: plan.config.scale_for(module), dropout: plan.config.dropout })
    }
}
