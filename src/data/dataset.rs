//! A JSONL dataset file → validated records with their line numbers → tokenized examples, and the
//! deterministic hold-out of a validation split. Validation is the upload validator's (the file
//! was checked at upload; checking again here keeps training from trusting storage); this module
//! owns only reading, error attribution to lines, and the counts a training job reports.

#[cfg(test)]
mod tests;

use std::path::Path;

use serde_json::Value;

use super::examples::{encode_record, EncodeOptions, TokenizedExample};
use super::tokenizer::ChatTokenizer;
use super::DataError;
use crate::domain::dataset::{DatasetFormat, DatasetValidator, Limits, Outcome};
use crate::rng::Rng;

/// The records of a dataset file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedDataset {
    pub format: DatasetFormat,
    pub records: Vec<Value>,
    /// The 1-based line number of each record (blank lines are skipped, so they can differ).
    pub lines: Vec<u64>,
}

impl LoadedDataset {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Reads and validates a JSONL dataset. The first problem the validator finds becomes the error.
pub fn load_jsonl(path: &Path) -> Result<LoadedDataset, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    // Upload limits were enforced when the file arrived; here only the content matters.
    let mut validator = DatasetValidator::new(Limits { max_line_bytes: usize::MAX, min_examples: 1 });
    validator.feed(&bytes);
    let format = match validator.finish() {
        Outcome::Valid(summary) => summary.format,
        Outcome::Invalid { problems, total } => {
            let first = problems.into_iter().next();
            return Err(DataError::InvalidDataset {
                line: first.as_ref().and_then(|p| p.line),
                code: first.as_ref().map_or("invalid_dataset", |p| p.code).to_string(),
                message: first.map_or_else(|| "the dataset is invalid".to_string(), |p| p.message),
                total,
            });
        }
        Outcome::LineTooLong { line, limit } => {
            return Err(DataError::InvalidDataset {
                line: Some(line),
                code: "line_too_long".into(),
                message: format!("the line is longer than {limit} bytes"),
                total: 1,
            });
        }
    };
    let mut records = Vec::new();
    let mut lines = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index as u64 + 1;
        // The validator's line rules: CRLF endings, a UTF-8 BOM on the first line, blank lines skipped.
        let mut raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line == 1 {
            raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = serde_json::from_slice(raw)
            .map_err(|e| DataError::InvalidRecord(format!("not valid JSON: {e}")).at_line(line))?;
        records.push(record);
        lines.push(line);
    }
    Ok(LoadedDataset { format, records, lines })
}

/// The examples of a dataset and what encoding did to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub examples: Vec<TokenizedExample>,
    pub stats: EncodeStats,
}

/// Counts for the job's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Examples kept.
    pub examples: usize,
    /// Records dropped because truncation left nothing to train on.
    pub dropped: usize,
    /// Kept examples that lost tokens to truncation.
    pub truncated: usize,
    /// Tokens in the kept examples.
    pub tokens: usize,
    /// Tokens the loss is computed on.
    pub trained_tokens: usize,
}

/// Tokenizes every record; an error names the record's line.
pub fn encode_dataset(tok: &ChatTokenizer, data: &LoadedDataset, opts: &EncodeOptions) -> Result<Encoded, DataError> {
    if !matches!(data.format, DatasetFormat::Chat | DatasetFormat::PromptCompletion | DatasetFormat::Text) {
        return Err(DataError::UnsupportedFormat(data.format));
    }
    let mut examples = Vec::with_capacity(data.len());
    let mut stats = EncodeStats::default();
    for (record, &line) in data.records.iter().zip(&data.lines) {
        match encode_record(tok, record, data.format, opts).map_err(|e| e.at_line(line))? {
            Some(example) => {
                stats.examples += 1;
                stats.truncated += usize::from(example.truncated);
                stats.tokens += example.input_ids.len();
                stats.trained_tokens += example.trained_tokens();
                examples.push(example);
            }
            None => stats.dropped += 1,
        }
    }
    Ok(Encoded { examples, stats })
}

/// Splits off a validation set: `round(fraction * n)` records chosen by a seeded shuffle (at least
/// one when `fraction > 0` and there are two or more records, and never all of them), both parts
/// keeping file order. Returns `(train, validation)`; the same seed always gives the same split.
pub fn split_validation(data: LoadedDataset, fraction: f64, seed: u64) -> (LoadedDataset, LoadedDataset) {
    let n = data.len();
    let held_out = if fraction > 0.0 && n > 1 {
        // `as` saturates, so a huge or infinite fraction is clamped rather than wrapped.
        ((fraction * n as f64).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed, "validation-split").shuffle(&mut order);
    let mut in_validation = vec![false; n];
    for &index in &order[..held_out] {
        in_validation[index] = true;
    }
    let empty = || LoadedDataset { format: data.format, records: Vec::new(), lines: Vec::new() };
    let (mut train, mut validation) = (empty(), empty());
    for ((record, line), held) in data.records.into_iter().zip(data.lines).zip(in_validation) {
        let part = if held { &mut validation } else { &mut train };
        part.records.push(record);
        part.lines.push(line);
    }
    (train, validation)
}
