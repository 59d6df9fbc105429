//! GGUF base models (llama, qwen2, qwen3, phi3, qwen2moe and qwen3moe architectures, and llama
//! files with experts: Mixtral): the configuration from the
//! `<arch>.*` metadata, the weights under transformers' names (kept quantized where the file has
//! them quantized), and the tokenizer and chat template from the `tokenizer.*` metadata.
//!
//! For the llama architecture, llama.cpp's converter stores the query and key projections with
//! their rows permuted for its interleaved rotary embedding (`convert_hf_to_gguf.py`,
//! `LlamaModel.permute`); we undo that permutation row by row (a quantized row is a whole number
//! of blocks, so rows move as bytes). Qwen2 and Qwen3 use the split-halves rotation that
//! transformers uses, and their files are not permuted.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Result, Tensor};
use serde_json::json;

use super::config::ModelConfig;
use crate::data::tokenizer::ChatTokenizer;

mod tokenizer;
pub use tokenizer::tokenizer;

/// A GGUF file's model: dense tensors (norms, embeddings) and quantized linear weights.
pub struct GgufModel {
    pub config: ModelConfig,
    pub dense: HashMap<String, Tensor>,
    pub quantized: HashMap<String, Arc<QTensor>>,
    pub tokenizer: ChatTokenizer,
    /// The quantization of most linear weights (what QLoRA keeps by default).
    pub quantization: Option<super::common::quantized::Quantization>,
}

fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata has no {key}")))
}

fn opt_u32(content: &Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

/// The GGUF architectures we read: (llama.cpp's name, transformers' `model_type`, class).
/// A `llama` file with experts (`llama.expert_count`) is a Mixtral.
const ARCHITECTURES: [(&str, &str, &str); 8] = [
    ("llama", "llama", "LlamaForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "qwen3", "Qwen3ForCausalLM"),
    ("phi3", "phi3", "Phi3ForCausalLM"),
    ("qwen2moe", "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("gemma2", "gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "gemma3_text", "Gemma3ForCausalLM"),
];

fn architecture(content: &Content) -> Result<(&'static str, &'static str, &'static str)> {
    let arch = meta(content, "general.architecture")?.to_string()?.clone();
    let found = ARCHITECTURES.into_iter().find(|(name, _, _)| *name == arch).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "GGUF architecture {arch:?} is not supported (llama, qwen2, qwen3, phi3, qwen2moe, qwen3moe, gemma2, \
             gemma3)"
        ))
    })?;
    if found.0 == "llama" && opt_u32(content, "llama.expert_count").is_some_and(|n| n > 0) {
        return Ok(("llama", "mixtral", "MixtralForCausalLM"));
    }
    Ok(found)
}

