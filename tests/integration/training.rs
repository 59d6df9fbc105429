//! The trainer end to end on a fixture model: it learns a synthetic question-answer set (full and
//! LoRA), resumes exactly from a checkpoint, and reproduces itself from a seed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrotune::data::tokenizer::ChatTokenizer;
use ferrotune::infer::generate::generate_greedy;
use ferrotune::models::config::ModelConfig;
use ferrotune::models::llama::{Adaptation, CausalLm};
use ferrotune::models::weights::load_model_weights;
use ferrotune::peft::adapter::load_adapter;
use ferrotune::peft::lora::{LoraPlan, TargetModules};
use ferrotune::train::config::{LoraSettings, Method, TrainConfig};
use ferrotune::train::{train, Control, Observer, Progress, Silent, StopReason};
use serde_json::json;

use crate::model_numerics::fixture;

const WORDS: [&str; 16] = [
    "apple", "river", "stone", "cloud", "green", "tiger", "music", "paper", "light", "ocean", "bread", "chair",
    "dream", "glass", "honey", "north",
];

fn qa_pairs() -> Vec<(String, String)> {
    WORDS.iter().enumerate().map(|(i, w)| (format!("What is code number {i}?"), format!("The code is {w}."))).collect()
}

fn write_dataset(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("train.jsonl");
    let lines: Vec<String> = qa_pairs()
        .iter()
        .map(|(q, a)| {
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn config(dir: &Path, method: Method) -> TrainConfig {
    config_for(dir, method, "llama")
}

/// A run on the question-answer set with the fixture model `model`.
pub fn config_for(dir: &Path, method: Method, model: &str) -> TrainConfig {
    let yaml = format!(
        "model: {}\ntrain_file: {}\noutput_dir: {}\nmethod: {}\n",
        fixture(model).display(),
        write_dataset(dir).display(),
        dir.join("out").display(),
        if method == Method::Full { "full" } else { "lora" },
    );
    let mut config: TrainConfig = serde_yaml::from_str(&yaml).unwrap();
    config.method = method;
    config.batch_size = 4;
    config.max_seq_len = 64;
    config.lr_scheduler = ferrotune::train::schedule::SchedulerKind::Constant;
    config.max_grad_norm = 1.0;
    config.seed = 7;
    config
}

/// Greedy answers to every question from the trained output, compared with the taught answers.
fn exact_answers(model: &CausalLm, tokenizer: &ChatTokenizer) -> usize {
    let stop: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
    qa_pairs()
        .iter()
        .filter(|(q, a)| {
            let prompt = tokenizer.apply_chat_template(&json!([{"role": "user", "content": q}]), None, true).unwrap();
            let ids = tokenizer.encode(&prompt, false).unwrap();
            let out = generate_greedy(model, &ids, 16, &stop).unwrap();
            let text = tokenizer.decode(&out, true).unwrap();
            text.trim() == a.as_str()
        })
        .count()
}

/// The LoRA and QLoRA runs: 80 epochs, r 16 on every linear layer, cosine from 1e-2 (decaying to
/// zero settles the adapter; a constant 1e-2 keeps it oscillating near the end).
fn adapter_run(mut config: TrainConfig) -> TrainConfig {
    config.epochs = 80;
    config.lr_scheduler = ferrotune::train::schedule::SchedulerKind::Cosine;
    config.learning_rate = 1e-2;
    config.lora = LoraSettings {
        r: 16,
        alpha: 32.0,
        target_modules: TargetModules::Keyword("all-linear".into()),
        ..Default::default()
    };
    config
}

fn load_base(adaptation: Adaptation<'_>, dir: &Path) -> CausalLm {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = load_model_weights(dir, DType::F32, &Device::Cpu).unwrap();
    CausalLm::new(config, weights, adaptation).unwrap()
}

#[test]
fn full_fine_tuning_learns_the_question_answer_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Method::Full);
    config.epochs = 60;
    config.learning_rate = 3e-3;
    let summary = train(&config, &mut Silent).unwrap();
    let loss = summary.final_train_loss.unwrap();
    assert!(loss < 0.1, "final training loss {loss}");
    let output = summary.output.unwrap();
    let model = load_base(Adaptation::None, &output);
    let tokenizer = ChatTokenizer::from_dir(&output).unwrap();
    let correct = exact_answers(&model, &tokenizer);
    assert!(correct * 10 >= qa_pairs().len() * 9, "{correct} of {} answered exactly", qa_pairs().len());
}

#[test]
fn lora_learns_the_question_answer_set_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let config = adapter_run(config(dir.path(), Method::Lora));
    let summary = train(&config, &mut Silent).unwrap();
    let loss = summary.final_train_loss.unwrap();
    assert!(loss < 0.1, "final training loss {loss}");
    let output = summary.output.unwrap();
    let (lora, norms, tensors) = load_adapter(&output, &Device::Cpu).unwrap();
    let plan = LoraPlan { config: lora, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) };
    let model = load_base(Adaptation::Lora(&plan), &fixture("llama"));
    let tokenizer = ChatTokenizer::from_dir(&output).unwrap();
    let correct = exact_answers(&model, &tokenizer);
    assert!(correct * 10 >= qa_pairs().len() * 9, "{correct} of {} answered exactly", qa_pairs().len());

    // The merged model answers the same.
    let merged_dir = dir.path().join("merged");
    let merged = ferrotune::models::llama::merge::merged_tensors(&model).unwrap();
    ferrotune::train::output::write_model_dir(&merged_dir, &model, merged, &fixture("llama")).unwrap();
    let merged_model = load_base(Adaptation::None, &merged_dir);
    assert_eq!(exact_answers(&merged_model, &tokenizer), correct);
}

