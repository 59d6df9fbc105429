//! Generation after a prefix-tuned model's prefix: its keys and values seed the KV cache, and
//! the real tokens take the positions after it.

use candle_core::{Result, Tensor};

use super::{CausalLm, KvCache, LayerCache};
use crate::models::ForwardCtx;

impl CausalLm {
    /// Puts per-layer prefix keys and values `(1, kv, n, hd)` into an empty cache, then feeds
    /// `input_ids` after them.
    pub fn forward_cached_after(
        &self,
        prefix: &[(Tensor, Tensor)],
        input_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let max = self.rope.max_positions();
        for ((k, v), slot) in prefix.iter().zip(cache.layers.iter_mut()) {
            LayerCache::append(slot, k, v, max)?;
        }
        cache.len = prefix.first().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        self.forward_cached(input_ids, cache)
    }

    /// The prefix's key/value table (for saving a prefix-tuned model), if it has one.
    pub fn prefix_table(&self) -> Result<Option<Tensor>> {
        self.prefix.as_ref().map(|p| p.table(&ForwardCtx::inference())).transpose()
    }
}
