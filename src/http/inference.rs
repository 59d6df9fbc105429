//! What the chat and text completion endpoints share: the sampling parameters OpenAI defines and
//! their validation, finding the model the caller asked for (and may use), submitting to its
//! engine, and turning the engine's events into one response or a stream of Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::{ApiError, ErrorCode};
use super::extract::Caller;
use super::state::AppState;
use crate::domain::model_name::parse_fine_tuned_name;
use crate::executor::plan::JobPlan;
use crate::infer::engine::{Engine, FinishReason, GenEvent, GenerationRequest, SubmitError, TokenInfo};
use crate::infer::sampling::SamplingParams;
use crate::models::llama::ServingAdapter;
use crate::serving::seq2seq::Seq2SeqEngine;
use crate::serving::{ServeError, Target, WeightsSource};

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The parameters both endpoints take, named as OpenAI names them.
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: String,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM's extension: keep generating past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: Option<bool>,
    /// Accepted and ignored, as a label for the caller's own bookkeeping.
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// Validated parameters, ready for the engine.
#[derive(Debug)]
pub struct Prepared {
    pub sampling: SamplingParams,
    pub n: usize,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message).with_param(param)
}

pub fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::UnsupportedParameter, message).with_param(param)
}

impl CommonParams {
    /// Checks ranges as OpenAI documents them; `top_logprobs` comes from the endpoint.
    pub fn prepare(&self, top_logprobs: Option<usize>, max_n: usize) -> Result<Prepared, ApiError> {
        let in_range = |param: &str, value: Option<f32>, lo: f32, hi: f32| -> Result<(), ApiError> {
            match value {
                Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => {
                    Err(invalid(param, format!("{param} must be between {lo} and {hi}, not {v}")))
                }
                _ => Ok(()),
            }
        };
        in_range("temperature", self.temperature, 0.0, 2.0)?;
        in_range("top_p", self.top_p, 0.0, 1.0)?;
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if self.top_p == Some(0.0) {
            return Err(invalid("top_p", "top_p must be greater than 0"));
        }
        let n = self.n.unwrap_or(1);
        if n < 1 || n as usize > max_n {
            return Err(invalid("n", format!("n must be between 1 and {max_n}, not {n}")));
        }
        let (param, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        if let Some(m) = max_tokens.filter(|&m| m < 1) {
            return Err(invalid(param, format!("{param} must be at least 1, not {m}")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.len() > 4 {
            return Err(invalid("stop", "stop takes at most 4 sequences"));
        }
        if stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop sequences must not be empty"));
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(unsupported("logit_bias", "logit_bias is not supported by this server"));
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(invalid("stream_options", "stream_options is only allowed when stream is true"));
        }
        let seed = match self.seed {
            Some(seed) => seed as u64,
            None => rand::random(),
        };
        Ok(Prepared {
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p.unwrap_or(1.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                top_logprobs,
                seed,
            },
            n: n as usize,
            max_tokens: max_tokens.map(|m| m as usize),
            stop,
            stream,
            include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

fn model_not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ModelNotFound,
        format!("The model `{name}` does not exist or you do not have access to it."),
    )
    .with_param("model")
}

/// What `name` means for this caller: a base model, or one of the caller's project's fine-tuned
/// models or checkpoints. Anything else, another project's model included, is 404.
pub async fn resolve(state: &AppState, caller: &Caller, name: &str) -> Result<Target, ApiError> {
    if state.catalog.get(name).is_some() {
        return Ok(Target::Base { name: name.to_string() });
    }
    let parsed = parse_fine_tuned_name(name).ok_or_else(|| model_not_found(name))?;
    match parsed.checkpoint_step {
        None => {
            let model = state.store.get_model(&caller.project_id, &parsed.model).await?;
            let model = model.ok_or_else(|| model_not_found(name))?;
            let source = WeightsSource::Stored { prefix: model.storage_key };
            let (id, base, project) = (model.id, model.base_model, model.project_id);
            Ok(if ["lora", "bottleneck", "prefix"].contains(&model.method.as_str()) {
                Target::Adapter { id, base, project, source }
            } else {
                Target::Full { id, base, project, source }
            })
        }
        Some(_) => {
            let found = super::models::find_checkpoint(state, &caller.project_id, name).await?;
            let (job, checkpoint) = found.ok_or_else(|| model_not_found(name))?;
            let plan: JobPlan = serde_json::from_str(&job.hyperparameters).map_err(ApiError::internal)?;
            let lora = plan.lora.is_some() || plan.adapter_size.is_some() || plan.prefix_length.is_some();
            let source = WeightsSource::Checkpoint { prefix: checkpoint.storage_key, plan: Box::new(plan) };
            let (id, base, project) = (name.to_string(), job.model, job.project_id);
            Ok(if lora {
                Target::Adapter { id, base, project, source }
            } else {
                Target::Full { id, base, project, source }
            })
        }
    }
}

pub fn serve_error(err: ServeError) -> ApiError {
    match err {
        ServeError::NotSupported(message) => ApiError::new(ErrorCode::ModelNotSupported, message).with_param("model"),
        ServeError::Internal(cause) => ApiError::internal(cause),
    }
}

/// The engine and adapter that serve `target` (what `name` resolved to), loading them on first
/// use. A model deleted while it loads (its files vanish under the load) is a 404, as it would
/// have been a moment later.
pub async fn load(
    state: &AppState,
    caller: &Caller,
    name: &str,
    target: &Target,
) -> Result<(Arc<Engine>, Option<Arc<ServingAdapter>>), ApiError> {
    let loaded = async {
        let engine = state.inference.engine(target).await?;
        let adapter = state.inference.adapter(target, &engine).await?;
        Ok::<_, ServeError>((engine, adapter))
    };
    match loaded.await {
        Ok(loaded) => Ok(loaded),
        Err(err @ ServeError::Internal(_)) => match resolve(state, caller, name).await {
            Err(gone) if gone.code() == ErrorCode::ModelNotFound => Err(gone),
            _ => Err(serve_error(err)),
        },
        Err(err) => Err(serve_error(err)),
    }
}

/// What generates for a model: the decoder engine (with the adapter, if any), or an
/// encoder-decoder's (T5) engine.
pub enum Generator {
    Decoder { engine: Arc<Engine>, adapter: Option<Arc<ServingAdapter>> },
    Seq2Seq(Arc<Seq2SeqEngine>),
}

impl Generator {
    /// The generator of `target` (what `name` resolved to), loaded on first use.
    pub async fn load(state: &AppState, caller: &Caller, name: &str, target: &Target) -> Result<Self, ApiError> {
        if state.inference.is_seq2seq(target).await.map_err(serve_error)? {
            return Ok(Self::Seq2Seq(state.inference.seq2seq(target).await.map_err(serve_error)?));
        }
        let (engine, adapter) = load(state, caller, name, target).await?;
        Ok(Self::Decoder { engine, adapter })
    }

    pub fn vocab_size(&self) -> u32 {
        match self {
            Self::Decoder { engine, .. } => engine.model.config.vocab_size as u32,
            Self::Seq2Seq(engine) => engine.vocab_size as u32,
        }
    }

    /// A prompt's ids with the tokenizer's special tokens (BOS, or T5's `</s>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            Self::Decoder { engine, .. } => engine.tokenizer.encode(text, true).map_err(|e| e.to_string()),
            Self::Seq2Seq(engine) => {
                engine.tokenizer.encode_text(text, None, usize::MAX).map(|e| e.ids).map_err(|e| e.to_string())
            }
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Decoder { engine, .. } => engine.tokenizer.decode(ids, false).unwrap_or_default(),
            Self::Seq2Seq(engine) => engine.tokenizer.decode(ids, false).unwrap_or_default(),
        }
    }

    /// Submits `prompt`; the receiver yields the engine's events.
    pub fn submit(&self, prompt: Vec<u32>, prepared: &Prepared) -> Result<UnboundedReceiver<GenEvent>, ApiError> {
        match self {
            Self::Decoder { engine, adapter } => submit(engine, adapter.clone(), prompt, prepared),
            Self::Seq2Seq(engine) => submit_seq2seq(engine, prompt, prepared),
        }
    }
}

/// An encoder-decoder's prompt is only bounded by [`crate::serving::seq2seq::MAX_PROMPT_TOKENS`];
/// its completion, unless limited, by [`crate::serving::seq2seq::DEFAULT_MAX_TOKENS`].
fn submit_seq2seq(
    engine: &Seq2SeqEngine,
    prompt: Vec<u32>,
    prepared: &Prepared,
) -> Result<UnboundedReceiver<GenEvent>, ApiError> {
    use crate::serving::seq2seq::{Seq2SeqRequest, DEFAULT_MAX_TOKENS, MAX_PROMPT_TOKENS};
    if prompt.len() > MAX_PROMPT_TOKENS {
        return Err(ApiError::new(
            ErrorCode::ContextLengthExceeded,
            format!(
                "This model takes prompts of at most {MAX_PROMPT_TOKENS} tokens; the prompt has {}. Please shorten it.",
                prompt.len()
            ),
        )
        .with_param("prompt"));
    }
    if prepared.ignore_eos {
        return Err(unsupported("ignore_eos", "ignore_eos is not supported for encoder-decoder (T5) models"));
    }
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
    let request = Seq2SeqRequest {
        prompt,
        n: prepared.n,
        params: prepared.sampling.clone(),
        max_new_tokens: prepared.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        stop: prepared.stop.clone(),
        events,
    };
    engine.submit(request).map_err(submit_error)?;
    Ok(receiver)
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Overloaded => {
            ApiError::new(ErrorCode::EngineOverloaded, "this model's generation queue is full; retry the request later")
        }
        SubmitError::Stopped => ApiError::internal(anyhow::anyhow!("the generation engine has stopped")),
    }
}

/// Checks the prompt against the context and submits it; the receiver yields the engine's events.
pub fn submit(
    engine: &Engine,
    adapter: Option<Arc<ServingAdapter>>,
    prompt: Vec<u32>,
    prepared: &Prepared,
) -> Result<UnboundedReceiver<GenEvent>, ApiError> {
    // A prefix-tuned model's prefix takes positions before the prompt.
    let limit = engine.max_positions().saturating_sub(adapter.as_ref().map_or(0, |a| a.prefix_len()));
    let requested = prepared.max_tokens.unwrap_or(0);
    if prompt.len() + requested.max(1) > limit {
        return Err(ApiError::new(
            ErrorCode::ContextLengthExceeded,
            format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the \
                 prompt, {} for the completion). Please reduce the prompt or the completion length.",
                prompt.len() + requested.max(1),
                prompt.len(),
                requested.max(1),
            ),
        )
        .with_param("messages"));
    }
    let max_new_tokens = prepared.max_tokens.unwrap_or(limit - prompt.len());
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
    let request = GenerationRequest {
        prompt,
        adapter,
        n: prepared.n,
        params: prepared.sampling.clone(),
        max_new_tokens,
        stop: prepared.stop.clone(),
        ignore_eos: prepared.ignore_eos,
        events,
    };
    engine.submit(request).map_err(submit_error)?;
    Ok(receiver)
}

