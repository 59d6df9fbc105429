//! Preference tuning (DPO, IPO, SimPO, RPO): the losses and gradients against PyTorch + PEFT on
//! the fixture made by `scripts/make_dpo_fixtures.py`, the reference policy as the adapters
//! switched off, exact resume, and a model that learns a preference from the trainer.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ferrotune::data::packing::Sequence;
use ferrotune::models::llama::CausalLm;
use ferrotune::models::ForwardCtx;
use ferrotune::train::batch::make_batch;
use ferrotune::train::preference::{
    preference_loss, reference_log_probs, sequence_log_probs, DpoSettings, PreferenceLoss,
};

use crate::model_numerics::{fixture, load, saved_adapter, AdaptationSpec};

fn dpo_reference() -> HashMap<String, Tensor> {
    let path = fixture("llama").join("dpo_reference.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The fixture's four rows (chosen 0, chosen 1, rejected 0, rejected 1) as training sequences.
fn fixture_rows(reference: &HashMap<String, Tensor>) -> Vec<Sequence> {
    let ids: Vec<Vec<i64>> = reference["input_ids"].to_vec2().unwrap();
    let mask: Vec<Vec<f32>> = reference["loss_mask"].to_vec2().unwrap();
    ids.iter()
        .zip(&mask)
        .map(|(ids, mask)| Sequence {
            input_ids: ids.iter().map(|&i| i as u32).collect(),
            loss_mask: mask.iter().map(|&m| m as u8).collect(),
            positions: (0..ids.len() as u32).collect(),
            segments: vec![0; ids.len()],
        })
        .collect()
}

fn variants() -> [(&'static str, DpoSettings); 4] {
    let sigmoid = DpoSettings { beta: Some(0.1), ..Default::default() };
    [
        ("sigmoid", sigmoid),
        ("sigmoid_ls_rpo", DpoSettings { label_smoothing: 0.1, rpo_alpha: Some(0.5), ..sigmoid }),
        ("ipo", DpoSettings { loss: PreferenceLoss::Ipo, ..sigmoid }),
        ("simpo", DpoSettings { loss: PreferenceLoss::Simpo, beta: Some(2.0), simpo_gamma: Some(0.5), ..sigmoid }),
    ]
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The loss over the fixture batch (both pairs in one micro-batch), with our log-probabilities
/// checked against the fixture's on the way.
fn fixture_loss(
    model: &CausalLm,
    rows: &[Sequence],
    settings: &DpoSettings,
    reference_logps: &[f32],
    expected_policy: &[f32],
) -> Tensor {
    let refs: Vec<&Sequence> = rows.iter().collect();
    let batch = make_batch(&refs, None, &Device::Cpu, DType::F32).unwrap();
    let ctx = ForwardCtx::inference();
    let hidden = model.forward_hidden(&batch.input_ids, &batch.positions, &batch.mask, &ctx).unwrap();
    let (logps, counts, _) = sequence_log_probs(model, &hidden, &batch, 2, &ctx).unwrap();
    assert_eq!(counts, [9.0, 6.0, 6.0, 8.0]);
    let ours: Vec<f32> = logps.to_vec1().unwrap();
    assert!(max_abs_diff(&ours, expected_policy) <= 1e-4, "policy log-probs {ours:?} vs {expected_policy:?}");
    let chosen_tokens = 15;
    preference_loss(settings, &logps, reference_logps, &counts, 2, chosen_tokens).unwrap().0
}

fn assert_loss_and_grads(model: &CausalLm, loss: &Tensor, reference: &HashMap<String, Tensor>, prefix: &str) -> usize {
    let ours = loss.to_scalar::<f32>().unwrap();
    let theirs = reference[&format!("{prefix}.loss")].to_scalar::<f32>().unwrap();
    let relative = (ours - theirs).abs() / theirs.abs().max(1.0);
    assert!(relative <= 1e-5, "{prefix}: loss {ours} vs PyTorch {theirs}");
    let grads = loss.backward().unwrap();
    let (mut checked, mut worst) = (0, 0f32);
    for p in &model.trainable.params {
        let key = format!("{prefix}.grad.{}", p.name);
        let expected = reference.get(&key).unwrap_or_else(|| panic!("no reference gradient {key}"));
        let got = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{prefix}: no gradient for {}", p.name));
        let scale = expected.abs().unwrap().max_keepdim(0).unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1e-12);
        let diff = (got - expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let relative = diff.to_scalar::<f32>().unwrap() / scale;
        assert!(relative <= 1e-3, "{prefix}: gradient of {} differs by {relative} (relative)", p.name);
        (checked, worst) = (checked + 1, worst.max(relative));
    }
    eprintln!(
        "{prefix}: loss {ours} vs {theirs} (|diff| {:.1e}); largest relative gradient difference {worst:.1e}",
        (ours - theirs).abs()
    );
    assert_eq!(checked, reference.keys().filter(|k| k.starts_with(&format!("{prefix}.grad."))).count());
    checked
}

#[test]
fn lora_preference_losses_and_gradients_equal_pytorch_and_peft() {
    let reference = dpo_reference();
    let rows = fixture_rows(&reference);
    let policy: Vec<f32> = reference["lora.policy_logps"].to_vec1().unwrap();
    let expected_reference: Vec<f32> = reference["lora.reference_logps"].to_vec1().unwrap();
    for (name, settings) in variants() {
        let model = load("llama", |_| AdaptationSpec::Lora(saved_adapter("llama", "lora", true)));
        // The reference policy is this model with its adapter switched off (PEFT's
        // `disable_adapter()`), computed here as the trainer does.
        let ours = reference_log_probs(&model, &rows, 2).unwrap();
        assert!(max_abs_diff(&ours, &expected_reference) <= 1e-4, "reference {ours:?} vs {expected_reference:?}");
        assert!(max_abs_diff(&ours, &policy) > 0.1, "the adapter changes the log-probs");
        let loss = fixture_loss(&model, &rows, &settings, &ours, &policy);
        let checked = assert_loss_and_grads(&model, &loss, &reference, &format!("lora.{name}"));
        assert_eq!(checked, 28, "{name}: every LoRA matrix is compared");
    }
}

#[test]
fn full_fine_tuning_dpo_loss_and_gradients_equal_pytorch() {
    let reference = dpo_reference();
    let rows = fixture_rows(&reference);
    let model = load("llama", |_| AdaptationSpec::Full);
    let policy: Vec<f32> = reference["full.policy_logps"].to_vec1().unwrap();
    // The fixture's reference policy is another model (the base with the LoRA merged), so the
    // margins are not zero.
    let reference_logps: Vec<f32> = reference["full.reference_logps"].to_vec1().unwrap();
    let loss = fixture_loss(&model, &rows, &variants()[0].1, &reference_logps, &policy);
    assert_loss_and_grads(&model, &loss, &reference, "full.sigmoid");
}

/// With the adapters off, a model with a prefix, bottleneck adapters or LoRA gives the base
/// model's log-probabilities: the reference policy needs no second copy of the weights.
#[test]
fn switching_the_adapters_off_gives_the_base_model() {
    use ferrotune::models::bottleneck::BottleneckPlan;
    use ferrotune::models::llama::Adaptation;
    use ferrotune::models::prefix::PrefixPlan;
    let reference = dpo_reference();
    let rows = fixture_rows(&reference);
    let base = reference_log_probs(&load("llama", |_| AdaptationSpec::None), &rows, 4).unwrap();
    let dir = fixture("llama");
    let config = ferrotune::models::config::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = || ferrotune::models::weights::load_model_weights(&dir, DType::F32, &Device::Cpu).unwrap();
    let prefix = PrefixPlan { length: 4, projection: None, seed: 3, trainable: true, loaded: None };
    let bottleneck = BottleneckPlan { adapter_size: 8, seed: 3, trainable: true, loaded: None };
    for adaptation in [Adaptation::Prefix(&prefix), Adaptation::Bottleneck(&bottleneck)] {
        let model = CausalLm::new(config.clone(), weights(), adaptation).unwrap();
        // As after some training: bottleneck adapters start as the identity (zero up-projection).
        for p in &model.trainable.params {
            p.var.set(&(p.var.as_tensor() + 0.05).unwrap()).unwrap();
        }
        let off = reference_log_probs(&model, &rows, 4).unwrap();
        assert!(max_abs_diff(&off, &base) <= 1e-5, "{off:?} vs the base's {base:?}");
        let refs: Vec<&Sequence> = rows.iter().collect();
        let batch = make_batch(&refs, None, &Device::Cpu, DType::F32).unwrap();
        let ctx = ForwardCtx::inference();
        let hidden = model.forward_hidden(&batch.input_ids, &batch.positions, &batch.mask, &ctx).unwrap();
        let on: Vec<f32> = sequence_log_probs(&model, &hidden, &batch, 2, &ctx).unwrap().0.to_vec1().unwrap();
        assert!(max_abs_diff(&on, &base) > 1e-3, "the adapter is active when switched on");
    }
}

// ---------------------------------------------------------------------------------------------
// Learning a preference: answers that state a unit over answers that name a thing.
// ---------------------------------------------------------------------------------------------

const UNITS: [&str; 6] = ["km", "kg", "cm", "ml", "mm", "kw"];
const THINGS: [&str; 6] = ["red", "cat", "sun", "box", "pen", "toy"];

/// Pair `i`: the same number, followed by a unit (preferred) or by a thing.
pub fn unit_pair(i: usize) -> serde_json::Value {
    let n = (i * 37 + 11) % 100;
    serde_json::json!({
        "input": {"messages": [{"role": "user", "content": format!("Measure item {i}.")}]},
        "preferred_output": [{"role": "assistant", "content": format!("{n} {}", UNITS[i % 6])}],
        "non_preferred_output": [{"role": "assistant", "content": format!("{n} {}", THINGS[(i * 5 + 1) % 6])}],
    })
}

/// Training pairs 0..48; held-out pairs 100..124 (other items, numbers and unit/thing matches).
pub fn unit_pairs_jsonl(range: std::ops::Range<usize>) -> String {
    range.map(|i| unit_pair(i).to_string() + "\n").collect()
}

/// The share of held-out pairs whose preferred answer `model` gives the higher log-probability.
pub fn preference_accuracy(model: &CausalLm, tokenizer: &ferrotune::data::tokenizer::ChatTokenizer) -> f64 {
    use ferrotune::data::examples::EncodeOptions;
    use ferrotune::data::packing::pad_each;
    let opts = EncodeOptions { max_seq_len: 128, train_on_inputs: false };
    let held_out: Vec<usize> = (100..124).collect();
    let mut right = 0;
    for &i in &held_out {
        let pair = ferrotune::data::preference::encode_pair(tokenizer, &unit_pair(i), &opts).unwrap().unwrap();
        let rows = pad_each(&[pair.chosen, pair.rejected], 128, 0);
        let logps = ferrotune::train::preference::log_probs(model, &rows, 1, &ForwardCtx::inference()).unwrap();
        right += usize::from(logps[0] > logps[1]);
    }
    right as f64 / held_out.len() as f64
}

/// Greedy answers to held-out prompts: how many end in a unit, and how many in a thing.
pub fn greedy_units(model: &CausalLm, tokenizer: &ferrotune::data::tokenizer::ChatTokenizer) -> (usize, usize) {
    let stop: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
    let (mut units, mut things) = (0, 0);
    for i in 100..124 {
        let messages = serde_json::json!([{"role": "user", "content": format!("Measure item {i}.")}]);
        let prompt = tokenizer.apply_chat_template(&messages, None, true).unwrap();
        let ids = tokenizer.encode(&prompt, false).unwrap();
        let out = ferrotune::infer::generate::generate_greedy(model, &ids, 12, &stop).unwrap();
        let text = tokenizer.decode(&out, true).unwrap();
        let last = text.split_whitespace().last().unwrap_or_default().to_string();
        units += usize::from(UNITS.contains(&last.as_str()));
        things += usize::from(THINGS.contains(&last.as_str()));
    }
    (units, things)
}

fn dpo_config(dir: &std::path::Path, method: &str, extra: &str) -> ferrotune::train::TrainConfig {
    let train = dir.join("train.jsonl");
    std::fs::write(&train, unit_pairs_jsonl(0..48)).unwrap();
    let yaml = format!(
        "model: {}\ntrain_file: {}\noutput_dir: {}\nmethod: {method}\nbatch_size: 4\nmax_seq_len: 64\nseed: 5\n\
         lr_scheduler: cosine\nlora: {{r: 16, alpha: 32}}\n{extra}",
        fixture("llama").display(),
        train.display(),
        dir.join("out").display(),
    );
    let config: ferrotune::train::TrainConfig = serde_yaml::from_str(&yaml).unwrap();
    config.validate().unwrap();
    config
}

#[test]
fn dpo_teaches_a_preference_the_base_model_does_not_have() {
    let tokenizer = ferrotune::data::tokenizer::ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let base = load("llama", |_| AdaptationSpec::None);
    let before = preference_accuracy(&base, &tokenizer);
    let dir = tempfile::tempdir().unwrap();
    // RPO's NLL term teaches the answers' form as well: plain DPO (or SimPO) from this random
    // model reaches the same ranking but greedy decoding never produces "<n> <unit>".
    let extra = "epochs: 12\nlearning_rate: 0.005\ndpo: {beta: 0.1, rpo_alpha: 1.0}\n";
    let summary =
        ferrotune::train::train(&dpo_config(dir.path(), "lora", extra), &mut ferrotune::train::Silent).unwrap();
    let output = summary.output.unwrap();
    let model = load("llama", |_| AdaptationSpec::Lora(lora_plan(&output)));
    let after = preference_accuracy(&model, &tokenizer);
    let (units, things) = greedy_units(&model, &tokenizer);
    eprintln!("held-out preference accuracy {before:.3} -> {after:.3}; greedy answers: {units} units, {things} things");
    assert!((0.25..=0.75).contains(&before), "the base ranks the pairs near chance: {before}");
    assert!(after >= 0.9, "after DPO: {after}");
    assert!(units >= 20 && things == 0, "greedy answers: {units} of 24 end in a unit, {things} in a thing");
}

fn lora_plan(dir: &std::path::Path) -> ferrotune::peft::lora::LoraPlan {
    let (config, norms, tensors) = ferrotune::peft::adapter::load_adapter(dir, &Device::Cpu).unwrap();
    ferrotune::peft::lora::LoraPlan { config, seed: 0, trainable: false, train_norms: norms, loaded: Some(tensors) }
}

// ---------------------------------------------------------------------------------------------
// Through the jobs API, on both backends.
// ---------------------------------------------------------------------------------------------

fn dpo_job(training: &str, validation: Option<&str>, hyperparameters: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "model": "tiny-llama", "training_file": training, "validation_file": validation, "suffix": "units", "seed": 5,
        "method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}},
    })
}

#[tokio::test]
async fn dpo_and_simpo_jobs_learn_a_preference_through_the_api_and_serve_it() {
    use std::time::Duration;

    use axum::http::StatusCode;
    use serde_json::json;

    use crate::jobs_e2e::{all_events, create_job, download_tar, results_csv, status, wait_for};
    let tokenizer = ferrotune::data::tokenizer::ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    for backend in crate::helpers::backends() {
        let mut app = crate::helpers::TestApp::spawn(backend).await;
        app.start_executors(1);
        let train = app.upload_dataset("prefs.jsonl", &unit_pairs_jsonl(0..48), None).await;
        let held_out = app.upload_dataset("held-out.jsonl", &unit_pairs_jsonl(100..124), None).await;
        assert_eq!(train["format"], "preference", "{train}");
        let (train, held_out) = (train["id"].as_str().unwrap(), held_out["id"].as_str().unwrap());
        let hyperparameters = json!({
            "n_epochs": 12, "batch_size": 4, "learning_rate": 0.005, "lr_scheduler": "cosine",
            "lora": {"r": 16, "alpha": 32}, "max_seq_len": 64, "beta": "auto", "rpo_alpha": 1.0,
        });
        let id = create_job(&app, &dpo_job(train, Some(held_out), hyperparameters)).await;
        let job = wait_for(&app, &id, Duration::from_secs(300), |j| {
            ["succeeded", "failed", "cancelled"].contains(&status(j))
        })
        .await;
        assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
        let shown = &job["method"]["dpo"]["hyperparameters"];
        assert_eq!((shown["beta"].clone(), shown["loss"].clone()), (json!(0.1), json!("sigmoid")), "{job}");
        assert_eq!(shown, &job["hyperparameters"]);

        // Every step's metrics event carries the reward metrics; the last evaluation ranks the
        // held-out pairs the preferred way.
        let events = all_events(&app, &id).await;
        let validated = events.iter().filter_map(|e| e["message"].as_str()).find(|m| m.starts_with("Files validated"));
        assert!(validated.unwrap().starts_with("Files validated: 48 preference pairs, "), "{validated:?}");
        let metrics: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["type"] == "metrics").map(|e| &e["data"]).collect();
        assert_eq!(metrics.len(), 144, "12 epochs of 12 steps");
        assert!(metrics
            .iter()
            .all(|m| m["train_rewards/accuracies"].is_number() && m["train_logps/chosen"].is_number()));
        let last = metrics.last().unwrap();
        assert!(last["valid_rewards/accuracies"].as_f64().unwrap() >= 0.9, "{last}");
        assert!(last["valid_rewards/margins"].as_f64().unwrap() > 0.0, "{last}");
        let csv = results_csv(&app, &job).await;
        assert!(csv.lines().next().unwrap().ends_with("valid_logps/chosen,valid_logps/rejected"), "{csv}");
        assert_eq!(csv.lines().count(), 145);

        // The downloaded adapter prefers the held-out units, and chat answers with one.
        let model = job["fine_tuned_model"].as_str().unwrap();
        let adapter = download_tar(&app, model, "").await;
        let tuned = load("llama", |_| AdaptationSpec::Lora(lora_plan(adapter.path())));
        assert!(preference_accuracy(&tuned, &tokenizer) >= 0.9);
        let messages = json!([{"role": "user", "content": "Measure item 117."}]);
        let body = json!({"model": model, "messages": messages, "max_tokens": 12, "temperature": 0});
        let response = app.post_json("/v1/chat/completions", &body, None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let answer = response.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let unit = answer.split_whitespace().last().unwrap_or_default();
        assert!(UNITS.contains(&unit), "{backend:?}: the tuned model answers {answer:?}");

        // SimPO: no reference pass, its own defaults shown.
        let simpo = json!({"n_epochs": 2, "batch_size": 8, "learning_rate": 0.005, "loss": "simpo", "max_seq_len": 64});
        let id = create_job(&app, &dpo_job(train, None, simpo)).await;
        let job = wait_for(&app, &id, Duration::from_secs(300), |j| {
            ["succeeded", "failed", "cancelled"].contains(&status(j))
        })
        .await;
        assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
        let shown = &job["hyperparameters"];
        assert_eq!((shown["beta"].clone(), shown["simpo_gamma"].clone()), (json!(2.0), json!(0.5)), "{job}");
    }
}

#[tokio::test]
async fn preference_jobs_reject_the_wrong_data_clearly() {
    use std::time::Duration;

    use axum::http::StatusCode;
    use serde_json::json;

    use crate::jobs_e2e::{create_job, status, wait_for};
    for backend in crate::helpers::backends() {
        let mut app = crate::helpers::TestApp::spawn(backend).await;
        app.start_executors(1);
        let prefs = app.upload_dataset("prefs.jsonl", &unit_pairs_jsonl(0..8), None).await;
        let chat = app.upload_dataset("chat.jsonl", &crate::helpers::chat_dataset(8), None).await;
        let (prefs, chat) = (prefs["id"].as_str().unwrap(), chat["id"].as_str().unwrap());

        let response = app.post_json("/v1/fine_tuning/jobs", &dpo_job(chat, None, json!({})), None).await;
        let error = response.assert_error(StatusCode::BAD_REQUEST, "invalid_file_format");
        assert!(error["message"].as_str().unwrap().contains("dpo fine-tuning needs preference"), "{error}");
        let supervised = json!({"model": "tiny-llama", "training_file": prefs});
        let response = app.post_json("/v1/fine_tuning/jobs", &supervised, None).await;
        response.assert_error(StatusCode::BAD_REQUEST, "invalid_file_format");
        let response = app.post_json("/v1/fine_tuning/jobs", &dpo_job(prefs, Some(chat), json!({})), None).await;
        response.assert_error(StatusCode::BAD_REQUEST, "invalid_file_format");

        // Identical answers never get in.
        let same = json!({"input": {"messages": [{"role": "user", "content": "Hi"}]},
                          "preferred_output": [{"role": "assistant", "content": "Yes"}],
                          "non_preferred_output": [{"role": "assistant", "content": "Yes"}]});
        let upload = app
            .upload(
                &[
                    crate::helpers::Field::text("purpose", "fine-tune"),
                    crate::helpers::Field::file("same.jsonl", format!("{same}\n").as_bytes()),
                ],
                None,
            )
            .await;
        let error = upload.assert_error(StatusCode::BAD_REQUEST, "invalid_dataset");
        assert!(error.to_string().contains("identical"), "{error}");

        // Prompts that fill max_seq_len leave nothing to compare: the job fails, naming the file.
        let long = "a long question that goes on ".repeat(12);
        let record = json!({"input": {"messages": [{"role": "user", "content": long}]},
                            "preferred_output": [{"role": "assistant", "content": "3 km"}],
                            "non_preferred_output": [{"role": "assistant", "content": "3 cat"}]});
        let file = app.upload_dataset("long.jsonl", &format!("{record}\n{record}\n"), None).await;
        let id = create_job(&app, &dpo_job(file["id"].as_str().unwrap(), None, json!({"max_seq_len": 16}))).await;
        let job = wait_for(&app, &id, Duration::from_secs(60), |j| status(j) == "failed").await;
        assert_eq!(job["error"]["param"], "training_file", "{job}");
        assert!(job["error"]["message"].as_str().unwrap().contains("max_seq_len 16"), "{job}");
    }
}

/// Pauses (saving a checkpoint) once the run has made `at` steps.
struct PauseAt(u64, u64);

impl ferrotune::train::Observer for PauseAt {
    fn progress(&mut self, p: &ferrotune::train::Progress) {
        self.1 = p.step;
    }
    fn control(&mut self) -> ferrotune::train::Control {
        if self.1 == self.0 {
            ferrotune::train::Control::Pause
        } else {
            ferrotune::train::Control::Continue
        }
    }
}

/// Full fine-tuning changes the weights the reference was computed from, so a resumed run must
/// take the reference from its checkpoint: it then ends bit for bit where an uninterrupted run does.
#[test]
fn a_resumed_full_dpo_run_ends_with_the_same_weights() {
    use ferrotune::train::{train, Silent, StopReason};
    let dir = tempfile::tempdir().unwrap();
    let extra = "epochs: 2\nlearning_rate: 0.0005\nwarmup_steps: 2\ngradient_accumulation_steps: 2\n\
                 dpo: {beta: 0.2, label_smoothing: 0.05, rpo_alpha: 0.3}\n";
    let base = dpo_config(dir.path(), "full", extra);
    let weights = |out: &std::path::Path| -> HashMap<String, Vec<f32>> {
        let tensors = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        tensors.into_iter().map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap())).collect()
    };
    let mut straight = base.clone();
    straight.output_dir = dir.path().join("straight");
    train(&straight, &mut Silent).unwrap();
    assert_ne!(weights(&straight.output_dir), weights(&fixture("llama")), "the run moved the weights");

    let mut interrupted = base.clone();
    interrupted.output_dir = dir.path().join("interrupted");
    let paused = train(&interrupted, &mut PauseAt(3, 0)).unwrap();
    assert_eq!((paused.stop, paused.steps), (StopReason::Paused, 3));
    let checkpoint = paused.last_checkpoint.clone().unwrap();
    assert!(checkpoint.join("reference_logps.safetensors").exists());
    let mut resumed = interrupted.clone();
    resumed.resume_from = Some(checkpoint);
    let finished = train(&resumed, &mut Silent).unwrap();
    assert_eq!(finished.steps, finished.total_steps);
    assert_eq!(weights(&dir.path().join("straight")), weights(&dir.path().join("interrupted")));
}
