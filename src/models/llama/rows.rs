//! Serving forward: several independent sequences ("rows") in one pass over the shared base
//! weights, each with its own KV cache and its own LoRA adapter (or none), applied unmerged.
//!
//! The tokens of every row are laid end to end, so each base linear layer runs once for the whole
//! batch (prompts being prefilled and single decode tokens alike); adapter deltas are computed per
//! adapter over that adapter's tokens and added back; attention runs per row against its cache.

use candle_core::{Result, Tensor};

use super::block::NormStyle;
use super::moe::{MoeHooks, ProjKind};
use super::serving_adapter::{LoraPair, ServingAdapter};
use super::{CausalLm, KvCache, LayerCache, Linear};
use crate::models::bottleneck::Bottleneck;
use crate::models::common::mask::incremental_causal_mask;
use crate::models::common::ops::{apply_rope, repeat_kv};
use crate::models::common::params::Param;
use crate::models::ForwardCtx;

/// One sequence of a batched step: the tokens it adds, its cache, and its adapter.
pub struct Row<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a ServingAdapter>,
}

/// The tokens (indices into the concatenated batch) that share one adapter.
struct Group<'a> {
    adapter: &'a ServingAdapter,
    /// `None` when the group is the whole batch.
    index: Option<Tensor>,
}

