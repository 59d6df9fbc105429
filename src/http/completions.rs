//! `POST /v1/completions` (OpenAI's legacy text completions): a raw prompt, no chat template;
//! decoders continue it, encoder-decoders (T5) answer it (the prompt is the encoder's input).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ErrorCode};
use super::extract::{ApiJson, Caller};
use super::inference::{self, unsupported, ChoiceOut, CommonParams, StreamItem};
use super::state::AppState;
use crate::infer::engine::TokenInfo;

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    common: CommonParams,
    prompt: Value,
    logprobs: Option<i64>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<i64>,
}

/// A prompt as text (tokenized with the model's special tokens, e.g. BOS) or as token ids.
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

fn prompts(value: &Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
        .with_param("prompt")
    };
    let tokens = |items: &[Value]| -> Option<Vec<u32>> {
        items.iter().map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
    };
    let list = match value {
        Value::String(text) => return Ok(vec![Prompt::Text(text.clone())]),
        Value::Array(items) if items.is_empty() => return Err(bad()),
        Value::Array(items) => items,
        _ => return Err(bad()),
    };
    if list.iter().all(Value::is_number) {
        return Ok(vec![Prompt::Tokens(tokens(list).ok_or_else(bad)?)]);
    }
    list.iter()
        .map(|item| match item {
            Value::String(text) => Ok(Prompt::Text(text.clone())),
            Value::Array(ids) if !ids.is_empty() => Ok(Prompt::Tokens(tokens(ids).ok_or_else(bad)?)),
            _ => Err(bad()),
        })
        .collect()
}

pub async fn create_completion(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "suffix (insertion) is not supported by this server"));
    }
    let top_logprobs = match request.logprobs {
        Some(k) if !(0..=5).contains(&k) => {
            return Err(
                ApiError::new(ErrorCode::InvalidRequest, "logprobs must be between 0 and 5").with_param("logprobs")
            )
        }
        k => k.map(|k| k as usize),
    };
    let echo = request.echo.unwrap_or(false);
    if echo && top_logprobs.is_some() {
        return Err(unsupported("echo", "echo together with logprobs (prompt log-probabilities) is not supported"));
    }
    let max_n = state.inference.settings().engine.max_batch;
    let prepared = request.common.prepare(top_logprobs, max_n)?;
    if let Some(best_of) = request.best_of.filter(|&b| b != prepared.n as i64) {
        return Err(unsupported("best_of", format!("best_of must equal n (no server-side ranking), not {best_of}")));
    }
    let prompts = prompts(&request.prompt)?;
    // Each prompt is one request in the model's queue: more than the queue holds could never be
    // accepted, however long the client waited, so this is the request's fault, not a 429.
    let max_queue = state.inference.settings().engine.max_queue;
    if prompts.len() > max_queue {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("this server takes at most {max_queue} prompts per request, not {}", prompts.len()),
        )
        .with_param("prompt"));
    }
    if prepared.stream && prompts.len() > 1 {
        return Err(unsupported("prompt", "streaming takes one prompt per request"));
    }
    let model_name = request.common.model.clone();
    let target = inference::resolve(&state, &caller, &model_name).await?;
    let generator = std::sync::Arc::new(inference::Generator::load(&state, &caller, &model_name, &target).await?);
    let vocab = generator.vocab_size();
    let encoding = generator.clone();
    let encoded = tokio::task::spawn_blocking(move || -> Result<Vec<(Vec<u32>, String)>, ApiError> {
        prompts
            .into_iter()
            .map(|prompt| {
                let (ids, text) = match prompt {
                    Prompt::Text(text) => (encoding.encode(&text), text),
                    Prompt::Tokens(ids) => {
                        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
                            return Err(ApiError::new(
                                ErrorCode::InvalidRequest,
                                format!("token id {bad} is outside the model's vocabulary of {vocab}"),
                            )
                            .with_param("prompt"));
                        }
                        let text = encoding.decode(&ids);
                        (Ok(ids), text)
                    }
                };
                let ids = ids.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e).with_param("prompt"))?;
                if ids.is_empty() {
                    return Err(ApiError::new(ErrorCode::InvalidRequest, "the prompt is empty").with_param("prompt"));
                }
                Ok((ids, text))
            })
            .collect()
    })
    .await
    .map_err(ApiError::internal)??;
    let id = inference::response_id("cmpl");
    let created = crate::ids::unix_now();
    let want_logprobs = top_logprobs.is_some();
    let prompt_tokens: usize = encoded.iter().map(|(ids, _)| ids.len()).sum();
    if prepared.stream {
        let (ids, prompt_text) = encoded.into_iter().next().expect("one prompt");
        let events = generator.submit(ids, &prepared)?;
        let chunk = move |item: StreamItem<'_>| -> Option<Value> {
            let (choices, usage) = match item {
                StreamItem::Start { choice } if echo => (choice_json(choice, &prompt_text, None, None), Value::Null),
                StreamItem::Start { .. } => return None,
                StreamItem::Delta { choice, text, tokens } => {
                    let logprobs = want_logprobs.then(|| legacy_logprobs(tokens, 0));
                    (choice_json(choice, text, logprobs, None), Value::Null)
                }
                StreamItem::Finished { choice, reason } => {
                    (choice_json(choice, "", None, Some(reason.as_str())), Value::Null)
                }
                StreamItem::Usage(usage) => (json!([]), usage),
            };
            let mut chunk = json!({"id": id, "object": "text_completion", "created": created, "model": model_name,
                "system_fingerprint": null, "choices": choices});
            if prepared.include_usage {
                chunk["usage"] = usage;
            }
            Some(chunk)
        };
        return Ok(inference::sse(events, prepared.n, prompt_tokens, prepared.include_usage, chunk));
    }
    let mut receivers = Vec::with_capacity(encoded.len());
    for (ids, text) in encoded {
        receivers.push((generator.submit(ids, &prepared)?, text));
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (p, (events, prompt_text)) in receivers.into_iter().enumerate() {
        for (j, c) in inference::collect(events, prepared.n).await?.into_iter().enumerate() {
            let ChoiceOut { text, tokens, finish_reason, completion_tokens: used } = c;
            completion_tokens += used;
            let text = if echo { format!("{prompt_text}{text}") } else { text };
            let logprobs = want_logprobs.then(|| legacy_logprobs(&tokens, 0));
            let mut choice = choice_json(p * prepared.n + j, &text, logprobs, finish_reason.map(|r| r.as_str()));
            choices.push(choice[0].take());
        }
    }
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "system_fingerprint": null,
        "choices": choices,
        "usage": inference::usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

fn choice_json(index: usize, text: &str, logprobs: Option<Value>, finish_reason: Option<&str>) -> Value {
    json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])
}

/// The legacy `logprobs` object: parallel lists per token.
fn legacy_logprobs(tokens: &[TokenInfo], start_offset: usize) -> Value {
    let mut offset = start_offset;
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.piece.bytes.len();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| Value::Object(t.top.iter().map(|(p, lp)| (p.text.clone(), json!(lp))).collect::<Map<_, _>>()))
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.piece.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}
