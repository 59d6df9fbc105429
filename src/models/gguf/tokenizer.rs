//! The tokenizer and chat template of a GGUF file, from its `tokenizer.*` metadata: byte-level
//! BPE (`tokenizer.ggml.model = "gpt2"`) or SentencePiece-style BPE (`"llama"`), built as
//! transformers' GGUF loader builds them, so that token ids match it.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Content;
use candle_core::Result;
use serde_json::json;

use super::{architecture, meta, opt_u32};
use crate::data::tokenizer::ChatTokenizer;

/// The pre-tokenizer of a GGUF byte-level BPE vocabulary, by `tokenizer.ggml.pre` (the names
/// llama.cpp gives them; the regular expressions are those of the original tokenizer.json files).
fn pre_tokenizer(pre: &str) -> anyhow::Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-bpe" | "llama-v3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        other => anyhow::bail!("GGUF pre-tokenizer {other:?} is not supported (smollm, gpt2, llama3, qwen2)"),
    })
}

/// The tokenizer (`tokenizer.json` equivalent) and chat template from GGUF metadata: byte-level
/// BPE (`tokenizer.ggml.model = "gpt2"`) or SentencePiece-style BPE (`"llama"`: Llama 2, Mistral,
/// Mixtral), built as transformers' GGUF loader builds them.
pub fn tokenizer(content: &Content) -> anyhow::Result<ChatTokenizer> {
    let model = meta(content, "tokenizer.ggml.model")?.to_string()?.clone();
    let strings = |key: &str| -> anyhow::Result<Vec<String>> {
        Ok(meta(content, key)?.to_vec()?.iter().map(|v| v.to_string().cloned()).collect::<Result<_>>()?)
    };
    let gemma = matches!(architecture(content)?.0, "gemma2" | "gemma3");
    let mut tokens = strings("tokenizer.ggml.tokens")?;
    if gemma {
        // Gemma files store tokens of several spaces as spaces; the vocabulary spells them `▁`.
        for t in tokens.iter_mut().filter(|t| t.contains(' ') && t.trim().is_empty()) {
            *t = "\u{2581}".repeat(t.chars().count());
        }
    }
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    let token = |key: &str| opt_u32(content, key).and_then(|id| tokens.get(id as usize).cloned());
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let document = match model.as_str() {
        "gpt2" => {
            let pre = content
                .metadata
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.to_string().ok())
                .map_or("default", |s| s.as_str());
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(&tokens, &types, |t| t == 4),
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer(pre)?,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": strings("tokenizer.ggml.merges")?},
            })
        }
        "llama" => {
            let merges = match content.metadata.get("tokenizer.ggml.merges") {
                Some(_) => strings("tokenizer.ggml.merges")?.into_iter().map(serde_json::Value::from).collect(),
                // Gemma's scores do not follow its merge order; its vocabulary order does (as
                // transformers' GGUF Gemma tokenizer ranks them).
                None if gemma => {
                    let positions: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
                    sentencepiece_merges(&tokens, &positions)
                }
                None => {
                    let scores: Vec<f32> = meta(content, "tokenizer.ggml.scores")?
                        .to_vec()?
                        .iter()
                        .map(|v| v.to_f32())
                        .collect::<Result<_>>()?;
                    sentencepiece_merges(&tokens, &scores)
                }
            };
            // transformers' LlamaTokenizer (not legacy) puts a `▁` before the text's first piece;
            // for Phi-3 a normalizer puts one before the text and turns every space into `▁` (so a
            // text starting with a space gets two), as Phi-3's own tokenizer.json does.
            // Gemma: no `▁` before the text, every space one (transformers' `GemmaTokenizer`).
            let (normalizer, pre_tokenizer) = if gemma {
                let normalizer = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
                let split = json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                    "invert": false});
                (normalizer, split)
            } else if architecture(content)?.0 == "phi3" {
                let normalizer = json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
                (normalizer, serde_json::Value::Null)
            } else {
                let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first",
                    "split": false});
                (serde_json::Value::Null, metaspace)
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if !gemma {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
            let add_bos =
                content.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(true);
            let post_processor = match token("tokenizer.ggml.bos_token_id") {
                Some(bos) if add_bos => {
                    let id = opt_u32(content, "tokenizer.ggml.bos_token_id");
                    json!({"type": "TemplateProcessing",
                        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                        "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}}})
                }
                _ => serde_json::Value::Null,
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(&tokens, &types, |_| false),
                "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": post_processor,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": merges},
            })
        }
        other => anyhow::bail!(
            "GGUF tokenizer model {other:?} is not supported (byte-level BPE \"gpt2\", SentencePiece BPE \"llama\")"
        ),
    };
    let tokenizer: tokenizers::Tokenizer =
        document.to_string().parse().map_err(|e| anyhow::anyhow!("building the GGUF tokenizer: {e}"))?;
    let mut special = Vec::new();
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = token(key) {
            special.push((name.to_string(), t));
        }
    }
    let templates = match content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
        Some(template) => vec![("default".to_string(), template.clone())],
        None => Vec::new(),
    };
    Ok(ChatTokenizer::new(tokenizer, special, templates)?)
}

/// Control (type 3) and user-defined (type 4) tokens, matched whole before the model runs;
/// `normalized(type)` says which see the normalizer.
fn added_tokens(tokens: &[String], types: &[i32], normalized: impl Fn(i32) -> bool) -> Vec<serde_json::Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t == 3 || t == 4)
        .map(|(i, (content, &t))| {
            json!({"id": i, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": normalized(t), "special": t == 3})
        })
        .collect()
}

/// The merges a SentencePiece BPE vocabulary implies (llama.cpp's files store scores, not merges):
/// every split of every token into two tokens, ranked by the merged token's score, best first, ties
/// by the halves' lengths, then in vocabulary order (transformers' `generate_merges`).
fn sentencepiece_merges(tokens: &[String], scores: &[f32]) -> Vec<serde_json::Value> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize, f32)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*index.get(&token[..at])?, *index.get(&token[at..])?, score)))
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    let chars = |i: usize| tokens[i].chars().count();
    // Stable, descending by (score, left length, right length).
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2).then_with(|| chars(b.0).cmp(&chars(a.0))).then_with(|| chars(b.1).cmp(&chars(a.1)))
    });
    merges.into_iter().map(|(l, r, _)| json!([tokens[l], tokens[r]])).collect()
}
