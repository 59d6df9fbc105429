//! Text generation with a KV cache (greedy for now; sampling and batching come with serving).

pub mod generate;
