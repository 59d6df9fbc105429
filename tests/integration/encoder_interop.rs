//! Our encoder outputs load in transformers / PEFT and give our logits there: LoRA adapters
//! (`SEQ_CLS`, `TOKEN_CLS`, head in `modules_to_save`) and full fine-tunes with their labels, and
//! an embedding model's pooled vectors (`scripts/check_with_transformers.py --task ...`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrotune::models::adaptation::Adaptation;
use ferrotune::models::bert::{Encoder, EncoderConfig, EncoderInput};
use ferrotune::models::weights::load_model_weights;
use ferrotune::models::ForwardCtx;
use ferrotune::peft::adapter::load_adapter;
use ferrotune::peft::lora::LoraPlan;
use ferrotune::train::config::{Method, TrainConfig};
use ferrotune::train::encoder::read_task_file;
use ferrotune::train::{train, Silent};

use crate::encoder_numerics::encoder_fixture;

fn torch_python() -> Option<String> {
    std::env::var("FERROTUNE_TEST_TORCH_PYTHON").ok().filter(|p| !p.is_empty()).or_else(|| {
        eprintln!("skipping: set FERROTUNE_TEST_TORCH_PYTHON to a Python with torch, transformers and peft");
        None
    })
}

/// A short run of `method` on `fixture` with `records` (JSONL lines) into `dir/out`.
fn trained(dir: &Path, fixture: &str, method: Method, records: &[String]) -> std::path::PathBuf {
    let data = dir.join("train.jsonl");
    std::fs::write(&data, records.join("\n") + "\n").unwrap();
    let yaml = format!(
        "model: {}\ntrain_file: {}\noutput_dir: {}\nepochs: 3\nbatch_size: 4\nlearning_rate: 0.01\n\
         lora: {{r: 4, alpha: 8}}\nseed: 9\n",
        encoder_fixture(fixture).display(),
        data.display(),
        dir.join("out").display()
    );
    let mut config: TrainConfig = serde_yaml::from_str(&yaml).unwrap();
    config.method = method;
    train(&config, &mut Silent).unwrap().output.unwrap()
}

/// Our logits (or embeddings) of a padded pair of inputs, with the inputs, saved for the script.
fn write_expected(model: &Encoder, file: &Path) {
    // A second segment where the model has segment embeddings for it (RoBERTa has one).
    let second = if model.config.type_vocab_size > 1 { 1 } else { 0 };
    let types = [0, 0, 0, 0, second, second];
    let rows: [(&[u32], &[u32]); 2] = [(&[2, 40, 41, 3, 50, 3], &types), (&[2, 60, 3], &[0, 0, 0])];
    let input = EncoderInput::new(&rows, &model.config, &Device::Cpu).unwrap();
    let ctx = ForwardCtx::inference();
    let hidden = model.hidden(&input, &ctx).unwrap();
    let out = match model.task {
        ferrotune::models::bert::Task::Embedding => {
            ferrotune::train::encoder::normalize(&Encoder::mean_pool(&hidden, &input.attention_mask).unwrap()).unwrap()
        }
        _ => model.logits(&hidden, &ctx).unwrap(),
    };
    let long = |t: &Tensor| t.to_dtype(DType::I64).unwrap();
    let tensors = HashMap::from([
        ("input_ids".to_string(), long(&input.input_ids)),
        ("token_type_ids".to_string(), long(&input.token_type_ids)),
        ("attention_mask".to_string(), long(&input.attention_mask)),
        ("logits".to_string(), out),
    ]);
    candle_core::safetensors::save(&tensors, file).unwrap();
}

fn check(python: &str, args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_with_transformers.py");
    let output = std::process::Command::new(python).arg(script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "transformers disagrees ({args:?}):\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}: {}", args.join(" "), stdout.trim());
}

fn load(dir: &Path, task_dir: &Path, adaptation: Adaptation<'_>) -> Encoder {
    let config = EncoderConfig::from_file(&dir.join("config.json")).unwrap();
    let task = read_task_file(task_dir).unwrap();
    Encoder::new(config, task, load_model_weights(dir, DType::F32, &Device::Cpu).unwrap(), adaptation).unwrap()
}

const LABELS: [&str; 2] = ["refund", "billing"];

#[test]
fn peft_and_transformers_load_our_encoder_outputs_with_our_logits() {
    let Some(python) = torch_python() else { return };
    let classification: Vec<String> = (0..8)
        .map(|i| serde_json::json!({"text": format!("please refund order {i}"), "label": LABELS[i % 2]}).to_string())
        .collect();
    let tags: Vec<String> = (0..8)
        .map(|_| serde_json::json!({"tokens": ["alice", "met", "bob"], "tags": ["B-PER", "O", "B-PER"]}).to_string())
        .collect();
    let pairs: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"anchor": format!("reset password {i}"), "positive": "how do i reset my password"})
                .to_string()
        })
        .collect();
    let cases = [
        ("bert-cls", Method::Lora, &classification, "seq_cls"),
        ("roberta-cls", Method::Lora, &classification, "seq_cls"),
        ("bert-ner", Method::Lora, &tags, "token_cls"),
        ("bert-cls", Method::Full, &classification, "seq_cls"),
        ("bert-embed", Method::Full, &pairs, "embedding"),
        ("bert-embed", Method::Lora, &pairs, "embedding"),
    ];
    for (fixture, method, records, task) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = trained(dir.path(), fixture, method, records);
        let expect = dir.path().join("expected.safetensors");
        let base = encoder_fixture(fixture);
        match method {
            Method::Full => {
                write_expected(&load(&out, &out, Adaptation::None), &expect);
                check(
                    &python,
                    &["--task", task, "--model", out.to_str().unwrap(), "--expect", expect.to_str().unwrap()],
                );
            }
            _ => {
                let (config, _, tensors) = load_adapter(&out, &Device::Cpu).unwrap();
                let plan = LoraPlan { config, seed: 0, trainable: false, train_norms: false, loaded: Some(tensors) };
                let tuned = load(&base, &out, Adaptation::Lora(&plan));
                write_expected(&tuned, &expect);
                let args = ["--task", task, "--model", base.to_str().unwrap(), "--adapter", out.to_str().unwrap()];
                check(&python, &[&args[..], &["--expect", expect.to_str().unwrap()]].concat());
                // Merged into a model directory of the task's class, without PEFT.
                let merged = dir.path().join("merged");
                ferrotune::train::encoder::output::write_model_dir(&tuned, &base, &merged).unwrap();
                let args = ["--task", task, "--model", merged.to_str().unwrap(), "--expect", expect.to_str().unwrap()];
                check(&python, &args);
            }
        }
    }
}
