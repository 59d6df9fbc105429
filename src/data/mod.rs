//! Training data for causal language models: tokenizers and chat templates that behave exactly like
//! transformers', dataset records turned into token ids with loss masks, and packing into fixed-length
//! sequences.
//!
//! This module owns the meaning of a record (which tokens are trained) and the exact token ids; it
//! must not know about models, devices or tensors, nor about HTTP or storage: callers hand it a
//! directory and a JSONL path and get plain vectors back.

pub mod dataset;
pub mod encoder;
pub mod examples;
pub mod packing;
pub mod preference;
pub mod template;
pub mod tokenizer;

#[cfg(test)]
pub(crate) mod fixtures;

use std::path::PathBuf;

use crate::domain::dataset::DatasetFormat;

/// Everything that can go wrong between a tokenizer directory or dataset file and token ids.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is not what it should be (malformed `tokenizer_config.json`...).
    #[error("invalid {path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
    /// The tokenizer library failed (loading `tokenizer.json`, encoding or decoding).
    #[error("tokenizer error: {0}")]
    Tokenizer(#[source] tokenizers::Error),
    /// Chat messages were given to a tokenizer that has no chat template.
    #[error("the tokenizer has no chat template")]
    MissingTemplate,
    /// A special token the operation needs (`eos_token`...) is not configured or not in the vocabulary.
    #[error("the tokenizer has no {0}")]
    MissingSpecialToken(&'static str),
    /// The chat template does not compile or fails while rendering.
    #[error("chat template error: {0}")]
    Template(String),
    /// The chat template called `raise_exception(message)`: it rejects this conversation.
    #[error("the chat template rejected the conversation: {0}")]
    TemplateException(String),
    /// Rendering a conversation turn by turn does not reproduce the full rendering, so the assistant
    /// turns cannot be located in it (templates that rewrite earlier turns, e.g. drop old reasoning).
    #[error(
        "the chat template is not prefix-stable at message {message}: rendering the conversation up to that \
         message does not give a prefix of the full rendering, so its tokens cannot be masked"
    )]
    TemplateNotPrefixStable { message: usize },
    /// A record does not have the shape its format requires.
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// An error in one record of a dataset file; `line` is 1-based.
    #[error("line {line}: {source}")]
    Record {
        line: u64,
        #[source]
        source: Box<DataError>,
    },
    /// The dataset file failed validation; the first problem is reported (`line` is absent for
    /// file-level problems such as an empty file).
    #[error("invalid dataset{}: {message} ({code}; {total} problem(s) in all)", line_suffix(*.line))]
    InvalidDataset { line: Option<u64>, code: String, message: String, total: u64 },
    /// The records belong to another kind of model (classification, preference...).
    #[error("{} datasets cannot train a causal language model", .0.human_name())]
    UnsupportedFormat(DatasetFormat),
}

impl DataError {
    /// The 1-based dataset line the error is about, when it is about one.
    pub fn line(&self) -> Option<u64> {
        match self {
            Self::Record { line, .. } => Some(*line),
            Self::InvalidDataset { line, .. } => *line,
            _ => None,
        }
    }

    fn at_line(self, line: u64) -> Self {
        Self::Record { line, source: Box::new(self) }
    }
}

fn line_suffix(line: Option<u64>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}
