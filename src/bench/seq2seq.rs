//! `ferrotune bench train` on an encoder-decoder (T5): teacher-forced steps on synthetic batches
//! (`scripts/bench_reference_t5.py` builds the same ones for transformers + PEFT): the encoder
//! input of row `r` of batch `j` is SplitMix64 ids `(seed, j·2·b·t + r·t + i) mod vocab`, the
//! labels the next `b·t` values of the stream, the decoder input the labels shifted right after
//! the decoder start token; mean cross-entropy; AdamW lr 1e-4; LoRA on the given targets or full
//! fine-tuning.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::train::BenchTrainArgs;
use crate::models::adaptation::Adaptation;
use crate::models::common::ops::masked_cross_entropy_sum;
use crate::models::t5::{T5Config, T5};
use crate::models::weights::load_model_weights;
use crate::models::ForwardCtx;
use crate::rng::splitmix64;
use crate::train::optimizer::{AdamW, AdamWConfig};

/// The batches cycled through (as the perf harness does).
const BATCHES: u64 = 4;

pub fn run(args: &BenchTrainArgs, targets: &str) -> anyhow::Result<()> {
    let device = super::open_device(&args.device)?;
    let config = T5Config::from_file(&args.model.join("config.json"))?;
    let (vocab, start) = (config.vocab_size as u64, config.decoder_start_token_id);
    let weights = load_model_weights(&args.model, DType::F32, &device)?;
    let params_total: usize = weights.values().map(Tensor::elem_count).sum();
    let plan = args.lora_plan(targets);
    let adaptation = match args.method.as_str() {
        "lora" => Adaptation::Lora(&plan),
        "full" => Adaptation::Full,
        other => anyhow::bail!("T5 benchmarks --method lora or full, not {other}"),
    };
    let model = T5::new(config, weights, adaptation)?;
    let trainable = model.trainable.count();
    let (b, t) = (args.batch, args.seq);
    let n = (b * t) as u64;
    let batches: Vec<[Tensor; 3]> = (0..BATCHES)
        .map(|j| {
            let ids = |offset: u64| -> Vec<u32> {
                (0..n).map(|k| (splitmix64(args.seed, j * 2 * n + offset + k) % vocab) as u32).collect()
            };
            let (input, labels) = (ids(0), ids(n));
            let decoder: Vec<u32> =
                labels.chunks(t).flat_map(|row| std::iter::once(start).chain(row[..t - 1].iter().copied())).collect();
            Ok([
                Tensor::from_vec(input, (b, t), &device)?,
                Tensor::from_vec(decoder, (b, t), &device)?,
                Tensor::from_vec(labels, b * t, &device)?,
            ])
        })
        .collect::<candle_core::Result<_>>()?;
    let mask = Tensor::ones((b, t), DType::F32, &device)?;
    let weights = Tensor::ones(b * t, DType::F32, &device)?;
    let mut optimizer = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() });
    let (mut loss_first, mut loss_last, mut times) = (0.0f32, 0.0f32, Vec::new());
    for step in 0..args.warmup + args.steps {
        let [input, decoder, labels] = &batches[step % BATCHES as usize];
        let started = Instant::now();
        let value = crate::train::on_pool(|| -> anyhow::Result<f32> {
            let ctx = ForwardCtx::inference();
            let logits = model.forward(input, &mask, decoder, &ctx)?;
            let flat = logits.reshape(((), model.config.vocab_size))?;
            let loss = (masked_cross_entropy_sum(&flat, labels, &weights)? / (b * t) as f64)?;
            let store = loss.backward()?;
            let grads = model.trainable.gradients(&store).into_iter().collect();
            optimizer.step(&model.trainable.params, &grads, 1e-4)?;
            Ok(loss.to_scalar::<f32>()?)
        })?;
        if step == 0 {
            loss_first = value;
        }
        loss_last = value;
        if step >= args.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Tokens per step: the encoder's and the decoder's, as the reference counts them.
    let line = json!({
        "impl": "ferrotune", "mode": "train", "method": args.method, "model": name,
        "params_total": params_total + if args.method == "full" { 0 } else { trainable },
        "params_trainable": trainable, "batch": b, "seq": t, "steps": args.steps, "device": args.device,
        "tokens_per_s": (2 * b * t * args.steps) as f64 / total.max(1e-9),
        "step_ms_median": times.get(times.len() / 2).copied().unwrap_or(0.0) * 1e3,
        "loss_first": loss_first, "loss_last": loss_last,
        "peak_rss_mb": super::peak_rss_mib(), "threads": super::threads(),
    });
    println!("{line}");
    Ok(())
}
