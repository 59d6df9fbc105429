//! A T5 model's weights as a `T5ForConditionalGeneration` checkpoint, with LoRA folded in
//! (`W' = W + scale · B·A`), for merged and checkpoint downloads.

use candle_core::{Result, Tensor};

use super::{Attention, FeedForward, Stack, T5};
use crate::models::common::linear::Linear;

impl T5 {
    /// Every weight under transformers' names (the current values, trained or frozen), each
    /// LoRA adapter merged into its linear. A tied model has no `lm_head.weight`.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("shared.weight".to_string(), self.shared.tensor().clone())];
        stack_tensors(&self.encoder, "encoder", &mut out)?;
        stack_tensors(&self.decoder, "decoder", &mut out)?;
        if !self.tied_head {
            out.push(("lm_head.weight".into(), self.lm_head.merged_weight()?));
        }
        Ok(out)
    }
}

fn stack_tensors(stack: &Stack, name: &str, out: &mut Vec<(String, Tensor)>) -> Result<()> {
    out.push((
        format!("{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        stack.relative_bias.tensor().clone(),
    ));
    for (i, block) in stack.blocks.iter().enumerate() {
        let p = format!("{name}.block.{i}.layer");
        attention_tensors(&block.self_attention, &format!("{p}.0.SelfAttention"), out)?;
        out.push((format!("{p}.0.layer_norm.weight"), block.self_norm.tensor().clone()));
        let ff = match &block.cross {
            Some((attention, norm)) => {
                attention_tensors(attention, &format!("{p}.1.EncDecAttention"), out)?;
                out.push((format!("{p}.1.layer_norm.weight"), norm.tensor().clone()));
                format!("{p}.2")
            }
            None => format!("{p}.1"),
        };
        let linears: Vec<(&str, &Linear)> = match &block.feed_forward {
            FeedForward::Plain { wi, wo } => vec![("wi", wi), ("wo", wo)],
            FeedForward::Gated { wi_0, wi_1, wo } => vec![("wi_0", wi_0), ("wi_1", wi_1), ("wo", wo)],
        };
        for (linear_name, linear) in linears {
            out.push((format!("{ff}.DenseReluDense.{linear_name}.weight"), linear.merged_weight()?));
        }
        out.push((format!("{ff}.layer_norm.weight"), block.ff_norm.tensor().clone()));
    }
    out.push((format!("{name}.final_layer_norm.weight"), stack.final_norm.tensor().clone()));
    Ok(())
}

fn attention_tensors(attention: &Attention, module: &str, out: &mut Vec<(String, Tensor)>) -> Result<()> {
    for (name, linear) in [("q", &attention.q), ("k", &attention.k), ("v", &attention.v), ("o", &attention.o)] {
        out.push((format!("{module}.{name}.weight"), linear.merged_weight()?));
    }
    Ok(())
}
