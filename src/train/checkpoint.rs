//! Checkpoints that let a run continue exactly where it stopped: trainable weights, optimizer
//! moments, the dropout generator and the position in the data.
//!
//! Layout of `<dir>`: `trainable.safetensors`, `optimizer.safetensors`, `state.json`. A checkpoint
//! is written to a temporary sibling and renamed, so a crash never leaves a half-written one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use super::TrainError;
use crate::models::common::params::TrainableParams;
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// The epoch and the optimizer-step group within it where training continues.
    pub epoch: u32,
    pub next_group: usize,
    pub dropout_rng: Rng,
    pub trained_tokens: u64,
    /// Example tokens processed (see `Progress::processed_tokens`); absent in older checkpoints.
    #[serde(default)]
    pub processed_tokens: u64,
    pub best_eval_loss: Option<f64>,
    pub evals_without_improvement: u32,
    /// The last training loss (for reports after resuming).
    pub last_loss: Option<f64>,
}

impl TrainState {
    /// Where a fresh run starts: step 0, the dropout generator derived from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            step: 0,
            epoch: 0,
            next_group: 0,
            dropout_rng: Rng::derive(seed, "dropout"),
            trained_tokens: 0,
            processed_tokens: 0,
            best_eval_loss: None,
            evals_without_improvement: 0,
            last_loss: None,
        }
    }
}

/// A preference run's reference log-probabilities, per training and validation sequence: kept
/// with checkpoints because after full fine-tuning steps they cannot be recomputed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReferenceLogps {
    pub train: Vec<f32>,
    pub validation: Vec<f32>,
}

const REFERENCE_FILE: &str = "reference_logps.safetensors";

pub fn save(
    dir: &Path,
    state: &TrainState,
    params: &TrainableParams,
    optimizer: &AdamW,
    reference: Option<&ReferenceLogps>,
) -> Result<(), TrainError> {
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    candle_core::safetensors::save(&params.snapshot()?, staging.join("trainable.safetensors"))?;
    let (_, moments) = optimizer.state();
    candle_core::safetensors::save(&moments, staging.join("optimizer.safetensors"))?;
    if let Some(reference) = reference {
        let tensors: HashMap<String, Tensor> = [("train", &reference.train), ("validation", &reference.validation)]
            .into_iter()
            .map(|(k, v)| Ok((k.to_string(), Tensor::new(v.as_slice(), &Device::Cpu)?)))
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&tensors, staging.join(REFERENCE_FILE))?;
    }
    let meta = serde_json::json!({ "state": state, "optimizer_step": optimizer.steps_taken() });
    std::fs::write(staging.join("state.json"), serde_json::to_string_pretty(&meta).map_err(std::io::Error::other)?)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir)?;
    Ok(())
}

pub struct Loaded {
    pub state: TrainState,
    pub trainable: HashMap<String, Tensor>,
    pub optimizer_step: u64,
    pub moments: HashMap<String, Tensor>,
    pub reference: Option<ReferenceLogps>,
}

pub fn load(dir: &Path, device: &Device) -> Result<Loaded, TrainError> {
    let text = std::fs::read_to_string(dir.join("state.json"))?;
    let meta: serde_json::Value = serde_json::from_str(&text).map_err(std::io::Error::other)?;
    let state: TrainState = serde_json::from_value(meta["state"].clone()).map_err(std::io::Error::other)?;
    let optimizer_step = meta["optimizer_step"].as_u64().unwrap_or(state.step);
    let reference = match dir.join(REFERENCE_FILE) {
        path if path.exists() => {
            let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
            let read = |k: &str| -> Result<Vec<f32>, TrainError> {
                let t = tensors.get(k).ok_or_else(|| TrainError::Config(format!("{REFERENCE_FILE} has no {k}")))?;
                Ok(t.to_vec1()?)
            };
            Some(ReferenceLogps { train: read("train")?, validation: read("validation")? })
        }
        _ => None,
    };
    Ok(Loaded {
        reference,
        state,
        trainable: candle_core::safetensors::load(dir.join("trainable.safetensors"), device)?,
        optimizer_step,
        moments: candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?,
    })
}
