//! One forward and backward over a batch: the loss a `head` computes from the final hidden
//! states, and every trainable parameter's gradient by name, through the plain graph or with
//! gradient checkpointing (`models::llama::Checkpointed`). Used by the trainer and the benchmark.

use candle_core::{Result, Tensor};

use crate::models::llama::CausalLm;
use crate::models::ForwardCtx;

/// What a batch gave: `head`'s own result, the loss, and the gradients by parameter name.
pub struct BatchGrads<T> {
    pub head: T,
    pub loss: f64,
    pub grads: Vec<(String, Tensor)>,
}

/// The model over `input_ids`, `head` turning its hidden states into a scalar loss (and
/// whatever else the caller wants from the logits), then the backward.
pub fn batch_gradients<T>(
    model: &CausalLm,
    (input_ids, positions, mask): (&Tensor, &Tensor, &Tensor),
    ctx: &ForwardCtx,
    checkpointing: bool,
    head: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
) -> Result<BatchGrads<T>> {
    if checkpointing {
        let forward = model.forward_checkpointed(input_ids, positions, mask, ctx)?;
        let (loss, out) = head(&forward.hidden)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        let store = loss.backward()?;
        drop(loss);
        let grads = forward.backward(store)?.into_iter().collect();
        return Ok(BatchGrads { head: out, loss: value, grads });
    }
    let (loss, out) = head(&model.forward_hidden(input_ids, positions, mask, ctx)?)?;
    let value = f64::from(loss.to_scalar::<f32>()?);
    let store = loss.backward()?;
    let grads = model.trainable.gradients(&store);
    Ok(BatchGrads { head: out, loss: value, grads })
}
