//! The Llama-family architecture as Hugging Face's `config.json` describes it (Llama 2/3, Mistral,
//! Qwen2, Qwen3, Phi-3, Gemma 2/3, SmolLM): one struct, with the per-family differences resolved
//! at load time.

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
    /// Gemma 2/3's variations on the layer (`None` for the other families).
    pub gemma: Option<Gemma>,
    /// Mixture-of-experts feed-forward layers (Mixtral, Qwen2-MoE, Qwen3-MoE).
    pub moe: Option<super::moe::MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The original file, kept to write it back unchanged next to fine-tuned weights.
    pub raw: Value,
}

/// What Gemma 2 and 3 change: RMSNorm scales by `1 + w`; embeddings are multiplied by
/// `sqrt(hidden)`; each sublayer has a norm before and after it (`input_layernorm` /
/// `post_attention_layernorm`, `pre_feedforward_layernorm` / `post_feedforward_layernorm`); the MLP
/// gates with tanh-approximated GELU; and the fields below.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma {
    /// Attention logits are `q·k × attention_scale` (`query_pre_attn_scalar^-1/2`).
    pub attention_scale: f64,
    /// Gemma 2: `c · tanh(x / c)` on the attention logits and on the output logits.
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Per layer, whether it attends only within `window` tokens (`layer_types`).
    pub sliding_layers: Vec<bool>,
    pub window: usize,
    /// Gemma 3: the sliding layers' RoPE (theta, scaling); the others use the model's.
    pub local_rope: Option<(f64, RopeScaling)>,
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
    tie_word_embeddings: Option<bool>,
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
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    router_aux_loss_coef: Option<f64>,
    router_jitter_noise: Option<f64>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    qkv_bias: Option<bool>,
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
        const SUPPORTED: [&str; 10] = [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "phi3",
            "gemma2",
            "gemma3_text",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
        ];
        if !SUPPORTED.contains(&c.model_type.as_str()) {
            return Err(ConfigError::Unsupported(format!(
                "model_type {:?} (supported: {})",
                c.model_type,
                SUPPORTED.join(", ")
            )));
        }
        let gemma = match c.model_type.as_str() {
            "gemma2" | "gemma3_text" => Some(gemma(&c)?),
            _ => None,
        };
        let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
        let partial = c.partial_rotary_factor.or_else(|| rope.and_then(|r| r.get("partial_rotary_factor")?.as_f64()));
        if partial.is_some_and(|f| f != 1.0) {
            return Err(ConfigError::Unsupported(
                "partial_rotary_factor other than 1 (rotary on part of each head)".into(),
            ));
        }
        if gemma.is_none() && c.hidden_act != "silu" {
            return Err(ConfigError::Unsupported(format!("hidden_act {:?} (only silu)", c.hidden_act)));
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if !c.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ConfigError::Unsupported(
                "num_attention_heads must be a multiple of num_key_value_heads".into(),
            ));
        }
        // transformers 5 keeps rope settings in `rope_parameters`; older files in `rope_scaling`.
        // Gemma 3 keeps one set of rope settings per layer type; the model's own are the global ones.
        let rope = match &gemma {
            Some(_) if rope.is_some_and(|r| r.get("full_attention").is_some()) => {
                rope.and_then(|r| r.get("full_attention"))
            }
            _ => rope,
        };
        let default_theta = if c.model_type == "gemma3_text" { 1_000_000.0 } else { 10_000.0 };
        let rope_theta = c
            .rope_theta
            .or_else(|| rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(default_theta);
        let sliding_window = match c.model_type.as_str() {
            "mistral" | "phi3" | "mixtral" => c.sliding_window,
            "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe" if c.use_sliding_window == Some(true) => {
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
        let tied_by_default = gemma.is_some();
        let moe = moe(&c)?;
        Ok(Self {
            qkv_bias: match c.model_type.as_str() {
                "qwen2" => true,
                "qwen2_moe" => c.qkv_bias.unwrap_or(true),
                _ => c.attention_bias,
            },
            o_bias: c.attention_bias,
            fused_projections: c.model_type == "phi3",
            qk_norm: matches!(c.model_type.as_str(), "qwen3" | "qwen3_moe" | "gemma3_text"),
            gemma,
            moe,
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
            // Gemma's configs default to a tied head; the others' to an untied one.
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(tied_by_default),
            sliding_window,
            mlp_bias: c.mlp_bias,
            bos_token_id: c.bos_token_id,
            eos_token_ids,
            raw,
        })
    }
}

impl ModelConfig {
    /// What RMSNorm adds to its weight before scaling: 1 for Gemma's `(1 + w)`, else 0.
    pub fn norm_offset(&self) -> f64 {
        if self.gemma.is_some() {
            1.0
        } else {
            0.0
        }
    }

    /// The factor on the token embeddings (Gemma: `sqrt(hidden_size)`).
    pub fn embed_scale(&self) -> Option<f64> {
        self.gemma.as_ref().map(|_| (self.hidden_size as f64).sqrt())
    }

    /// Attention logits are `q·k × attention_scale()`.
    pub fn attention_scale(&self) -> f64 {
        self.gemma.as_ref().map_or(1.0 / (self.head_dim as f64).sqrt(), |g| g.attention_scale)
    }

    /// Gemma 2's attention-logit soft-cap.
    pub fn attention_softcap(&self) -> Option<f64> {
        self.gemma.as_ref().and_then(|g| g.attn_softcap)
    }

    /// The window that layer `i` alone attends within (Gemma's sliding layers); the model-wide
    /// `sliding_window` (Mistral, Phi-3) is applied by whoever builds the mask.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        let gemma = self.gemma.as_ref()?;
        gemma.sliding_layers.get(i).copied().unwrap_or(false).then_some(gemma.window)
    }

    /// The linear modules of one decoder layer, by PEFT name (what `all-linear` expands to).
    /// Mixture-of-experts models: the attention's, and those of the dense layers and of Qwen2-MoE's
    /// shared expert (with its gate); the experts are parameters, adapted through PEFT's
    /// `target_parameters`, and the router is no linear module either.
    pub fn linear_modules(&self) -> Vec<&'static str> {
        if self.fused_projections {
            return vec!["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];
        }
        let mut out = vec!["q_proj", "k_proj", "v_proj", "o_proj"];
        let dense_mlp = self.moe.as_ref().is_none_or(|m| m.sparse_layers.iter().any(|&s| !s));
        let shared = self.moe.as_ref().is_some_and(|m| m.shared_intermediate.is_some());
        if dense_mlp || shared {
            out.extend(["gate_proj", "up_proj", "down_proj"]);
        }
        if shared {
            out.push("shared_expert_gate");
        }
        out
    }
}

