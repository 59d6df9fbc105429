//! Fine-tuning hyperparameters as clients send them (OpenAI's, each a number or `"auto"`, plus
//! ours in the same object), their validation, and their resolution once the data is known.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::train::preference::{DpoSettings, PreferenceLoss};

/// A number or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(untagged)]
pub enum AutoOr<T> {
    #[default]
    #[serde(with = "auto_keyword")]
    Auto,
    Value(T),
}

mod auto_keyword {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("auto")
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let text = String::deserialize(d)?;
        if text == "auto" {
            Ok(())
        } else {
            Err(serde::de::Error::custom(format!("expected a number or \"auto\", got {text:?}")))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainingType {
    Full,
    #[default]
    Lora,
    /// LoRA over a frozen base kept block-quantized in memory.
    Qlora,
    /// Bottleneck (Houlsby) adapters after attention and MLP, base frozen.
    Bottleneck,
    /// Prefix tuning: trained key/value vectors before every input, base frozen.
    Prefix,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub dropout: Option<f32>,
    pub target_modules: Option<Value>,
    pub use_rslora: Option<bool>,
    /// Mixture-of-experts models: the stacked expert weights to adapt (PEFT `target_parameters`).
    pub target_parameters: Option<Vec<String>>,
    /// Mixture-of-experts models: also train the routers.
    pub train_router: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingRequest {
    pub patience: u32,
    #[serde(default)]
    pub min_delta: f64,
    /// `loss` (default), or an encoder task's validation metric (higher is better).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
}

/// Every metric `early_stopping.metric` may name (which apply depends on the task).
pub const EARLY_STOPPING_METRICS: [&str; 9] =
    ["loss", "accuracy", "macro_f1", "f1", "precision", "recall", "recall_at_1", "recall_at_5", "recall_at_10"];

/// The `hyperparameters` object: OpenAI's three, then ours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HyperparametersRequest {
    #[serde(default)]
    pub n_epochs: AutoOr<u32>,
    #[serde(default)]
    pub batch_size: AutoOr<usize>,
    #[serde(default)]
    pub learning_rate_multiplier: AutoOr<f64>,
    pub training_type: Option<TrainingType>,
    pub lora: Option<LoraRequest>,
    pub learning_rate: Option<f64>,
    pub lr_scheduler: Option<String>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub gradient_accumulation_steps: Option<usize>,
    pub max_seq_len: Option<usize>,
    pub packing: Option<bool>,
    /// Recompute each decoder layer's activations in the backward instead of keeping them.
    pub gradient_checkpointing: Option<bool>,
    /// Mixture-of-experts models: the router load-balancing loss's weight (default: the model's).
    pub router_aux_loss_coef: Option<f64>,
    pub eval_interval: Option<u64>,
    pub early_stopping: Option<EarlyStoppingRequest>,
    pub n_checkpoints: Option<u32>,
    /// QLoRA: how the frozen base is quantized (`q4_0`, `q4_1`, `q4_k`, `q5_k`, `q6_k`, `q8_0`);
    /// default: a GGUF base's own quantization, else `q4_0`.
    pub quantization: Option<String>,
    /// Bottleneck adapters: the width they project down to (default 64).
    pub adapter_size: Option<usize>,
    /// Prefix tuning: virtual tokens per layer (default 16).
    pub prefix_length: Option<usize>,
    /// Prefix tuning: train through an MLP reparameterisation (PEFT's `prefix_projection`).
    pub prefix_projection: Option<bool>,
    /// DPO: OpenAI's β, a number or `"auto"` (0.1; 2.0 for SimPO).
    pub beta: Option<AutoOr<f64>>,
    /// DPO: `sigmoid` (DPO, the default), `ipo` or `simpo` (reference-free).
    pub loss: Option<PreferenceLoss>,
    /// DPO with `loss: simpo`: the target reward margin γ (default 0.5).
    pub simpo_gamma: Option<f64>,
    /// DPO: weight of the chosen answers' NLL added to the loss (RPO).
    pub rpo_alpha: Option<f64>,
    /// DPO: label smoothing ε (sigmoid and simpo).
    pub label_smoothing: Option<f64>,
}

/// `method.type`: what a job trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MethodType {
    #[default]
    Supervised,
    Dpo,
}

impl MethodType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Supervised => "supervised",
            Self::Dpo => "dpo",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Supervised, Self::Dpo].into_iter().find(|m| m.as_str() == text)
    }

    /// The type of a stored `method` object (`{"type": ..., <type>: {...}}`); supervised when
    /// absent.
    pub fn of(method: &Value) -> Self {
        method.get("type").and_then(Value::as_str).and_then(Self::parse).unwrap_or_default()
    }
}

