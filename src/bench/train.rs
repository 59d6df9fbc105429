//! `ferrotune bench train`: timed training steps on synthetic token batches, as the perf harness
//! defines them (SplitMix64 token ids, AdamW lr 1e-4, LoRA r 8 / alpha 16 on q,k,v,o).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::models::common::mask::packed_causal_mask;
use crate::models::common::ops::masked_cross_entropy_sum;
use crate::models::config::ModelConfig;
use crate::models::llama::{Adaptation, CausalLm};
use crate::models::weights::load_model_weights;
use crate::models::ForwardCtx;
use crate::peft::lora::{LoraConfig, LoraPlan, TargetModules};
use crate::rng::splitmix64;
use crate::train::grads::batch_gradients;
use crate::train::optimizer::{AdamW, AdamWConfig};

const DECODER_TARGETS: &str = "q_proj,k_proj,v_proj,o_proj";

#[derive(Debug, Clone, clap::Args)]
pub struct BenchTrainArgs {
    /// A Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// `lora`, `qlora` or `full`; `dpo` (LoRA) or `dpo-full` for preference steps, where
    /// `--batch` counts pairs (two rows each).
    #[arg(long, default_value = "lora")]
    pub method: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Timed steps (after the warm-up steps).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Comma-separated LoRA target modules (encoders: `query,key,value,attention.output.dense`;
    /// T5: `q,k,v,o`).
    #[arg(long, default_value = DECODER_TARGETS)]
    pub targets: String,
    /// Mixture-of-experts models: comma-separated stacked expert weights that get LoRA too
    /// (`gate_up_proj,down_proj`, PEFT's `target_parameters`).
    #[arg(long, default_value = "")]
    pub target_parameters: String,
    /// qlora: the base's quantization (default: a GGUF base's own, q4_1 as q8_0; else q4_0).
    #[arg(long)]
    pub quantization: Option<String>,
    /// Recompute each layer's activations in the backward (see `train::grads`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Where to train: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl BenchTrainArgs {
    /// LoRA as the harness trains it (r and alpha from the arguments, no dropout) on the
    /// comma-separated `targets` and `--target-parameters`, seeded with `--seed`.
    pub fn lora_plan(&self, targets: &str) -> LoraPlan {
        let list = |names: &str| names.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect();
        LoraPlan {
            config: LoraConfig {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: 0.0,
                target_modules: TargetModules::List(list(targets)),
                use_rslora: false,
                target_parameters: list(&self.target_parameters),
                train_router: false,
                rank_pattern: Default::default(),
                alpha_pattern: Default::default(),
            },
            seed: self.seed,
            trainable: true,
            train_norms: false,
            loaded: None,
        }
    }
}

pub fn run(args: &BenchTrainArgs) -> anyhow::Result<()> {
    if crate::models::bert::config::is_encoder_dir(&args.model) {
        // The harness's BERT targets, unless others were asked for.
        let targets = match args.targets.as_str() {
            DECODER_TARGETS => "query,key,value,attention.output.dense",
            other => other,
        };
        return super::encoder::run(args, targets);
    }
    if crate::models::t5::config::is_seq2seq_dir(&args.model) {
        let targets = if args.targets == DECODER_TARGETS { "q,k,v,o" } else { args.targets.as_str() };
        return super::seq2seq::run(args, targets);
    }
    let device = super::open_device(&args.device)?;
    anyhow::ensure!(
        args.method != "qlora" || device.is_cpu(),
        "qlora trains on the CPU only for now (its block-quantized base has no GPU kernel here)"
    );
    // A GGUF file is benchmarked through its directory form.
    let gguf_dir = if args.model.extension().is_some_and(|e| e == "gguf") {
        let dir = tempfile::tempdir()?;
        crate::models::gguf::materialize(&args.model, dir.path())?;
        Some(dir)
    } else {
        None
    };
    let model_dir = gguf_dir.as_ref().map_or(args.model.as_path(), |d| d.path());
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let vocab = config.vocab_size as u64;
    let (weights, quantized) = if args.method == "qlora" {
        let quantization = match args.quantization.as_deref() {
            Some(name) => Some(
                crate::models::common::quantized::Quantization::parse(name)
                    .ok_or_else(|| anyhow::anyhow!("unknown --quantization {name}"))?,
            ),
            None => None,
        };
        crate::models::weights::load_quantized_weights(model_dir, quantization)?
    } else {
        (load_model_weights(model_dir, DType::F32, &device)?, Default::default())
    };
    let params_total: usize = weights.values().map(|t| t.elem_count()).sum::<usize>()
        + quantized.values().map(|q| q.shape().elem_count()).sum::<usize>();
    let plan = args.lora_plan(&args.targets);
    let adaptation = match args.method.as_str() {
        "lora" | "qlora" | "dpo" => Adaptation::Lora(&plan),
        "full" | "dpo-full" => Adaptation::Full,
        other => anyhow::bail!("--method must be lora, qlora, full, dpo or dpo-full, not {other}"),
    };
    let model = CausalLm::with_quantized(config, weights, quantized, adaptation)?;
    let trainable = model.trainable.count();
    let (b, t) = (args.batch, args.seq);
    let name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let summary = |figures: serde_json::Value| {
        let mut line = json!({
            "impl": "ferrotune", "mode": "train", "method": args.method, "model": name,
            "params_total": params_total + if args.method.contains("full") { 0 } else { trainable },
            "params_trainable": trainable, "batch": b, "seq": t, "steps": args.steps,
            "gradient_checkpointing": args.gradient_checkpointing, "device": args.device,
            "peak_rss_mb": super::peak_rss_mib(), "threads": super::threads(),
        });
        line.as_object_mut().unwrap().extend(figures.as_object().cloned().unwrap_or_default());
        println!("{line}");
    };
    if args.method.starts_with("dpo") {
        let shape = (b, t, args.steps, args.warmup);
        let run = super::dpo::run(&model, shape, vocab, args.seed, args.gradient_checkpointing)?;
        summary(super::dpo::figures(&run));
        return Ok(());
    }
    // Batch j holds draws [j·B·L, (j+1)·B·L) of the SplitMix64 stream; step i uses batch i % 4.
    let batches: Vec<Tensor> = (0..4u64)
        .map(|j| {
            let ids: Vec<u32> =
                (0..(b * t) as u64).map(|k| (splitmix64(args.seed, j * (b * t) as u64 + k) % vocab) as u32).collect();
            Tensor::from_vec(ids, (b, t), &device)
        })
        .collect::<candle_core::Result<_>>()?;
    let positions = Tensor::arange(0u32, t as u32, &device)?.unsqueeze(0)?.repeat((b, 1))?;
    let mask = packed_causal_mask(&vec![0; b * t], b, t, model.config.sliding_window, &device)?;
    let target_mask = Tensor::ones(b * (t - 1), DType::F32, &device)?;
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let (mut loss_first, mut loss_last, mut times) = (0.0f32, 0.0f32, Vec::new());
    // Mixture of experts: the load-balancing loss joins the loss, as transformers adds it with
    // `output_router_logits`; the MoE layers' forward time is split into experts and the rest.
    let moe = model.config.moe.as_ref().map(|m| (m.num_experts, m.aux_loss_coef));
    let (mut moe_all, mut moe_experts) = (0.0f64, 0.0f64);
    for step in 0..args.warmup + args.steps {
        let ids = &batches[step % 4];
        let started = Instant::now();
        let value = crate::train::on_pool(|| -> anyhow::Result<f32> {
            let ctx = match moe {
                Some(_) => ForwardCtx::inference().collect_routing(None),
                None => ForwardCtx::inference(),
            };
            // The last position predicts nothing: no logits for it (as in training, `train::run`).
            let head = |hidden: &Tensor| {
                let logits = model.logits(&hidden.narrow(1, 0, t - 1)?, &ctx)?.reshape((b * (t - 1), ()))?;
                let labels = ids.narrow(1, 1, t - 1)?.flatten_all()?;
                let mut loss = (masked_cross_entropy_sum(&logits, &labels, &target_mask)? / (b * (t - 1)) as f64)?;
                if let Some((experts, coef)) = moe {
                    if let Some(aux) = crate::models::moe::load_balancing_loss(&ctx.take_routing(), experts)? {
                        loss = (loss + (aux * coef)?)?;
                    }
                }
                Ok((loss, ()))
            };
            let inputs = (ids, &positions, &mask);
            let out = batch_gradients(&model, inputs, &ctx, args.gradient_checkpointing, head)?;
            optimizer.step(&model.trainable.params, &out.grads.into_iter().collect(), 1e-4)?;
            Ok(out.loss as f32)
        })?;
        let elapsed = started.elapsed().as_secs_f64();
        let (all, experts) = crate::models::llama::take_moe_forward_seconds();
        if step >= args.warmup {
            (moe_all, moe_experts) = (moe_all + all, moe_experts + experts);
        }
        if step == 0 {
            loss_first = value;
        }
        loss_last = value;
        if step >= args.warmup {
            times.push(elapsed);
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let mut figures = json!({
        "tokens_per_s": (b * t * args.steps) as f64 / total.max(1e-9),
        "step_ms_median": median * 1e3, "loss_first": loss_first, "loss_last": loss_last,
    });
    if moe.is_some() {
        // Forward only: the backward of routing and dispatch (gathers' index_add) runs inside
        // candle's backward pass, where it is not timed apart.
        let per_step = |s: f64| s / args.steps.max(1) as f64 * 1e3;
        figures["moe_forward_ms_per_step"] = json!(per_step(moe_all));
        figures["moe_routing_dispatch_forward_ms_per_step"] = json!(per_step(moe_all - moe_experts));
        figures["moe_routing_dispatch_forward_share_of_step"] = json!((moe_all - moe_experts) / total.max(1e-9));
    }
    summary(figures);
    Ok(())
}
