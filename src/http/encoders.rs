//! The encoder endpoints: `POST /v1/embeddings` in OpenAI's shape (float or base64 vectors, the
//! mean-pooled, normalized sentence embedding) and `POST /v1/classifications` (ours: per-label
//! probabilities of each input or input pair, or per-token labels with character offsets and the
//! entities they form). Both run on the model's encoder engine, batched with concurrent requests.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{ApiJson, Caller};
use super::inference::{self, unsupported};
use super::state::AppState;
use crate::data::encoder::Encoded;
use crate::models::bert::Task;
use crate::serving::encoder::{char_offset, EncoderEngine, Output, Purpose};

/// OpenAI's limit on inputs per embeddings request.
const MAX_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<Value>,
    user: Option<String>,
    /// Ours: cut inputs longer than the model's context instead of refusing them.
    truncate: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationsRequest {
    model: String,
    input: Value,
    /// Only the `top_k` most likely labels per input (sequence classification); default: all.
    top_k: Option<usize>,
    truncate: Option<bool>,
    user: Option<String>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message).with_param(param)
}

/// One text, or a pair (`{"text", "text_pair"}`, classification only).
fn texts(input: &Value, pairs_allowed: bool) -> Result<Vec<(String, Option<String>)>, ApiError> {
    let bad = || {
        let pairs = if pairs_allowed { ", or objects {\"text\", \"text_pair\"}" } else { "" };
        invalid("input", format!("input must be a non-empty string or a list of non-empty strings{pairs}"))
    };
    let one = |item: &Value| -> Result<(String, Option<String>), ApiError> {
        match item {
            Value::String(text) if !text.is_empty() => Ok((text.clone(), None)),
            Value::Object(pair) if pairs_allowed => {
                let text = pair.get("text").and_then(Value::as_str).filter(|t| !t.is_empty()).ok_or_else(bad)?;
                let second = match pair.get("text_pair") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                    _ => return Err(bad()),
                };
                Ok((text.to_string(), second))
            }
            Value::Number(_) | Value::Array(_) => Err(invalid(
                "input",
                "token-id input is not supported for encoder models (their ids depend on special tokens); send text",
            )),
            _ => Err(bad()),
        }
    };
    let list: Vec<(String, Option<String>)> = match input {
        Value::Array(items) if items.is_empty() => return Err(bad()),
        Value::Array(items) => items.iter().map(one).collect::<Result<_, _>>()?,
        other => vec![one(other)?],
    };
    if list.len() > MAX_INPUTS {
        return Err(invalid("input", format!("at most {MAX_INPUTS} inputs per request, got {}", list.len())));
    }
    Ok(list)
}

/// Tokenizes every input (off the async workers), refusing ones longer than the model's context
/// unless `truncate`.
async fn encode(
    engine: &std::sync::Arc<EncoderEngine>,
    inputs: Vec<(String, Option<String>)>,
    words: bool,
    truncate: bool,
) -> Result<Vec<Encoded>, ApiError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || {
        let limit = engine.max_tokens;
        inputs
            .iter()
            .enumerate()
            .map(|(i, (text, pair))| {
                let encoded = if words {
                    // Token classification labels words: split on whitespace, offsets kept.
                    engine.tokenizer().encode_text(text, None, limit)
                } else {
                    engine.tokenizer().encode_text(text, pair.as_deref(), limit)
                }
                .map_err(|e| invalid("input", format!("input {i} cannot be tokenized: {e}")))?;
                if encoded.truncated && !truncate {
                    return Err(ApiError::new(
                        ErrorCode::ContextLengthExceeded,
                        format!(
                            "input {i} is longer than the model's {limit}-token context; shorten it or pass \
                             \"truncate\": true"
                        ),
                    )
                    .with_param("input"));
                }
                Ok(encoded)
            })
            .collect()
    })
    .await
    .map_err(ApiError::internal)?
}

async fn engine_for(
    state: &AppState,
    caller: &Caller,
    model: &str,
    purpose: Purpose,
) -> Result<std::sync::Arc<EncoderEngine>, ApiError> {
    let target = inference::resolve(state, caller, model).await?;
    state.inference.encoder(&target, purpose).await.map_err(inference::serve_error)
}

fn usage(encoded: &[Encoded]) -> Value {
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
    json!({"prompt_tokens": tokens, "total_tokens": tokens})
}

/// Little-endian f32 bytes in standard base64 (what OpenAI's `encoding_format: "base64"` returns).
fn base64_f32(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub async fn create_embeddings(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<EmbeddingsRequest>,
) -> Result<Json<Value>, ApiError> {
    let _ = &request.user;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(invalid("encoding_format", format!("encoding_format must be float or base64, not {other:?}")))
        }
    };
    let inputs = texts(&request.input, false)?;
    let engine = engine_for(&state, &caller, &request.model, Purpose::Embedding).await?;
    if let Some(dimensions) = &request.dimensions {
        if dimensions.as_u64() != Some(engine.hidden_size as u64) {
            return Err(unsupported(
                "dimensions",
                format!(
                    "{} returns {}-dimensional embeddings and cannot shorten them (it was not trained with Matryoshka \
                     loss); omit dimensions",
                    request.model, engine.hidden_size
                ),
            ));
        }
    }
    let encoded = encode(&engine, inputs, false, request.truncate.unwrap_or(false)).await?;
    let outputs = engine.run(encoded.clone()).await.map_err(ApiError::internal)?;
    let data: Vec<Value> = outputs
        .into_iter()
        .enumerate()
        .map(|(i, output)| {
            let Output::Embedding(vector) = output else { return json!(null) };
            let embedding = if base64 { json!(base64_f32(&vector)) } else { json!(vector) };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "model": request.model, "usage": usage(&encoded)})))
}

