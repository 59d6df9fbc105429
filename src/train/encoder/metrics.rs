//! Validation metrics of the encoder tasks: accuracy and macro-F1 (scikit-learn's definition:
//! the unweighted mean of per-label F1 over the labels in the truth or the predictions),
//! entity-level precision, recall and F1 (seqeval's default, lenient IOB chunking), and
//! retrieval recall@k for embeddings.

use std::collections::BTreeSet;

use serde::Serialize;

/// What a task's evaluation gives beyond the loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "task")]
pub enum TaskMetrics {
    Classification {
        accuracy: f64,
        macro_f1: f64,
    },
    TokenClassification {
        precision: f64,
        recall: f64,
        f1: f64,
        /// Accuracy over scored tokens (each word's first sub-token).
        accuracy: f64,
    },
    Embedding {
        /// Share of anchors whose own positive ranks first (within 5, within 10) among every
        /// validation positive, by cosine similarity.
        recall_at_1: f64,
        recall_at_5: f64,
        recall_at_10: f64,
    },
}

impl TaskMetrics {
    /// A metric by its name in `early_stopping.metric` (higher is better for all of them).
    pub fn get(&self, name: &str) -> Option<f64> {
        match (self, name) {
            (Self::Classification { accuracy, .. }, "accuracy") => Some(*accuracy),
            (Self::Classification { macro_f1, .. }, "macro_f1") => Some(*macro_f1),
            (Self::TokenClassification { f1, .. }, "f1") => Some(*f1),
            (Self::TokenClassification { precision, .. }, "precision") => Some(*precision),
            (Self::TokenClassification { recall, .. }, "recall") => Some(*recall),
            (Self::TokenClassification { accuracy, .. }, "accuracy") => Some(*accuracy),
            (Self::Embedding { recall_at_1, .. }, "recall_at_1") => Some(*recall_at_1),
            (Self::Embedding { recall_at_5, .. }, "recall_at_5") => Some(*recall_at_5),
            (Self::Embedding { recall_at_10, .. }, "recall_at_10") => Some(*recall_at_10),
            _ => None,
        }
    }

    /// The metric names of each task, for error messages.
    pub fn names(task: &crate::models::bert::Task) -> &'static [&'static str] {
        match task {
            crate::models::bert::Task::Classification { .. } => &["accuracy", "macro_f1"],
            crate::models::bert::Task::TokenClassification { .. } => &["f1", "precision", "recall", "accuracy"],
            crate::models::bert::Task::Embedding => &["recall_at_1", "recall_at_5", "recall_at_10"],
        }
    }
}

/// Accuracy and macro-F1 of `predicted` against `truth` (label ids).
pub fn classification(truth: &[u32], predicted: &[u32]) -> (f64, f64) {
    let n = truth.len().max(1) as f64;
    let accuracy = truth.iter().zip(predicted).filter(|(t, p)| t == p).count() as f64 / n;
    let labels: BTreeSet<u32> = truth.iter().chain(predicted).copied().collect();
    let mut f1_sum = 0.0;
    for &label in &labels {
        let tp = truth.iter().zip(predicted).filter(|(t, p)| **t == label && **p == label).count() as f64;
        let fp = truth.iter().zip(predicted).filter(|(t, p)| **t != label && **p == label).count() as f64;
        let fn_ = truth.iter().zip(predicted).filter(|(t, p)| **t == label && **p != label).count() as f64;
        // scikit-learn's zero_division default: 0 where a ratio is 0/0.
        let denominator = 2.0 * tp + fp + fn_;
        f1_sum += if denominator > 0.0 { 2.0 * tp / denominator } else { 0.0 };
    }
    (accuracy, if labels.is_empty() { 0.0 } else { f1_sum / labels.len() as f64 })
}

