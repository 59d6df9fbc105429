//! Tokenized examples → fixed-length training sequences, either several examples packed into each
//! sequence or one example per sequence. The model builds a block-diagonal causal mask from
//! `segments`, so packed examples never attend to each other, and `positions` restart per example,
//! so each one sees exactly the positions it would see alone. This owns the layout only.

use super::examples::TokenizedExample;

/// The segment id of padding: it belongs to no example.
pub const PAD_SEGMENT: u32 = u32::MAX;

/// One training sequence; every field has length `seq_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// Position of each token within its own example.
    pub positions: Vec<u32>,
    /// Which example of the sequence each token belongs to (0, 1, 2...), [`PAD_SEGMENT`] for padding.
    pub segments: Vec<u32>,
}

impl Sequence {
    fn with_capacity(seq_len: usize) -> Self {
        Self {
            input_ids: Vec::with_capacity(seq_len),
            loss_mask: Vec::with_capacity(seq_len),
            positions: Vec::with_capacity(seq_len),
            segments: Vec::with_capacity(seq_len),
        }
    }

    fn len(&self) -> usize {
        self.input_ids.len()
    }

    fn push_example(&mut self, example: &TokenizedExample, segment: u32, seq_len: usize) {
        // Examples are encoded with `max_seq_len <= seq_len`; a longer one keeps its head, like
        // encoding truncation, rather than spilling into a sequence where it would lose its context.
        let len = example.input_ids.len().min(seq_len - self.len());
        self.input_ids.extend_from_slice(&example.input_ids[..len]);
        self.loss_mask.extend_from_slice(&example.loss_mask[..len]);
        self.positions.extend(0..len as u32);
        self.segments.extend(std::iter::repeat_n(segment, len));
    }

    fn pad_to(mut self, seq_len: usize, pad_id: u32) -> Self {
        let missing = seq_len - self.len();
        self.input_ids.extend(std::iter::repeat_n(pad_id, missing));
        self.loss_mask.extend(std::iter::repeat_n(0, missing));
        self.positions.extend(std::iter::repeat_n(0, missing));
        self.segments.extend(std::iter::repeat_n(PAD_SEGMENT, missing));
        self
    }
}

/// Packs examples greedily in the given order: each goes into the current sequence if it fits
/// whole, otherwise it starts the next one. No example is split.
pub fn pack(examples: &[TokenizedExample], seq_len: usize, pad_id: u32) -> Vec<Sequence> {
    let mut sequences = Vec::new();
    let mut current = Sequence::with_capacity(seq_len);
    let mut segment = 0;
    for example in examples.iter().filter(|e| !e.input_ids.is_empty()) {
        if current.len() + example.input_ids.len() > seq_len && current.len() > 0 {
            sequences.push(std::mem::replace(&mut current, Sequence::with_capacity(seq_len)).pad_to(seq_len, pad_id));
            segment = 0;
        }
        current.push_example(example, segment, seq_len);
        segment += 1;
    }
    if current.len() > 0 {
        sequences.push(current.pad_to(seq_len, pad_id));
    }
    sequences
}

/// One example per sequence, padded to `seq_len`.
pub fn pad_each(examples: &[TokenizedExample], seq_len: usize, pad_id: u32) -> Vec<Sequence> {
    examples
        .iter()
        .map(|example| {
            let mut sequence = Sequence::with_capacity(seq_len);
            sequence.push_example(example, 0, seq_len);
            sequence.pad_to(seq_len, pad_id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(len: usize, first_id: u32) -> TokenizedExample {
        let input_ids = (first_id..first_id + len as u32).collect();
        let mut loss_mask = vec![1; len];
        loss_mask[0] = 0;
        TokenizedExample { input_ids, loss_mask, truncated: false }
    }

    fn trained(examples: &[TokenizedExample]) -> usize {
        examples.iter().map(TokenizedExample::trained_tokens).sum()
    }

    fn trained_in(sequences: &[Sequence]) -> usize {
        sequences.iter().flat_map(|s| &s.loss_mask).filter(|&&m| m == 1).count()
    }

    #[test]
    fn pack_fills_sequences_greedily_without_splitting_examples() {
        let examples = [example(3, 10), example(4, 20), example(2, 30), example(5, 40)];

        let sequences = pack(&examples, 8, 0);

        assert_eq!(sequences.len(), 2);
        assert_eq!(sequences[0].input_ids, [10, 11, 12, 20, 21, 22, 23, 0]);
        assert_eq!(sequences[0].segments, [0, 0, 0, 1, 1, 1, 1, PAD_SEGMENT]);
        assert_eq!(sequences[1].input_ids, [30, 31, 40, 41, 42, 43, 44, 0]);
        assert_eq!(sequences[1].segments, [0, 0, 1, 1, 1, 1, 1, PAD_SEGMENT]);
        assert!(sequences.iter().all(|s| s.loss_mask.len() == 8 && s.positions.len() == 8));
    }

    #[test]
    fn positions_restart_for_every_example_and_padding_is_masked() {
        let sequences = pack(&[example(3, 10), example(2, 20)], 7, 99);

        assert_eq!(sequences[0].positions, [0, 1, 2, 0, 1, 0, 0]);
        assert_eq!(sequences[0].loss_mask, [0, 1, 1, 0, 1, 0, 0]);
        assert_eq!(sequences[0].input_ids[5..], [99, 99]);
    }

    #[test]
    fn packing_preserves_every_trained_token() {
        let examples: Vec<_> = (1..20).map(|n| example(n % 7 + 1, n as u32 * 100)).collect();

        let sequences = pack(&examples, 9, 0);

        assert_eq!(trained_in(&sequences), trained(&examples));
        let tokens: usize = sequences.iter().map(|s| s.segments.iter().filter(|&&g| g != PAD_SEGMENT).count()).sum();
        assert_eq!(tokens, examples.iter().map(|e| e.input_ids.len()).sum::<usize>());
    }

    #[test]
    fn an_example_that_fills_a_sequence_exactly_gets_it_alone() {
        let sequences = pack(&[example(4, 1), example(2, 10), example(2, 20)], 4, 0);

        assert_eq!(sequences.len(), 2);
        assert_eq!(sequences[0].segments, [0, 0, 0, 0]);
        assert_eq!(sequences[1].segments, [0, 0, 1, 1]);
    }

    #[test]
    fn pad_each_puts_one_example_per_sequence() {
        let examples = [example(3, 10), example(2, 20)];

        let sequences = pad_each(&examples, 4, 7);

        assert_eq!(sequences.len(), 2);
        assert_eq!(sequences[1].input_ids, [20, 21, 7, 7]);
        assert_eq!(sequences[1].segments, [0, 0, PAD_SEGMENT, PAD_SEGMENT]);
        assert_eq!(sequences[1].positions, [0, 1, 0, 0]);
        assert_eq!(trained_in(&sequences), trained(&examples));
    }

    #[test]
    fn an_example_longer_than_the_sequence_keeps_its_head() {
        let sequences = pack(&[example(6, 10)], 4, 0);

        assert_eq!(sequences.len(), 1);
        assert_eq!(sequences[0].input_ids, [10, 11, 12, 13]);
    }
}
