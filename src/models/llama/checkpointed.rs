//! Gradient checkpointing: a training forward that keeps only each decoder layer's input, and a
//! backward that recomputes the layers one at a time, last first, so that the activations of one
//! layer are alive at a time instead of every layer's.
//!
//! candle differentiates a whole graph at once, so the graph is cut at every layer boundary: the
//! forward runs each layer on a detached input and keeps that input; the loss is computed from
//! the final hidden states over a leaf `top` (the last layer's output). Its backward gives the
//! head's parameter gradients and `∂loss/∂top`; then each layer, from the last, is run again on
//! its saved input (a fresh leaf), with the dropout masks of the first run, and differentiated
//! through `sum(output · ∂loss/∂output)`, whose gradient is the vector-Jacobian product: the
//! layer's parameter gradients and `∂loss/∂input`, the next layer down's output gradient. The
//! embeddings and the prefix (whose per-layer keys and values every layer reads) get theirs the
//! same way at the end. The gradients equal those of the uncut graph up to summation order.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{CausalLm, LayerInputs};
use crate::models::ForwardCtx;
use crate::rng::Rng;

/// A checkpointed forward, waiting for the loss's gradients.
pub struct Checkpointed<'m> {
    model: &'m CausalLm,
    /// The final (normed) hidden states of every position, over the leaf `top`.
    pub hidden: Tensor,
    top: Var,
    /// The embeddings with their graph, when they train (full fine-tuning).
    embedded: Option<Tensor>,
    /// Each layer's input, detached, and the dropout state when the layer began.
    saved: Vec<(Tensor, Option<Rng>)>,
    inputs: LayerInputs,
    /// The prefix's per-layer keys and values with their graph, when there is a prefix: the
    /// layers read them through leaves (in `inputs`).
    prefix_graph: Option<Vec<(Tensor, Tensor)>>,
}

impl CausalLm {
    /// As [`CausalLm::forward_hidden`], keeping only what [`Checkpointed::backward`] needs.
    pub fn forward_checkpointed(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Checkpointed<'_>> {
        let embedded = self.embed(input_ids)?;
        let mut inputs = self.layer_inputs(positions, mask, ctx)?;
        // The layers see the prefix through leaves, so that each layer's backward stops there.
        let prefix_graph = match inputs.prefix.take() {
            Some(kv) => {
                let leaves = kv
                    .iter()
                    .map(|(k, v)| Ok((leaf(k)?.as_tensor().clone(), leaf(v)?.as_tensor().clone())))
                    .collect::<Result<Vec<_>>>()?;
                inputs.prefix = Some(leaves);
                Some(kv)
            }
            None => None,
        };
        let mut x = embedded.detach();
        let mut saved = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            saved.push((x.clone(), ctx.rng_state()));
            x = inputs.forward(layer, i, &x, ctx)?.detach();
        }
        let top = Var::from_tensor(&x)?;
        let hidden = self.final_norm(top.as_tensor())?;
        let embedded = self.embed.is_trainable().then_some(embedded);
        Ok(Checkpointed { model: self, hidden, top, embedded, saved, inputs, prefix_graph })
    }
}

/// A leaf copy of `t` (no graph behind it) whose gradient a backward reports.
fn leaf(t: &Tensor) -> Result<Var> {
    Var::from_tensor(&t.detach())
}

/// Gradients of the model's trainable parameters, by name, summed over partial backwards.
struct ParamGrads<'m> {
    model: &'m CausalLm,
    sums: HashMap<String, Tensor>,
}

impl ParamGrads<'_> {
    fn add(&mut self, store: &GradStore) -> Result<()> {
        for p in &self.model.trainable.params {
            if let Some(g) = store.get(p.var.as_tensor()) {
                let sum = match self.sums.remove(&p.name) {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                };
                self.sums.insert(p.name.clone(), sum);
            }
        }
        Ok(())
    }
}

/// The backward of `sum(output · grad)`: `output`'s vector-Jacobian product with `grad`.
fn vjp(output: &Tensor, grad: &Tensor) -> Result<GradStore> {
    (output * grad.detach())?.sum_all()?.backward()
}

impl Checkpointed<'_> {
    /// Every trainable parameter's gradient, by name, given `head`: the backward of a loss
    /// computed from `hidden` (which this consumes).
    pub fn backward(self, head: GradStore) -> Result<HashMap<String, Tensor>> {
        let Self { model, hidden, top, embedded, saved, inputs, prefix_graph } = self;
        drop(hidden);
        let mut grads = ParamGrads { model, sums: HashMap::new() };
        grads.add(&head)?;
        let Some(mut upstream) = head.get(top.as_tensor()).cloned() else {
            // The loss does not depend on the hidden states (no trained position).
            return Ok(grads.sums);
        };
        drop(head);
        let mut prefix_grads: Vec<Option<(Tensor, Tensor)>> = vec![None; model.layers.len()];
        for (i, (layer, (input, rng))) in model.layers.iter().zip(saved).enumerate().rev() {
            let input = Var::from_tensor(&input)?;
            let output = inputs.forward(layer, i, input.as_tensor(), &ForwardCtx::replay(rng))?;
            let store = vjp(&output, &upstream)?;
            grads.add(&store)?;
            if let Some(kv) = &inputs.prefix {
                let (k, v) = &kv[i];
                prefix_grads[i] = match (store.get(k), store.get(v)) {
                    (Some(dk), Some(dv)) => Some((dk.clone(), dv.clone())),
                    _ => None,
                };
            }
            upstream = store
                .get(input.as_tensor())
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("layer {i}'s input got no gradient")))?;
        }
        if let Some(embedded) = embedded {
            grads.add(&vjp(&embedded, &upstream)?)?;
        }
        if let Some(kv) = prefix_graph {
            let mut total: Option<Tensor> = None;
            for ((k, v), g) in kv.iter().zip(prefix_grads) {
                let Some((dk, dv)) = g else { continue };
                let term = ((k * dk.detach())?.sum_all()? + (v * dv.detach())?.sum_all()?)?;
                total = Some(match total {
                    Some(t) => (t + term)?,
                    None => term,
                });
            }
            if let Some(total) = total {
                grads.add(&total.backward()?)?;
            }
        }
        Ok(grads.sums)
    }
}
