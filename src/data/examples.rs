//! One dataset record → token ids and a loss mask saying which tokens the model learns to predict.
//!
//! Chat records are rendered once with the model's chat template and tokenized once, exactly as the
//! model will see conversations at inference; the assistant turns are then located in that text by
//! rendering the conversation up to each turn (the same prefix rendering an inference server does
//! before generating), and every token overlapping a turn is trained. This owns the masking rules;
//! it knows nothing of batching or packing.

#[cfg(test)]
mod tests;

use std::ops::Range;

use serde_json::Value;

use super::tokenizer::ChatTokenizer;
use super::DataError;
use crate::domain::dataset::DatasetFormat;

/// The token ids of one example and what to train on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    /// `loss_mask[i] == 1`: the model is trained to predict token `i` from the tokens before it.
    /// `loss_mask[0]` is always 0 (nothing precedes it).
    pub loss_mask: Vec<u8>,
    /// Whether tokens past `max_seq_len` were cut off.
    pub truncated: bool,
}

impl TokenizedExample {
    /// How many tokens the loss is computed on.
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m == 1).count()
    }
}

/// How records become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Longer examples keep their first `max_seq_len` tokens.
    pub max_seq_len: usize,
    /// Train on every token (prompts and system/user turns included), not only on the answers.
    pub train_on_inputs: bool,
}

/// Tokenizes one record of a causal-LM dataset. `Ok(None)` when truncation left no trained token
/// (the caller counts the example as dropped).
pub fn encode_record(
    tok: &ChatTokenizer,
    record: &Value,
    format: DatasetFormat,
    opts: &EncodeOptions,
) -> Result<Option<TokenizedExample>, DataError> {
    let (input_ids, loss_mask) = match format {
        DatasetFormat::Chat => encode_chat(tok, record, !opts.train_on_inputs)?,
        DatasetFormat::PromptCompletion => encode_prompt_completion(tok, record)?,
        DatasetFormat::Text => encode_text(tok, record)?,
        other => return Err(DataError::UnsupportedFormat(other)),
    };
    Ok(finish(input_ids, loss_mask, opts))
}

fn finish(mut input_ids: Vec<u32>, mut loss_mask: Vec<u8>, opts: &EncodeOptions) -> Option<TokenizedExample> {
    if opts.train_on_inputs {
        loss_mask.iter_mut().for_each(|m| *m = 1);
    }
    if let Some(first) = loss_mask.first_mut() {
        *first = 0;
    }
    let truncated = input_ids.len() > opts.max_seq_len;
    input_ids.truncate(opts.max_seq_len);
    loss_mask.truncate(opts.max_seq_len);
    let example = TokenizedExample { input_ids, loss_mask, truncated };
    (example.trained_tokens() > 0).then_some(example)
}

/// `locate_turns`: find the assistant turns (not needed when every token is trained anyway).
fn encode_chat(tok: &ChatTokenizer, record: &Value, locate_turns: bool) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let messages = record
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::InvalidRecord("a chat record needs a `messages` array".into()))?;
    let tools = record.get("tools").filter(|t| !t.is_null());
    // `weight` annotates the dataset, not the conversation: the template must not see it.
    let conversation: Vec<Value> = messages.iter().map(without_weight).collect();
    let render = |messages: &[Value], add_generation_prompt: bool| {
        tok.apply_chat_template(&Value::Array(messages.to_vec()), tools, add_generation_prompt)
    };
    let full = render(&conversation, false)?;
    let mut trained: Vec<Range<usize>> = Vec::new();
    for (k, message) in messages.iter().enumerate() {
        let is_assistant = message.get("role").and_then(Value::as_str) == Some("assistant");
        if !locate_turns || !is_assistant || has_zero_weight(message) {
            continue;
        }
        let prefix = render(&conversation[..k], true)?;
        let upto = render(&conversation[..=k], false)?;
        if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
            return Err(DataError::TemplateNotPrefixStable { message: k });
        }
        // Everything the template writes for the turn after the generation prompt: the answer and
        // its end-of-turn marker, so that the model learns to stop.
        trained.push(prefix.len()..upto.len());
    }
    let (input_ids, offsets) = tok.encode_with_offsets(&full, false)?;
    let loss_mask = offsets
        .iter()
        .map(|&(start, end)| {
            let overlaps = |span: &Range<usize>| start < end && start < span.end && span.start < end;
            u8::from(trained.iter().any(overlaps))
        })
        .collect();
    Ok((input_ids, loss_mask))
}

fn without_weight(message: &Value) -> Value {
    match message {
        Value::Object(fields) if fields.contains_key("weight") => {
            Value::Object(fields.iter().filter(|(k, _)| *k != "weight").map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        other => other.clone(),
    }
}

fn has_zero_weight(message: &Value) -> bool {
    message.get("weight").and_then(Value::as_f64) == Some(0.0)
}

/// `encode(prompt, true) ++ encode(completion, false) ++ [eos]`; the completion and EOS are trained.
fn encode_prompt_completion(tok: &ChatTokenizer, record: &Value) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let prompt = string_field(record, "prompt")?;
    let completion = string_field(record, "completion")?;
    let eos = tok.eos_token_id().ok_or(DataError::MissingSpecialToken("eos_token"))?;
    let mut input_ids = tok.encode(prompt, true)?;
    let prompt_len = input_ids.len();
    input_ids.extend(tok.encode(completion, false)?);
    input_ids.push(eos);
    let mut loss_mask = vec![1; input_ids.len()];
    loss_mask[..prompt_len].fill(0);
    Ok((input_ids, loss_mask))
}

/// `encode(text, true) ++ [eos]`, all trained.
fn encode_text(tok: &ChatTokenizer, record: &Value) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let text = string_field(record, "text")?;
    let eos = tok.eos_token_id().ok_or(DataError::MissingSpecialToken("eos_token"))?;
    let mut input_ids = tok.encode(text, true)?;
    input_ids.push(eos);
    let loss_mask = vec![1; input_ids.len()];
    Ok((input_ids, loss_mask))
}

fn string_field<'a>(record: &'a Value, key: &str) -> Result<&'a str, DataError> {
    record.get(key).and_then(Value::as_str).ok_or_else(|| DataError::InvalidRecord(format!("`{key}` must be a string")))
}
