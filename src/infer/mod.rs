//! Text generation with a KV cache: greedy decoding for tools and benchmarks, and the batched,
//! sampled serving engine with its detokenizer; encoder-decoder (T5) decoding in `seq2seq`.

pub mod engine;
pub mod generate;
pub mod sampling;
pub mod seq2seq;
pub mod text;
