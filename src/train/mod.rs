//! The trainer: full fine-tuning and LoRA on the Llama-family models, with our AdamW, schedules,
//! gradient accumulation and clipping, evaluation, early stopping, exact-resume checkpoints and
//! PEFT / Hugging Face outputs. Used by `ferrotune train` and by the job executor; no HTTP, no SQL.

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod encoder;
pub mod eval;
pub mod files;
pub mod grads;
pub mod optimizer;
pub mod output;
mod pool;
pub mod preference;
mod run;
pub mod schedule;
pub mod seq2seq;
mod setup;
pub mod task_loop;

use std::path::PathBuf;

pub use config::{Method, TrainConfig};
pub use eval::EvalMetrics;
pub use pool::{init_pool, on_pool};
pub use run::train;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("cannot load the model: {0}")]
    Model(String),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the training thread failed: {0}")]
    Thread(String),
}

/// What the trainer reports after every optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch (1.5 = half-way through the second epoch).
    pub epoch: f64,
    pub loss: f64,
    /// Share of trained tokens the model predicted right (argmax) in this step's batches.
    pub accuracy: f64,
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    /// Tokens the loss was computed on so far (the trained positions).
    pub trained_tokens: u64,
    /// Tokens of the training examples processed so far, padding excluded: OpenAI's billable
    /// `trained_tokens` (the examples' tokens times the epochs, once the run completes).
    pub processed_tokens: u64,
    /// The validation metrics, at the steps where the model was evaluated.
    pub eval: Option<EvalMetrics>,
    /// Preference runs: this step's pair metrics (`loss` is then the preference loss and
    /// `accuracy` that of the chosen answers' tokens).
    pub preference: Option<preference::PreferenceMetrics>,
    /// Mixture-of-experts models: this step's router load-balancing loss (unweighted; the
    /// objective adds it times `router_aux_loss_coef` to `loss`).
    pub router_aux_loss: Option<f64>,
}

/// What the caller wants the trainer to do next; asked before every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop now, without writing outputs.
    Cancel,
    /// Save a checkpoint, then stop.
    Pause,
}

/// Hooks for the CLI and the executor. Every method has a do-nothing default.
pub trait Observer {
    /// After every optimizer step (and the evaluation at that step, if one was due).
    fn progress(&mut self, _progress: &Progress) {}
    fn checkpointed(&mut self, _step: u64, _dir: &std::path::Path) {}
    fn control(&mut self) -> Control {
        Control::Continue
    }
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Completed,
    EarlyStopped,
    Cancelled,
    Paused,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub total_steps: u64,
    pub trained_tokens: u64,
    pub processed_tokens: u64,
    pub examples: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub final_train_loss: Option<f64>,
    pub final_eval: Option<EvalMetrics>,
    pub best_eval_loss: Option<f64>,
    pub stop: StopReason,
    /// Where the adapter or model was written (absent when cancelled or paused).
    pub output: Option<PathBuf>,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
}

/// Runs `train` on a dedicated thread with a large stack (deep autograd graphs overflow the
/// default 2 MiB), off any async runtime.
pub fn spawn_training<O: Observer + Send + 'static>(
    config: TrainConfig,
    mut observer: O,
) -> std::io::Result<std::thread::JoinHandle<Result<Summary, TrainError>>> {
    std::thread::Builder::new()
        .name("ferrotune-train".into())
        .stack_size(256 << 20)
        .spawn(move || train(&config, &mut observer))
}