#[test]
fn qlora_learns_the_question_answer_set_over_a_quantized_base() {
    use ferrotune::models::common::quantized::Quantization;
    for quantization in [Quantization::Q8_0, Quantization::Q4_0] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = adapter_run(config(dir.path(), Method::Qlora));
        config.quantization = Some(quantization);
        let summary = train(&config, &mut Silent).unwrap();
        let loss = summary.final_train_loss.unwrap();
        assert!(loss < 0.1, "{quantization:?}: final training loss {loss}");
        let output = summary.output.unwrap();
        // The adapter is a plain PEFT LoRA adapter, used over the same quantized base.
        let (lora, norms, tensors) = load_adapter(&output, &Device::Cpu).unwrap();
        let plan = LoraPlan { config: lora, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) };
        let (dense, quantized) =
            ferrotune::models::weights::load_quantized_weights(&fixture("llama"), Some(quantization)).unwrap();
        assert_eq!(quantized.len(), 14, "every projection of both layers is quantized");
        let model_config = ModelConfig::from_file(&fixture("llama").join("config.json")).unwrap();
        let model = CausalLm::with_quantized(model_config, dense, quantized, Adaptation::Lora(&plan)).unwrap();
        let tokenizer = ChatTokenizer::from_dir(&output).unwrap();
        let correct = exact_answers(&model, &tokenizer);
        assert!(correct * 10 >= qa_pairs().len() * 9, "{quantization:?}: {correct} of {} answered", qa_pairs().len());
    }
}

#[test]
fn bottleneck_adapters_learn_the_question_answer_set_and_serve_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Method::Bottleneck);
    config.epochs = 60;
    config.adapter_size = 32;
    config.learning_rate = 1e-2;
    config.lr_scheduler = ferrotune::train::schedule::SchedulerKind::Cosine;
    let summary = train(&config, &mut Silent).unwrap();
    let loss = summary.final_train_loss.unwrap();
    assert!(loss < 0.1, "final training loss {loss}");
    let output = summary.output.unwrap();
    assert!(ferrotune::models::bottleneck::is_bottleneck_dir(&output));
    let (size, tensors) = ferrotune::models::bottleneck::load(&output, &Device::Cpu).unwrap();
    assert_eq!(size, 32);
    let plan = ferrotune::models::bottleneck::BottleneckPlan {
        adapter_size: size,
        seed: 0,
        trainable: false,
        loaded: Some(tensors.clone()),
    };
    let model = load_base(Adaptation::Bottleneck(&plan), &fixture("llama"));
    let tokenizer = ChatTokenizer::from_dir(&output).unwrap();
    let correct = exact_answers(&model, &tokenizer);
    assert!(correct * 10 >= qa_pairs().len() * 9, "{correct} of {} answered exactly", qa_pairs().len());

    // The serving engine's form of the saved adapter gives the same logits as the model built with it.
    let base = load_base(Adaptation::None, &fixture("llama"));
    let serving = ferrotune::models::llama::ServingAdapter::from_bottleneck(&base, size, tensors).unwrap();
    let prompt = tokenizer.encode("What is code number 3?", true).unwrap();
    let mut cache = ferrotune::models::llama::KvCache::default();
    let direct = model
        .forward_cached(&Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache)
        .unwrap();
    let mut cache = ferrotune::models::llama::KvCache::default();
    let mut rows = [ferrotune::models::llama::Row { tokens: &prompt, cache: &mut cache, adapter: Some(&serving) }];
    let served = base.forward_rows(&mut rows).unwrap();
    let diff: f32 = (direct - served).unwrap().abs().unwrap().max(1).unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(diff < 1e-4, "served logits differ by {diff}");
}

