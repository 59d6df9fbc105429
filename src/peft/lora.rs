//! LoRA: which modules get adapters, how they start, and what they are called in PEFT's files.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// PEFT's `target_parameters`: the stacked expert weights of mixture-of-experts layers
    /// (`gate_up_proj`, `down_proj`), each expert getting its own rank-`r` adapter.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_empty")]
    pub target_parameters: Vec<String>,
    /// Also train the mixture-of-experts routers (saved whole, PEFT `modules_to_save: ["gate"]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub train_router: bool,
    /// PEFT's per-module ranks and alphas, by pattern. Only PEFT's own suffix form (`.*\.NAME`, as
    /// its mixture-of-experts conversion writes for `gate_up_proj`) or a plain name is understood.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, f64>,
}

/// The name a PEFT rank/alpha pattern stands for: `.*\.NAME` or `NAME`; `None` for other regexes.
fn pattern_name(pattern: &str) -> Option<&str> {
    let name = pattern.strip_prefix(".*\\.").unwrap_or(pattern);
    let plain = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    plain.then_some(name)
}

/// `(v4 name, parameter it becomes)` pairs, and the two v4 names fused into `gate_up_proj`.
type MoeConversion = (&'static [(&'static str, &'static str)], [&'static str; 2]);

/// The v4 module names PEFT (on transformers 5) turns into expert parameters for a model type, and
/// the two that fuse into `gate_up_proj`: Mixtral's, and those of models converted like Qwen2-MoE
/// (Qwen3-MoE; Qwen2-MoE itself is not converted), after `peft.utils.transformers_weight_conversion`.
fn moe_conversion(model_type: &str) -> Option<MoeConversion> {
    match model_type {
        "mixtral" => Some((
            &[("gate", "gate.weight"), ("w1", "gate_up_proj"), ("w3", "gate_up_proj"), ("w2", "down_proj")],
            ["w1", "w3"],
        )),
        "qwen3_moe" => Some((
            &[
                ("gate", "gate.weight"),
                ("gate_proj", "gate_up_proj"),
                ("up_proj", "gate_up_proj"),
                ("down_proj", "down_proj"),
            ],
            ["gate_proj", "up_proj"],
        )),
        _ => None,
    }
}

/// A list of module names (matched as PEFT does: the whole name or its last dotted components),
/// or `all-linear` (every linear layer but the output head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Keyword(String),
}