/// The model's configuration as a transformers `config.json` would state it (`file` is read for
/// Phi-3's LongRoPE factors, which llama.cpp stores as tensors).
pub fn config_json(content: &Content, file: &mut std::fs::File) -> Result<serde_json::Value> {
    let (arch, model_type, class) = architecture(content)?;
    let key = |name: &str| format!("{arch}.{name}");
    let u = |name: &str| -> Result<u32> { meta(content, &key(name))?.to_u32() };
    let heads = u("attention.head_count")?;
    let hidden = u("embedding_length")?;
    let vocab = match opt_u32(content, &key("vocab_size")) {
        Some(v) => v as usize,
        None => meta(content, "tokenizer.ggml.tokens")?.to_vec()?.len(),
    };
    let eps = meta(content, &key("attention.layer_norm_rms_epsilon"))?.to_f32()?;
    let theta = content.metadata.get(&key("rope.freq_base")).and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0);
    let mut extra = serde_json::Map::new();
    if arch == "llama" && content.tensor_infos.contains_key("rope_freqs.weight") {
        // Llama 3.1+: llama.cpp stores the llama3 RoPE scaling as one divisor per frequency. The
        // same divisors for short and long sequences, without attention factor, are that scaling
        // as a transformers `longrope` configuration (which divides each frequency by its factor).
        let factors: Vec<f32> = content
            .tensor(file, "rope_freqs.weight", &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let context = u("context_length")?;
        extra.insert(
            "rope_parameters".into(),
            json!({"rope_type": "longrope", "rope_theta": theta as f64, "short_factor": factors,
                "long_factor": factors, "original_max_position_embeddings": context, "attention_factor": 1.0}),
        );
    }
    if arch == "phi3" {
        let window = opt_u32(content, &key("attention.sliding_window")).filter(|&w| w > 0);
        extra.insert("sliding_window".into(), json!(window));
        if content.tensor_infos.contains_key("rope_factors_long.weight") {
            let mut factors = |name: &str| -> Result<Vec<f32>> {
                content.tensor(file, name, &Device::Cpu)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
            };
            let original = u("rope.scaling.original_context_length")?;
            let mut rope = json!({"rope_type": "longrope", "rope_theta": theta as f64,
                "long_factor": factors("rope_factors_long.weight")?,
                "short_factor": factors("rope_factors_short.weight")?,
                "original_max_position_embeddings": original});
            if let Some(factor) = content.metadata.get(&key("rope.scaling.attn_factor")).and_then(|v| v.to_f32().ok()) {
                rope["attention_factor"] = json!(factor as f64);
            }
            extra.insert("rope_parameters".into(), rope);
            extra.insert("original_max_position_embeddings".into(), json!(original));
        }
    }
    if arch == "gemma2" || arch == "gemma3" {
        gemma_config(content, arch, theta, &mut extra)?;
    }
    if let Some(experts) = opt_u32(content, &key("expert_count")).filter(|&n| n > 0) {
        let used = u("expert_used_count")?;
        extra.insert("num_experts_per_tok".into(), json!(used));
        if model_type == "mixtral" {
            extra.insert("num_local_experts".into(), json!(experts));
        } else {
            extra.insert("num_experts".into(), json!(experts));
            extra.insert("moe_intermediate_size".into(), json!(u("expert_feed_forward_length")?));
            // llama.cpp renormalizes Qwen3-MoE's top-k weights, not Qwen2-MoE's.
            extra.insert("norm_topk_prob".into(), json!(model_type == "qwen3_moe"));
            if model_type == "qwen2_moe" {
                extra.insert("shared_expert_intermediate_size".into(), json!(u("expert_shared_feed_forward_length")?));
            }
        }
    }
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": u("feed_forward_length")?,
        "num_hidden_layers": u("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": opt_u32(content, &key("attention.head_count_kv")).unwrap_or(heads),
        "head_dim": opt_u32(content, &key("attention.key_length")).unwrap_or(hidden / heads),
        // f32 metadata: round to the decimal value the converter was given (1e-5, not 9.99999974e-6).
        "rms_norm_eps": format!("{eps:e}").parse::<f64>().unwrap_or(eps as f64),
        "rope_theta": theta as f64,
        "max_position_embeddings": u("context_length")?,
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        "hidden_act": "silu",
        "bos_token_id": opt_u32(content, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": opt_u32(content, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    });
    config.as_object_mut().expect("an object").extend(extra);
    Ok(config)
}

/// Gemma's settings as llama.cpp has them: the soft-caps and window from the metadata; the query
/// scale `1/sqrt(head_dim)`, but `1/sqrt(hidden/heads)` for the 27B models (46 layers for Gemma 2,
/// 62 for Gemma 3), which llama.cpp recognizes by size (there is no key for it); the sliding
/// layers in transformers' default pattern (every other layer, every sixth full for Gemma 3), as
/// llama.cpp fixes them; Gemma 3's global RoPE (theta, linear scaling) from the metadata and its
/// local theta 10000.
fn gemma_config(
    content: &Content,
    arch: &str,
    theta: f32,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let key = |name: &str| format!("{arch}.{name}");
    let u = |name: &str| -> Result<u32> { meta(content, &key(name))?.to_u32() };
    let f = |name: &str| content.metadata.get(&key(name)).and_then(|v| v.to_f32().ok()).map(f64::from);
    let (layers, hidden, heads) = (u("block_count")?, u("embedding_length")?, u("attention.head_count")?);
    let head_dim = opt_u32(content, &key("attention.key_length")).unwrap_or(hidden / heads);
    let big = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
    extra.insert("query_pre_attn_scalar".into(), json!(if big { hidden / heads } else { head_dim }));
    extra.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    extra.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
    if let Some(window) = opt_u32(content, &key("attention.sliding_window")) {
        extra.insert("sliding_window".into(), json!(window));
    }
    if arch == "gemma2" {
        extra.insert("attn_logit_softcapping".into(), json!(f("attn_logit_softcapping")));
        extra.insert("final_logit_softcapping".into(), json!(f("final_logit_softcapping")));
    } else {
        let scaling = content.metadata.get(&key("rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
        let global = match (scaling.as_deref(), f("rope.scaling.factor")) {
            (Some("linear"), Some(factor)) => {
                json!({"rope_type": "linear", "factor": factor, "rope_theta": theta as f64})
            }
            (None | Some("none"), _) => json!({"rope_type": "default", "rope_theta": theta as f64}),
            (Some(other), _) => candle_core::bail!("gemma3 GGUF rope scaling {other:?} is not supported"),
        };
        extra.insert(
            "rope_parameters".into(),
            json!({"full_attention": global, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        );
    }
    Ok(())
}

/// transformers' name for a GGUF tensor name of architecture `arch`.
fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        // Gemma's norms: before and after each sublayer.
        "ffn_norm" if arch.starts_with("gemma") => "pre_feedforward_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        // Phi-3's fused projections.
        "attn_qkv" => "self_attn.qkv_proj",
        "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        // Mixture of experts: the router, Qwen2-MoE's shared expert and its gate; the stacked
        // experts (`ffn_*_exps`) are split per expert by `load`.
        "ffn_gate_inp" => "mlp.gate",
        "ffn_gate_inp_shexp" => "mlp.shared_expert_gate",
        "ffn_gate_shexp" => "mlp.shared_expert.gate_proj",
        "ffn_up_shexp" => "mlp.shared_expert.up_proj",
        "ffn_down_shexp" => "mlp.shared_expert.down_proj",
        "ffn_gate_exps" => "mlp.experts.gate",
        "ffn_up_exps" => "mlp.experts.up",
        "ffn_down_exps" => "mlp.experts.down",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// Reads a GGUF file: every weight, dequantizing embeddings and norms and keeping the linear
/// weights as the file stores them.
pub fn load(path: &Path) -> anyhow::Result<GgufModel> {
    let mut file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let content =
        Content::read(&mut file).map_err(|e| anyhow::anyhow!("{} is not a GGUF file: {e}", path.display()))?;
    let raw_config = config_json(&content, &mut file)?;
    let config = ModelConfig::from_json(raw_config)?;
    let arch = architecture(&content)?.0;
    let permuted = arch == "llama";
    let device = Device::Cpu;
    let mut dense = HashMap::new();
    let mut quantized = HashMap::new();
    let mut counts: HashMap<GgmlDType, usize> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name, arch) else {
            if name == "rope_freqs.weight" {
                continue; // Llama 3.1's RoPE divisors, read into the configuration
            }
            if name.starts_with("rope_factors_") {
                continue; // Phi-3's LongRoPE factors, read into the configuration
            }
            anyhow::bail!("unexpected tensor {name} in a {} GGUF file", config.model_type);
        };
        let mut tensor = content.tensor(&mut file, name, &device)?;
        if let Some((layer, part)) = expert_stack(&hf) {
            // `(E, out, in)`: one weight per expert under the checkpoint's name, kept quantized.
            let Some(moe) = &config.moe else { anyhow::bail!("expert tensor {name} in a model without experts") };
            let index = match part {
                "gate" => 0,
                "up" => 1,
                _ => 2,
            };
            for (e, expert) in split_experts(&tensor, moe.num_experts)?.into_iter().enumerate() {
                let expert_name = moe.expert_weight_names(layer, e)[index].clone();
                match super::common::quantized::Quantization::from_ggml(expert.dtype()) {
                    Some(_) => {
                        *counts.entry(expert.dtype()).or_default() += 1;
                        quantized.insert(expert_name, Arc::new(expert));
                    }
                    None => {
                        dense.insert(expert_name, expert.dequantize(&device)?);
                    }
                }
            }
            continue;
        }
        if permuted && hf.ends_with("q_proj.weight") {
            tensor = unpermute_rows(&tensor, config.num_heads)?;
        } else if permuted && hf.ends_with("k_proj.weight") {
            tensor = unpermute_rows(&tensor, config.num_kv_heads)?;
        }
        let is_linear = hf.ends_with("_proj.weight") || hf == "lm_head.weight";
        let dtype = tensor.dtype();
        let block_quantized = super::common::quantized::Quantization::from_ggml(dtype).is_some();
        let tensor = Arc::new(tensor);
        if hf == "model.embed_tokens.weight" && config.tie_word_embeddings && block_quantized {
            // The tied output head reads this table once per generated token: kept quantized too,
            // it costs a quarter of the f32 table's memory traffic.
            quantized.insert("lm_head.weight".to_string(), tensor.clone());
        }
        if is_linear && block_quantized {
            *counts.entry(dtype).or_default() += 1;
            quantized.insert(hf, tensor);
        } else if arch.starts_with("gemma") && hf.ends_with("norm.weight") {
            // llama.cpp stores Gemma's `(1 + w)` norm weights with the 1 added.
            dense.insert(hf, (tensor.dequantize(&device)? - 1.0)?);
        } else if hf.ends_with("shared_expert_gate.weight") {
            // llama.cpp stores Qwen2-MoE's shared-expert gate `(1, hidden)` as a vector.
            dense.insert(hf, tensor.dequantize(&device)?.reshape((1, ()))?);
        } else {
            dense.insert(hf, tensor.dequantize(&device)?);
        }
    }
    let quantization = counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .and_then(|(d, _)| super::common::quantized::Quantization::from_ggml(d));
    let tokenizer = tokenizer(&content)?;
    Ok(GgufModel { config, dense, quantized, tokenizer, quantization })
}

/// `(layer, gate|up|down)` of a stacked expert tensor's placeholder name from [`hf_name`].
fn expert_stack(hf: &str) -> Option<(usize, &str)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let part = rest.strip_prefix("mlp.experts.")?.strip_suffix(".weight")?;
    Some((layer.parse().ok()?, part))
}

/// A stacked `(E, out, in)` GGUF tensor as `E` tensors `(out, in)` of the same type (the blocks of
/// a quantized one are split where each expert's rows start).
fn split_experts(tensor: &QTensor, experts: usize) -> Result<Vec<QTensor>> {
    let dims = tensor.shape().dims().to_vec();
    if dims.len() != 3 || dims[0] != experts {
        candle_core::bail!("expert tensor of shape {dims:?}, expected ({experts}, out, in)");
    }
    let dtype = tensor.dtype();
    let data = tensor.data()?;
    let per_expert = data.len() / experts;
    (0..experts)
        .map(|e| {
            let bytes = &data[e * per_expert..(e + 1) * per_expert];
            candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![dims[1], dims[2]], &Device::Cpu)
        })
        .collect()
}

/// Undoes llama.cpp's `permute` of a query/key projection: GGUF row `h·d + 2j + p` holds
/// transformers' row `h·d + p·d/2 + j` (`d` = head_dim).
fn unpermute_rows(tensor: &QTensor, heads: usize) -> Result<QTensor> {
    let (rows, cols) = tensor.shape().dims2()?;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let source_row = |hf_row: usize| {
        let (h, r) = (hf_row / head_dim, hf_row % head_dim);
        let (p, j) = (r / half, r % half);
        h * head_dim + 2 * j + p
    };
    let dtype = tensor.dtype();
    if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        let dense = tensor.dequantize(&Device::Cpu)?;
        let index: Vec<u32> = (0..rows).map(|r| source_row(r) as u32).collect();
        let permuted = dense.index_select(&Tensor::from_vec(index, rows, &Device::Cpu)?, 0)?;
        return QTensor::quantize(&permuted, dtype);
    }
    let data = tensor.data()?;
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    if data.len() != rows * row_bytes {
        candle_core::bail!("unexpected size of a {dtype:?} tensor");
    }
    let mut out = Vec::with_capacity(data.len());
    for r in 0..rows {
        let s = source_row(r);
        out.extend_from_slice(&data[s * row_bytes..(s + 1) * row_bytes]);
    }
    QTensor::new(QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, dtype)?, (rows, cols))
}

