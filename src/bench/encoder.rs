//! `ferrotune bench train` on an encoder (`tiny-bert` of the perf harness): sequence
//! classification steps on synthetic batches as `shared/perf` defines them (the label of row `b`
//! is `input_ids[b][0] % 2`, attention all ones, token types 0, mean cross-entropy), LoRA on the
//! given targets with the classifier head trained in full, or full fine-tuning.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::train::BenchTrainArgs;
use crate::models::adaptation::Adaptation;
use crate::models::bert::{Encoder, EncoderConfig, EncoderInput, Task};
use crate::models::common::ops::masked_cross_entropy_sum;
use crate::models::weights::load_model_weights;
use crate::models::ForwardCtx;
use crate::rng::splitmix64;
use crate::train::optimizer::{AdamW, AdamWConfig};

pub fn run(args: &BenchTrainArgs, targets: &str) -> anyhow::Result<()> {
    let device = super::open_device(&args.device)?;
    let config = EncoderConfig::from_file(&args.model.join("config.json"))?;
    let vocab = config.vocab_size as u64;
    let weights = load_model_weights(&args.model, DType::F32, &device)?;
    let params_total: usize =
        weights.iter().filter(|(k, _)| !k.ends_with("position_ids")).map(|(_, t)| t.elem_count()).sum();
    let labels = config.saved_labels().unwrap_or_else(|| vec!["LABEL_0".into(), "LABEL_1".into()]);
    let plan = args.lora_plan(targets);
    let adaptation = match args.method.as_str() {
        "lora" => Adaptation::Lora(&plan),
        "full" => Adaptation::Full,
        other => anyhow::bail!("encoders benchmark --method lora or full, not {other}"),
    };
    let model = Encoder::new(config, Task::Classification { labels }, weights, adaptation)?;
    let trainable = model.trainable.count();
    let (b, t) = (args.batch, args.seq);
    let batches: Vec<(EncoderInput, Tensor)> = (0..4u64)
        .map(|j| {
            let ids: Vec<u32> =
                (0..(b * t) as u64).map(|k| (splitmix64(args.seed, j * (b * t) as u64 + k) % vocab) as u32).collect();
            let types = vec![0u32; t];
            let rows: Vec<(&[u32], &[u32])> = ids.chunks(t).map(|row| (row, &types[..])).collect();
            let labels: Vec<u32> = ids.chunks(t).map(|row| row[0] % 2).collect();
            Ok((EncoderInput::new(&rows, &model.config, &device)?, Tensor::new(labels.as_slice(), &device)?))
        })
        .collect::<candle_core::Result<_>>()?;
    let ones = Tensor::ones(b, DType::F32, &device)?;
    let mut optimizer = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() });
    let (mut loss_first, mut loss_last, mut times) = (0.0f32, 0.0f32, Vec::new());
    for step in 0..args.warmup + args.steps {
        let (input, labels) = &batches[step % 4];
        let started = Instant::now();
        let value = crate::train::on_pool(|| -> anyhow::Result<f32> {
            let ctx = ForwardCtx::inference();
            let logits = model.logits(&model.hidden(input, &ctx)?, &ctx)?;
            let loss = (masked_cross_entropy_sum(&logits, labels, &ones)? / b as f64)?;
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
    let line = json!({
        "impl": "ferrotune", "mode": "train", "method": args.method, "model": name,
        "params_total": params_total + if args.method == "full" { 0 } else { trainable },
        "params_trainable": trainable, "batch": b, "seq": t, "steps": args.steps, "device": args.device,
        "tokens_per_s": (b * t * args.steps) as f64 / total.max(1e-9),
        "step_ms_median": times.get(times.len() / 2).copied().unwrap_or(0.0) * 1e3,
        "loss_first": loss_first, "loss_last": loss_last,
        "peak_rss_mb": super::peak_rss_mib(), "threads": super::threads(),
    });
    println!("{line}");
    Ok(())
}