/// Entity chunks `(type, start, end)` (end exclusive) of an IOB/IOB2/IOBES tag sequence, chunked
/// as seqeval's default mode does (its `get_entities`, `end_of_chunk` and `start_of_chunk`): the
/// tag's first character is its prefix and what follows the first `-` its type; an entity starts
/// at `B`/`S`, at `I`/`E` after `O`, `E` or `S`, or at a change of type, and ends before the tag
/// that starts another or at `O`.
pub fn entities(tags: &[&str]) -> Vec<(String, usize, usize)> {
    let split = |tag: &str| -> (char, String) {
        let mut chars = tag.chars();
        let prefix = chars.next().unwrap_or('O');
        let rest = chars.as_str();
        let kind = rest.split_once('-').map_or(rest, |(_, kind)| kind);
        (prefix, if kind.is_empty() { "_".to_string() } else { kind.to_string() })
    };
    let mut chunks = Vec::new();
    let (mut prev, mut prev_kind, mut begin) = ('O', String::new(), 0usize);
    for (i, tag) in tags.iter().chain(std::iter::once(&"O")).enumerate() {
        let (tag, kind) = split(tag);
        let ends = matches!(prev, 'E' | 'S')
            || (matches!(prev, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
            || (prev != 'O' && prev != '.' && prev_kind != kind);
        if ends {
            chunks.push((prev_kind.clone(), begin, i));
        }
        let starts = matches!(tag, 'B' | 'S')
            || (matches!(prev, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
            || (tag != 'O' && tag != '.' && prev_kind != kind);
        if starts {
            begin = i;
        }
        (prev, prev_kind) = (tag, kind);
    }
    chunks
}

/// Entity-level micro precision, recall and F1 over sentences of `(truth, predicted)` tags.
pub fn entity_scores(sentences: &[(Vec<&str>, Vec<&str>)]) -> (f64, f64, f64) {
    let (mut correct, mut predicted, mut actual) = (0usize, 0usize, 0usize);
    for (truth, guess) in sentences {
        let truth: BTreeSet<_> = entities(truth).into_iter().collect();
        let guess: BTreeSet<_> = entities(guess).into_iter().collect();
        correct += truth.intersection(&guess).count();
        predicted += guess.len();
        actual += truth.len();
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (precision, recall) = (ratio(correct, predicted), ratio(correct, actual));
    let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    (precision, recall, f1)
}

/// Recall@k for k in `ks`: row `i` of `similarity` (anchors × positives) scores its own
/// positive `i` against all; a hit when fewer than `k` positives score strictly higher.
pub fn recall_at(similarity: &[Vec<f32>], ks: &[usize]) -> Vec<f64> {
    let n = similarity.len().max(1) as f64;
    let ranks: Vec<usize> =
        similarity.iter().enumerate().map(|(i, row)| row.iter().filter(|&&s| s > row[i]).count()).collect();
    ks.iter().map(|&k| ranks.iter().filter(|&&r| r < k).count() as f64 / n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_matches_scikit_learn() {
        // sklearn.metrics.f1_score([0,1,2,0,1,2], [0,2,1,0,0,1], average="macro") = 0.26666…
        let (accuracy, f1) = classification(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 1]);
        assert!((accuracy - 1.0 / 3.0).abs() < 1e-12);
        assert!((f1 - 0.266_666_666_666_666_7).abs() < 1e-12, "{f1}");
    }

    #[test]
    fn entities_are_chunked_as_seqeval_does() {
        let tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "O"];
        let found: Vec<_> = entities(&tags).into_iter().map(|(k, s, e)| format!("{k}:{s}-{e}")).collect();
        assert_eq!(found, ["PER:0-2", "LOC:3-5", "LOC:5-6", "ORG:6-7"]);
        // seqeval's README example: precision 0.5, recall 0.5, f1 0.5.
        let truth = vec![vec!["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], vec!["B-PER", "I-PER", "O"]];
        let guess = vec![vec!["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], vec!["B-PER", "I-PER", "O"]];
        let pairs: Vec<_> = truth.into_iter().zip(guess).collect();
        let (p, r, f) = entity_scores(&pairs);
        assert!((p - 0.5).abs() < 1e-12 && (r - 0.5).abs() < 1e-12 && (f - 0.5).abs() < 1e-12);
    }

    #[test]
    fn recall_counts_the_own_positive_rank() {
        let similarity = vec![vec![0.9, 0.1, 0.2], vec![0.8, 0.5, 0.1], vec![0.3, 0.9, 0.2]];
        assert_eq!(recall_at(&similarity, &[1, 2, 3]), vec![1.0 / 3.0, 2.0 / 3.0, 1.0]);
    }
}