impl CausalLm {
    /// Feeds every row's tokens after its cached ones; returns the logits of each row's last
    /// token, `(rows, vocab)`.
    pub fn forward_rows(&self, rows: &mut [Row<'_>]) -> Result<Tensor> {
        if rows.is_empty() || rows.iter().any(|r| r.tokens.is_empty()) {
            candle_core::bail!("forward_rows needs at least one row, each with at least one token");
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(rows.len());
        for row in rows.iter_mut() {
            if row.cache.len == 0 {
                if let Some(adapter) = row.adapter.filter(|a| !a.prefix.is_empty()) {
                    // A new sequence of a prefix-tuned model starts after its prefix.
                    row.cache.layers = (0..self.layers.len()).map(|_| None).collect();
                    for ((k, v), slot) in adapter.prefix.iter().zip(row.cache.layers.iter_mut()) {
                        LayerCache::append(slot, k, v, self.rope.max_positions())?;
                    }
                    row.cache.len = adapter.prefix[0].0.dim(2)?;
                }
            }
            let past = row.cache.len;
            let t = row.tokens.len();
            if past + t > self.rope.max_positions() {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    past + t,
                    self.rope.max_positions()
                );
            }
            if row.cache.layers.is_empty() {
                row.cache.layers = (0..self.layers.len()).map(|_| None).collect();
            }
            spans.push((ids.len(), t));
            ids.extend_from_slice(row.tokens);
            // Each row picks its own RoPE rows (LongRoPE switches on the row's own length).
            positions.extend((past..past + t).map(|p| self.rope.row(p, past + t)));
        }
        let total = ids.len();
        let groups = self.groups(rows, &spans, total)?;
        // Each token's adapter group (for the experts, which see a subset of the tokens).
        let mut token_group = vec![usize::MAX; total];
        for (g, group) in groups.iter().enumerate() {
            match &group.index {
                None => token_group.fill(g),
                Some(index) => index.to_vec1::<u32>()?.into_iter().for_each(|t| token_group[t as usize] = g),
            }
        }
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let positions = Tensor::from_vec(positions, (1, total), &self.device)?;
        let (global_cos, global_sin) = self.rope.at_rows(&positions, self.dtype)?;
        let local = self.local_rope.as_ref().map(|rope| rope.at_rows(&positions, self.dtype)).transpose()?;
        let style = self.norm_style;
        let ctx = ForwardCtx::inference();
        let mut x = self.embed_rows(&ids)?;
        let adapters: Vec<Option<&ServingAdapter>> = rows.iter().map(|r| r.adapter).collect();
        for (li, block) in self.layers.iter().enumerate() {
            // The layer's own window (Gemma's sliding layers) or the model's; Gemma 3's local RoPE.
            let window = block.window.or(self.config.sliding_window);
            let (cos, sin) = match &local {
                Some((cos, sin)) if block.window.is_some() => (cos, sin),
                _ => (&global_cos, &global_sin),
            };
            let norm = |x: &Tensor, base: &Param, name: &'static str| {
                norm_rows(x, base.tensor(), &adapters, &spans, style, |a| a.layers[li].norm(name))
            };
            let normed = norm(&x, &block.input_norm, "input_layernorm")?;
            let apply = |name: &'static str, linear: &Linear, input: &Tensor| -> Result<Tensor> {
                with_adapters(linear.forward(input, &ctx)?, input, &groups, |a| a.layers[li].linears.get(name))
            };
            let att = &block.attention;
            let (q, k, v) = att.project(&normed, &apply)?;
            let (q, k) = match &att.qk_norm {
                Some((q_norm, k_norm)) => {
                    let per_head = |y: &Tensor, n: usize, w: &Param, name: &'static str| {
                        norm(&y.reshape((total, n, att.head_dim))?, w, name)?.reshape((total, n * att.head_dim))
                    };
                    (
                        per_head(&q, att.heads, q_norm, "self_attn.q_norm")?,
                        per_head(&k, att.kv_heads, k_norm, "self_attn.k_norm")?,
                    )
                }
                None => (q, k),
            };
            // RoPE for every token at once; then each row attends against its own cache.
            let all_heads = |y: &Tensor, n: usize| -> Result<Tensor> {
                y.reshape((1, total, n, att.head_dim))?.transpose(1, 2)?.contiguous()
            };
            let q = apply_rope(&all_heads(&q, att.heads)?, cos, sin)?;
            let k = apply_rope(&all_heads(&k, att.kv_heads)?, cos, sin)?;
            let v = all_heads(&v, att.kv_heads)?;
            let group_size = att.heads / att.kv_heads;
            let max_positions = self.rope.max_positions();
            let mut outs = Vec::with_capacity(rows.len());
            for (row, &(start, t)) in rows.iter_mut().zip(&spans) {
                let past = row.cache.len;
                let (keys, values) = LayerCache::append(
                    &mut row.cache.layers[li],
                    &k.narrow(2, start, t)?,
                    &v.narrow(2, start, t)?,
                    max_positions,
                )?;
                let q = q.narrow(2, start, t)?;
                let windowed = window.is_some_and(|w| past + t > w);
                let mask = if t > 1 || windowed {
                    Some(incremental_causal_mask(past, t, window, &self.device)?.to_dtype(self.dtype)?)
                } else {
                    None
                };
                let out = if t == 1 {
                    // One query per head: group the query heads by their key/value head instead of
                    // repeating keys and values (heads h·g..h·g+g share key/value head h).
                    let q = q.contiguous()?.reshape((1, att.kv_heads, group_size, att.head_dim))?;
                    let mut scores = att.logits.apply(&q.matmul(&keys.t()?)?)?;
                    if let Some(mask) = &mask {
                        scores = scores.broadcast_add(mask)?;
                    }
                    let probs = crate::models::common::fused::softmax_last_dim(&scores)?;
                    probs.matmul(&values)?.reshape((1, att.heads * att.head_dim))?
                } else {
                    let (keys, values) = (repeat_kv(&keys, group_size)?, repeat_kv(&values, group_size)?);
                    let mut scores = att.logits.apply(&q.contiguous()?.matmul(&keys.t()?)?)?;
                    if let Some(mask) = &mask {
                        scores = scores.broadcast_add(mask)?;
                    }
                    let probs = crate::models::common::fused::softmax_last_dim(&scores)?;
                    probs.matmul(&values)?.transpose(1, 2)?.reshape((t, att.heads * att.head_dim))?
                };
                outs.push(out);
            }
            let attended = if outs.len() == 1 { outs.pop().expect("one row") } else { Tensor::cat(&outs, 0)? };
            let mut attended = apply("o_proj", &att.o, &attended)?;
            if let Some((after_attention, _)) = &block.output_norms {
                attended = norm(&attended, after_attention, "post_attention_layernorm")?;
            }
            let attended = with_bottlenecks(attended, &groups, &ctx, |a| a.bottlenecks.get(li).map(|b| &b.0))?;
            x = (x + attended)?;
            let normed = norm(&x, &block.post_norm, block.post_norm_name())?;
            let expert = |kind: ProjKind, e: usize, input: &Tensor, tokens: &[u32], y: Tensor| {
                with_expert_adapters(y, input, tokens, &groups, &token_group, |a| {
                    a.layers[li].experts[kind as usize].get(e)
                })
            };
            let router = |input: &Tensor, logits: Tensor| {
                with_adapters(logits, input, &groups, |a| a.layers[li].linears.get("gate"))
            };
            let hooks = MoeHooks { expert: &expert, router: &router };
            let mut out = block.mlp.forward(&normed, &apply, Some(&hooks), &ctx)?;
            if let Some((_, after_mlp)) = &block.output_norms {
                out = norm(&out, after_mlp, "post_feedforward_layernorm")?;
            }
            let out = with_bottlenecks(out, &groups, &ctx, |a| a.bottlenecks.get(li).map(|b| &b.1))?;
            x = (x + out)?;
        }
        for row in rows.iter_mut() {
            row.cache.len += row.tokens.len();
        }
        let last: Vec<u32> = spans.iter().map(|&(start, t)| (start + t - 1) as u32).collect();
        let last = Tensor::from_vec(last, rows.len(), &self.device)?;
        let hidden = x.index_select(&last, 0)?;
        let row_spans: Vec<(usize, usize)> = (0..rows.len()).map(|i| (i, 1)).collect();
        let hidden = norm_rows(&hidden, self.norm.tensor(), &adapters, &row_spans, style, |a| a.norm.as_ref())?;
        let logits = self.logits(&hidden, &ctx)?;
        if self.lm_head.is_none() {
            return Ok(logits);
        }
        let row_groups = self.groups(rows, &row_spans, rows.len())?;
        with_adapters(logits, &hidden, &row_groups, |a| a.lm_head.as_ref())
    }

    fn groups<'a>(&self, rows: &[Row<'a>], spans: &[(usize, usize)], total: usize) -> Result<Vec<Group<'a>>> {
        let mut by_adapter: Vec<(&'a ServingAdapter, Vec<u32>)> = Vec::new();
        for (row, &(start, t)) in rows.iter().zip(spans) {
            let Some(adapter) = row.adapter else { continue };
            let tokens = (start..start + t).map(|i| i as u32);
            match by_adapter.iter_mut().find(|(a, _)| std::ptr::eq(*a, adapter)) {
                Some((_, index)) => index.extend(tokens),
                None => by_adapter.push((adapter, tokens.collect())),
            }
        }
        by_adapter
            .into_iter()
            .map(|(adapter, index)| {
                let index = if index.len() == total {
                    None
                } else {
                    let n = index.len();
                    Some(Tensor::from_vec(index, n, &self.device)?)
                };
                Ok(Group { adapter, index })
            })
            .collect()
    }
}

