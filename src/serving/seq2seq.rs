//! The generation engine of an encoder-decoder (T5): a thread of its own that takes the queued
//! requests together (every choice of every request one row of a batch, up to `max_batch`),
//! encodes their prompts once and decodes them step by step, streaming each row's new text as
//! [`GenEvent`]s, the same events the decoder engine sends, so the HTTP layer's collecting and
//! streaming serve both. Stop sequences end a row; text that could be the start of one is held
//! back until it is known not to be.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use super::Weights;
use crate::data::encoder::EncoderTokenizer;
use crate::infer::engine::{EngineSettings, FinishReason, GenEvent, SubmitError, TokenInfo, TokenPiece};
use crate::infer::sampling::{Sampled, Sampler, SamplingParams};
use crate::infer::seq2seq::{decode_batch, Finish};
use crate::models::adaptation::Adaptation;
use crate::models::t5::{T5Config, T5};
use crate::peft::lora::LoraPlan;

/// The longest prompt the engine encodes, in tokens (T5's relative positions set no limit; this
/// bounds the encoder's memory).
pub const MAX_PROMPT_TOKENS: usize = 2048;
/// Tokens generated when a request names no limit.
pub const DEFAULT_MAX_TOKENS: usize = 512;

pub struct Seq2SeqRequest {
    pub prompt: Vec<u32>,
    pub n: usize,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub events: UnboundedSender<GenEvent>,
}

pub struct Seq2SeqEngine {
    pub name: String,
    pub tokenizer: Arc<EncoderTokenizer>,
    pub vocab_size: usize,
    queue: SyncSender<Seq2SeqRequest>,
}

impl Seq2SeqEngine {
    pub fn start(name: &str, model: T5, tokenizer: EncoderTokenizer, settings: EngineSettings) -> anyhow::Result<Self> {
        let (queue, requests) = std::sync::mpsc::sync_channel(settings.max_queue.max(1));
        let tokenizer = Arc::new(tokenizer);
        let vocab_size = model.config.vocab_size;
        let worker_tokenizer = tokenizer.clone();
        let max_batch = settings.max_batch.max(1);
        std::thread::Builder::new()
            .name(format!("seq2seq-{}", name.chars().take(20).collect::<String>()))
            .stack_size(64 << 20)
            .spawn(move || serve(&model, &worker_tokenizer, requests, max_batch))
            .context("starting a seq2seq engine thread")?;
        Ok(Self { name: name.to_string(), tokenizer, vocab_size, queue })
    }

    pub fn submit(&self, request: Seq2SeqRequest) -> Result<(), SubmitError> {
        self.queue.try_send(request).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Overloaded,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}

/// One choice of one request being decoded.
struct Row {
    request: usize,
    choice: usize,
    tokens: Vec<u32>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    /// Tokens not yet reported with a delta (log-probabilities).
    pending: Vec<TokenInfo>,
    stopped_by_sequence: bool,
    gone: bool,
}

fn serve(model: &T5, tokenizer: &EncoderTokenizer, requests: Receiver<Seq2SeqRequest>, max_batch: usize) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        let mut rows = batch[0].n;
        while rows < max_batch {
            match requests.try_recv() {
                Ok(more) => {
                    rows += more.n;
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        if let Err(err) = run_batch(model, tokenizer, &batch) {
            tracing::error!(error = %err, "seq2seq generation failed");
            for request in &batch {
                let _ = request.events.send(GenEvent::Failed(err.to_string()));
            }
        }
    }
}

fn run_batch(model: &T5, tokenizer: &EncoderTokenizer, batch: &[Seq2SeqRequest]) -> anyhow::Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    let (mut prompts, mut limits, mut samplers) = (Vec::new(), Vec::new(), Vec::new());
    for (r, request) in batch.iter().enumerate() {
        for choice in 0..request.n {
            rows.push(Row {
                request: r,
                choice,
                tokens: Vec::new(),
                sent: 0,
                pending: Vec::new(),
                stopped_by_sequence: false,
                gone: false,
            });
            prompts.push(request.prompt.clone());
            limits.push(request.max_new_tokens);
            samplers.push(Sampler::new(request.params.clone(), choice));
        }
    }
    let finishes = decode_batch(model, &prompts, &limits, &mut samplers, |i, sampled| {
        let row = &mut rows[i];
        let request = &batch[row.request];
        row.tokens.push(sampled.token);
        if request.params.top_logprobs.is_some() {
            row.pending.push(token_info(tokenizer, sampled));
        }
        let text = tokenizer.decode(&row.tokens, true).unwrap_or_default();
        let (end, stop_at) = safe_end(&text, &request.stop);
        if let Some(at) = stop_at {
            row.stopped_by_sequence = true;
            send_delta(row, request, &text[..at.max(row.sent)]);
            return false;
        }
        send_delta(row, request, &text[..end]);
        !row.gone
    })?;
    for (row, finish) in rows.iter_mut().zip(finishes) {
        let request = &batch[row.request];
        if !row.stopped_by_sequence {
            // What was held back as a possible stop sequence's start, or an unfinished character.
            let text = tokenizer.decode(&row.tokens, true).unwrap_or_default();
            send_delta(row, request, &text);
        }
        let reason = match finish {
            Finish::Stop => FinishReason::Stop,
            Finish::Length => FinishReason::Length,
        };
        let _ =
            request.events.send(GenEvent::Finished { choice: row.choice, reason, completion_tokens: row.tokens.len() });
    }
    Ok(())
}

/// Sends the part of `text` after what was sent (with any pending token details).
fn send_delta(row: &mut Row, request: &Seq2SeqRequest, text: &str) {
    if text.len() <= row.sent && row.pending.is_empty() {
        return;
    }
    let new = text.get(row.sent..).unwrap_or_default().to_string();
    row.sent = row.sent.max(text.len());
    let tokens = std::mem::take(&mut row.pending);
    if request.events.send(GenEvent::Delta { choice: row.choice, text: new, tokens }).is_err() {
        row.gone = true;
    }
}

/// How much of `text` can be sent: up to where a stop sequence starts (and that position), else
/// all but a tail that could begin one, and never a trailing replacement character (a character
/// whose bytes are not all generated yet).
fn safe_end(text: &str, stops: &[String]) -> (usize, Option<usize>) {
    if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        return (at, Some(at));
    }
    let mut end = text.len();
    for stop in stops {
        for cut in (1..stop.len()).rev() {
            if stop.is_char_boundary(cut) && text.ends_with(&stop[..cut]) {
                end = end.min(text.len() - cut);
                break;
            }
        }
    }
    let trimmed = text[..end].trim_end_matches('\u{FFFD}');
    (trimmed.len(), None)
}

