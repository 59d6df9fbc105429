//! Mixture-of-experts settings (Mixtral, Qwen2-MoE, Qwen3-MoE), the experts' weight layouts, and
//! the router's load-balancing loss.
//!
//! Checkpoints store each expert's projections as 2-D weights (Mixtral:
//! `block_sparse_moe.experts.N.w1/w3/w2`; Qwen: `mlp.experts.N.gate_proj/up_proj/down_proj`).
//! transformers 5 holds them stacked, `mlp.experts.gate_up_proj (E, 2I, H)` (gate rows, then up)
//! and `mlp.experts.down_proj (E, H, I)`, and PEFT's expert LoRA (`target_parameters`) is defined
//! on those stacks, so the model does too: [`to_stacked`] converts on load, [`to_checkpoint`] back
//! on save (transformers' `save_pretrained` writes the per-expert layout as well).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};

/// Whose checkpoint names the experts have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeNames {
    /// `block_sparse_moe.experts.N.w1` (gate), `w3` (up), `w2` (down), router `block_sparse_moe.gate`.
    Mixtral,
    /// `mlp.experts.N.gate_proj`, `up_proj`, `down_proj`, router `mlp.gate`.
    Qwen,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Each expert's intermediate size (Mixtral: `intermediate_size`; Qwen: `moe_intermediate_size`).
    pub expert_intermediate: usize,
    /// Whether the top-k probabilities are renormalized to sum to 1.
    pub norm_topk: bool,
    /// Qwen2-MoE's shared expert (a dense SwiGLU MLP every token goes through, gated by a sigmoid).
    pub shared_intermediate: Option<usize>,
    /// Per layer, whether its feed-forward is the mixture (else a dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    /// `router_aux_loss_coef`: the load-balancing loss's weight in training.
    pub aux_loss_coef: f64,
    pub names: MoeNames,
}

impl MoeConfig {
    pub fn is_sparse(&self, layer: usize) -> bool {
        self.sparse_layers.get(layer).copied().unwrap_or(false)
    }

    /// Checkpoint names (after [`rename_mixtral`]) of expert `e`'s gate, up and down weights.
    pub fn expert_weight_names(&self, layer: usize, e: usize) -> [String; 3] {
        let p = format!("model.layers.{layer}.mlp.experts.{e}");
        match self.names {
            MoeNames::Mixtral => [format!("{p}.w1.weight"), format!("{p}.w3.weight"), format!("{p}.w2.weight")],
            MoeNames::Qwen => {
                [format!("{p}.gate_proj.weight"), format!("{p}.up_proj.weight"), format!("{p}.down_proj.weight")]
            }
        }
    }
}

/// Layer `layer`'s stacked expert weights: `(gate_up_proj, down_proj)`.
pub fn stacked_names(layer: usize) -> (String, String) {
    let p = format!("model.layers.{layer}.mlp.experts");
    (format!("{p}.gate_up_proj"), format!("{p}.down_proj"))
}

/// Mixtral's `block_sparse_moe` is transformers' `mlp`.
fn rename_mixtral<T>(map: &mut HashMap<String, T>) {
    let old: Vec<String> = map.keys().filter(|k| k.contains(".block_sparse_moe.")).cloned().collect();
    for name in old {
        let value = map.remove(&name).expect("listed above");
        map.insert(name.replace(".block_sparse_moe.", ".mlp."), value);
    }
}

/// Converts a checkpoint's expert weights to the stacked layout in place (see the module doc). A
/// checkpoint already stacked (transformers 5 names) is left as it is; quantized experts (QLoRA)
/// stay per expert, in `quantized`, under their checkpoint names.
pub fn to_stacked(
    config: &MoeConfig,
    layers: usize,
    weights: &mut HashMap<String, Tensor>,
    quantized: &mut HashMap<String, Arc<QTensor>>,
) -> Result<()> {
    if config.names == MoeNames::Mixtral {
        rename_mixtral(weights);
        rename_mixtral(quantized);
    }
    for layer in (0..layers).filter(|&l| config.is_sparse(l)) {
        let (gate_up_name, down_name) = stacked_names(layer);
        if weights.contains_key(&gate_up_name) || quantized.contains_key(&config.expert_weight_names(layer, 0)[0]) {
            continue;
        }
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..config.num_experts {
            let [gate, up, down_proj] = config.expert_weight_names(layer, e);
            let mut take = |name: &str| {
                weights.remove(name).ok_or_else(|| candle_core::Error::Msg(format!("missing weight {name}")))
            };
            let (g, u, d) = (take(&gate)?, take(&up)?, take(&down_proj)?);
            gate_up.push(Tensor::cat(&[&g, &u], 0)?);
            down.push(d);
        }
        weights.insert(gate_up_name, Tensor::stack(&gate_up, 0)?);
        weights.insert(down_name, Tensor::stack(&down, 0)?);
    }
    Ok(())
}

