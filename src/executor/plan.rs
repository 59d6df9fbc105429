//! A job's concrete training plan: its requested hyperparameters resolved against the data
//! (stored on the job after validation) and turned into a `TrainConfig`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::hyperparameters::{HyperparametersRequest, MethodType, TrainingType};
use crate::peft::lora::TargetModules;
use crate::train::config::{EarlyStopping, LoraSettings, Method, TrainConfig};
use crate::train::preference::{DpoSettings, PreferenceLoss};
use crate::train::schedule::SchedulerKind;

/// Base learning rates before `learning_rate_multiplier` (full fine-tuning moves every weight,
/// so it starts an order of magnitude lower).
const LORA_BASE_LR: f64 = 2e-4;
const FULL_BASE_LR: f64 = 2e-5;
/// DPO moves the policy only slightly away from the reference: TRL's `DPOConfig` default for full
/// fine-tuning (1e-6), and a LoRA rate 25x lower than supervised LoRA's.
const DPO_LORA_BASE_LR: f64 = 8e-6;
const DPO_FULL_BASE_LR: f64 = 1e-6;
const DEFAULT_MAX_SEQ_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPlan {
    pub n_epochs: u32,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    pub training_type: TrainingType,
    pub learning_rate: f64,
    pub lr_scheduler: SchedulerKind,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub gradient_accumulation_steps: usize,
    pub max_seq_len: usize,
    pub packing: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// Mixture-of-experts models: the load-balancing loss's weight, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
    pub eval_interval: u64,
    pub early_stopping: Option<EarlyStopping>,
    pub n_checkpoints: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
    /// QLoRA's quantization of the base, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// Bottleneck adapters' width, when training them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_size: Option<usize>,
    /// Prefix tuning's virtual tokens, when training a prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefix_projection: bool,
    /// DPO jobs: β (resolved) and the loss settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<PreferenceLoss>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simpo_gamma: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// Examples and tokens the training file holds (for the totals shown to users).
    pub examples: usize,
    pub tokens: usize,
    pub total_steps: u64,
}

