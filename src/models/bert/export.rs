//! An encoder's weights as a transformers checkpoint of its task class, LoRA folded into each
//! linear, for merged and checkpoint downloads. Bottleneck adapters add layers of their own and
//! are refused.

use candle_core::{Result, Tensor};

use super::{Encoder, Head, LayerNorm};
use crate::models::common::linear::Linear;

impl Encoder {
    /// Every weight under transformers' names (the current values, trained or frozen): the
    /// backbone under its prefix (`bert.`, none for an embedding model) and the task head.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if self.layers.iter().any(|layer| layer.adapters.is_some()) {
            candle_core::bail!("bottleneck adapters add layers and cannot be merged into the base");
        }
        let r = &self.root;
        let mut out = vec![
            (format!("{r}embeddings.word_embeddings.weight"), self.word_embeddings.tensor().clone()),
            (format!("{r}embeddings.position_embeddings.weight"), self.position_embeddings.tensor().clone()),
            (format!("{r}embeddings.token_type_embeddings.weight"), self.token_type_embeddings.tensor().clone()),
        ];
        push_norm(&mut out, &format!("{r}embeddings.LayerNorm"), &self.embedding_norm);
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("{r}encoder.layer.{i}");
            push_linear(&mut out, &format!("{p}.attention.self.query"), &layer.query)?;
            push_linear(&mut out, &format!("{p}.attention.self.key"), &layer.key)?;
            push_linear(&mut out, &format!("{p}.attention.self.value"), &layer.value)?;
            push_linear(&mut out, &format!("{p}.attention.output.dense"), &layer.attention_out)?;
            push_norm(&mut out, &format!("{p}.attention.output.LayerNorm"), &layer.attention_norm);
            push_linear(&mut out, &format!("{p}.intermediate.dense"), &layer.intermediate)?;
            push_linear(&mut out, &format!("{p}.output.dense"), &layer.output)?;
            push_norm(&mut out, &format!("{p}.output.LayerNorm"), &layer.output_norm);
        }
        match &self.head {
            Head::None => {}
            Head::Pooled { pooler, classifier } => {
                push_linear(&mut out, &format!("{r}pooler.dense"), pooler)?;
                push_linear(&mut out, "classifier", classifier)?;
            }
            Head::Roberta { dense, out_proj } => {
                push_linear(&mut out, "classifier.dense", dense)?;
                push_linear(&mut out, "classifier.out_proj", out_proj)?;
            }
            Head::Token { classifier } => push_linear(&mut out, "classifier", classifier)?,
        }
        Ok(out)
    }
}

fn push_linear(out: &mut Vec<(String, Tensor)>, module: &str, linear: &Linear) -> Result<()> {
    out.push((format!("{module}.weight"), linear.merged_weight()?));
    if let Some(bias) = &linear.bias {
        out.push((format!("{module}.bias"), bias.tensor().clone()));
    }
    Ok(())
}

fn push_norm(out: &mut Vec<(String, Tensor)>, module: &str, norm: &LayerNorm) {
    out.push((format!("{module}.weight"), norm.weight.tensor().clone()));
    out.push((format!("{module}.bias"), norm.bias.tensor().clone()));
}
