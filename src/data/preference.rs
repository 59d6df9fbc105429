//! Preference records (OpenAI's DPO format: `input.messages`, `preferred_output`,
//! `non_preferred_output`) → a pair of token sequences that share the prompt, each trained only
//! on its own answer.
//!
//! Each answer is rendered after the prompt with the model's chat template, exactly as a
//! conversation ending in that answer would be, and its tokens are located the way `examples`
//! locates assistant turns: by rendering the prompt with the generation prompt and taking what
//! follows. Assistant turns inside the prompt are context, never trained.

use std::ops::Range;

use serde_json::Value;

use super::dataset::{EncodeStats, LoadedDataset};
use super::examples::{EncodeOptions, TokenizedExample};
use super::tokenizer::ChatTokenizer;
use super::DataError;
use crate::domain::dataset::DatasetFormat;

/// The two answers to one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub chosen: TokenizedExample,
    pub rejected: TokenizedExample,
}

/// The pairs of a dataset and what encoding did to it (counts are of pairs; `tokens` and
/// `trained_tokens` add up both answers).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPairs {
    pub pairs: Vec<PreferencePair>,
    pub stats: EncodeStats,
}

/// Tokenizes every preference record; an error names the record's line. A pair is dropped when
/// truncation to `max_seq_len` leaves either answer without a token (the prompt alone fills it).
pub fn encode_preference_dataset(
    tok: &ChatTokenizer,
    data: &LoadedDataset,
    opts: &EncodeOptions,
) -> Result<EncodedPairs, DataError> {
    if data.format != DatasetFormat::Preference {
        return Err(DataError::InvalidRecord(format!(
            "preference training needs a preference dataset (input, preferred_output, non_preferred_output); this \
             file is {}",
            data.format.human_name()
        )));
    }
    let mut pairs = Vec::with_capacity(data.len());
    let mut stats = EncodeStats::default();
    for (record, &line) in data.records.iter().zip(&data.lines) {
        let pair = encode_pair(tok, record, opts).map_err(|e| DataError::Record { line, source: Box::new(e) })?;
        match pair {
            Some(pair) => {
                stats.examples += 1;
                stats.truncated += usize::from(pair.chosen.truncated || pair.rejected.truncated);
                stats.tokens += pair.chosen.input_ids.len() + pair.rejected.input_ids.len();
                stats.trained_tokens += pair.chosen.trained_tokens() + pair.rejected.trained_tokens();
                pairs.push(pair);
            }
            None => stats.dropped += 1,
        }
    }
    Ok(EncodedPairs { pairs, stats })
}

/// One record → its pair; `Ok(None)` when an answer has no token left after truncation.
pub fn encode_pair(
    tok: &ChatTokenizer,
    record: &Value,
    opts: &EncodeOptions,
) -> Result<Option<PreferencePair>, DataError> {
    let input = record.get("input").ok_or_else(|| DataError::InvalidRecord("`input` is missing".into()))?;
    let prompt = input
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::InvalidRecord("`input.messages` must be an array".into()))?;
    let tools = input.get("tools").filter(|t| !t.is_null());
    let answer = |key: &str| -> Result<Option<TokenizedExample>, DataError> {
        let outputs = record
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| DataError::InvalidRecord(format!("`{key}` must be an array of assistant messages")))?;
        let (ids, mask) = encode_answer(tok, prompt, outputs, tools)?;
        Ok(truncate(ids, mask, opts.max_seq_len))
    };
    match (answer("preferred_output")?, answer("non_preferred_output")?) {
        (Some(chosen), Some(rejected)) => Ok(Some(PreferencePair { chosen, rejected })),
        _ => Ok(None),
    }
}

/// The conversation `prompt ++ outputs` rendered and tokenized once; the mask covers what the
/// template writes after the prompt's generation prompt (the answer and its end-of-turn marker).
fn encode_answer(
    tok: &ChatTokenizer,
    prompt: &[Value],
    outputs: &[Value],
    tools: Option<&Value>,
) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let conversation: Vec<Value> = prompt.iter().chain(outputs).cloned().collect();
    let head = tok.apply_chat_template(&Value::Array(prompt.to_vec()), tools, true)?;
    let full = tok.apply_chat_template(&Value::Array(conversation), tools, false)?;
    if !full.starts_with(&head) {
        return Err(DataError::TemplateNotPrefixStable { message: prompt.len() });
    }
    let answer: Range<usize> = head.len()..full.len();
    let (input_ids, offsets) = tok.encode_with_offsets(&full, false)?;
    let mask =
        offsets.iter().map(|&(start, end)| u8::from(start < end && start < answer.end && answer.start < end)).collect();
    Ok((input_ids, mask))
}

fn truncate(mut input_ids: Vec<u32>, mut loss_mask: Vec<u8>, max_seq_len: usize) -> Option<TokenizedExample> {
    if let Some(first) = loss_mask.first_mut() {
        *first = 0;
    }
    let truncated = input_ids.len() > max_seq_len;
    input_ids.truncate(max_seq_len);
    loss_mask.truncate(max_seq_len);
    let example = TokenizedExample { input_ids, loss_mask, truncated };
    (example.trained_tokens() > 0).then_some(example)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::data::fixtures::tokenizer as fixture_tokenizer;

    fn record() -> Value {
        json!({
            "input": {"messages": [{"role": "user", "content": "How far is the station?"}]},
            "preferred_output": [{"role": "assistant", "content": "It is 3 km away."}],
            "non_preferred_output": [{"role": "assistant", "content": "Far."}],
        })
    }

    #[test]
    fn both_answers_follow_the_same_prompt_and_only_the_answers_are_trained() {
        let tok = fixture_tokenizer("llama");
        let opts = EncodeOptions { max_seq_len: 1024, train_on_inputs: false };
        let pair = encode_pair(&tok, &record(), &opts).unwrap().unwrap();
        let prompt = tok
            .apply_chat_template(&json!([{"role": "user", "content": "How far is the station?"}]), None, true)
            .unwrap();
        let prompt_tokens = tok.encode_with_offsets(&prompt, false).unwrap().0.len();
        for (example, text) in [(&pair.chosen, "It is 3 km away."), (&pair.rejected, "Far.")] {
            let first_trained = example.loss_mask.iter().position(|&m| m == 1).unwrap();
            assert!(first_trained >= prompt_tokens - 1, "the prompt is not trained");
            assert_eq!(example.input_ids[..prompt_tokens - 1], pair.chosen.input_ids[..prompt_tokens - 1]);
            let trained: Vec<u32> =
                example.input_ids.iter().zip(&example.loss_mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).collect();
            let decoded = tok.decode(&trained, false).unwrap();
            assert!(decoded.contains(text.trim_end_matches('.')), "{decoded:?} holds the answer {text:?}");
        }
    }

    #[test]
    fn a_prompt_that_fills_max_seq_len_drops_the_pair() {
        let tok = fixture_tokenizer("llama");
        let opts = EncodeOptions { max_seq_len: 4, train_on_inputs: false };
        assert_eq!(encode_pair(&tok, &record(), &opts).unwrap(), None);
    }
}
