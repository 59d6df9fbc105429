//! Text generation with a KV cache: greedy decoding for tools and benchmarks, and the batched,
//! sampled serving engine with its detokenizer.

pub mod engine;
pub mod generate;
pub mod sampling;
pub mod text;
