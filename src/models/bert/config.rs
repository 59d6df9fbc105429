//! The encoder's `config.json` (BERT, MiniLM and RoBERTa / XLM-R as transformers writes them) and
//! the label maps of a task head.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::models::config::ConfigError;

/// The encoder model types we load. RoBERTa and XLM-R differ from BERT only in where positions
/// start (after the padding index) and in their classification head.
pub const ENCODER_TYPES: [&str; 3] = ["bert", "roberta", "xlm-roberta"];

/// Whether a `config.json` document describes an encoder this module loads.
pub fn is_encoder(raw: &Value) -> bool {
    raw.get("model_type").and_then(Value::as_str).is_some_and(|t| ENCODER_TYPES.contains(&t))
}

/// Whether the model directory `dir` holds an encoder (its `config.json` says so).
pub fn is_encoder_dir(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|raw| is_encoder(&raw))
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The exact, erf-based GELU (transformers' `gelu`).
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub hidden_dropout: f32,
    pub attention_dropout: f32,
    /// The classifier's dropout (`classifier_dropout`, else `hidden_dropout_prob`).
    pub classifier_dropout: f32,
    pub pad_token_id: u32,
    /// The document as read, written back (with a task's labels) beside trained weights.
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawEncoder {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_dropout")]
    hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    attention_probs_dropout_prob: f32,
    #[serde(default)]
    classifier_dropout: Option<f32>,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn default_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f32 {
    0.1
}

impl EncoderConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_json(serde_json::from_str(&text)?)
    }

    pub fn from_json(raw: Value) -> Result<Self, ConfigError> {
        let c: RawEncoder = serde_json::from_value(raw.clone())?;
        if !ENCODER_TYPES.contains(&c.model_type.as_str()) {
            return Err(ConfigError::Unsupported(format!(
                "model_type {:?} is not an encoder we load (supported: {})",
                c.model_type,
                ENCODER_TYPES.join(", ")
            )));
        }
        if let Some(kind) = c.position_embedding_type.as_deref().filter(|k| *k != "absolute") {
            return Err(ConfigError::Unsupported(format!(
                "position_embedding_type {kind:?}: only absolute position embeddings are supported"
            )));
        }
        let activation = match c.hidden_act.as_str() {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => return Err(ConfigError::Unsupported(format!("hidden_act {other:?}"))),
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(ConfigError::Unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            max_position_embeddings: c.max_position_embeddings,
            type_vocab_size: c.type_vocab_size,
            layer_norm_eps: c.layer_norm_eps,
            activation,
            hidden_dropout: c.hidden_dropout_prob,
            attention_dropout: c.attention_probs_dropout_prob,
            classifier_dropout: c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
            pad_token_id: c.pad_token_id.unwrap_or(if c.model_type == "bert" { 0 } else { 1 }),
            model_type: c.model_type,
            raw,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// RoBERTa-style models number positions from `pad_token_id + 1`; BERT from 0.
    pub fn position_offset(&self) -> usize {
        if self.model_type == "bert" {
            0
        } else {
            self.pad_token_id as usize + 1
        }
    }

    /// The longest input (special tokens included) the position table allows.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }

    /// The prefix of the backbone's weights in transformers' task models (`bert.`, `roberta.`).
    pub fn backbone_prefix(&self) -> &'static str {
        if self.model_type == "bert" {
            "bert"
        } else {
            "roberta"
        }
    }

    /// The labels of a classification head saved in this config (`id2label`), in id order, when
    /// there are any beyond transformers' placeholder `LABEL_i` names.
    pub fn saved_labels(&self) -> Option<Vec<String>> {
        let map = self.raw.get("id2label")?.as_object()?;
        let mut by_id: BTreeMap<usize, String> = BTreeMap::new();
        for (id, label) in map {
            by_id.insert(id.parse().ok()?, label.as_str()?.to_string());
        }
        let labels: Vec<String> = by_id.into_values().collect();
        let placeholder = labels.iter().enumerate().all(|(i, l)| *l == format!("LABEL_{i}"));
        (!labels.is_empty() && !placeholder).then_some(labels)
    }

    /// This config with a task's head written in transformers' terms: `architectures`,
    /// `id2label`/`label2id` (classification), `num_labels` implied by them.
    pub fn with_task(&self, architecture: &str, labels: Option<&[String]>) -> Value {
        let mut raw = self.raw.clone();
        if let Some(object) = raw.as_object_mut() {
            object.insert("architectures".into(), serde_json::json!([architecture]));
            if let Some(labels) = labels {
                let id2label: serde_json::Map<String, Value> =
                    labels.iter().enumerate().map(|(i, l)| (i.to_string(), Value::from(l.as_str()))).collect();
                let label2id: serde_json::Map<String, Value> =
                    labels.iter().enumerate().map(|(i, l)| (l.clone(), Value::from(i))).collect();
                object.insert("id2label".into(), Value::Object(id2label));
                object.insert("label2id".into(), Value::Object(label2id));
            }
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> Value {
        serde_json::json!({
            "model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0
        })
    }

    #[test]
    fn reads_a_bert_config_and_writes_labels_back() {
        let config = EncoderConfig::from_json(minilm()).unwrap();
        assert_eq!((config.head_dim(), config.position_offset(), config.max_tokens()), (32, 0, 512));
        assert_eq!(config.activation, Activation::GeluErf);
        assert!(config.saved_labels().is_none());
        let labels = vec!["billing".to_string(), "refund".to_string()];
        let written =
            EncoderConfig::from_json(config.with_task("BertForSequenceClassification", Some(&labels))).unwrap();
        assert_eq!(written.saved_labels(), Some(labels));
        assert_eq!(written.raw["label2id"]["refund"], 1);
    }

    #[test]
    fn roberta_positions_start_after_padding_and_unknown_types_are_refused() {
        let mut raw = minilm();
        raw["model_type"] = "roberta".into();
        raw["pad_token_id"] = 1.into();
        raw["max_position_embeddings"] = 514.into();
        let config = EncoderConfig::from_json(raw.clone()).unwrap();
        assert_eq!((config.position_offset(), config.max_tokens(), config.backbone_prefix()), (2, 512, "roberta"));
        raw["model_type"] = "t5".into();
        assert!(matches!(EncoderConfig::from_json(raw), Err(ConfigError::Unsupported(_))));
    }
}