impl GgufModel {
    /// Builds the model: linear weights stay quantized when `keep_quantized` (QLoRA, inference),
    /// else everything is dequantized to f32 (LoRA over a dense base, full fine-tuning).
    pub fn build(
        self,
        keep_quantized: bool,
        adaptation: super::llama::Adaptation<'_>,
    ) -> Result<(super::llama::CausalLm, ChatTokenizer)> {
        let GgufModel { config, mut dense, quantized, tokenizer, .. } = self;
        let quantized = if keep_quantized {
            quantized
        } else {
            for (name, q) in quantized {
                dense.insert(name, q.dequantize(&Device::Cpu)?);
            }
            HashMap::new()
        };
        Ok((super::llama::CausalLm::with_quantized(config, dense, quantized, adaptation)?, tokenizer))
    }
}

/// The name of the link to the GGUF file in a materialized directory.
pub const GGUF_FILE: &str = "model.gguf";

/// Writes what the rest of the system reads from a Hugging Face directory for the GGUF file
/// `gguf`: `config.json`, `tokenizer.json`, `tokenizer_config.json` (special tokens and chat
/// template), `generation_config.json`, and `model.gguf` linking to the weights (read by
/// [`super::weights`]; never copied or dequantized to disk).
pub fn materialize(gguf: &Path, dir: &Path) -> anyhow::Result<()> {
    let gguf = std::fs::canonicalize(gguf).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", gguf.display()))?;
    let mut file = std::fs::File::open(&gguf)?;
    let content =
        Content::read(&mut file).map_err(|e| anyhow::anyhow!("{} is not a GGUF file: {e}", gguf.display()))?;
    let config = config_json(&content, &mut file)?;
    ModelConfig::from_json(config.clone())?;
    let tokenizer = tokenizer(&content)?;
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, value: &serde_json::Value| -> anyhow::Result<()> {
        Ok(std::fs::write(dir.join(name), serde_json::to_string_pretty(value)? + "\n")?)
    };
    write("config.json", &config)?;
    tokenizer.inner().save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tokenizer_config = serde_json::Map::new();
    for name in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(token) = tokenizer.special_token(name) {
            tokenizer_config.insert(name.to_string(), json!(token));
        }
    }
    if let Some(template) = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
        tokenizer_config.insert("chat_template".into(), json!(template));
    }
    tokenizer_config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    write("tokenizer_config.json", &serde_json::Value::Object(tokenizer_config))?;
    write(
        "generation_config.json",
        &json!({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}),
    )?;
    let link = dir.join(GGUF_FILE);
    let _ = std::fs::remove_file(&link);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&gguf, &link)?;
    #[cfg(not(unix))]
    std::fs::copy(&gguf, &link)?;
    Ok(())
}
