//! Greedy decoding: the argmax token at each step, until a stop token or the length limit.

use candle_core::{Result, Tensor, D};

use crate::models::llama::{CausalLm, KvCache};

/// Generates up to `max_new_tokens` after `prompt`; stops after emitting any of `stop_ids`
/// (the stop token is included). Returns only the new tokens.
pub fn generate_greedy(model: &CausalLm, prompt: &[u32], max_new_tokens: usize, stop_ids: &[u32]) -> Result<Vec<u32>> {
    let mut cache = KvCache::default();
    let mut out = Vec::with_capacity(max_new_tokens);
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    for _ in 0..max_new_tokens {
        let logits = model.forward_cached(&input, &mut cache)?;
        let next = logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?;
        out.push(next);
        if stop_ids.contains(&next) {
            break;
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(out)
}
