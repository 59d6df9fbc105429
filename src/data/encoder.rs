//! Encoder datasets → token ids with their targets, as transformers' example scripts prepare them:
//! `[CLS] text [SEP] (text_pair [SEP])` with segment ids for classification (`run_glue`), the
//! label of each word on its first sub-token and `-100` elsewhere for token classification
//! (`run_ner`), and anchor/positive pairs for embedding fine-tuning (sentence-transformers).

use std::path::Path;

use serde_json::Value;
use tokenizers::{EncodeInput, InputSequence, Tokenizer};

use super::dataset::LoadedDataset;
use super::DataError;
use crate::domain::dataset::DatasetFormat;

/// The label of a sub-token that is not scored (transformers' ignore index).
pub const IGNORE: i64 = -100;

/// A tokenizer for encoders: `tokenizer.json` with its post-processor's special tokens, stored
/// padding and truncation switched off (as transformers does unless asked).
pub struct EncoderTokenizer {
    tokenizer: Tokenizer,
    /// A copy that truncates, for the length last asked (built once, not per over-long input).
    truncating: std::sync::Mutex<Option<(usize, Tokenizer)>>,
}

/// One encoded input: token ids and segment ids, and the byte span of each token in its text
/// (`(0, 0)` for special tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
    /// For pre-split words: the word each token belongs to.
    pub words: Vec<Option<u32>>,
    pub truncated: bool,
}

impl EncoderTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| match e.downcast::<std::io::Error>() {
            Ok(io) => DataError::Io { path: path.clone(), source: *io },
            Err(e) => DataError::InvalidFile { path: path.clone(), message: e.to_string() },
        })?;
        tokenizer.with_truncation(None).map_err(DataError::Tokenizer)?;
        tokenizer.with_padding(None);
        Ok(Self { tokenizer, truncating: std::sync::Mutex::new(None) })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The text of `ids`, special tokens left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, DataError> {
        self.tokenizer.decode(ids, skip_special).map_err(DataError::Tokenizer)
    }

    /// `text` (and `pair`) with special tokens, cut to `max_len` tokens (the longer part first,
    /// as transformers' `longest_first`).
    pub fn encode_text(&self, text: &str, pair: Option<&str>, max_len: usize) -> Result<Encoded, DataError> {
        let input: EncodeInput = match pair {
            Some(pair) => (text, pair).into(),
            None => text.into(),
        };
        self.encode(input, max_len)
    }

    /// Pre-split `words` (token classification), each word's sub-tokens marked with its index.
    pub fn encode_words(&self, words: &[&str], max_len: usize) -> Result<Encoded, DataError> {
        let input = EncodeInput::Single(InputSequence::PreTokenized(words.iter().copied().collect()));
        self.encode(input, max_len)
    }

    fn encode(&self, input: EncodeInput, max_len: usize) -> Result<Encoded, DataError> {
        let full = self.tokenizer.encode(input.clone(), true).map_err(DataError::Tokenizer)?;
        let truncated = full.len() > max_len;
        let encoding = if truncated {
            let mut cached = self.truncating.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if cached.as_ref().is_none_or(|(len, _)| *len != max_len) {
                let mut tokenizer = self.tokenizer.clone();
                tokenizer
                    .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
                    .map_err(DataError::Tokenizer)?;
                *cached = Some((max_len, tokenizer));
            }
            let (_, tokenizer) = cached.as_ref().expect("built above");
            tokenizer.encode(input, true).map_err(DataError::Tokenizer)?
        } else {
            full
        };
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
            offsets: encoding.get_offsets().to_vec(),
            words: encoding.get_word_ids().to_vec(),
            truncated,
        })
    }
}

/// What an example is trained towards.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The label's id.
    Label(u32),
    /// Per token: a label id, or [`IGNORE`].
    Tags(Vec<i64>),
    /// The positive text of an anchor/positive pair.
    Positive(Encoded),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskExample {
    pub input: Encoded,
    pub target: Target,
}

