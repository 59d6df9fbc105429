//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW`), f32 moments, decay only on
//! parameters marked for it (matrices), and a state that checkpoints and restores exactly.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};

use crate::models::params::NamedParam;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    config: AdamWConfig,
    /// Optimizer steps taken so far.
    step: u64,
    /// First and second moments by parameter name (created at the first step).
    moments: HashMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, moments: HashMap::new() }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Applies one update with learning rate `lr` from `grads` (by parameter name).
    pub fn step(&mut self, params: &[NamedParam], grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        for p in params {
            let Some(grad) = grads.get(&p.name) else { continue };
            // Detached, so that the moments never hold on to an autograd graph.
            let grad = grad.detach().to_dtype(DType::F32)?;
            let (m, v) = match self.moments.remove(&p.name) {
                Some(state) => state,
                None => (grad.zeros_like()?, grad.zeros_like()?),
            };
            let m = ((m * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let mut value = p.var.as_tensor().detach().to_dtype(DType::F32)?;
            if p.decay && c.weight_decay > 0.0 {
                value = (value * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            p.var.set(&(value - update)?.to_dtype(p.var.dtype())?)?;
            self.moments.insert(p.name.clone(), (m, v));
        }
        Ok(())
    }

    /// Moments as tensors named `m.<param>` / `v.<param>`, and the step count.
    pub fn state(&self) -> (u64, HashMap<String, Tensor>) {
        let mut tensors = HashMap::new();
        for (name, (m, v)) in &self.moments {
            tensors.insert(format!("m.{name}"), m.clone());
            tensors.insert(format!("v.{name}"), v.clone());
        }
        (self.step, tensors)
    }

    pub fn restore(&mut self, step: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.moments.clear();
        for (key, m) in tensors {
            if let Some(name) = key.strip_prefix("m.") {
                let v = tensors
                    .get(&format!("v.{name}"))
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks v.{name}")))?;
                self.moments.insert(name.to_string(), (m.clone(), v.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Two steps of PyTorch's AdamW (lr 0.1, wd 0.5) on p = [1, -2] with grads [0.5, 0.25] then
    /// [-1, 2], computed by hand from the algorithm in torch/optim/adamw.py.
    #[test]
    fn matches_torch_adamw_on_two_steps() {
        let var = Var::from_slice(&[1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let params = vec![NamedParam { name: "w".into(), var: var.clone(), decay: true }];
        let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.5, ..Default::default() });
        let grads = |g: [f32; 2]| HashMap::from([("w".to_string(), Tensor::new(&g, &Device::Cpu).unwrap())]);
        opt.step(&params, &grads([0.5, 0.25]), 0.1).unwrap();
        opt.step(&params, &grads([-1.0, 2.0]), 0.1).unwrap();
        // Reference, step by step in f64:
        let reference = |p0: f64, g: [f64; 2]| {
            let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
            for (t, g) in g.iter().enumerate() {
                let t = t as i32 + 1;
                p *= 1.0 - 0.1 * 0.5;
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let denom = v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                p -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            }
            p
        };
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((got[0] as f64 - reference(1.0, [0.5, -1.0])).abs() < 1e-6, "{got:?}");
        assert!((got[1] as f64 - reference(-2.0, [0.25, 2.0])).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn state_round_trips() {
        let var = Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
        let params = vec![NamedParam { name: "w".into(), var: var.clone(), decay: false }];
        let mut a = AdamW::new(AdamWConfig::default());
        let g = HashMap::from([("w".to_string(), Tensor::new(&[0.3f32], &Device::Cpu).unwrap())]);
        a.step(&params, &g, 0.01).unwrap();
        let (step, state) = a.state();
        let mut b = AdamW::new(AdamWConfig::default());
        b.restore(step, &state).unwrap();
        let twin = Var::from_slice(&[var.as_tensor().to_vec1::<f32>().unwrap()[0]], 1, &Device::Cpu).unwrap();
        let twin_params = vec![NamedParam { name: "w".into(), var: twin.clone(), decay: false }];
        a.step(&params, &g, 0.01).unwrap();
        b.step(&twin_params, &g, 0.01).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), twin.as_tensor().to_vec1::<f32>().unwrap());
    }
}
