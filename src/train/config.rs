//! A training run's configuration: what `ferrotune train --config FILE` reads (YAML or JSON) and
//! what the job executor builds from a job's hyperparameters.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::schedule::SchedulerKind;
use crate::peft::lora::{LoraConfig, TargetModules};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Full,
    Lora,
    /// LoRA over the base's linear weights kept block-quantized (see `quantization`).
    Qlora,
    /// Bottleneck adapters after attention and MLP (see `adapter_size`).
    Bottleneck,
    /// Prefix tuning (see `prefix_length`, `prefix_projection`).
    Prefix,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    /// Mixture-of-experts models: stacked expert weights to adapt (PEFT `target_parameters`).
    #[serde(default)]
    pub target_parameters: Vec<String>,
    /// Mixture-of-experts models: also train the routers.
    #[serde(default)]
    pub train_router: bool,
    /// Also train the RMSNorm weights.
    #[serde(default)]
    pub train_norms: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
            target_parameters: Vec::new(),
            train_router: false,
            train_norms: false,
        }
    }
}

impl LoraSettings {
    /// [`LoraSettings::lora_config`] as PEFT applies it to `model` (see
    /// [`LoraConfig::converted_for`]): what is trained and saved.
    pub fn lora_config_for(&self, model: &crate::models::config::ModelConfig) -> Result<LoraConfig, String> {
        self.lora_config().converted_for(&model.model_type, &model.linear_modules())
    }

    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            target_parameters: self.target_parameters.clone(),
            train_router: self.train_router,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Evaluations without improvement before stopping.
    pub patience: u32,
    /// The smallest decrease of the validation loss that counts as an improvement.
    #[serde(default)]
    pub min_delta: f64,
    /// What improves: `loss` (the default, lower is better) or, for encoder tasks, a validation
    /// metric where higher is better (`accuracy`, `macro_f1`, `f1`, `recall_at_1`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer files), or a directory
    /// made from a GGUF file (`ferrotune train` accepts the `.gguf` file itself).
    pub model: PathBuf,
    pub train_file: PathBuf,
    #[serde(default)]
    pub validation_file: Option<PathBuf>,
    /// Hold out this fraction of the training file for validation when there is no validation file.
    #[serde(default)]
    pub validation_fraction: f64,
    pub output_dir: PathBuf,
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default)]
    pub lora: LoraSettings,
    /// QLoRA: the base's quantization (default: a GGUF base's own, else q4_0).
    #[serde(default)]
    pub quantization: Option<crate::models::common::quantized::Quantization>,
    /// Bottleneck adapters: the width they project down to.
    #[serde(default = "default_adapter_size")]
    pub adapter_size: usize,
    /// Prefix tuning: virtual tokens per layer.
    #[serde(default = "default_prefix_length")]
    pub prefix_length: usize,
    /// Prefix tuning: train through PEFT's reparameterisation (embedding → Linear → tanh → Linear).
    #[serde(default)]
    pub prefix_projection: bool,
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Stop after this many optimizer steps, even mid-epoch.
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub lr_scheduler: SchedulerKind,
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Overrides `warmup_ratio` when set.
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "default_seq")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub packing: bool,
    /// Keep only each decoder layer's input in the forward and recompute the layer in the
    /// backward: activation memory stops growing with depth, for about one more forward's time.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Mixture-of-experts models: the load-balancing loss's weight (default: the model's
    /// `router_aux_loss_coef`; 0 reports the loss without training on it).
    #[serde(default)]
    pub router_aux_loss_coef: Option<f64>,
    /// Where to train: `cpu` (default), `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: crate::device::DeviceSpec,
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Preference tuning (DPO, IPO or SimPO) on a preference dataset instead of supervised
    /// fine-tuning; `method` still says which weights train.
    #[serde(default)]
    pub dpo: Option<super::preference::DpoSettings>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate every N optimizer steps (0: at the end of each epoch).
    #[serde(default)]
    pub eval_interval: u64,
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_interval: u64,
    /// Continue from this checkpoint directory.
    #[serde(default)]
    pub resume_from: Option<PathBuf>,
}

impl TrainConfig {
    /// The load-balancing loss's weight for a mixture-of-experts model.
    pub fn router_aux_loss_coef(&self, moe: &crate::models::moe::MoeConfig) -> f64 {
        self.router_aux_loss_coef.unwrap_or(moe.aux_loss_coef)
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> TargetModules {
    TargetModules::Keyword("all-linear".into())
}
fn default_method() -> Method {
    Method::Lora
}
fn default_prefix_length() -> usize {
    16
}

fn default_adapter_size() -> usize {
    64
}

fn default_epochs() -> u32 {
    3
}
fn default_batch() -> usize {
    4
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    2e-4
}
fn default_clip() -> f64 {
    1.0
}
fn default_seq() -> usize {
    1024
}
fn default_seed() -> u64 {
    42
}

impl TrainConfig {
    /// Reads a YAML or JSON file (JSON is YAML); relative paths are resolved against its folder.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut config: Self = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.model, &mut config.train_file, &mut config.output_dir] {
            *p = base.join(&*p);
        }
        for p in [&mut config.validation_file, &mut config.resume_from].into_iter().flatten() {
            *p = base.join(&*p);
        }
        config.validate()?;
        Ok(config)
    }

    /// Rejects values that cannot train, with the field's name.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, message: &str| if ok { Ok(()) } else { Err(message.to_string()) };
        check(self.epochs >= 1, "epochs must be at least 1")?;
        check(self.adapter_size >= 1, "adapter_size must be at least 1")?;
        check(self.prefix_length >= 1, "prefix_length must be at least 1")?;
        check(self.batch_size >= 1, "batch_size must be at least 1")?;
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1")?;
        check(self.learning_rate > 0.0 && self.learning_rate.is_finite(), "learning_rate must be positive")?;
        check((0.0..1.0).contains(&self.warmup_ratio), "warmup_ratio must be in [0, 1)")?;
        check((0.0..=1.0).contains(&self.min_lr_ratio), "min_lr_ratio must be in [0, 1]")?;
        check(self.weight_decay >= 0.0, "weight_decay must not be negative")?;
        check(self.max_grad_norm >= 0.0, "max_grad_norm must not be negative")?;
        check(self.max_seq_len >= 2, "max_seq_len must be at least 2")?;
        check((0.0..1.0).contains(&self.validation_fraction), "validation_fraction must be in [0, 1)")?;
        if let Some(es) = &self.early_stopping {
            check(es.patience >= 1, "early_stopping.patience must be at least 1")?;
            check(
                self.validation_file.is_some() || self.validation_fraction > 0.0,
                "early_stopping needs a validation_file or a validation_fraction",
            )?;
        }
        if self.method == Method::Lora {
            self.lora.lora_config().validate()?;
        }
        if let Some(dpo) = &self.dpo {
            dpo.validate()?;
            check(!self.packing, "packing does not apply to dpo: each answer is its own sequence")?;
            check(!self.train_on_inputs, "train_on_inputs does not apply to dpo: only the answers are compared")?;
        }
        Ok(())
    }
}
