//! What a finished run leaves behind: a PEFT adapter (LoRA) or a Hugging Face model directory
//! (full fine-tuning), each with the tokenizer files, so either loads in transformers/PEFT as is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::config::{Method, TrainConfig};
use super::setup::Prepared;
use super::TrainError;
use crate::models::llama::CausalLm;
use crate::peft::adapter::save_adapter;

/// Files copied next to the weights when the base model has them.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

pub fn write(prepared: &Prepared, config: &TrainConfig) -> Result<PathBuf, TrainError> {
    let dir = config.output_dir.clone();
    match config.method {
        Method::Lora | Method::Qlora => {
            let tensors: HashMap<String, Tensor> =
                prepared
                    .model
                    .trainable
                    .snapshot()?
                    .into_iter()
                    // Trained norms are saved under PEFT's `modules_to_save` names.
                    .map(|(name, t)| {
                        if name.starts_with("base_model.") {
                            (name, t)
                        } else {
                            (format!("base_model.model.{name}"), t)
                        }
                    })
                    .collect();
            let base = config.model.display().to_string();
            let modules = prepared.model.config.linear_modules();
            let lora = config.lora.lora_config_for(&prepared.model.config).map_err(TrainError::Config)?;
            save_adapter(&dir, &lora, &base, &modules, &tensors, config.lora.train_norms)?;
            copy_tokenizer_files(&config.model, &dir)?;
        }
        Method::Bottleneck => {
            let tensors: HashMap<String, Tensor> = prepared.model.trainable.snapshot()?.into_iter().collect();
            let base = config.model.display().to_string();
            crate::models::bottleneck::save(&dir, config.adapter_size, &base, &tensors)?;
            copy_tokenizer_files(&config.model, &dir)?;
        }
        Method::Prefix => {
            let table = prepared.model.prefix_table()?.ok_or_else(|| TrainError::Model("no prefix to save".into()))?;
            let base = config.model.display().to_string();
            crate::models::prefix::save(&dir, &prepared.model.config, config.prefix_length, &base, &table)?;
            copy_tokenizer_files(&config.model, &dir)?;
        }
        Method::Full => write_model_dir(&dir, &prepared.model, prepared.model.base_tensors()?, &config.model)?,
    }
    Ok(dir)
}

/// A Hugging Face model directory: `config.json`, `model.safetensors`, tokenizer files.
pub fn write_model_dir(
    dir: &Path,
    model: &CausalLm,
    tensors: Vec<(String, Tensor)>,
    source: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::to_string_pretty(&model.config.raw).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("config.json"), config + "\n")?;
    // Mixture-of-experts weights go back to the per-expert layout checkpoints have.
    let tensors = match &model.config.moe {
        Some(moe) => crate::models::moe::to_checkpoint(moe, tensors)?,
        None => tensors,
    };
    let cpu: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&cpu, dir.join("model.safetensors"))?;
    copy_tokenizer_files(source, dir)
}

fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<(), TrainError> {
    for name in TOKENIZER_FILES {
        let source = from.join(name);
        if source.exists() {
            std::fs::copy(&source, to.join(name))?;
        }
    }
    Ok(())
}

/// A LoRA adapter directory folded into its base: a model directory at `out` whose weights are
/// `W + scale · B·A` (f32), with the base's tokenizer files.
pub fn merge_adapter_dir(base: &Path, adapter: &Path, out: &Path) -> anyhow::Result<()> {
    if crate::models::t5::config::is_seq2seq_dir(base) {
        return super::seq2seq::merge_adapter_dir(base, adapter, out);
    }
    use crate::models::config::ModelConfig;
    use crate::models::llama::Adaptation;
    use crate::peft::lora::LoraPlan;
    let (config, norms, tensors) = anyhow::Context::context(
        crate::peft::adapter::load_adapter(adapter, &Device::Cpu),
        "could not read the adapter",
    )?;
    let plan = LoraPlan { config, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) };
    let weights = crate::models::weights::load_model_weights(base, candle_core::DType::F32, &Device::Cpu)?;
    let model = CausalLm::new(ModelConfig::from_file(&base.join("config.json"))?, weights, Adaptation::Lora(&plan))?;
    write_model_dir(out, &model, crate::models::llama::merge::merged_tensors(&model)?, base)?;
    Ok(())
}