/// One finished choice.
#[derive(Debug, Default)]
pub struct ChoiceOut {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub finish_reason: Option<FinishReason>,
    pub completion_tokens: usize,
}

/// Waits for every choice to finish.
pub async fn collect(mut events: UnboundedReceiver<GenEvent>, n: usize) -> Result<Vec<ChoiceOut>, ApiError> {
    let mut choices: Vec<ChoiceOut> = (0..n).map(|_| ChoiceOut::default()).collect();
    let mut open = n;
    while open > 0 {
        match events.recv().await {
            Some(GenEvent::Delta { choice, text, tokens }) => {
                choices[choice].text.push_str(&text);
                choices[choice].tokens.extend(tokens);
            }
            Some(GenEvent::Finished { choice, reason, completion_tokens }) => {
                choices[choice].finish_reason = Some(reason);
                choices[choice].completion_tokens = completion_tokens;
                open -= 1;
            }
            Some(GenEvent::Failed(message)) => return Err(ApiError::internal(anyhow::anyhow!(message))),
            None => return Err(ApiError::internal(anyhow::anyhow!("the generation engine dropped the request"))),
        }
    }
    Ok(choices)
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// What a streaming endpoint turns into a chunk.
pub enum StreamItem<'a> {
    /// Before anything else, once per choice.
    Start {
        choice: usize,
    },
    Delta {
        choice: usize,
        text: &'a str,
        tokens: &'a [TokenInfo],
    },
    Finished {
        choice: usize,
        reason: FinishReason,
    },
    /// After every choice finished, when `include_usage` was asked for.
    Usage(Value),
}

