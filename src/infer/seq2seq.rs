//! Decoding with an encoder-decoder (T5): the prompts are encoded once, then the decoder runs one
//! token at a time from the decoder start token over its cache, each sequence drawing from its own
//! [`Sampler`] (temperature 0 is greedy) until the end-of-sequence token or the token limit.

use candle_core::{DType, Result, Tensor};

use super::sampling::{Sampled, Sampler};
use crate::models::t5::T5;
use crate::models::ForwardCtx;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced its end-of-sequence token.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated tokens, without the decoder start token and the end-of-sequence token.
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// Each generated token's log-probability (when the sampler reports them).
    pub logprobs: Vec<f32>,
}

/// Decodes every prompt (token ids, the tokenizer's `</s>` included) with its sampler, as one
/// batch, each to at most `max_new_tokens`. Runs the model: call it off the async runtime.
pub fn generate(
    model: &T5,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    samplers: &mut [Sampler],
) -> Result<Vec<Generation>> {
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation { tokens: Vec::new(), finish: Finish::Length, logprobs: Vec::new() })
        .collect();
    let limits = vec![max_new_tokens; prompts.len()];
    let finishes = decode_batch(model, prompts, &limits, samplers, |row, sampled| {
        out[row].tokens.push(sampled.token);
        out[row].logprobs.extend(sampled.logprob);
        true
    })?;
    for (generation, finish) in out.iter_mut().zip(finishes) {
        generation.finish = finish;
    }
    Ok(out)
}

/// The decoding loop under [`generate`] and the serving engine: each row generates up to its
/// limit, and `on_token(row, sampled)` sees every token but `</s>`; when it returns false the row
/// stops there (a stop sequence, a client gone) with [`Finish::Stop`].
pub fn decode_batch(
    model: &T5,
    prompts: &[Vec<u32>],
    limits: &[usize],
    samplers: &mut [Sampler],
    mut on_token: impl FnMut(usize, &Sampled) -> bool,
) -> Result<Vec<Finish>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if samplers.len() != b || limits.len() != b || prompts.iter().any(Vec::is_empty) {
        candle_core::bail!("seq2seq decoding: {b} prompts (none empty) need {b} samplers and limits");
    }
    let c = &model.config;
    let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let (mut ids, mut mask) = (vec![c.pad_token_id; b * s], vec![0f32; b * s]);
    for (r, prompt) in prompts.iter().enumerate() {
        ids[r * s..r * s + prompt.len()].copy_from_slice(prompt);
        mask[r * s..r * s + prompt.len()].fill(1.0);
    }
    let device = model.device();
    let input_ids = Tensor::from_vec(ids, (b, s), device)?;
    let attention_mask = Tensor::from_vec(mask, (b, s), device)?;
    let ctx = ForwardCtx::inference();
    let encoded = model.encode(&input_ids, &attention_mask, &ctx)?;
    let mut cache = model.start_decoding(&encoded, &attention_mask, &ctx)?;
    let mut finish = vec![Finish::Length; b];
    let mut done: Vec<bool> = limits.iter().map(|&l| l == 0).collect();
    let mut generated = vec![0usize; b];
    let mut next = vec![c.decoder_start_token_id; b];
    while !done.iter().all(|&d| d) {
        let step = Tensor::from_vec(next.clone(), (b, 1), device)?;
        let hidden = model.decode(&step, &mut cache, &ctx)?;
        let rows: Vec<Vec<f32>> = model.logits(&hidden, &ctx)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?;
        for r in 0..b {
            if done[r] {
                next[r] = c.pad_token_id;
                continue;
            }
            let sampled = samplers[r].sample(&rows[r]);
            next[r] = sampled.token;
            if sampled.token == c.eos_token_id || !on_token(r, &sampled) {
                (done[r], finish[r]) = (true, Finish::Stop);
                continue;
            }
            generated[r] += 1;
            if generated[r] >= limits[r] {
                done[r] = true;
            }
        }
    }
    Ok(finish)
}