/// Adds each adapter group's LoRA delta (from `pick`) to the base output `y`.
fn with_adapters(
    mut y: Tensor,
    x: &Tensor,
    groups: &[Group<'_>],
    pick: impl Fn(&ServingAdapter) -> Option<&LoraPair>,
) -> Result<Tensor> {
    for group in groups {
        let Some(pair) = pick(group.adapter) else { continue };
        y = match &group.index {
            None => (y + x.matmul(&pair.a_t)?.matmul(&pair.b_t)?)?,
            Some(index) => {
                let delta = x.index_select(index, 0)?.matmul(&pair.a_t)?.matmul(&pair.b_t)?;
                y.index_add(index, &delta, 0)?
            }
        };
    }
    Ok(y)
}

/// Adds each adapter group's expert LoRA delta (from `pick`) to an expert's output `y`, whose input
/// rows are the batch's tokens `tokens`.
fn with_expert_adapters(
    mut y: Tensor,
    x: &Tensor,
    tokens: &[u32],
    groups: &[Group<'_>],
    token_group: &[usize],
    pick: impl Fn(&ServingAdapter) -> Option<&LoraPair>,
) -> Result<Tensor> {
    for (g, group) in groups.iter().enumerate() {
        let Some(pair) = pick(group.adapter) else { continue };
        let local: Vec<u32> =
            (0..tokens.len() as u32).filter(|&k| token_group[tokens[k as usize] as usize] == g).collect();
        y = match local.len() {
            0 => continue,
            n if n == tokens.len() => (y + x.matmul(&pair.a_t)?.matmul(&pair.b_t)?)?,
            n => {
                let index = Tensor::from_vec(local, n, x.device())?;
                let delta = x.index_select(&index, 0)?.matmul(&pair.a_t)?.matmul(&pair.b_t)?;
                y.index_add(&index, &delta, 0)?
            }
        };
    }
    Ok(y)
}

/// Applies each adapter group's bottleneck (`h + up(swish(down(h)))`) to its tokens of `y`.
fn with_bottlenecks(
    mut y: Tensor,
    groups: &[Group<'_>],
    ctx: &ForwardCtx,
    pick: impl Fn(&ServingAdapter) -> Option<&Bottleneck>,
) -> Result<Tensor> {
    for group in groups {
        let Some(bottleneck) = pick(group.adapter) else { continue };
        y = match &group.index {
            None => bottleneck.forward(&y, ctx)?,
            Some(index) => {
                let part = y.index_select(index, 0)?;
                let delta = bottleneck.up.forward(&bottleneck.down.forward(&part, ctx)?.silu()?, ctx)?;
                y.index_add(index, &delta, 0)?
            }
        };
    }
    Ok(y)
}

/// RMSNorm with the base weight, or per row with the weight its adapter trained.
fn norm_rows<'a>(
    x: &Tensor,
    base: &Tensor,
    adapters: &[Option<&'a ServingAdapter>],
    spans: &[(usize, usize)],
    style: NormStyle,
    pick: impl Fn(&'a ServingAdapter) -> Option<&'a Tensor>,
) -> Result<Tensor> {
    let weight_of = |adapter: &Option<&'a ServingAdapter>| -> Option<&'a Tensor> { adapter.and_then(&pick) };
    if adapters.iter().all(|a| weight_of(a).is_none()) {
        return style.apply(x, base);
    }
    let parts = adapters
        .iter()
        .zip(spans)
        .map(|(adapter, &(start, t))| style.apply(&x.narrow(0, start, t)?, weight_of(adapter).unwrap_or(base)))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}
