//! The BERT-specific parts of building an [`super::Encoder`]: LayerNorms with biases and the task
//! heads (loaded, or new).

use candle_core::Result;

use super::{Head, LayerNorm};
use crate::models::common::builder::Builder;

impl Builder<'_> {
    pub(super) fn layer_norm(&mut self, module: &str, width: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.param(&format!("{module}.weight"), &[width], false)?,
            bias: self.param(&format!("{module}.bias"), &[width], false)?,
            eps,
        })
    }

    /// The head of a task over a backbone under `root` (`bert.`): BERT's pooler and classifier,
    /// RoBERTa's two-layer classifier, or a per-token classifier.
    pub(super) fn head(&mut self, task: &super::Task, model_type: &str, root: &str, hidden: usize) -> Result<Head> {
        Ok(match task {
            super::Task::Embedding => Head::None,
            super::Task::TokenClassification { labels } => {
                Head::Token { classifier: self.head_linear("classifier", hidden, labels.len())? }
            }
            super::Task::Classification { labels } if model_type == "bert" => Head::Pooled {
                pooler: self.linear(&format!("{root}pooler.dense"), hidden, hidden).or_else(|_| {
                    // A checkpoint saved without a pooler: transformers initialises one.
                    self.head_linear(&format!("{root}pooler.dense"), hidden, hidden)
                })?,
                classifier: self.head_linear("classifier", hidden, labels.len())?,
            },
            super::Task::Classification { labels } => Head::Roberta {
                dense: self.head_linear("classifier.dense", hidden, hidden)?,
                out_proj: self.head_linear("classifier.out_proj", hidden, labels.len())?,
            },
        })
    }
}
