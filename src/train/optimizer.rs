//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW`), f32 moments, decay only on
//! parameters marked for it (matrices), and a state that checkpoints and restores exactly.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::models::common::params::NamedParam;

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
    /// First and second moments by parameter name (created at the first step), flat f32.
    moments: HashMap<String, (Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, moments: HashMap::new() }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient in `grads` (by name), at rate `lr`.
    ///
    /// One pass over each parameter's values, gradient and moments (in parallel chunks), instead
    /// of a dozen tensor operations that each allocate a parameter-sized result.
    pub fn step(&mut self, params: &[NamedParam], grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        // 1 − β in f64 first: 1 − 0.999f32 is 0.0010000467, not 0.001.
        let (b1, b2, rest1, rest2) = (c.beta1 as f32, c.beta2 as f32, (1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        let (step_size, inv_bias2_sqrt, eps) = ((lr / bias1) as f32, (1.0 / bias2_sqrt) as f32, c.eps as f32);
        for p in params {
            let Some(grad) = grads.get(&p.name) else { continue };
            let grad: Vec<f32> = grad.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let value = p.var.as_tensor();
            let mut values: Vec<f32> = value.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if grad.len() != values.len() {
                candle_core::bail!("{}: gradient of {} values for {} weights", p.name, grad.len(), values.len());
            }
            let n = values.len();
            let (m, v) = self.moments.entry(p.name.clone()).or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
            if m.len() != n || v.len() != n {
                candle_core::bail!("{}: optimizer state of {} values for {n} weights", p.name, m.len());
            }
            let decay = if p.decay && c.weight_decay > 0.0 { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 };
            const CHUNK: usize = 1 << 14;
            values
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                        *m = b1 * *m + rest1 * g;
                        *v = b2 * *v + rest2 * g * g;
                        *w = *w * decay - step_size * *m / (v.sqrt() * inv_bias2_sqrt + eps);
                    }
                });
            let updated = Tensor::from_vec(values, value.shape(), value.device())?.to_dtype(value.dtype())?;
            p.var.set(&updated)?;
        }
        Ok(())
    }

    /// Step count and moments (`m.<name>`, `v.<name>`, flat f32) for a checkpoint.
    pub fn state(&self) -> (u64, HashMap<String, Tensor>) {
        let mut tensors = HashMap::new();
        for (name, (m, v)) in &self.moments {
            let flat = |x: &Vec<f32>| Tensor::from_slice(x, x.len(), &candle_core::Device::Cpu);
            if let (Ok(m), Ok(v)) = (flat(m), flat(v)) {
                tensors.insert(format!("m.{name}"), m);
                tensors.insert(format!("v.{name}"), v);
            }
        }
        (self.step, tensors)
    }

    /// Restores what [`AdamW::state`] returned.
    pub fn restore(&mut self, step: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.moments.clear();
        let flat = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
        for (key, m) in tensors {
            if let Some(name) = key.strip_prefix("m.") {
                let v = tensors
                    .get(&format!("v.{name}"))
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks v.{name}")))?;
                self.moments.insert(name.to_string(), (flat(m)?, flat(v)?));
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
