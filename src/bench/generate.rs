//! `ferrotune bench generate`: greedy decoding with a KV cache from the perf harness's synthetic
//! prompt (SplitMix64 draws 0..32 seeded with `seed + 1`), timed as `shared/perf` defines it.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Tensor, D};
use serde_json::json;

use crate::models::config::ModelConfig;
use crate::models::llama::{Adaptation, CausalLm, KvCache};
use crate::peft::adapter::load_adapter;
use crate::peft::lora::LoraPlan;
use crate::rng::splitmix64;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchGenerateArgs {
    /// A Hugging Face model directory, or a GGUF file (served quantized).
    #[arg(long, visible_alias = "gguf")]
    pub model: PathBuf,
    /// A PEFT adapter directory, applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Timed repetitions after one warm-up (the medians are reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Run N simultaneous requests through the serving engine (batched decode, adapter unmerged)
    /// and report their aggregate throughput, instead of the single-sequence decoder.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Where to decode: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: &BenchGenerateArgs) -> anyhow::Result<()> {
    if let Some(concurrency) = args.concurrency {
        return super::serve::run(args, concurrency);
    }
    anyhow::ensure!(args.new_tokens >= 2 && args.prompt_tokens >= 1, "need a prompt and at least 2 new tokens");
    let device = super::open_device(&args.device)?;
    let (dir, _guard) = super::model_dir(&args.model)?;
    let vocab = ModelConfig::from_file(&dir.join("config.json"))?.vocab_size as u64;
    let plan = match &args.adapter {
        Some(dir) => {
            let (lora, norms, tensors) = load_adapter(dir, &device)?;
            Some(LoraPlan { config: lora, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) })
        }
        None => None,
    };
    let adaptation = plan.as_ref().map_or(Adaptation::None, Adaptation::Lora);
    let model = crate::models::weights::load_inference_model(&dir, adaptation, &device)?;
    let prompt: Vec<u32> =
        (0..args.prompt_tokens as u64).map(|k| (splitmix64(args.seed + 1, k) % vocab) as u32).collect();
    let mut runs = Vec::new();
    let mut first_tokens = Vec::new();
    for _ in 0..=args.repeats {
        // On a rayon worker, as the serving engine runs its steps (see `infer::engine`).
        let (tokens, prefill, decode) = rayon::scope(|_| decode(&model, &prompt, args.new_tokens))?;
        first_tokens = tokens.into_iter().take(8).collect();
        runs.push((prefill, decode));
    }
    let timed = &runs[1..];
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let prefill = median(timed.iter().map(|r| r.0).collect());
    let decode_time = median(timed.iter().map(|r| r.1).collect());
    let name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!(
        "{}",
        json!({
            "impl": "ferrotune", "mode": "generate", "model": name,
            "adapter": if args.adapter.is_some() { "lora" } else { "none" },
            "decode_tokens_per_s": (args.new_tokens - 1) as f64 / decode_time,
            "prefill_tokens_per_s": args.prompt_tokens as f64 / prefill,
            "peak_rss_mb": super::peak_rss_mib(), "threads": super::threads(),
            "first_tokens": first_tokens,
        })
    );
    Ok(())
}

/// Greedy tokens (EOS ignored), the prefill time (prompt → token 1) and the decode time of the rest.
fn decode(model: &CausalLm, prompt: &[u32], new_tokens: usize) -> candle_core::Result<(Vec<u32>, f64, f64)> {
    let mut cache = KvCache::default();
    let started = Instant::now();
    let logits = model.forward_cached(&Tensor::new(prompt, model.device())?.unsqueeze(0)?, &mut cache)?;
    let mut next = logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?;
    let prefill = started.elapsed().as_secs_f64();
    let mut tokens = vec![next];
    let started = Instant::now();
    for _ in 1..new_tokens {
        let logits = model.forward_cached(&Tensor::new(&[next], model.device())?.unsqueeze(0)?, &mut cache)?;
        next = logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?;
        tokens.push(next);
    }
    Ok((tokens, prefill, started.elapsed().as_secs_f64()))
}
