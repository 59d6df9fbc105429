//! `ferrotune train` on encoders: each method learns a small classification task on the tiny
//! BERT fixture and writes an output that serves what it learned; runs resume exactly; settings
//! that do not apply to encoders are refused; `ferrotune train` and `bench train` run end to end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use ferrotune::serving::encoder::{load, Output, Purpose, Weights};
use ferrotune::train::config::{EarlyStopping, Method, TrainConfig};
use ferrotune::train::{train, Control, Observer, Progress, Silent, StopReason};

use crate::encoder_numerics::encoder_fixture;

/// Sentences whose label is which word they contain (the fixture tokenizer knows these words).
const EXAMPLES: [(&str, &str); 9] = [
    ("please refund my order", "refund"),
    ("refund the last order please", "refund"),
    ("i want a refund", "refund"),
    ("the invoice was charged twice", "billing"),
    ("my invoice is wrong", "billing"),
    ("charged on the invoice", "billing"),
    ("how do i reset my password", "other"),
    ("the quick brown fox", "other"),
    ("alice met bob in berlin", "other"),
];

fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> PathBuf {
    std::fs::write(path, lines.collect::<Vec<_>>().join("\n") + "\n").unwrap();
    path.to_path_buf()
}

fn classification_config(dir: &Path, method: Method) -> TrainConfig {
    let data =
        (0..3).flat_map(|_| EXAMPLES.iter()).map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string());
    let train_file = write_lines(&dir.join("train.jsonl"), data);
    let validation = write_lines(
        &dir.join("valid.jsonl"),
        EXAMPLES.iter().map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string()),
    );
    let yaml = format!(
        "model: {}\ntrain_file: {}\nvalidation_file: {}\noutput_dir: {}\n",
        encoder_fixture("bert-cls").display(),
        train_file.display(),
        validation.display(),
        dir.join("out").display()
    );
    let mut config: TrainConfig = serde_yaml::from_str(&yaml).unwrap();
    config.method = method;
    // Bottleneck adapters over this tiny random base need more steps than LoRA to separate them
    // (at 120 epochs of 1e-2 they reached 8/9 on one CPU and 9/9 on another).
    config.epochs = if method == Method::Bottleneck { 200 } else { 60 };
    config.batch_size = 9;
    config.learning_rate = match method {
        Method::Full => 2e-3,
        Method::Bottleneck => 5e-3,
        _ => 5e-3,
    };
    config.lr_scheduler = ferrotune::train::schedule::SchedulerKind::Constant;
    config.adapter_size = 16;
    config.seed = 3;
    config
}

/// The trained output served for classification: how many of the examples it labels right.
async fn served_right(dir: &Path, method: Method) -> usize {
    let weights = match method {
        Method::Full => Weights::Model(dir.to_path_buf()),
        _ => Weights::Adapter { base: encoder_fixture("bert-cls"), adapter: dir.to_path_buf() },
    };
    let engine = load("trained", weights, Purpose::Classification, &Device::Cpu).unwrap();
    let labels = engine.task.labels().unwrap().to_vec();
    let inputs = EXAMPLES.iter().map(|(t, _)| engine.tokenizer().encode_text(t, None, 64).unwrap()).collect();
    let outputs = engine.run(inputs).await.unwrap();
    outputs
        .iter()
        .zip(EXAMPLES)
        .filter(|(o, (_, label))| {
            let Output::Sequence(p) = o else { panic!("a sequence classifier gives sequence outputs") };
            let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            labels[best] == *label
        })
        .count()
}

#[tokio::test]
async fn every_method_learns_a_classifier_and_serves_what_it_learned() {
    for method in [Method::Full, Method::Lora, Method::Bottleneck] {
        let dir = tempfile::tempdir().unwrap();
        let config = classification_config(dir.path(), method);
        let summary = tokio::task::spawn_blocking(move || train(&config, &mut Silent)).await.unwrap().unwrap();
        let eval = summary.final_eval.unwrap();
        let accuracy = eval.task.and_then(|t| t.get("accuracy")).unwrap();
        eprintln!("{method:?}: validation loss {:.4}, accuracy {accuracy:.3}", eval.loss);
        assert!(accuracy >= 0.99, "{method:?}: validation accuracy {accuracy}");
        let out = summary.output.unwrap();
        let task: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
        assert_eq!(task["labels"], serde_json::json!(["billing", "other", "refund"]));
        match method {
            Method::Full => {
                let config: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
                assert_eq!(config["architectures"][0], "BertForSequenceClassification");
                assert_eq!(config["label2id"]["refund"], 2);
            }
            Method::Lora => {
                let config: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
                assert_eq!(
                    (config["task_type"].as_str(), config["modules_to_save"][0].as_str()),
                    (Some("SEQ_CLS"), Some("classifier"))
                );
                // all-linear, written as the module paths adapted (pooler included, as PEFT does).
                let targets = config["target_modules"].as_array().unwrap();
                assert!(targets.iter().any(|t| t == "bert.pooler.dense"), "{targets:?}");
                assert_eq!(targets.len(), 2 * 6 + 1);
            }
            _ => assert!(ferrotune::models::bottleneck::is_bottleneck_dir(&out)),
        }
        assert_eq!(served_right(&out, method).await, EXAMPLES.len(), "{method:?}: served predictions");
    }
}