#[test]
fn prefix_tuning_learns_the_question_answer_set_and_serves_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Method::Prefix);
    config.prefix_length = 64;
    // A direct table learns this set faster than PEFT's reparameterisation (checked elsewhere).
    config.prefix_projection = false;
    config.epochs = 200;
    config.learning_rate = 1e-1;
    config.lr_scheduler = ferrotune::train::schedule::SchedulerKind::Cosine;
    let summary = train(&config, &mut Silent).unwrap();
    let loss = summary.final_train_loss.unwrap();
    assert!(loss < 0.2, "final training loss {loss}");
    let output = summary.output.unwrap();
    let table = ferrotune::models::prefix::load(&output, &Device::Cpu).unwrap();
    let plan = ferrotune::models::prefix::PrefixPlan {
        length: 64,
        projection: None,
        seed: 0,
        trainable: false,
        loaded: Some(table.clone()),
    };
    let model = load_base(Adaptation::Prefix(&plan), &fixture("llama"));
    let tokenizer = ChatTokenizer::from_dir(&output).unwrap();
    let correct = exact_answers(&model, &tokenizer);
    assert!(correct * 10 >= qa_pairs().len() * 8, "{correct} of {} answered exactly", qa_pairs().len());

    let base = load_base(Adaptation::None, &fixture("llama"));
    let serving = ferrotune::models::llama::ServingAdapter::from_prefix(&base, &table).unwrap();
    let prompt = tokenizer.encode("What is code number 3?", true).unwrap();
    let mut cache = ferrotune::models::llama::KvCache::default();
    let direct = model
        .forward_cached(&Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache)
        .unwrap();
    let mut cache = ferrotune::models::llama::KvCache::default();
    let mut rows = [ferrotune::models::llama::Row { tokens: &prompt, cache: &mut cache, adapter: Some(&serving) }];
    let served = base.forward_rows(&mut rows).unwrap();
    let diff: f32 = (direct - served).unwrap().abs().unwrap().max(1).unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(diff < 1e-4, "served logits differ by {diff}");
}

fn adapter_tensors(dir: &Path) -> HashMap<String, Vec<f32>> {
    let (_, _, tensors) = load_adapter(dir, &Device::Cpu).unwrap();
    tensors.into_iter().map(|(k, v): (String, Tensor)| (k, v.flatten_all().unwrap().to_vec1().unwrap())).collect()
}

/// Pauses (saving a checkpoint) when the run reaches `at`.
struct PauseAt {
    at: u64,
    step: u64,
}

impl Observer for PauseAt {
    fn progress(&mut self, p: &Progress) {
        self.step = p.step;
    }
    fn control(&mut self) -> Control {
        if self.step == self.at {
            Control::Pause
        } else {
            Control::Continue
        }
    }
}

#[test]
fn a_run_resumed_from_a_checkpoint_ends_with_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path(), Method::Lora);
    base.epochs = 3;
    base.learning_rate = 5e-3;
    base.lora.dropout = 0.1; // the dropout generator must be restored too
    base.lr_scheduler = ferrotune::train::schedule::SchedulerKind::Cosine;
    base.warmup_steps = Some(2);
    base.gradient_accumulation_steps = 2;

    let mut straight = base.clone();
    straight.output_dir = dir.path().join("straight");
    train(&straight, &mut Silent).unwrap();

    let mut interrupted = base.clone();
    interrupted.output_dir = dir.path().join("interrupted");
    let paused = train(&interrupted, &mut PauseAt { at: 3, step: 0 }).unwrap();
    assert_eq!(paused.stop, StopReason::Paused);
    assert_eq!(paused.steps, 3);
    let mut resumed = interrupted.clone();
    resumed.resume_from = paused.last_checkpoint.clone();
    let finished = train(&resumed, &mut Silent).unwrap();
    assert_eq!(finished.steps, finished.total_steps);

    assert_eq!(adapter_tensors(&dir.path().join("straight")), adapter_tensors(&dir.path().join("interrupted")));
}

#[test]
fn two_runs_with_the_same_seed_produce_identical_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path(), Method::Lora);
    base.epochs = 2;
    base.lora.dropout = 0.05;
    let (mut a, mut b, mut c) = (base.clone(), base.clone(), base.clone());
    a.output_dir = dir.path().join("a");
    b.output_dir = dir.path().join("b");
    c.output_dir = dir.path().join("c");
    c.seed = 8;
    for config in [&a, &b, &c] {
        train(config, &mut Silent).unwrap();
    }
    assert_eq!(adapter_tensors(&a.output_dir), adapter_tensors(&b.output_dir));
    assert_ne!(adapter_tensors(&a.output_dir), adapter_tensors(&c.output_dir), "the seed matters");
}