pub async fn create_classifications(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<ClassificationsRequest>,
) -> Result<Json<Value>, ApiError> {
    let _ = &request.user;
    if request.top_k == Some(0) {
        return Err(invalid("top_k", "top_k must be at least 1"));
    }
    let inputs = texts(&request.input, true)?;
    let engine = engine_for(&state, &caller, &request.model, Purpose::Classification).await?;
    let token_task = matches!(engine.task, Task::TokenClassification { .. });
    if token_task && inputs.iter().any(|(_, pair)| pair.is_some()) {
        return Err(invalid("input", "token classification takes single texts, not text pairs"));
    }
    let encoded = encode(&engine, inputs.clone(), token_task, request.truncate.unwrap_or(false)).await?;
    let outputs = engine.run(encoded.clone()).await.map_err(ApiError::internal)?;
    let labels = engine.task.labels().unwrap_or_default();
    let data: Vec<Value> = outputs
        .into_iter()
        .zip(&inputs)
        .enumerate()
        .map(|(i, (output, (text, _)))| match output {
            Output::Sequence(probs) => {
                let mut scores: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
                scores.sort_by(|a, b| b.1.total_cmp(&a.1));
                let best = scores[0];
                scores.truncate(request.top_k.unwrap_or(usize::MAX));
                let scores: Vec<Value> =
                    scores.iter().map(|&(l, s)| json!({"label": labels[l], "score": s})).collect();
                json!({"object": "classification", "index": i, "label": labels[best.0], "score": best.1, "scores": scores})
            }
            Output::Tokens(tokens) => {
                let tokens: Vec<(String, f32, usize, usize)> = tokens
                    .into_iter()
                    .map(|(probs, (start, end))| {
                        let (best, score) =
                            probs.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((0, 0.0));
                        (labels[best].clone(), score, char_offset(text, start), char_offset(text, end))
                    })
                    .collect();
                let entities = entities(text, &tokens);
                let tokens: Vec<Value> = tokens
                    .iter()
                    .map(|(label, score, start, end)| {
                        let word: String = text.chars().skip(*start).take(end - start).collect();
                        json!({"text": word, "label": label, "score": score, "start": start, "end": end})
                    })
                    .collect();
                json!({"object": "token_classification", "index": i, "tokens": tokens, "entities": entities})
            }
            Output::Embedding(_) => json!(null),
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "model": request.model, "usage": usage(&encoded)})))
}

/// Entities from per-token labels: consecutive tokens of one type (`B-X` starts one, `I-X`
/// continues it; a token continuing a word continues its entity), with the text they span and
/// their mean score, as transformers' `aggregation_strategy="simple"` groups them.
fn entities(text: &str, tokens: &[(String, f32, usize, usize)]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut current: Option<(String, usize, usize, Vec<f32>)> = None;
    let flush = |current: &mut Option<(String, usize, usize, Vec<f32>)>, out: &mut Vec<Value>| {
        if let Some((kind, start, end, scores)) = current.take() {
            let word: String = text.chars().skip(start).take(end - start).collect();
            let score = scores.iter().sum::<f32>() / scores.len() as f32;
            out.push(json!({"entity_group": kind, "score": score, "word": word, "start": start, "end": end}));
        }
    };
    for (label, score, start, end) in tokens {
        let (prefix, kind) = match label.split_once('-') {
            Some((p, k)) if p.len() == 1 => (p, k.to_string()),
            _ if label == "O" => ("O", String::new()),
            _ => ("B", label.clone()),
        };
        let continues = current.as_ref().is_some_and(|(k, _, end_so_far, _)| {
            *k == kind && (prefix == "I" || prefix == "E" || *start == *end_so_far)
        });
        if prefix == "O" {
            flush(&mut current, &mut out);
            continue;
        }
        if continues {
            if let Some((_, _, e, scores)) = current.as_mut() {
                *e = *end;
                scores.push(*score);
            }
        } else {
            flush(&mut current, &mut out);
            current = Some((kind, *start, *end, vec![*score]));
        }
    }
    flush(&mut current, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        // 1.0f32 = 00 00 80 3f; 2.0f32 = 00 00 00 40 (little-endian).
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
    }

    #[test]
    fn entities_group_b_and_i_tags_and_word_pieces() {
        let text = "Alice visited Paris";
        let tokens = vec![
            ("B-PER".to_string(), 0.9, 0, 3),
            ("I-PER".to_string(), 0.7, 3, 5),
            ("O".to_string(), 0.99, 6, 13),
            ("B-LOC".to_string(), 0.8, 14, 19),
        ];
        let found = entities(text, &tokens);
        assert_eq!(found.len(), 2);
        assert_eq!((found[0]["word"].as_str(), found[0]["entity_group"].as_str()), (Some("Alice"), Some("PER")));
        assert!((found[0]["score"].as_f64().unwrap() - 0.8).abs() < 1e-6);
        assert_eq!((found[1]["word"].as_str(), found[1]["start"].as_u64()), (Some("Paris"), Some(14)));
    }
}