struct PauseAt(u64, u64);

impl Observer for PauseAt {
    fn progress(&mut self, p: &Progress) {
        self.1 = p.step;
    }
    fn control(&mut self) -> Control {
        if self.1 == self.0 {
            Control::Pause
        } else {
            Control::Continue
        }
    }
}

fn tensors(path: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v): (String, Tensor)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn an_encoder_run_resumed_from_a_checkpoint_ends_with_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = classification_config(dir.path(), Method::Lora);
    base.epochs = 2;
    base.batch_size = 4;
    base.gradient_accumulation_steps = 2;
    base.lora.dropout = 0.1;
    let mut straight = base.clone();
    straight.output_dir = dir.path().join("straight");
    train(&straight, &mut Silent).unwrap();
    let mut interrupted = base.clone();
    interrupted.output_dir = dir.path().join("interrupted");
    let paused = train(&interrupted, &mut PauseAt(2, 0)).unwrap();
    assert_eq!((paused.stop, paused.steps), (StopReason::Paused, 2));
    interrupted.resume_from = paused.last_checkpoint.clone();
    let finished = train(&interrupted, &mut Silent).unwrap();
    assert_eq!(finished.steps, finished.total_steps);
    let file = "adapter_model.safetensors";
    assert_eq!(tensors(&dir.path().join("straight").join(file)), tensors(&dir.path().join("interrupted").join(file)));
}

#[test]
fn settings_that_do_not_apply_to_encoders_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (change, expected) in [
        (Box::new(|c: &mut TrainConfig| c.method = Method::Qlora) as Box<dyn Fn(&mut TrainConfig)>, "qlora"),
        (Box::new(|c: &mut TrainConfig| c.method = Method::Prefix), "prefix"),
        (Box::new(|c: &mut TrainConfig| c.gradient_checkpointing = true), "gradient_checkpointing"),
        (
            Box::new(|c: &mut TrainConfig| {
                c.early_stopping = Some(EarlyStopping { patience: 2, min_delta: 0.0, metric: Some("f1".into()) })
            }),
            "early_stopping.metric \"f1\"",
        ),
    ] {
        let mut config = classification_config(dir.path(), Method::Lora);
        change(&mut config);
        let error = train(&config, &mut Silent).unwrap_err().to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

#[test]
fn ferrotune_train_and_bench_train_run_an_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let tags = [(["alice", "met", "bob"], ["B-PER", "O", "B-PER"]), (["paris", "is", "big"], ["B-LOC", "O", "O"])];
    let lines = (0..4).flat_map(|_| tags.iter()).map(|(t, g)| serde_json::json!({"tokens": t, "tags": g}).to_string());
    let data = write_lines(&dir.path().join("ner.jsonl"), lines);
    let yaml = format!(
        "model: {}\ntrain_file: {}\noutput_dir: {}\nepochs: 2\nbatch_size: 4\nvalidation_fraction: 0.25\n",
        encoder_fixture("bert-ner").display(),
        data.display(),
        dir.path().join("out").display()
    );
    std::fs::write(dir.path().join("train.yaml"), yaml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", "--config", dir.path().join("train.yaml").to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("final valid metrics: ") && stdout.contains("f1 "), "{stdout}");
    assert!(dir.path().join("out/adapter_config.json").exists());

    let model = encoder_fixture("bert-cls");
    let bench = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["bench", "train", "--model", model.to_str().unwrap(), "--batch", "2", "--seq", "16", "--steps", "2"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
    let line = String::from_utf8_lossy(&bench.stdout).lines().find(|l| l.starts_with('{')).unwrap().to_string();
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    for field in ["tokens_per_s", "step_ms_median", "peak_rss_mb", "loss_first", "loss_last", "params_trainable"] {
        assert!(report[field].is_number(), "{field}: {report}");
    }
    // LoRA on query, key, value and attention.output.dense (r 8) plus the classifier in full.
    let (h, layers, labels) = (32, 2, 3);
    assert_eq!(report["params_trainable"], 4 * layers * 8 * (h + h) + labels * h + labels);
}
