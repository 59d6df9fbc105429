//! One generation engine per loaded model: a dedicated thread that owns the decode loop.
//!
//! Requests arrive on a bounded queue (full = refused, so the caller can answer 429). Each step,
//! every active sequence contributes its pending tokens (a whole prompt when it is new, one token
//! when decoding) to a single batched forward over the shared base weights, each with its own
//! LoRA adapter and KV cache ([`CausalLm::forward_rows`]). A sequence ends on an end-of-sequence
//! token, a stop string, its token limit or the model's context; or when its caller goes away
//! (the event channel is closed), which frees its place at the next step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::sampling::{Sampled, Sampler, SamplingParams};
use super::text::{Piece, TextStream};
use crate::data::tokenizer::ChatTokenizer;
use crate::models::llama::{CausalLm, KvCache, Row, ServingAdapter};

/// A request for `n` completions of one prompt.
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<ServingAdapter>>,
    pub n: usize,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    pub events: UnboundedSender<GenEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A token as the API shows it: its raw bytes (a token may be part of a UTF-8 character) and
/// its text (`bytes:\xHH` for such a part, as OpenAI spells it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPiece {
    pub text: String,
    pub bytes: Vec<u8>,
}

impl TokenPiece {
    pub fn of(tokenizer: &ChatTokenizer, id: u32) -> Self {
        let bytes = tokenizer.token_bytes(id);
        Self { text: crate::data::tokenizer::token_text(&bytes), bytes }
    }
}

/// A generated token as the API reports it.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub piece: TokenPiece,
    pub logprob: Option<f32>,
    pub top: Vec<(TokenPiece, f32)>,
}

#[derive(Debug)]
pub enum GenEvent {
    /// New text (and the tokens generated this step, when log-probabilities were asked for).
    Delta {
        choice: usize,
        text: String,
        tokens: Vec<TokenInfo>,
    },
    Finished {
        choice: usize,
        reason: FinishReason,
        completion_tokens: usize,
    },
    /// Generation failed; no more events follow for this request.
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a place at most; more are refused.
    pub max_queue: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full.
    Overloaded,
    /// The engine thread is gone.
    Stopped,
}

/// What an engine has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences being generated now.
    pub active: AtomicUsize,
    /// Tokens generated since the engine started.
    pub generated_tokens: AtomicU64,
    /// Batched forward passes run.
    pub steps: AtomicU64,
    /// The most sequences one forward pass has carried.
    pub peak_batch: AtomicUsize,
}

/// The handle requests are submitted through; the thread ends once every handle is dropped and
/// its last sequence has finished.
pub struct Engine {
    queue: SyncSender<GenerationRequest>,
    pub model: Arc<CausalLm>,
    pub tokenizer: Arc<ChatTokenizer>,
    pub stop_ids: Vec<u32>,
    pub stats: Arc<EngineStats>,
}

impl Engine {
    pub fn start(
        name: &str,
        model: CausalLm,
        tokenizer: ChatTokenizer,
        settings: EngineSettings,
    ) -> std::io::Result<Self> {
        let (queue, receiver) = std::sync::mpsc::sync_channel(settings.max_queue.max(1));
        let mut stop_ids = model.config.eos_token_ids.clone();
        stop_ids.extend(tokenizer.eos_token_id());
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let model = Arc::new(model);
        let tokenizer = Arc::new(tokenizer);
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            stats: stats.clone(),
            model: model.clone(),
            tokenizer: tokenizer.clone(),
            stop_ids: stop_ids.clone(),
            max_batch: settings.max_batch.max(1),
            active: Vec::new(),
            next_group: 0,
        };
        std::thread::Builder::new()
            .name(format!("generate-{}", name.chars().take(20).collect::<String>()))
            .stack_size(64 << 20)
            .spawn(move || worker.run(receiver))?;
        Ok(Self { queue, model, tokenizer, stop_ids, stats })
    }

    pub fn submit(&self, request: GenerationRequest) -> Result<(), SubmitError> {
        self.queue.try_send(request).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Overloaded,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.model.config.max_position_embeddings
    }
}

/// One sequence being generated (one choice of a request).
struct Seq {
    group: u64,
    choice: usize,
    /// Tokens to feed at the next step; empty while waiting for the group's shared prefill.
    pending: Vec<u32>,
    cache: KvCache,
    adapter: Option<Arc<ServingAdapter>>,
    sampler: Sampler,
    text: TextStream,
    generated: usize,
    max_new_tokens: usize,
    want_logprobs: bool,
    ignore_eos: bool,
    events: UnboundedSender<GenEvent>,
}

struct Worker {
    stats: Arc<EngineStats>,
    model: Arc<CausalLm>,
    tokenizer: Arc<ChatTokenizer>,
    stop_ids: Vec<u32>,
    max_batch: usize,
    active: Vec<Seq>,
    next_group: u64,
}

impl Worker {
    fn run(mut self, queue: Receiver<GenerationRequest>) {
        let mut waiting: Option<GenerationRequest> = None;
        let mut open = true;
        loop {
            if self.active.is_empty() && waiting.is_none() {
                match queue.recv() {
                    Ok(request) => waiting = Some(request),
                    Err(_) => return,
                }
            }
            loop {
                if waiting.is_none() && open {
                    match queue.try_recv() {
                        Ok(request) => waiting = Some(request),
                        Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => open = false,
                    }
                }
                let Some(request) = waiting.take() else { break };
                if request.events.is_closed() {
                    continue;
                }
                if !self.active.is_empty() && self.active.len() + request.n > self.max_batch {
                    waiting = Some(request);
                    break;
                }
                self.admit(request);
            }
            self.active.retain(|s| !s.events.is_closed());
            self.stats.active.store(self.active.len(), Ordering::Relaxed);
            if self.active.is_empty() {
                if !open && waiting.is_none() {
                    return;
                }
                continue;
            }
            self.step();
        }
    }