/// The label set of a classification or token classification training file: `0..=max` when
/// every label is a non-negative integer (so an integer label is its own id), else the distinct
/// strings sorted (transformers' `run_glue` / `run_ner` order).
pub fn label_set(data: &LoadedDataset) -> Vec<String> {
    let mut values: Vec<&Value> = Vec::new();
    for record in &data.records {
        match data.format {
            DatasetFormat::Classification => values.extend(record.get("label")),
            DatasetFormat::TokenClassification => {
                values.extend(record.get("tags").and_then(Value::as_array).into_iter().flatten())
            }
            _ => {}
        }
    }
    if let Some(max) = values.iter().map(|v| v.as_u64()).collect::<Option<Vec<u64>>>().and_then(|v| v.into_iter().max())
    {
        return (0..=max).map(|i| i.to_string()).collect();
    }
    let mut names: Vec<String> = values.iter().map(|v| label_text(v)).collect();
    names.sort();
    names.dedup();
    names
}

fn label_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Counts of an encoding pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeCounts {
    pub examples: usize,
    pub truncated: usize,
    /// Tokens of all inputs (pairs count both sides).
    pub tokens: usize,
}

/// Encodes `data` for the encoder `format` task with `labels` (from the training file).
pub fn encode_task_dataset(
    tokenizer: &EncoderTokenizer,
    data: &LoadedDataset,
    labels: &[String],
    max_len: usize,
) -> Result<(Vec<TaskExample>, EncodeCounts), DataError> {
    let mut out = Vec::with_capacity(data.len());
    let mut counts = EncodeCounts::default();
    let id_of = |value: &Value, line: u64, field: &str| -> Result<u32, DataError> {
        let name = label_text(value);
        labels.iter().position(|l| *l == name).map(|i| i as u32).ok_or_else(|| DataError::Record {
            line,
            source: Box::new(DataError::InvalidRecord(format!(
                "{field} {name:?} is not one of the training file's labels ({})",
                labels.join(", ")
            ))),
        })
    };
    for (record, &line) in data.records.iter().zip(&data.lines) {
        let text = |key: &str| record.get(key).and_then(Value::as_str);
        let example = match data.format {
            DatasetFormat::Classification => {
                let input = tokenizer.encode_text(text("text").unwrap_or_default(), text("text_pair"), max_len)?;
                TaskExample { input, target: Target::Label(id_of(&record["label"], line, "label")?) }
            }
            DatasetFormat::TokenClassification => {
                let words: Vec<&str> =
                    record["tokens"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let tags = record["tags"].as_array().cloned().unwrap_or_default();
                let input = tokenizer.encode_words(&words, max_len)?;
                let mut previous = None;
                let mut targets = Vec::with_capacity(input.ids.len());
                for word in &input.words {
                    targets.push(match word {
                        Some(w) if previous != Some(*w) => id_of(&tags[*w as usize], line, "tag")? as i64,
                        _ => IGNORE,
                    });
                    previous = *word;
                }
                TaskExample { input, target: Target::Tags(targets) }
            }
            DatasetFormat::Embedding => {
                let anchor = tokenizer.encode_text(text("anchor").unwrap_or_default(), None, max_len)?;
                let positive = tokenizer.encode_text(text("positive").unwrap_or_default(), None, max_len)?;
                TaskExample { input: anchor, target: Target::Positive(positive) }
            }
            other => return Err(DataError::UnsupportedFormat(other)),
        };
        counts.examples += 1;
        counts.tokens += example.input.ids.len();
        let mut truncated = example.input.truncated;
        if let Target::Positive(p) = &example.target {
            counts.tokens += p.ids.len();
            truncated |= p.truncated;
        }
        counts.truncated += usize::from(truncated);
        out.push(example);
    }
    Ok((out, counts))
}
