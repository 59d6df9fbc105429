//! Weights: frozen tensors or trainable `Var`s, and the registry of what a run trains.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

/// A weight that is either frozen (a plain tensor: no graph, no gradient memory) or trained.
#[derive(Debug, Clone)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
}

impl Param {
    pub fn is_trainable(&self) -> bool {
        matches!(self, Self::Trainable(_))
    }

    pub fn tensor(&self) -> &Tensor {
        match self {
            Self::Frozen(t) => t,
            Self::Trainable(v) => v.as_tensor(),
        }
    }
}

/// One trainable parameter, under the name it is saved with (transformers' or PEFT's).
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub var: Var,
    /// Weight decay applies to matrices, not to norms and biases.
    pub decay: bool,
}

/// Everything a run trains, in a stable order.
#[derive(Debug, Default, Clone)]
pub struct TrainableParams {
    pub params: Vec<NamedParam>,
}

impl TrainableParams {
    /// Makes `tensor` trainable under `name` and returns it as a [`Param`].
    pub fn add(&mut self, name: impl Into<String>, tensor: &Tensor, decay: bool) -> Result<Param> {
        let var = Var::from_tensor(tensor)?;
        self.params.push(NamedParam { name: name.into(), var: var.clone(), decay });
        Ok(Param::Trainable(var))
    }

    /// Each parameter's gradient in `store` (those that have one), by name.
    pub fn gradients(&self, store: &candle_core::backprop::GradStore) -> Vec<(String, Tensor)> {
        self.params.iter().filter_map(|p| Some((p.name.clone(), store.get(p.var.as_tensor())?.clone()))).collect()
    }

    pub fn count(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Current values by name (detached copies safe to save).
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.params.iter().map(|p| Ok((p.name.clone(), p.var.as_tensor().detach().copy()?))).collect()
    }

    /// Overwrites values from `tensors` (by name); every parameter must be present.
    pub fn restore(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for p in &self.params {
            let value = tensors
                .get(&p.name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {} in checkpoint", p.name)))?;
            p.var.set(&value.to_device(p.var.device())?.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }
}
