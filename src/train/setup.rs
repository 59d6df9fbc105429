//! Everything a run needs before its first step: model, tokenizer, encoded data.

use candle_core::{DType, Device};

use super::config::{Method, TrainConfig};
use super::TrainError;
use crate::data::dataset::{encode_dataset, load_jsonl, split_validation, EncodeStats};
use crate::data::examples::EncodeOptions;
use crate::data::packing::{pack, pad_each, Sequence};
use crate::data::preference::encode_preference_dataset;
use crate::data::tokenizer::ChatTokenizer;
use crate::models::config::ModelConfig;
use crate::models::llama::{Adaptation, CausalLm};
use crate::models::weights::{load_model_weights, load_quantized_weights};
use crate::peft::lora::LoraPlan;

pub struct Prepared {
    pub model: CausalLm,
    pub tokenizer: ChatTokenizer,
    /// Training sequences; a preference run holds each pair's chosen and rejected answers next
    /// to each other (`2i`, `2i + 1`).
    pub train: Vec<Sequence>,
    pub validation: Vec<Sequence>,
    /// Whether `train` and `validation` hold preference pairs.
    pub pairs: bool,
    pub stats: EncodeStats,
    pub lora_plan: Option<LoraPlan>,
}

impl Prepared {
    /// What an epoch shuffles and batches: examples, or pairs in a preference run.
    pub fn items(&self) -> usize {
        if self.pairs {
            self.train.len() / 2
        } else {
            self.train.len()
        }
    }
}

pub fn prepare(config: &TrainConfig, device: &Device) -> Result<Prepared, TrainError> {
    config.validate().map_err(TrainError::Config)?;
    let model_config =
        ModelConfig::from_file(&config.model.join("config.json")).map_err(|e| TrainError::Model(e.to_string()))?;
    if model_config.moe.is_some() && config.gradient_checkpointing {
        return Err(TrainError::Config(
            "gradient_checkpointing is not supported for mixture-of-experts models yet (the load-balancing loss \
             spans every layer); train without it"
                .into(),
        ));
    }
    if model_config.moe.is_none() && (!config.lora.target_parameters.is_empty() || config.lora.train_router) {
        return Err(TrainError::Config(format!(
            "lora target_parameters and train_router apply to mixture-of-experts models; this is a {} model",
            model_config.model_type
        )));
    }
    if let Some(metric) = config.early_stopping.as_ref().and_then(|r| r.metric.as_deref()).filter(|m| *m != "loss") {
        return Err(TrainError::Config(format!(
            "early_stopping.metric {metric:?}: decoder models stop on the validation loss (metric \"loss\")"
        )));
    }
    let tokenizer = ChatTokenizer::from_dir(&config.model)?;
    let (train_data, validation_data) = {
        let train = load_jsonl(&config.train_file)?;
        match &config.validation_file {
            Some(path) => (train, Some(load_jsonl(path)?)),
            None if config.validation_fraction > 0.0 => {
                let (train, held_out) = split_validation(train, config.validation_fraction, config.seed);
                (train, Some(held_out))
            }
            None => (train, None),
        }
    };
    let options = EncodeOptions {
        max_seq_len: config.max_seq_len.min(
            model_config.max_position_embeddings
                - if config.method == Method::Prefix { config.prefix_length } else { 0 },
        ),
        train_on_inputs: config.train_on_inputs,
    };
    let pad = tokenizer.pad_token_id().unwrap_or(0);
    let to_sequences = |examples: &[crate::data::examples::TokenizedExample]| {
        if config.packing {
            pack(examples, options.max_seq_len, pad)
        } else {
            pad_each(examples, options.max_seq_len, pad)
        }
    };
    let (train, validation, stats) = if config.dpo.is_some() {
        let pairs = |data: &crate::data::dataset::LoadedDataset| -> Result<_, TrainError> {
            let encoded = encode_preference_dataset(&tokenizer, data, &options)?;
            let examples: Vec<_> = encoded.pairs.into_iter().flat_map(|p| [p.chosen, p.rejected]).collect();
            Ok((pad_each(&examples, options.max_seq_len, pad), encoded.stats))
        };
        let (train, stats) = pairs(&train_data)?;
        if train.is_empty() {
            return Err(TrainError::Config(format!(
                "no preference pair fits max_seq_len {}: every prompt leaves no room for its answers",
                options.max_seq_len
            )));
        }
        let validation = validation_data.as_ref().map(|d| pairs(d).map(|(v, _)| v)).transpose()?.unwrap_or_default();
        (train, validation, stats)
    } else {
        let encoded = encode_dataset(&tokenizer, &train_data, &options)?;
        if encoded.examples.is_empty() {
            return Err(TrainError::Config("no training example has a token to learn after truncation".into()));
        }
        let validation = match &validation_data {
            Some(data) => to_sequences(&encode_dataset(&tokenizer, data, &options)?.examples),
            None => Vec::new(),
        };
        (to_sequences(&encoded.examples), validation, encoded.stats)
    };
    let bottleneck_plan = crate::models::bottleneck::BottleneckPlan {
        adapter_size: config.adapter_size,
        seed: config.seed,
        trainable: true,
        loaded: None,
    };
    let prefix_plan = crate::models::prefix::PrefixPlan {
        length: config.prefix_length,
        projection: config.prefix_projection.then_some(model_config.hidden_size),
        seed: config.seed,
        trainable: true,
        loaded: None,
    };
    let lora_plan = match config.method {
        Method::Lora | Method::Qlora => Some(LoraPlan {
            config: config.lora.lora_config_for(&model_config).map_err(TrainError::Config)?,
            seed: config.seed,
            trainable: true,
            train_norms: config.lora.train_norms,
            loaded: None,
        }),
        _ => None,
    };
    let adaptation = match (&lora_plan, config.method) {
        (Some(plan), _) => Adaptation::Lora(plan),
        (None, Method::Bottleneck) => Adaptation::Bottleneck(&bottleneck_plan),
        (None, Method::Prefix) => Adaptation::Prefix(&prefix_plan),
        (None, _) => Adaptation::Full,
    };
    if config.method == Method::Qlora && !device.is_cpu() {
        return Err(TrainError::Config(format!(
            "qlora trains on the CPU only for now (its block-quantized base has no GPU kernel here); use lora \
             on {}",
            config.device
        )));
    }
    let model = if config.method == Method::Qlora {
        let (dense, quantized) = load_quantized_weights(&config.model, config.quantization)
            .map_err(|e| TrainError::Model(format!("quantizing the base model: {e}")))?;
        let dense =
            dense.into_iter().map(|(k, v)| Ok((k, v.to_device(device)?))).collect::<candle_core::Result<_>>()?;
        CausalLm::with_quantized(model_config, dense, quantized, adaptation)?
    } else {
        CausalLm::new(model_config, load_model_weights(&config.model, DType::F32, device)?, adaptation)?
    };
    Ok(Prepared { model, tokenizer, train, validation, pairs: config.dpo.is_some(), stats, lora_plan })
}