/// The mixture-of-experts settings of a Mixtral, Qwen2-MoE or Qwen3-MoE config.
fn moe(c: &RawConfig) -> Result<Option<super::moe::MoeConfig>, ConfigError> {
    use super::moe::{MoeConfig, MoeNames};
    let names = match c.model_type.as_str() {
        "mixtral" => MoeNames::Mixtral,
        "qwen2_moe" | "qwen3_moe" => MoeNames::Qwen,
        _ => return Ok(None),
    };
    let missing = |key: &str| ConfigError::Unsupported(format!("{} config without `{key}`", c.model_type));
    let mixtral = names == MoeNames::Mixtral;
    // transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts` too.
    let num_experts = c.num_local_experts.or(c.num_experts).ok_or_else(|| missing("num_experts"))?;
    let top_k = c.num_experts_per_tok.ok_or_else(|| missing("num_experts_per_tok"))?;
    if num_experts == 0 || top_k == 0 || top_k > num_experts {
        return Err(ConfigError::Unsupported(format!(
            "num_experts_per_tok {top_k} with {num_experts} experts (needs 1 ≤ k ≤ experts)"
        )));
    }
    if c.router_jitter_noise.is_some_and(|j| j != 0.0) {
        return Err(ConfigError::Unsupported("router_jitter_noise other than 0".into()));
    }
    let step = c.decoder_sparse_step.unwrap_or(1).max(1);
    let dense = c.mlp_only_layers.clone().unwrap_or_default();
    let sparse_layers =
        (0..c.num_hidden_layers).map(|i| mixtral || (!dense.contains(&i) && (i + 1) % step == 0)).collect();
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        expert_intermediate: if mixtral {
            c.intermediate_size
        } else {
            c.moe_intermediate_size.ok_or_else(|| missing("moe_intermediate_size"))?
        },
        // Mixtral always renormalizes the top-k probabilities; Qwen when `norm_topk_prob`.
        norm_topk: mixtral || c.norm_topk_prob.unwrap_or(false),
        shared_intermediate: match c.model_type.as_str() {
            "qwen2_moe" => {
                Some(c.shared_expert_intermediate_size.ok_or_else(|| missing("shared_expert_intermediate_size"))?)
            }
            _ => None,
        },
        sparse_layers,
        aux_loss_coef: c.router_aux_loss_coef.unwrap_or(0.001),
        names,
    }))
}

/// Gemma's settings from a Gemma 2 or Gemma 3 (text) config.
fn gemma(c: &RawConfig) -> Result<Gemma, ConfigError> {
    let activation = c.hidden_activation.as_deref().unwrap_or(&c.hidden_act);
    if activation != "gelu_pytorch_tanh" {
        return Err(ConfigError::Unsupported(format!("{} with hidden_activation {activation:?}", c.model_type)));
    }
    if c.use_bidirectional_attention == Some(true) {
        return Err(ConfigError::Unsupported("use_bidirectional_attention".into()));
    }
    let gemma3 = c.model_type == "gemma3_text";
    // transformers' defaults when `layer_types` is absent: Gemma 2 alternates sliding and full
    // layers, Gemma 3 has every `sliding_window_pattern`-th layer (6) full.
    let pattern = c.sliding_window_pattern.unwrap_or(if gemma3 { 6 } else { 2 });
    let sliding_layers = match &c.layer_types {
        Some(types) if types.len() == c.num_hidden_layers => types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(ConfigError::Unsupported(format!("layer type {other:?}"))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ConfigError::Unsupported("layer_types must list every layer".into())),
        None => (0..c.num_hidden_layers).map(|i| (i + 1) % pattern != 0).collect(),
    };
    let window = c.sliding_window.unwrap_or(4096);
    let local_rope = if gemma3 {
        let local = c.rope_parameters.as_ref().and_then(|r| r.get("sliding_attention"));
        let theta = local
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(c.rope_local_base_freq)
            .unwrap_or(10_000.0);
        Some((theta, parse_rope_scaling(local, c)?))
    } else {
        None
    };
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads) as f64;
    Ok(Gemma {
        attention_scale: c.query_pre_attn_scalar.unwrap_or(head_dim).powf(-0.5),
        // Gemma 3 keeps the keys in its config but applies neither cap.
        attn_softcap: c.attn_logit_softcapping.filter(|_| !gemma3),
        final_softcap: c.final_logit_softcapping,
        sliding_layers,
        window,
        local_rope,
    })
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
