//! The Llama-family architecture as Hugging Face's `config.json` describes it (Llama 2/3, Mistral,
//! Qwen2, Qwen3, Phi-3, SmolLM): one struct, with the per-family differences resolved at load time.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config.json: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

/// Rotary-embedding frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// LongRoPE (Phi-3 128k, Phi-3.5): per-frequency divisors, `short` while a forward's longest
    /// position is within `original_max_position_embeddings`, `long` beyond it; cos and sin are
    /// multiplied by `attention_factor`.
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// A token attends to itself and the `window - 1` tokens before it (Mistral).
    pub sliding_window: Option<usize>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3's `q_norm`/`k_norm`).
    pub qk_norm: bool,
    pub mlp_bias: bool,
    /// Phi-3's fused projections: one `qkv_proj` (queries, keys, values in that order) and one
    /// `gate_up_proj` (gate, then up) instead of separate linears.
    pub fused_projections: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The original file, kept to write it back unchanged next to fine-tuned weights.
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "default_model_type")]
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl ModelConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_json(serde_json::from_str(&text)?)
    }

    pub fn from_json(raw: Value) -> Result<Self, ConfigError> {
        let c: RawConfig = serde_json::from_value(raw.clone())?;
        if !matches!(c.model_type.as_str(), "llama" | "mistral" | "qwen2" | "qwen3" | "phi3") {
            return Err(ConfigError::Unsupported(format!(
                "model_type {:?} (supported: llama, mistral, qwen2, qwen3, phi3)",
                c.model_type
            )));
        }
        let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
        let partial = c.partial_rotary_factor.or_else(|| rope.and_then(|r| r.get("partial_rotary_factor")?.as_f64()));
        if partial.is_some_and(|f| f != 1.0) {
            return Err(ConfigError::Unsupported(
                "partial_rotary_factor other than 1 (rotary on part of each head)".into(),
            ));
        }
        if c.hidden_act != "silu" {
            return Err(ConfigError::Unsupported(format!("hidden_act {:?} (only silu)", c.hidden_act)));
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if !c.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ConfigError::Unsupported(
                "num_attention_heads must be a multiple of num_key_value_heads".into(),
            ));
        }
        // transformers 5 keeps rope settings in `rope_parameters`; older files in `rope_scaling`.
        let rope_theta =
            c.rope_theta.or_else(|| rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64)).unwrap_or(10_000.0);
        let sliding_window = match c.model_type.as_str() {
            "mistral" | "phi3" => c.sliding_window,
            "qwen2" | "qwen3" if c.use_sliding_window == Some(true) => {
                return Err(ConfigError::Unsupported(format!("{} with use_sliding_window", c.model_type)))
            }
            _ => None,
        };
        let eos_token_ids = match &c.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
            _ => Vec::new(),
        };
        let rope_scaling = parse_rope_scaling(rope, &c)?;
        Ok(Self {
            qkv_bias: c.model_type == "qwen2" || c.attention_bias,
            o_bias: c.attention_bias,
            qk_norm: c.model_type == "qwen3",
            fused_projections: c.model_type == "phi3",
            model_type: c.model_type,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            sliding_window,
            mlp_bias: c.mlp_bias,
            bos_token_id: c.bos_token_id,
            eos_token_ids,
            raw,
        })
    }
}

impl ModelConfig {
    /// The linear modules of one decoder layer, by PEFT name (what `all-linear` expands to).
    pub fn linear_modules(&self) -> &'static [&'static str] {
        if self.fused_projections {
            &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        } else {
            &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        }
    }
}

fn parse_rope_scaling(rope: Option<&Value>, c: &RawConfig) -> Result<RopeScaling, ConfigError> {
    let Some(rope) = rope.filter(|r| r.is_object()) else { return Ok(RopeScaling::None) };
    let kind = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
    let number = |key: &str| {
        rope.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| ConfigError::Unsupported(format!("rope scaling {kind:?} without `{key}`")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: number("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        }),
        "longrope" | "su" => {
            let factors = |key: &str| -> Result<Vec<f64>, ConfigError> {
                let list =
                    rope.get(key).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_f64).collect());
                match list {
                    Some(list)
                        if Vec::len(&list) == c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads) / 2 =>
                    {
                        Ok(list)
                    }
                    _ => Err(ConfigError::Unsupported(format!("longrope `{key}` must list head_dim / 2 numbers"))),
                }
            };
            // transformers 5 moves `original_max_position_embeddings` into the rope settings;
            // Phi-3's own files have it at the top level.
            let original = rope
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .or(c.original_max_position_embeddings)
                .ok_or_else(|| ConfigError::Unsupported("longrope without original_max_position_embeddings".into()))?;
            // As transformers' `_compute_longrope_parameters`: the factor defaults to the context
            // extension ratio, the attention factor to sqrt(1 + ln(factor) / ln(original)).
            let factor = rope
                .get("factor")
                .and_then(Value::as_f64)
                .unwrap_or(c.max_position_embeddings as f64 / original as f64);
            let attention_factor = rope.get("attention_factor").and_then(Value::as_f64).unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / (original as f64).ln()).sqrt()
            });
            Ok(RopeScaling::LongRope {
                short: factors("short_factor")?,
                long: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => Err(ConfigError::Unsupported(format!(
            "rope scaling {other:?} (supported: default, linear, llama3, longrope)"
        ))),
    }
}