/// The model's tensors with the stacked experts split back into the checkpoint layout (and
/// Mixtral's `block_sparse_moe` names), as transformers' `save_pretrained` writes them.
pub fn to_checkpoint(config: &MoeConfig, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let stacked = name.strip_prefix("model.layers.").and_then(|rest| {
            let (layer, param) = rest.split_once('.')?;
            Some((layer.parse::<usize>().ok()?, param))
        });
        match stacked {
            Some((layer, "mlp.experts.gate_up_proj")) => {
                let half = tensor.dim(1)? / 2;
                for e in 0..config.num_experts {
                    let [gate, up, _] = config.expert_weight_names(layer, e);
                    let expert = tensor.get(e)?;
                    out.push((gate, expert.narrow(0, 0, half)?.contiguous()?));
                    out.push((up, expert.narrow(0, half, half)?.contiguous()?));
                }
            }
            Some((layer, "mlp.experts.down_proj")) => {
                for e in 0..config.num_experts {
                    let [_, _, down] = config.expert_weight_names(layer, e);
                    out.push((down, tensor.get(e)?.contiguous()?));
                }
            }
            _ => out.push((name, tensor)),
        }
    }
    if config.names == MoeNames::Mixtral {
        for (name, _) in out.iter_mut() {
            if name.contains(".mlp.experts.") || name.ends_with(".mlp.gate.weight") {
                *name = name.replace(".mlp.", ".block_sparse_moe.");
            }
        }
    }
    Ok(out)
}

/// One MoE layer's routing in a training forward, for the load-balancing loss.
pub struct RoutingStats {
    /// `(E)`: the router probabilities summed over the counted tokens (differentiable).
    pub prob_sums: Tensor,
    /// Per expert, how many of the counted tokens picked it (top-k).
    pub counts: Vec<f64>,
    /// Tokens counted (padding is not).
    pub rows: f64,
}

/// transformers' `load_balancing_loss_func` (Switch Transformer, eqs. 4–6) over every MoE layer of
/// a forward: `E · Σ_e f_e · P_e`, with `f_e` the share of top-k picks of expert `e` and `P_e` its
/// mean router probability, both over all layers' counted tokens. `None` without MoE layers.
pub fn load_balancing_loss(stats: &[RoutingStats], num_experts: usize) -> Result<Option<Tensor>> {
    let Some(first) = stats.first() else { return Ok(None) };
    let rows: f64 = stats.iter().map(|s| s.rows).sum();
    if rows == 0.0 {
        return Ok(None);
    }
    let mut counts = vec![0f64; num_experts];
    let mut probs = first.prob_sums.clone();
    for (i, s) in stats.iter().enumerate() {
        for (c, n) in counts.iter_mut().zip(&s.counts) {
            *c += n;
        }
        if i > 0 {
            probs = (probs + &s.prob_sums)?;
        }
    }
    let share: Vec<f32> = counts.iter().map(|c| (c / rows) as f32).collect();
    let share = Tensor::from_vec(share, num_experts, first.prob_sums.device())?;
    let weighted = (probs.to_dtype(DType::F32)? * share)?.sum_all()?;
    Ok(Some((weighted * (num_experts as f64 / rows))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(names: MoeNames) -> MoeConfig {
        MoeConfig {
            num_experts: 2,
            top_k: 1,
            expert_intermediate: 3,
            norm_topk: true,
            shared_intermediate: None,
            sparse_layers: vec![true],
            aux_loss_coef: 0.01,
            names,
        }
    }

    #[test]
    fn experts_stack_and_split_back_to_the_checkpoint_layout() {
        for names in [MoeNames::Mixtral, MoeNames::Qwen] {
            let c = config(names);
            let mut weights = HashMap::new();
            let mut originals = Vec::new();
            for e in 0..2 {
                for (k, name) in c.expert_weight_names(0, e).into_iter().enumerate() {
                    let shape = if k == 2 { (4, 3) } else { (3, 4) };
                    let t = Tensor::rand(0f32, 1f32, shape, &Device::Cpu).unwrap();
                    let on_disk = match names {
                        MoeNames::Mixtral => name.replace(".mlp.", ".block_sparse_moe."),
                        MoeNames::Qwen => name.clone(),
                    };
                    originals.push((on_disk.clone(), t.clone()));
                    weights.insert(on_disk, t);
                }
            }
            to_stacked(&c, 1, &mut weights, &mut HashMap::new()).unwrap();
            let (gate_up, down) = stacked_names(0);
            assert_eq!(weights[&gate_up].dims(), [2, 6, 4]);
            assert_eq!(weights[&down].dims(), [2, 4, 3]);
            let back: HashMap<String, Tensor> =
                to_checkpoint(&c, weights.into_iter().collect()).unwrap().into_iter().collect();
            assert_eq!(back.len(), originals.len());
            for (name, t) in originals {
                let diff = (&back[&name] - &t).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(diff, 0.0, "{name}");
            }
        }
    }

    #[test]
    fn balanced_routing_gives_a_load_balancing_loss_of_one() {
        // Two experts, each picked by half the tokens with mean probability 1/2: E · Σ f·P = 1.
        let stats = RoutingStats {
            prob_sums: Tensor::new(&[2f32, 2.0], &Device::Cpu).unwrap(),
            counts: vec![2.0, 2.0],
            rows: 4.0,
        };
        let loss = load_balancing_loss(&[stats], 2).unwrap().unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - 1.0).abs() < 1e-6, "{loss}");
        let skewed = RoutingStats {
            prob_sums: Tensor::new(&[3.6f32, 0.4], &Device::Cpu).unwrap(),
            counts: vec![4.0, 0.0],
            rows: 4.0,
        };
        let loss = load_balancing_loss(&[skewed], 2).unwrap().unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - 1.8).abs() < 1e-6, "{loss}");
    }
}
