//! LoRA: which modules get adapters, how they start, and what they are called in PEFT's files.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// The LoRA hyperparameters, as PEFT's `LoraConfig` names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    #[serde(rename = "lora_alpha")]
    pub alpha: f64,
    #[serde(rename = "lora_dropout", default)]
    pub dropout: f32,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
}

/// A list of module names (matched as PEFT does: the whole name or its last dotted components),
/// or `all-linear` (every linear layer but the output head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Keyword(String),
}

impl LoraConfig {
    /// The factor applied to `B·A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether the module at `path` (e.g. `model.layers.0.self_attn.q_proj`) gets an adapter.
    pub fn targets(&self, path: &str) -> bool {
        match &self.target_modules {
            TargetModules::Keyword(k) if k == "all-linear" => path != "lm_head",
            TargetModules::Keyword(single) => path == single || path.ends_with(&format!(".{single}")),
            TargetModules::List(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.r == 0 {
            return Err("lora r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err("lora dropout must be in [0, 1)".into());
        }
        if self.alpha <= 0.0 {
            return Err("lora alpha must be positive".into());
        }
        match &self.target_modules {
            TargetModules::List(list) if list.is_empty() => Err("lora target_modules is empty".into()),
            TargetModules::Keyword(k) if k.is_empty() => Err("lora target_modules is empty".into()),
            _ => Ok(()),
        }
    }
}

/// How a model gets its adapters: fresh (seeded) or loaded, trained or frozen.
#[derive(Debug, Clone)]
pub struct LoraPlan {
    pub config: LoraConfig,
    pub seed: u64,
    pub trainable: bool,
    /// Also train the RMSNorm weights (saved as PEFT `modules_to_save`).
    pub train_norms: bool,
    /// Adapter tensors by PEFT name, when loading a saved adapter.
    pub loaded: Option<HashMap<String, Tensor>>,
}

impl LoraPlan {
    pub fn targets(&self, module: &str) -> bool {
        self.config.targets(module)
    }

    /// A and B for `module`: loaded, or PEFT's default (A Kaiming-uniform with a = √5, B zero).
    pub fn initial_weights(
        &self,
        module: &str,
        in_features: usize,
        out_features: usize,
        rng: &mut Rng,
        like: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let r = self.config.r;
        if let Some(loaded) = &self.loaded {
            let (a_name, b_name) = peft_names(module);
            let get = |name: &str, shape: (usize, usize)| -> Result<Tensor> {
                let t = loaded.get(name).ok_or_else(|| candle_core::Error::Msg(format!("adapter has no {name}")))?;
                if t.dims() != [shape.0, shape.1] {
                    candle_core::bail!("adapter tensor {name} has shape {:?}, expected {shape:?}", t.dims());
                }
                t.to_device(like.device())?.to_dtype(like.dtype())
            };
            return Ok((get(&a_name, (r, in_features))?, get(&b_name, (out_features, r))?));
        }
        // kaiming_uniform_(a=√5): bound = gain·√(3/fan_in), gain = √(2/(1+a²)) ⇒ bound = 1/√fan_in.
        let bound = 1.0 / (in_features as f32).sqrt();
        let values: Vec<f32> = (0..r * in_features).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
        let a = Tensor::from_vec(values, (r, in_features), like.device())?.to_dtype(like.dtype())?;
        let b = Tensor::zeros((out_features, r), like.dtype(), like.device())?;
        Ok((a, b))
    }
}

/// PEFT's saved names of a module's A and B.
pub fn peft_names(module: &str) -> (String, String) {
    (format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(targets: TargetModules) -> LoraConfig {
        LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, target_modules: targets, use_rslora: false }
    }

    #[test]
    fn targets_match_like_peft() {
        let list = config(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        assert!(list.targets("model.layers.0.self_attn.q_proj"));
        assert!(!list.targets("model.layers.0.self_attn.k_proj"));
        assert!(!list.targets("model.layers.0.self_attn.xq_proj"));
        let all = config(TargetModules::Keyword("all-linear".into()));
        assert!(all.targets("model.layers.3.mlp.down_proj"));
        assert!(!all.targets("lm_head"));
    }

    #[test]
    fn scale_is_alpha_over_r_or_over_sqrt_r() {
        let mut c = config(TargetModules::Keyword("all-linear".into()));
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert!((c.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }
}