    fn admit(&mut self, request: GenerationRequest) {
        let group = self.next_group;
        self.next_group += 1;
        for choice in 0..request.n.max(1) {
            self.active.push(Seq {
                group,
                choice,
                pending: if choice == 0 { request.prompt.clone() } else { Vec::new() },
                cache: KvCache::default(),
                adapter: request.adapter.clone(),
                sampler: Sampler::new(request.params.clone(), choice),
                text: TextStream::new(request.stop.clone()),
                generated: 0,
                max_new_tokens: request.max_new_tokens,
                want_logprobs: request.params.top_logprobs.is_some(),
                ignore_eos: request.ignore_eos,
                events: request.events.clone(),
            });
        }
    }

    /// One batched forward, then one token for every sequence.
    fn step(&mut self) {
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.peak_batch.fetch_max(self.active.len(), Ordering::Relaxed);
        let logits = {
            let mut rows: Vec<Row<'_>> = self
                .active
                .iter_mut()
                .filter(|s| !s.pending.is_empty())
                .map(|s| Row { tokens: &s.pending, cache: &mut s.cache, adapter: s.adapter.as_deref() })
                .collect();
            // On a rayon worker: the step's many small parallel ops then run there (inline with one
            // thread) instead of each waking the pool from this thread (~10% of a 1-thread decode).
            let model = &self.model;
            rayon::scope(|_| {
                model.forward_rows(&mut rows).and_then(|l| l.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>())
            })
        };
        let logits = match logits {
            Ok(logits) => logits,
            Err(err) => {
                tracing::error!(error = %err, "generation step failed");
                for seq in self.active.drain(..) {
                    let _ = seq.events.send(GenEvent::Failed(err.to_string()));
                }
                return;
            }
        };
        // Rows are the sequences that had pending tokens, in order; the others of their group
        // take the group leader's cache and logits (one prefill serves all `n` choices).
        let mut row_of: Vec<Option<usize>> = Vec::with_capacity(self.active.len());
        let mut next_row = 0;
        for seq in &self.active {
            if seq.pending.is_empty() {
                row_of.push(None);
            } else {
                row_of.push(Some(next_row));
                next_row += 1;
            }
        }
        for i in 0..self.active.len() {
            let row = match row_of[i] {
                Some(row) => row,
                None => {
                    let group = self.active[i].group;
                    let leader = (0..self.active.len()).find(|&j| self.active[j].group == group && row_of[j].is_some());
                    let Some(leader) = leader else { continue };
                    match self.active[leader].cache.fork() {
                        Ok(cache) => self.active[i].cache = cache,
                        Err(err) => {
                            let _ = self.active[i].events.send(GenEvent::Failed(err.to_string()));
                            self.active[i].pending.clear();
                            continue;
                        }
                    }
                    row_of[leader].expect("a leader has a row")
                }
            };
            let sampled = self.active[i].sampler.sample(&logits[row]);
            self.active[i].pending = vec![sampled.token];
            self.advance(i, sampled);
        }
        self.active.retain(|s| !s.pending.is_empty());
        self.stats.active.store(self.active.len(), Ordering::Relaxed);
    }

    /// Emits what the new token adds and ends the sequence when it should end (by clearing
    /// `pending`).
    fn advance(&mut self, i: usize, sampled: Sampled) {
        let max_positions = self.model.config.max_position_embeddings;
        let tokenizer = self.tokenizer.clone();
        let seq = &mut self.active[i];
        seq.generated += 1;
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let tokens = if seq.want_logprobs {
            vec![TokenInfo {
                piece: TokenPiece::of(&tokenizer, sampled.token),
                logprob: sampled.logprob,
                top: sampled.top.iter().map(|&(id, lp)| (TokenPiece::of(&tokenizer, id), lp)).collect(),
            }]
        } else {
            Vec::new()
        };
        let finish = |seq: &mut Seq, text: String, tokens: Vec<TokenInfo>, reason: FinishReason| {
            let choice = seq.choice;
            if !text.is_empty() || !tokens.is_empty() {
                let _ = seq.events.send(GenEvent::Delta { choice, text, tokens });
            }
            let _ = seq.events.send(GenEvent::Finished { choice, reason, completion_tokens: seq.generated });
            seq.pending.clear();
        };
        if !seq.ignore_eos && self.stop_ids.contains(&sampled.token) {
            let rest = seq.text.finish(&tokenizer).unwrap_or_default();
            return finish(seq, rest, tokens, FinishReason::Stop);
        }
        let piece = match seq.text.push(&tokenizer, sampled.token) {
            Ok(piece) => piece,
            Err(err) => {
                let _ = seq.events.send(GenEvent::Failed(format!("decoding generated tokens failed: {err}")));
                seq.pending.clear();
                return;
            }
        };
        match piece {
            Piece::Stopped(text) => finish(seq, text, tokens, FinishReason::Stop),
            Piece::Text(text) => {
                if seq.generated >= seq.max_new_tokens || seq.cache.len() + 1 > max_positions {
                    let text = text + &seq.text.finish(&tokenizer).unwrap_or_default();
                    return finish(seq, text, tokens, FinishReason::Length);
                }
                if !text.is_empty() || !tokens.is_empty() {
                    let _ = seq.events.send(GenEvent::Delta { choice: seq.choice, text, tokens });
                }
            }
        }
    }
}