/// The hyperparameters that only preference (DPO) jobs take.
pub const DPO_HYPERPARAMETERS: [&str; 5] = ["beta", "loss", "simpo_gamma", "rpo_alpha", "label_smoothing"];

/// A hyperparameter that is out of range: the field (relative to the hyperparameters object) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidHyperparameter {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidHyperparameter {
    InvalidHyperparameter { field, message: message.into() }
}

impl HyperparametersRequest {
    /// The preference settings requested (`beta: "auto"` left to the loss's default).
    pub fn dpo_settings(&self) -> DpoSettings {
        DpoSettings {
            loss: self.loss.unwrap_or_default(),
            beta: match self.beta {
                Some(AutoOr::Value(beta)) => Some(beta),
                _ => None,
            },
            simpo_gamma: self.simpo_gamma,
            rpo_alpha: self.rpo_alpha,
            label_smoothing: self.label_smoothing.unwrap_or(0.0),
        }
    }

    /// [`Self::validate`], plus the rules of the job's method: DPO's settings only on DPO jobs
    /// and in range there, and no packing of preference pairs.
    pub fn validate_for(&self, method: MethodType) -> Result<(), InvalidHyperparameter> {
        self.validate()?;
        let set = [
            ("beta", self.beta.is_some()),
            ("loss", self.loss.is_some()),
            ("simpo_gamma", self.simpo_gamma.is_some()),
            ("rpo_alpha", self.rpo_alpha.is_some()),
            ("label_smoothing", self.label_smoothing.is_some()),
        ];
        if method == MethodType::Supervised {
            if let Some((field, _)) = set.iter().find(|(_, present)| *present) {
                return Err(invalid(field, format!("{field} applies to method dpo only")));
            }
            return Ok(());
        }
        if self.packing == Some(true) {
            return Err(invalid("packing", "packing does not apply to dpo: each answer is its own sequence"));
        }
        self.dpo_settings().validate().map_err(|message| {
            // The settings' messages start with the field: "dpo.<field> ...".
            let named = message.strip_prefix("dpo.").and_then(|rest| rest.split_whitespace().next());
            let field = DPO_HYPERPARAMETERS.into_iter().find(|f| named == Some(*f)).unwrap_or("beta");
            invalid(field, message.replace("dpo.", ""))
        })
    }