impl JobPlan {
    /// Resolves `"auto"` and defaults for `examples` training examples (pairs, for DPO) of
    /// `tokens` tokens.
    pub fn resolve(
        request: &HyperparametersRequest,
        method: MethodType,
        examples: usize,
        tokens: usize,
        model_max_len: usize,
    ) -> Self {
        let (n_epochs, batch_size, multiplier) = request.resolve_openai(examples);
        let training_type = request.training_type.unwrap_or_default();
        let full = training_type == TrainingType::Full;
        let base = match method {
            MethodType::Supervised if full => FULL_BASE_LR,
            MethodType::Supervised => LORA_BASE_LR,
            MethodType::Dpo if full => DPO_FULL_BASE_LR,
            MethodType::Dpo => DPO_LORA_BASE_LR,
        };
        let dpo = (method == MethodType::Dpo).then(|| request.dpo_settings());
        let accumulation = request.gradient_accumulation_steps.unwrap_or(1);
        let steps_per_epoch = examples.div_ceil(batch_size).div_ceil(accumulation) as u64;
        let lora = matches!(training_type, TrainingType::Lora | TrainingType::Qlora).then(|| {
            let requested = request.lora.clone().unwrap_or_default();
            let defaults = LoraSettings::default();
            LoraSettings {
                r: requested.r.unwrap_or(defaults.r),
                alpha: requested.alpha.unwrap_or(defaults.alpha),
                dropout: requested.dropout.unwrap_or(defaults.dropout),
                target_modules: requested
                    .target_modules
                    .and_then(|t| serde_json::from_value::<TargetModules>(t).ok())
                    .unwrap_or(defaults.target_modules),
                use_rslora: requested.use_rslora.unwrap_or(false),
                target_parameters: requested.target_parameters.unwrap_or_default(),
                train_router: requested.train_router.unwrap_or(false),
                train_norms: false,
            }
        });
        Self {
            quantization: request.quantization.clone(),
            adapter_size: (training_type == TrainingType::Bottleneck).then(|| request.adapter_size.unwrap_or(64)),
            prefix_length: (training_type == TrainingType::Prefix).then(|| request.prefix_length.unwrap_or(16)),
            prefix_projection: request.prefix_projection.unwrap_or(false),
            beta: dpo.map(|d| d.beta()),
            loss: dpo.map(|d| d.loss),
            simpo_gamma: dpo.and_then(|d| (d.loss == PreferenceLoss::Simpo).then(|| d.gamma())),
            rpo_alpha: dpo.and_then(|d| d.rpo_alpha),
            label_smoothing: dpo.map(|d| d.label_smoothing).filter(|&e| e > 0.0),
            n_epochs,
            batch_size,
            learning_rate_multiplier: multiplier,
            training_type,
            learning_rate: request.learning_rate.unwrap_or(base) * multiplier,
            lr_scheduler: match request.lr_scheduler.as_deref() {
                Some("constant") => SchedulerKind::Constant,
                Some("cosine") => SchedulerKind::Cosine,
                _ => SchedulerKind::Linear,
            },
            warmup_ratio: request.warmup_ratio.unwrap_or(0.0),
            weight_decay: request.weight_decay.unwrap_or(0.0),
            max_grad_norm: request.max_grad_norm.unwrap_or(1.0),
            gradient_accumulation_steps: accumulation,
            max_seq_len: request.max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN).min(model_max_len),
            packing: request.packing.unwrap_or(false),
            gradient_checkpointing: request.gradient_checkpointing.unwrap_or(false),
            router_aux_loss_coef: request.router_aux_loss_coef,
            eval_interval: request.eval_interval.unwrap_or(0),
            early_stopping: request.early_stopping.as_ref().map(|e| EarlyStopping {
                patience: e.patience,
                min_delta: e.min_delta,
                metric: e.metric.clone(),
            }),
            n_checkpoints: request.n_checkpoints.unwrap_or(n_epochs.min(3)),
            lora,
            examples,
            tokens,
            total_steps: steps_per_epoch * u64::from(n_epochs),
        }
    }

    /// Checkpoint every N steps so that about `n_checkpoints` are made (at least every step).
    /// The preference settings of a DPO plan.
    pub fn dpo(&self) -> Option<DpoSettings> {
        Some(DpoSettings {
            loss: self.loss?,
            beta: self.beta,
            simpo_gamma: self.simpo_gamma,
            rpo_alpha: self.rpo_alpha,
            label_smoothing: self.label_smoothing.unwrap_or(0.0),
        })
    }

    pub fn checkpoint_interval(&self) -> u64 {
        if self.n_checkpoints == 0 {
            return 0;
        }
        self.total_steps.div_ceil(u64::from(self.n_checkpoints)).max(1)
    }

    pub fn train_config(
        &self,
        model: &Path,
        train_file: PathBuf,
        validation_file: Option<PathBuf>,
        output_dir: PathBuf,
        seed: u64,
    ) -> TrainConfig {
        TrainConfig {
            model: model.to_path_buf(),
            train_file,
            validation_file,
            validation_fraction: 0.0,
            output_dir,
            method: match self.training_type {
                TrainingType::Full => Method::Full,
                TrainingType::Lora => Method::Lora,
                TrainingType::Qlora => Method::Qlora,
                TrainingType::Bottleneck => Method::Bottleneck,
                TrainingType::Prefix => Method::Prefix,
            },
            prefix_length: self.prefix_length.unwrap_or(16),
            prefix_projection: self.prefix_projection,
            adapter_size: self.adapter_size.unwrap_or(64),
            quantization: self.quantization.as_deref().and_then(crate::models::common::quantized::Quantization::parse),
            lora: self.lora.clone().unwrap_or_default(),
            epochs: self.n_epochs,
            max_steps: None,
            batch_size: self.batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            learning_rate: self.learning_rate,
            lr_scheduler: self.lr_scheduler,
            warmup_ratio: self.warmup_ratio,
            warmup_steps: None,
            min_lr_ratio: 0.0,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            max_seq_len: self.max_seq_len,
            packing: self.packing,
            gradient_checkpointing: self.gradient_checkpointing,
            router_aux_loss_coef: self.router_aux_loss_coef,
            // The executor sets its own device.
            device: Default::default(),
            train_on_inputs: false,
            dpo: self.dpo(),
            seed,
            eval_interval: self.eval_interval,
            early_stopping: self.early_stopping.clone(),
            checkpoint_interval: self.checkpoint_interval(),
            resume_from: None,
        }
    }
}