/// Server-Sent Events: the endpoint's chunks, then `data: [DONE]`. A failure mid-stream is sent
/// as an `{"error": ...}` event, and the stream ends. Dropping the stream (the client left)
/// drops the receiver, which stops the generation.
pub fn sse(
    events: UnboundedReceiver<GenEvent>,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
    chunk: impl FnMut(StreamItem<'_>) -> Option<Value> + Send + 'static,
) -> Response {
    struct State<F> {
        events: UnboundedReceiver<GenEvent>,
        chunk: F,
        queued: std::collections::VecDeque<String>,
        open: usize,
        completion_tokens: usize,
        done: bool,
    }
    let mut state = State { events, chunk, queued: Default::default(), open: n, completion_tokens: 0, done: false };
    for choice in 0..n {
        if let Some(value) = (state.chunk)(StreamItem::Start { choice }) {
            state.queued.push_back(value.to_string());
        }
    }
    let stream = futures::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(data) = s.queued.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            if s.open == 0 {
                if include_usage {
                    if let Some(v) = (s.chunk)(StreamItem::Usage(usage(prompt_tokens, s.completion_tokens))) {
                        s.queued.push_back(v.to_string());
                    }
                }
                s.queued.push_back("[DONE]".to_string());
                s.done = true;
                continue;
            }
            match s.events.recv().await {
                Some(GenEvent::Delta { choice, text, tokens }) => {
                    if let Some(v) = (s.chunk)(StreamItem::Delta { choice, text: &text, tokens: &tokens }) {
                        s.queued.push_back(v.to_string());
                    }
                }
                Some(GenEvent::Finished { choice, reason, completion_tokens }) => {
                    s.open -= 1;
                    s.completion_tokens += completion_tokens;
                    if let Some(v) = (s.chunk)(StreamItem::Finished { choice, reason }) {
                        s.queued.push_back(v.to_string());
                    }
                }
                Some(GenEvent::Failed(message)) => {
                    tracing::error!(error = %message, "generation failed mid-stream");
                    let error = json!({"error": {"message": "internal error", "type": "server_error", "param": null,
                        "code": "internal_error"}});
                    s.queued.push_back(error.to_string());
                    s.done = true;
                }
                None => {
                    s.done = true;
                }
            }
        }
    });
    sse_response(stream)
}

fn sse_response(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// A fresh response id with OpenAI's prefix.
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", crate::ids::random_alphanumeric(24))
}