/// PEFT writes `"target_parameters": null` when there are none.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(deserializer)?.unwrap_or_default())
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

    /// The rank of the module or parameter at `path` (`rank_pattern`, else `r`).
    pub fn rank_for(&self, path: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(p, _)| pattern_name(p).is_some_and(|n| path == n || path.ends_with(&format!(".{n}"))))
            .map_or(self.r, |(_, &r)| r)
    }

    /// The factor on `B·A` at `path`: its alpha (`alpha_pattern`, else `lora_alpha`) over its rank
    /// (or its square root with rsLoRA), as PEFT computes it.
    pub fn scale_for(&self, path: &str) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(p, _)| pattern_name(p).is_some_and(|n| path == n || path.ends_with(&format!(".{n}"))))
            .map_or(self.alpha, |(_, &a)| a);
        let r = self.rank_for(path) as f64;
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// The configuration PEFT (0.21, on transformers 5) actually applies to a `model_type` model
    /// whose `linear_modules` are those of [`crate::models::config::ModelConfig::linear_modules`]:
    /// for Mixtral and Qwen3-MoE, targets named like the v4 experts (`w1`/`w3`/`w2`,
    /// `gate_proj`/`up_proj`/`down_proj`, wherever they are, dense layers included) and the router
    /// (`gate`) become `target_parameters`, the fused gate-up one with twice the rank and alpha, and
    /// `all-linear` includes them all. Other models are returned unchanged. Adapters are trained
    /// and saved in this converted form, which PEFT loads as it is.
    ///
    /// With `train_router`, the routers train whole rather than with LoRA, and Qwen2-MoE's `shared_expert_gate` (which PEFT's `modules_to_save:
    /// ["gate"]` saves whole) is no LoRA target: PEFT cannot do both to one module.
    pub fn converted_for(&self, model_type: &str, linear_modules: &[&str]) -> std::result::Result<Self, String> {
        let conversion = moe_conversion(model_type);
        let shared_gate_whole = self.train_router && linear_modules.contains(&"shared_expert_gate");
        if conversion.is_none() && !shared_gate_whole {
            return Ok(self.clone());
        }
        // The targets as names; `all-linear` is the model's linear modules and, where PEFT converts
        // them, the v4 expert and router names too.
        let mut targets: Vec<String> = match &self.target_modules {
            TargetModules::List(list) => list.clone(),
            TargetModules::Keyword(k) if k == "all-linear" => {
                let old = conversion.iter().flat_map(|(mapping, _)| mapping.iter().map(|(old, _)| *old));
                linear_modules.iter().copied().chain(old).map(str::to_string).collect()
            }
            TargetModules::Keyword(single) => vec![single.clone()],
        };
        if shared_gate_whole {
            targets.retain(|m| m != "shared_expert_gate" && !m.ends_with(".shared_expert_gate"));
        }
        let Some((mapping, fused)) = conversion else {
            return Ok(Self { target_modules: TargetModules::List(targets), ..self.clone() });
        };
        let mut params: BTreeSet<String> = self.target_parameters.iter().cloned().collect();
        let mut remaining = Vec::new();
        let mut fused_seen = BTreeSet::new();
        for target in targets {
            match mapping.iter().find(|(old, _)| target == *old || target.ends_with(&format!(".{old}"))) {
                Some((old, new)) => {
                    params.insert(new.to_string());
                    if fused.contains(old) {
                        fused_seen.insert(*old);
                    }
                }
                None if !remaining.contains(&target) => remaining.push(target),
                None => {}
            }
        }
        let mut out = self.clone();
        match fused_seen.len() {
            1 => {
                let present = fused_seen.iter().next().expect("one");
                let missing = fused.iter().find(|f| *f != present).expect("two fused names");
                return Err(format!(
                    "lora target {present} cannot be adapted without {missing}: the two are fused into gate_up_proj \
                     in this model (as PEFT converts them)"
                ));
            }
            2 => {
                out.rank_pattern.insert(".*\\.gate_up_proj".into(), self.r * 2);
                out.alpha_pattern.insert(".*\\.gate_up_proj".into(), self.alpha * 2.0);
            }
            _ => {}
        }
        if self.train_router {
            // The router trains whole (`modules_to_save`), so it gets no LoRA as well.
            params.remove("gate.weight");
        }
        out.target_modules = TargetModules::List(remaining);
        out.target_parameters = params.into_iter().collect();
        Ok(out)
    }

    /// Whether the expert parameter at `path` (e.g. `model.layers.0.mlp.experts.down_proj`) gets
    /// an adapter (matched like PEFT: the whole name or its last dotted components).
    pub fn targets_parameter(&self, path: &str) -> bool {
        self.target_parameters.iter().any(|n| path == n || path.ends_with(&format!(".{n}")))
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
        if let Some(pattern) =
            self.rank_pattern.keys().chain(self.alpha_pattern.keys()).find(|p| pattern_name(p).is_none())
        {
            return Err(format!("lora rank/alpha pattern {pattern:?} is not supported (only PEFT's `.*\\.NAME` form)"));
        }
        match &self.target_modules {
            TargetModules::List(list) if list.is_empty() && self.target_parameters.is_empty() => {
                Err("lora target_modules is empty".into())
            }
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

    /// A `(rank, in)` and B `(out, rank)` for `module`: loaded, or PEFT's default (A
    /// Kaiming-uniform with a = √5, B zero). `rank` is `r`, or `r·E` for the stacked LoRA of `E`
    /// experts.
    pub fn initial_weights(
        &self,
        module: &str,
        in_features: usize,
        out_features: usize,
        rng: &mut Rng,
        like: &Tensor,
        rank: usize,
    ) -> Result<(Tensor, Tensor)> {
        let r = rank;
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
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: targets,
            use_rslora: false,
            target_parameters: Vec::new(),
            train_router: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        }
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

    /// What PEFT 0.21.2 made of `LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")` on a
    /// transformers 5.24 Qwen3-MoE with a dense layer: target_modules {q,k,v,o}_proj,
    /// target_parameters {gate_up_proj, gate.weight, down_proj}, rank_pattern and alpha_pattern
    /// `{".*\\.gate_up_proj": 4}` and `8`; Qwen2-MoE is left as it is.
    #[test]
    fn moe_targets_convert_as_peft_converts_them() {
        let mut c = config(TargetModules::Keyword("all-linear".into()));
        (c.r, c.alpha) = (2, 4.0);
        let modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        let converted = c.converted_for("qwen3_moe", &modules).unwrap();
        assert_eq!(
            converted.target_modules,
            TargetModules::List(vec!["q_proj".into(), "k_proj".into(), "v_proj".into(), "o_proj".into()])
        );
        assert_eq!(converted.target_parameters, ["down_proj", "gate.weight", "gate_up_proj"]);
        assert_eq!(converted.rank_for("model.layers.0.mlp.experts.gate_up_proj"), 4);
        assert_eq!(converted.rank_for("model.layers.0.mlp.experts.down_proj"), 2);
        assert_eq!(converted.scale_for("model.layers.0.mlp.experts.gate_up_proj"), 2.0);
        assert!(!converted.targets("model.layers.1.mlp.gate_proj"), "the dense layer's MLP is no longer a target");
        assert_eq!(c.converted_for("qwen2_moe", &modules).unwrap(), c);
        // Qwen2-MoE's shared-expert gate, saved whole with trained routers, is no LoRA target.
        let qwen2_moe: Vec<&str> = modules.iter().copied().chain(["shared_expert_gate"]).collect();
        let routed = LoraConfig { train_router: true, ..c.clone() }.converted_for("qwen2_moe", &qwen2_moe).unwrap();
        let TargetModules::List(targets) = &routed.target_modules else { panic!("expanded") };
        assert_eq!(targets.len(), 7);
        assert!(!routed.targets("model.layers.0.mlp.shared_expert_gate") && routed.train_router);
        // Mixtral's v4 names; half of a fused pair is refused, as PEFT refuses it.
        let list = config(TargetModules::List(vec!["q_proj".into(), "w1".into(), "w3".into(), "w2".into()]));
        let converted = list.converted_for("mixtral", &modules).unwrap();
        assert_eq!(converted.target_parameters, ["down_proj", "gate_up_proj"]);
        let half = config(TargetModules::List(vec!["w1".into()]));
        assert!(half.converted_for("mixtral", &modules).unwrap_err().contains("without w3"));
    }

    #[test]
    fn scale_is_alpha_over_r_or_over_sqrt_r() {
        let mut c = config(TargetModules::Keyword("all-linear".into()));
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert!((c.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }
}
