//! The benchmark commands print the one JSON line that `shared/perf/compare.sh` reads.

use std::process::Command;

use serde_json::Value;

use crate::model_numerics::fixture;

fn run(args: &[&str]) -> Value {
    let output =
        Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).env("RAYON_NUM_THREADS", "1").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let line = stdout.lines().find(|l| l.starts_with('{')).expect("a JSON line");
    serde_json::from_str(line).unwrap()
}

#[test]
fn bench_train_reports_the_harness_fields() {
    let model = fixture("llama");
    let report =
        run(&["bench", "train", "--model", model.to_str().unwrap(), "--batch", "2", "--seq", "16", "--steps", "2"]);
    for field in [
        "impl",
        "method",
        "model",
        "params_total",
        "params_trainable",
        "batch",
        "seq",
        "steps",
        "tokens_per_s",
        "step_ms_median",
        "peak_rss_mb",
        "loss_first",
        "loss_last",
        "threads",
    ] {
        assert!(report.get(field).is_some(), "missing {field}: {report}");
    }
    // r 8 on q (64→64), k and v (64→32), o (64→64), in 2 layers: 2 · (1024 + 768 + 768 + 1024).
    assert_eq!(report["params_trainable"], 7168, "{report}");
    let (first, last) = (report["loss_first"].as_f64().unwrap(), report["loss_last"].as_f64().unwrap());
    // ln(512) ≈ 6.2 for an untrained model on random tokens; the optimizer steps move the loss.
    assert!(first.is_finite() && first > 1.0 && first < 20.0, "{report}");
    assert_ne!(first, last, "the timed steps trained nothing: {report}");
}

/// DPO steps start at log 2 (the reference is the policy before the first step) and move it.
#[test]
fn bench_train_times_dpo_steps_for_adapters_and_full_fine_tuning() {
    let model = fixture("llama");
    for method in ["dpo", "dpo-full"] {
        let args = ["--model", model.to_str().unwrap(), "--method", method, "--batch", "2", "--seq", "16"];
        let report = run(&[&["bench", "train"][..], &args, &["--steps", "2"]].concat());
        let (first, last) = (report["loss_first"].as_f64().unwrap(), report["loss_last"].as_f64().unwrap());
        assert!((first - std::f64::consts::LN_2).abs() < 1e-6, "{report}");
        assert_ne!(first, last, "{report}");
        assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0 && report["method"] == method, "{report}");
    }
}

#[test]
fn bench_generate_reports_the_harness_fields_and_greedy_tokens() {
    let model = fixture("llama");
    let report = run(&["bench", "generate", "--model", model.to_str().unwrap(), "--new-tokens", "8", "--repeats", "1"]);
    for field in ["impl", "model", "adapter", "decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_mb", "threads"] {
        assert!(report.get(field).is_some(), "missing {field}: {report}");
    }
    assert_eq!(report["first_tokens"].as_array().unwrap().len(), 8);
    let adapter = fixture("llama").join("lora");
    let with = run(&[
        "bench",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--new-tokens",
        "8",
        "--repeats",
        "1",
    ]);
    assert_eq!(with["adapter"], "lora");
}
