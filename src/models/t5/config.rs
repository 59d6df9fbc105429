//! T5's `config.json` as transformers writes it (T5, T5 v1.1, Flan-T5, mT5): the two stacks'
//! sizes, the relative position buckets, the feed-forward variant and whether the output head is
//! tied to the embeddings.

use serde::Deserialize;
use serde_json::Value;

use crate::models::config::ConfigError;

/// The encoder-decoder model types we load.
pub const SEQ2SEQ_TYPES: [&str; 2] = ["t5", "mt5"];

/// Whether a `config.json` document describes an encoder-decoder this module loads.
pub fn is_seq2seq(raw: &Value) -> bool {
    raw.get("model_type").and_then(Value::as_str).is_some_and(|t| SEQ2SEQ_TYPES.contains(&t))
}

/// Whether the model directory `dir` holds a T5-family encoder-decoder (its `config.json` says so).
pub fn is_seq2seq_dir(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|raw| is_seq2seq(&raw))
}

/// The feed-forward's activation (transformers' `ACT2FN` names after `feed_forward_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// The exact, erf-based GELU (`gelu`).
    GeluErf,
    /// The tanh approximation (`gelu_new`): what `gated-gelu` means in T5 v1.1 and Flan-T5.
    GeluTanh,
    Silu,
}

#[derive(Debug, Clone)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub dropout: f32,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    /// `wi_0`/`wi_1` (act(wi_0·x) ⊙ wi_1·x) instead of one `wi`.
    pub gated: bool,
    /// What the config says about tying the output head to the shared embedding. transformers 5
    /// ties it unless the checkpoint holds a different `lm_head.weight` (T5 v1.1, Flan-T5), and
    /// so does [`super::T5::new`].
    pub tie_word_embeddings: bool,
    /// The decoder's output is scaled by `d_model^-0.5` before the head (original T5; not v1.1).
    /// transformers 5 writes `scale_decoder_outputs`; older configs meant it by
    /// `tie_word_embeddings` not being `false`.
    pub scale_decoder_outputs: bool,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
    /// The document as read, written back beside trained weights.
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawT5 {
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    #[serde(default)]
    num_decoder_layers: Option<usize>,
    num_heads: usize,
    #[serde(default = "default_buckets")]
    relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    relative_attention_max_distance: usize,
    #[serde(default = "default_dropout")]
    dropout_rate: f32,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_proj")]
    feed_forward_proj: String,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<Value>,
    #[serde(default)]
    decoder_start_token_id: Option<u32>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_dropout() -> f32 {
    0.1
}
fn default_eps() -> f64 {
    1e-6
}
fn default_proj() -> String {
    "relu".into()
}

impl T5Config {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let raw: Value = serde_json::from_str(&text)?;
        Self::from_json(raw)
    }

    pub fn from_json(raw: Value) -> Result<Self, ConfigError> {
        if !is_seq2seq(&raw) {
            return Err(ConfigError::Unsupported(format!(
                "model_type {} is not an encoder-decoder we load (expected one of {})",
                raw.get("model_type").unwrap_or(&Value::Null),
                SEQ2SEQ_TYPES.join(", ")
            )));
        }
        let r: RawT5 = serde_json::from_value(raw.clone())?;
        // transformers: "gated-gelu" is gelu_new; otherwise the last part names the activation.
        let (gated, act_name) = match r.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, r.feed_forward_proj.as_str()),
            Some(_) => {
                return Err(ConfigError::Unsupported(format!(
                    "feed_forward_proj {:?} is not `ACT` or `gated-ACT`",
                    r.feed_forward_proj
                )))
            }
        };
        let activation = match (gated, act_name) {
            (true, "gelu") | (_, "gelu_new") | (_, "gelu_pytorch_tanh") => Activation::GeluTanh,
            (false, "gelu") => Activation::GeluErf,
            (_, "relu") => Activation::Relu,
            (_, "silu") | (_, "swish") => Activation::Silu,
            (_, other) => {
                return Err(ConfigError::Unsupported(format!("T5 feed-forward activation {other:?} is not supported")))
            }
        };
        let eos = match &r.eos_token_id {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::Array(ids)) => ids.first().and_then(Value::as_u64),
            _ => None,
        }
        .unwrap_or(1) as u32;
        let pad = r.pad_token_id.unwrap_or(0);
        let config = Self {
            vocab_size: r.vocab_size,
            d_model: r.d_model,
            d_kv: r.d_kv,
            d_ff: r.d_ff,
            num_layers: r.num_layers,
            num_decoder_layers: r.num_decoder_layers.unwrap_or(r.num_layers),
            num_heads: r.num_heads,
            relative_attention_num_buckets: r.relative_attention_num_buckets,
            relative_attention_max_distance: r.relative_attention_max_distance,
            dropout: r.dropout_rate,
            layer_norm_epsilon: r.layer_norm_epsilon,
            activation,
            gated,
            tie_word_embeddings: r.tie_word_embeddings != Some(false),
            scale_decoder_outputs: r.scale_decoder_outputs.unwrap_or(r.tie_word_embeddings != Some(false)),
            pad_token_id: pad,
            eos_token_id: eos,
            decoder_start_token_id: r.decoder_start_token_id.unwrap_or(pad),
            raw,
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let zero = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.num_decoder_layers),
            ("num_heads", self.num_heads),
            ("relative_attention_num_buckets", self.relative_attention_num_buckets),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Unsupported(format!("{name} must be positive")));
        }
        if self.relative_attention_num_buckets < 4 || self.relative_attention_max_distance < 2 {
            return Err(ConfigError::Unsupported(
                "relative_attention_num_buckets must be at least 4 and relative_attention_max_distance at least 2"
                    .into(),
            ));
        }
        let ids = [("pad_token_id", self.pad_token_id), ("eos_token_id", self.eos_token_id)];
        if let Some((name, id)) = ids.iter().find(|(_, id)| *id as usize >= self.vocab_size) {
            return Err(ConfigError::Unsupported(format!(
                "{name} {id} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(())
    }

    /// Query/key/value width: `num_heads · d_kv` (not necessarily `d_model`).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// T5's relative position bucket of `relative = key − query` (transformers'
/// `_relative_position_bucket`): half the buckets per direction when `bidirectional` (the
/// encoder), only the past for the decoder; exact buckets for small distances, logarithmic ones
/// up to `max_distance`, and the last bucket beyond.
pub fn relative_bucket(relative: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        buckets /= 2;
        if relative > 0 {
            bucket += buckets;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as usize;
    }
    // As torch computes it: a float32 log over a float64 `math.log` (cast to float32), scaled,
    // truncated toward zero.
    let denominator = (max_distance as f64 / max_exact as f64).ln() as f32;
    let scaled = ((distance as f32 / max_exact as f32).ln() / denominator * (buckets - max_exact) as f32) as i64;
    (bucket + (max_exact + scaled).min(buckets - 1)) as usize
}