    /// Checks every range that does not depend on the data.
    pub fn validate(&self) -> Result<(), InvalidHyperparameter> {
        if let AutoOr::Value(n) = self.n_epochs {
            if !(1..=50).contains(&n) {
                return Err(invalid("n_epochs", "n_epochs must be between 1 and 50"));
            }
        }
        if let AutoOr::Value(b) = self.batch_size {
            if !(1..=256).contains(&b) {
                return Err(invalid("batch_size", "batch_size must be between 1 and 256"));
            }
        }
        if let AutoOr::Value(m) = self.learning_rate_multiplier {
            if !(m > 0.0 && m <= 10.0) {
                return Err(invalid("learning_rate_multiplier", "learning_rate_multiplier must be in (0, 10]"));
            }
        }
        let ranges: [(&'static str, Option<f64>, f64, f64); 5] = [
            ("learning_rate", self.learning_rate, 1e-8, 1.0),
            ("router_aux_loss_coef", self.router_aux_loss_coef, 0.0, 10.0),
            ("warmup_ratio", self.warmup_ratio, 0.0, 0.5),
            ("weight_decay", self.weight_decay, 0.0, 1.0),
            ("max_grad_norm", self.max_grad_norm, 0.0, 1e6),
        ];
        for (field, value, low, high) in ranges {
            if let Some(v) = value {
                if !(v.is_finite() && v >= low && v <= high) {
                    return Err(invalid(field, format!("{field} must be between {low} and {high}")));
                }
            }
        }
        if let Some(s) = &self.lr_scheduler {
            if !["constant", "linear", "cosine"].contains(&s.as_str()) {
                return Err(invalid("lr_scheduler", "lr_scheduler must be constant, linear or cosine"));
            }
        }
        if self.gradient_accumulation_steps.is_some_and(|g| !(1..=1024).contains(&g)) {
            return Err(invalid(
                "gradient_accumulation_steps",
                "gradient_accumulation_steps must be between 1 and 1024",
            ));
        }
        if self.max_seq_len.is_some_and(|l| !(16..=131_072).contains(&l)) {
            return Err(invalid("max_seq_len", "max_seq_len must be between 16 and 131072"));
        }
        if self.n_checkpoints.is_some_and(|n| n > 100) {
            return Err(invalid("n_checkpoints", "n_checkpoints must be at most 100"));
        }
        if self.early_stopping.as_ref().is_some_and(|e| e.patience == 0 || e.min_delta < 0.0) {
            return Err(invalid("early_stopping", "early_stopping needs patience >= 1 and min_delta >= 0"));
        }
        if let Some(metric) = self.early_stopping.as_ref().and_then(|e| e.metric.as_deref()) {
            if !EARLY_STOPPING_METRICS.contains(&metric) {
                return Err(invalid(
                    "early_stopping.metric",
                    format!("early_stopping.metric must be one of {}", EARLY_STOPPING_METRICS.join(", ")),
                ));
            }
        }
        if let Some(size) = self.adapter_size {
            if self.training_type != Some(TrainingType::Bottleneck) {
                return Err(invalid("adapter_size", "adapter_size applies to training_type bottleneck only"));
            }
            if !(1..=4096).contains(&size) {
                return Err(invalid("adapter_size", "adapter_size must be between 1 and 4096"));
            }
        }
        if self.prefix_length.is_some() || self.prefix_projection.is_some() {
            if self.training_type != Some(TrainingType::Prefix) {
                return Err(invalid("prefix_length", "prefix settings apply to training_type prefix only"));
            }
            if self.prefix_length.is_some_and(|n| !(1..=512).contains(&n)) {
                return Err(invalid("prefix_length", "prefix_length must be between 1 and 512"));
            }
        }
        if let Some(q) = &self.quantization {
            if self.training_type != Some(TrainingType::Qlora) {
                return Err(invalid("quantization", "quantization applies to training_type qlora only"));
            }
            if crate::models::common::quantized::Quantization::parse(q).is_none() {
                return Err(invalid("quantization", "quantization must be q4_0, q4_1, q4_k, q5_k, q6_k or q8_0"));
            }
        }
        if let Some(lora) = &self.lora {
            if matches!(self.training_type, Some(TrainingType::Full | TrainingType::Bottleneck | TrainingType::Prefix))
            {
                return Err(invalid("lora", "lora settings apply to training_type lora and qlora only"));
            }
            if lora.r.is_some_and(|r| !(1..=512).contains(&r)) {
                return Err(invalid("lora", "lora.r must be between 1 and 512"));
            }
            if lora.alpha.is_some_and(|a| !(a > 0.0 && a <= 4096.0)) {
                return Err(invalid("lora", "lora.alpha must be in (0, 4096]"));
            }
            if lora.dropout.is_some_and(|d| !(0.0..1.0).contains(&d)) {
                return Err(invalid("lora", "lora.dropout must be in [0, 1)"));
            }
            if let Some(t) = &lora.target_modules {
                let ok = match t {
                    Value::String(s) => !s.is_empty(),
                    Value::Array(items) => {
                        !items.is_empty() && items.iter().all(|i| i.as_str().is_some_and(|s| !s.is_empty()))
                    }
                    _ => false,
                };
                if !ok {
                    return Err(invalid(
                        "lora",
                        "lora.target_modules must be \"all-linear\" or a list of module names",
                    ));
                }
            }
            if let Some(params) = &lora.target_parameters {
                let known =
                    |p: &str| ["gate_up_proj", "down_proj"].iter().any(|k| p == *k || p.ends_with(&format!(".{k}")));
                if let Some(bad) = params.iter().find(|p| !known(p)) {
                    return Err(invalid(
                        "lora",
                        format!(
                            "lora.target_parameters names {bad:?}; the expert parameters are gate_up_proj and down_proj \
                             (or mlp.experts.gate_up_proj, mlp.experts.down_proj)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// OpenAI's documented `"auto"` rules, for `examples` training examples: 3 epochs, raised
    /// so that small sets see at least 100 examples and lowered so that large ones see at most
    /// 25,000; a batch of ~0.2% of the examples (1 to 256); a learning-rate multiplier of 1.
    pub fn resolve_openai(&self, examples: usize) -> (u32, usize, f64) {
        let n = examples.max(1);
        let epochs = match self.n_epochs {
            AutoOr::Value(e) => e,
            AutoOr::Auto if n * 3 < 100 => 100usize.div_ceil(n).min(25) as u32,
            AutoOr::Auto if n * 3 > 25_000 => (25_000 / n).max(1) as u32,
            AutoOr::Auto => 3,
        };
        let batch = match self.batch_size {
            AutoOr::Value(b) => b,
            AutoOr::Auto => ((n as f64 * 0.002).ceil() as usize).clamp(1, 256),
        };
        let multiplier = match self.learning_rate_multiplier {
            AutoOr::Value(m) => m,
            AutoOr::Auto => 1.0,
        };
        (epochs, batch, multiplier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> HyperparametersRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn numbers_and_auto_parse() {
        let h = parse(r#"{"n_epochs": "auto", "batch_size": 8, "learning_rate_multiplier": 0.5}"#);
        assert_eq!(h.n_epochs, AutoOr::Auto);
        assert_eq!(h.batch_size, AutoOr::Value(8));
        assert!(serde_json::from_str::<HyperparametersRequest>(r#"{"n_epochs": "many"}"#).is_err());
        assert!(
            serde_json::from_str::<HyperparametersRequest>(r#"{"epochs": 3}"#).is_err(),
            "unknown fields are rejected"
        );
    }

    #[test]
    fn auto_follows_openais_rules() {
        let auto = HyperparametersRequest::default();
        assert_eq!(auto.resolve_openai(10), (10, 1, 1.0));
        assert_eq!(auto.resolve_openai(1000), (3, 2, 1.0));
        assert_eq!(auto.resolve_openai(100_000), (1, 200, 1.0));
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        assert_eq!(parse(r#"{"n_epochs": 0}"#).validate().unwrap_err().field, "n_epochs");
        assert_eq!(parse(r#"{"learning_rate": -1}"#).validate().unwrap_err().field, "learning_rate");
        assert_eq!(parse(r#"{"lora": {"r": 0}}"#).validate().unwrap_err().field, "lora");
        assert_eq!(parse(r#"{"lr_scheduler": "wavy"}"#).validate().unwrap_err().field, "lr_scheduler");
        assert!(parse(r#"{"training_type": "full", "learning_rate": 1e-5}"#).validate().is_ok());
    }

    #[test]
    fn dpo_settings_belong_to_dpo_jobs_and_are_range_checked() {
        let supervised = |json: &str| parse(json).validate_for(MethodType::Supervised);
        let dpo = |json: &str| parse(json).validate_for(MethodType::Dpo);
        assert_eq!(supervised(r#"{"beta": 0.1}"#).unwrap_err().field, "beta");
        assert!(dpo(r#"{"beta": "auto", "loss": "ipo"}"#).is_ok());
        assert_eq!(dpo(r#"{"beta": 0}"#).unwrap_err().field, "beta");
        assert_eq!(dpo(r#"{"loss": "ipo", "label_smoothing": 0.1}"#).unwrap_err().field, "label_smoothing");
        assert_eq!(dpo(r#"{"simpo_gamma": 1.0}"#).unwrap_err().field, "simpo_gamma");
        assert_eq!(dpo(r#"{"rpo_alpha": -1}"#).unwrap_err().field, "rpo_alpha");
        assert_eq!(dpo(r#"{"packing": true}"#).unwrap_err().field, "packing");
        assert!(serde_json::from_str::<HyperparametersRequest>(r#"{"loss": "hinge"}"#).is_err());
        let settings = parse(r#"{"loss": "simpo", "simpo_gamma": 1.0}"#).dpo_settings();
        assert_eq!((settings.beta(), settings.gamma()), (2.0, 1.0));
    }
}
