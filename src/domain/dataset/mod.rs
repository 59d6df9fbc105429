//! Streaming validation of fine-tuning datasets (JSONL), one line at a time.
//!
//! Bytes arrive in arbitrary chunks; [`DatasetValidator`] splits them into lines, checks each record
//! (see `records`), detects the file's format from its records and collects problems with their
//! line numbers. Memory stays bounded by the longest line (capped by [`Limits::max_line_bytes`]) and
//! the first [`MAX_REPORTED_PROBLEMS`] problems.

mod messages;
mod records;

use serde::Serialize;

pub use records::DatasetFormat;

/// How many problems a rejection lists; the total is always counted.
pub const MAX_REPORTED_PROBLEMS: usize = 100;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_line_bytes: usize,
    pub min_examples: u64,
}

/// One thing wrong with a dataset. `line` is 1-based; it is absent for file-level problems.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub code: &'static str,
    pub message: String,
}

/// What a valid dataset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub format: DatasetFormat,
    pub examples: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Valid(Summary),
    Invalid {
        problems: Vec<Problem>,
        total: u64,
    },
    /// A line exceeded the configured limit; validation stopped there.
    LineTooLong {
        line: u64,
        limit: usize,
    },
}

/// Incremental validator: `feed` chunks in order, then `finish`.
pub struct DatasetValidator {
    limits: Limits,
    partial: Vec<u8>,
    line_no: u64,
    examples: u64,
    /// The format of the first valid-looking record, and its line.
    file_format: Option<(DatasetFormat, u64)>,
    /// Lines whose format could not be recognised; judged once the file's format is known.
    unrecognized: Vec<u64>,
    problems: Vec<Problem>,
    total_problems: u64,
    too_long: Option<u64>,
}

impl DatasetValidator {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            partial: Vec::new(),
            line_no: 0,
            examples: 0,
            file_format: None,
            unrecognized: Vec::new(),
            problems: Vec::new(),
            total_problems: 0,
            too_long: None,
        }
    }

    /// Consumes the next chunk of the file.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while self.too_long.is_none() && !chunk.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                Some(end) => {
                    if self.partial.is_empty() {
                        self.check_line_length(end);
                        if self.too_long.is_none() {
                            self.process_line(&chunk[..end]);
                        }
                    } else {
                        self.partial.extend_from_slice(&chunk[..end]);
                        let line = std::mem::take(&mut self.partial);
                        self.check_line_length(line.len());
                        if self.too_long.is_none() {
                            self.process_line(&line);
                        }
                    }
                    chunk = &chunk[end + 1..];
                }
                None => {
                    self.partial.extend_from_slice(chunk);
                    // The line is not over yet; it is already too long if it passed the limit.
                    if self.partial.len() > self.limits.max_line_bytes {
                        self.too_long = Some(self.line_no + 1);
                        self.partial = Vec::new();
                    }
                    chunk = &[];
                }
            }
        }
    }

    /// Whether the verdict is already final (a line was too long): further input is ignored.
    pub fn stopped(&self) -> bool {
        self.too_long.is_some()
    }

    /// Ends the file and judges it as a whole.
    pub fn finish(mut self) -> Outcome {
        if self.too_long.is_none() && !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.check_line_length(line.len());
            if self.too_long.is_none() {
                self.process_line(&line);
            }
        }
        if let Some(line) = self.too_long {
            return Outcome::LineTooLong { line, limit: self.limits.max_line_bytes };
        }
        for line in std::mem::take(&mut self.unrecognized) {
            let (code, message) = match self.file_format {
                Some((format, first)) => (
                    format.missing_key_code(),
                    format!(
                        "the record is not a {} example (the file's format, from line {first}); {}",
                        format.human_name(),
                        format.shape_hint()
                    ),
                ),
                None => ("unrecognized_format", records::UNRECOGNIZED_MESSAGE.to_string()),
            };
            self.report(Some(line), None, code, message);
        }
        let format = self.file_format.map(|(f, _)| f);
        if self.examples == 0 && self.total_problems == 0 {
            self.report(None, None, "empty_file", "the file holds no examples".into());
        } else if self.total_problems == 0 && self.examples < self.limits.min_examples {
            // Only once every line is fine: with broken lines the count of examples is not final.
            let message = format!(
                "the file has {} valid example(s); at least {} are required",
                self.examples, self.limits.min_examples
            );
            self.report(None, None, "too_few_examples", message);
        }
        match (format, self.total_problems) {
            (Some(format), 0) => Outcome::Valid(Summary { format, examples: self.examples }),
            _ => {
                self.problems.sort_by_key(|p| p.line.unwrap_or(u64::MAX));
                Outcome::Invalid { problems: self.problems, total: self.total_problems }
            }
        }
    }

    fn check_line_length(&mut self, len: usize) {
        if len > self.limits.max_line_bytes {
            self.too_long = Some(self.line_no + 1);
        }
    }

    fn process_line(&mut self, raw: &[u8]) {
        self.line_no += 1;
        let line_no = self.line_no;
        let mut raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line_no == 1 {
            raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match records::check_line(raw) {
            Ok(None) => self.unrecognized.push(line_no),
            Ok(Some(format)) => match self.file_format {
                None => {
                    self.file_format = Some((format, line_no));
                    self.examples += 1;
                }
                Some((expected, _)) if expected == format => self.examples += 1,
                Some((expected, first)) => {
                    let message = format!(
                        "the record is a {} example but the file's format is {} (from line {first}); a file holds one format",
                        format.human_name(),
                        expected.human_name()
                    );
                    self.report(Some(line_no), None, "mixed_formats", message);
                }
            },
            Err(err) => {
                // A broken record still tells the format when its shape is recognisable.
                if let (None, Some(format)) = (self.file_format, err.format) {
                    self.file_format = Some((format, line_no));
                }
                self.report(Some(line_no), err.field, err.code, err.message);
            }
        }
    }

    fn report(&mut self, line: Option<u64>, field: Option<String>, code: &'static str, message: String) {
        self.total_problems += 1;
        if self.problems.len() < MAX_REPORTED_PROBLEMS {
            self.problems.push(Problem { line, field, code, message });
        }
    }
}

#[cfg(test)]
mod tests;
