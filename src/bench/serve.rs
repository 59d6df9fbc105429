//! `ferrotune bench generate --concurrency N`: the serving engine (batched decode over a shared
//! base, the adapter applied unmerged) with N simultaneous greedy requests.
//!
//! Each request has its own synthetic prompt (the harness's prompt for request 0, then other
//! seeds) and generates exactly `--new-tokens` tokens (EOS ignored). Decode throughput is
//! `N · (new_tokens − 1) / (T(new_tokens) − T(1))`, where `T(k)` is the wall time for all N
//! requests to produce k tokens: the same subtraction `scripts/bench_reference_generate.py` uses
//! for transformers, so both sides exclude the prefill the same way.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::generate::BenchGenerateArgs;
use crate::data::tokenizer::ChatTokenizer;
use crate::infer::engine::{Engine, EngineSettings, GenEvent, GenerationRequest};
use crate::infer::sampling::SamplingParams;
use crate::models::config::ModelConfig;
use crate::models::llama::{Adaptation, ServingAdapter};
use crate::peft::adapter::load_adapter;
use crate::rng::splitmix64;

pub fn run(args: &BenchGenerateArgs, concurrency: usize) -> anyhow::Result<()> {
    anyhow::ensure!(concurrency >= 1, "--concurrency must be at least 1");
    let device = super::open_device(&args.device)?;
    let (dir, _guard) = super::model_dir(&args.model)?;
    let vocab = ModelConfig::from_file(&dir.join("config.json"))?.vocab_size as u64;
    let model = crate::models::weights::load_inference_model(&dir, Adaptation::None, &device)?;
    let adapter_started = Instant::now();
    let adapter = match &args.adapter {
        Some(dir) => {
            let (lora, _norms, tensors) = load_adapter(dir, &device)?;
            Some(Arc::new(ServingAdapter::from_peft(&model, &lora, &tensors)?))
        }
        None => None,
    };
    let adapter_load_ms = adapter.as_ref().map(|_| adapter_started.elapsed().as_secs_f64() * 1e3);
    let tokenizer = ChatTokenizer::from_dir(&dir)?;
    let settings = EngineSettings { max_batch: concurrency, max_queue: concurrency * 2 };
    let engine = Engine::start("bench", model, tokenizer, settings)?;
    let prompts: Vec<Vec<u32>> = (0..concurrency as u64)
        .map(|r| (0..args.prompt_tokens as u64).map(|k| (splitmix64(args.seed + 1 + r, k) % vocab) as u32).collect())
        .collect();
    let round = |tokens: usize| -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut receivers = Vec::with_capacity(concurrency);
        for prompt in &prompts {
            let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
            let request = GenerationRequest {
                prompt: prompt.clone(),
                adapter: adapter.clone(),
                n: 1,
                params: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
                max_new_tokens: tokens,
                stop: Vec::new(),
                ignore_eos: true,
                events,
            };
            engine.submit(request).map_err(|e| anyhow::anyhow!("the engine refused a request: {e:?}"))?;
            receivers.push(receiver);
        }
        let mut generated = 0;
        for mut receiver in receivers {
            loop {
                match receiver.blocking_recv() {
                    Some(GenEvent::Finished { completion_tokens, .. }) => {
                        generated += completion_tokens;
                        break;
                    }
                    Some(GenEvent::Failed(message)) => anyhow::bail!("generation failed: {message}"),
                    Some(GenEvent::Delta { .. }) => {}
                    None => anyhow::bail!("the engine dropped a request"),
                }
            }
        }
        anyhow::ensure!(generated == tokens * concurrency, "expected {} tokens, got {generated}", tokens * concurrency);
        Ok(started.elapsed().as_secs_f64())
    };
    round(4)?; // warm-up
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut prefill = Vec::new();
    let mut full = Vec::new();
    for _ in 0..args.repeats.max(1) {
        prefill.push(round(1)?);
        full.push(round(args.new_tokens)?);
    }
    let (prefill, full) = (median(prefill), median(full));
    let decode_tokens = (concurrency * (args.new_tokens - 1)) as f64;
    let name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!(
        "{}",
        json!({
            "impl": "ferrotune", "mode": "generate", "engine": "serving", "model": name,
            "adapter": if args.adapter.is_some() { "lora" } else { "none" },
            "concurrency": concurrency,
            "decode_tokens_per_s": decode_tokens / (full - prefill).max(1e-9),
            "prefill_tokens_per_s": (concurrency * args.prompt_tokens) as f64 / prefill,
            "adapter_load_ms": adapter_load_ms,
            "peak_rss_mb": super::peak_rss_mib(), "threads": super::threads(),
        })
    );
    Ok(())
}