fn token_info(tokenizer: &EncoderTokenizer, sampled: &Sampled) -> TokenInfo {
    let piece = |id: u32| {
        let text = tokenizer.decode(&[id], false).unwrap_or_default();
        TokenPiece { bytes: text.as_bytes().to_vec(), text }
    };
    TokenInfo {
        piece: piece(sampled.token),
        logprob: sampled.logprob,
        top: sampled.top.iter().map(|&(id, lp)| (piece(id), lp)).collect(),
    }
}

/// Loads the T5 of `weights` and its tokenizer (blocking): a model directory, a PEFT LoRA adapter
/// over its base, or a checkpoint (LoRA factors, or every weight) over its base.
pub fn load(weights: Weights, device: &Device) -> anyhow::Result<(T5, EncoderTokenizer)> {
    let read = |dir: &Path| -> anyhow::Result<(T5Config, HashMap<String, Tensor>)> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        Ok((config, crate::models::weights::load_model_weights(dir, DType::F32, device)?))
    };
    let lora_plan =
        |config, tensors| LoraPlan { config, seed: 0, trainable: false, train_norms: false, loaded: Some(tensors) };
    match weights {
        Weights::Model(dir) => {
            let (config, tensors) = read(&dir)?;
            Ok((T5::new(config, tensors, Adaptation::None)?, EncoderTokenizer::from_dir(&dir)?))
        }
        Weights::Adapter { base, adapter } => {
            let (lora, _, adapter_tensors) = crate::peft::adapter::load_adapter(&adapter, device)?;
            let (config, tensors) = read(&base)?;
            let model = T5::new(config, tensors, Adaptation::Lora(&lora_plan(lora, adapter_tensors)))?;
            let tokenizer = EncoderTokenizer::from_dir(&adapter).or_else(|_| EncoderTokenizer::from_dir(&base))?;
            Ok((model, tokenizer))
        }
        Weights::Checkpoint { base, dir, plan } => {
            let trainable = candle_core::safetensors::load(dir.join("trainable.safetensors"), device)?;
            let (config, tensors) = read(&base)?;
            let model = match &plan.lora {
                Some(lora) => {
                    let named =
                        trainable
                            .into_iter()
                            .map(|(k, v)| {
                                if k.starts_with("base_model.") {
                                    (k, v)
                                } else {
                                    (format!("base_model.model.{k}"), v)
                                }
                            })
                            .collect();
                    T5::new(config, tensors, Adaptation::Lora(&lora_plan(lora.lora_config(), named)))?
                }
                None => {
                    let model = T5::new(config, tensors, Adaptation::Full)?;
                    model.trainable.restore(&trainable).context("the checkpoint does not fit its base model")?;
                    model
                }
            };
            Ok((model, EncoderTokenizer::from_dir(&base)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::safe_end;

    #[test]
    fn text_that_may_start_a_stop_sequence_is_held_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(safe_end("hello wor", &stops), (9, None));
        assert_eq!(safe_end("hello EN", &stops), (6, None));
        assert_eq!(safe_end("hello\n", &stops), (5, None));
        assert_eq!(safe_end("hello END more", &stops), (6, Some(6)));
        assert_eq!(safe_end("a\n\nb END", &stops), (1, Some(1)));
        assert_eq!(safe_end("caf\u{FFFD}", &[]), (3, None));
    }
}
