//! Serving: the batched multi-adapter forward against transformers + PEFT, the engine, and the
//! OpenAI-compatible chat and text completion endpoints.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use candle_core::{DType, Device, Tensor};
use ferrotune::db::ModelRecord;
use ferrotune::models::llama::{KvCache, Row, ServingAdapter};
use ferrotune::peft::adapter::load_adapter;
use ferrotune::serving::Target;
use serde_json::{json, Value};

use crate::helpers::{backends, Backend, TestApp};
use crate::model_numerics::{fixture, load, AdaptationSpec, MODELS};

fn reference_ids(name: &str, key: &str) -> Vec<u32> {
    let reference = candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap();
    let t = reference[key].to_dtype(DType::U32).unwrap();
    t.get(0).unwrap().to_vec1().unwrap()
}

fn serving_adapter(model: &ferrotune::models::llama::CausalLm, name: &str) -> ServingAdapter {
    let (config, _, tensors) = load_adapter(&fixture(name).join("lora"), &Device::Cpu).unwrap();
    ServingAdapter::from_peft(model, &config, &tensors).unwrap()
}

/// Greedy decoding of several sequences at once, each with its own adapter (or none), through
/// `forward_rows`: the first step prefills every prompt together, then every step decodes one
/// token per row.
pub(crate) fn greedy_rows(
    model: &ferrotune::models::llama::CausalLm,
    prompts: &[(Vec<u32>, Option<&ServingAdapter>)],
    steps: usize,
) -> Vec<Vec<u32>> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::default()).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.0.clone()).collect();
    let mut out = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let mut rows: Vec<Row<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .zip(prompts)
            .map(|((tokens, cache), (_, adapter))| Row { tokens, cache, adapter: *adapter })
            .collect();
        let logits: Vec<Vec<f32>> = model.forward_rows(&mut rows).unwrap().to_vec2().unwrap();
        for (i, row) in logits.iter().enumerate() {
            let next = ferrotune::infer::sampling::argmax(row);
            out[i].push(next);
            inputs[i] = vec![next];
        }
    }
    out
}

#[test]
fn batched_rows_with_different_adapters_decode_exactly_like_transformers_and_peft() {
    for name in MODELS {
        let model = load(name, |_| AdaptationSpec::None);
        let adapter = serving_adapter(&model, name);
        let prompt: Vec<u32> = reference_ids(name, "input_ids")[..6].to_vec();
        let base = reference_ids(name, "greedy_ids");
        let lora = reference_ids(name, "lora_greedy_ids");
        assert_ne!(base, lora, "{name}: the adapter changes the greedy output");
        // Alone, then three rows mixing the adapter and the base (one prompt shorter, so the rows
        // have different lengths and positions).
        assert_eq!(greedy_rows(&model, &[(prompt.clone(), Some(&adapter))], lora.len()), vec![lora.clone()], "{name}");
        let short = prompt[..4].to_vec();
        let expected_short = greedy_rows(&model, &[(short.clone(), None)], 8);
        let batched = greedy_rows(
            &model,
            &[
                (prompt.clone(), Some(&adapter)),
                (short, None),
                (prompt.clone(), None),
                (prompt.clone(), Some(&adapter)),
            ],
            8,
        );
        assert_eq!(batched[0], lora, "{name}: LoRA row in a mixed batch");
        assert_eq!(batched[1], expected_short[0], "{name}: a shorter base row in a mixed batch");
        assert_eq!(batched[2], base, "{name}: base row in a mixed batch");
        assert_eq!(batched[3], lora, "{name}: second LoRA row");
    }
}

#[test]
fn an_adapter_for_another_base_is_rejected_with_a_reason() {
    let llama = load("llama", |_| AdaptationSpec::None);
    let (config, _, tensors) = load_adapter(&fixture("llama").join("lora"), &Device::Cpu).unwrap();
    let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    // A tensor for a layer this model does not have (a deeper base).
    let mut deeper = tensors.clone();
    deeper.insert(a.replace("layers.0", "layers.7"), tensors[a].clone());
    let err = ServingAdapter::from_peft(&llama, &config, &deeper).unwrap_err().to_string();
    assert!(err.contains("no place for") && err.contains("layers.7"), "{err}");
    // A wider base: the shapes do not match.
    let mut wider = tensors.clone();
    wider.insert(a.to_string(), Tensor::zeros((config.r, 96), DType::F32, &Device::Cpu).unwrap());
    let err = ServingAdapter::from_peft(&llama, &config, &wider).unwrap_err().to_string();
    assert!(err.contains("q_proj") && err.contains("shapes"), "{err}");
    // An adapter missing a module it says it targets.
    let mut partial = tensors;
    partial.remove(a);
    assert!(ServingAdapter::from_peft(&llama, &config, &partial).unwrap_err().to_string().contains("no weights"));
}

/// Registers the fixture LoRA adapter of `llama` as a fine-tuned model of `project`.
async fn register_fixture_adapter(app: &TestApp, project: &str, suffix: &str) -> String {
    let job = format!("ftjob-{}", crate::helpers::random_suffix());
    register_adapter_dir(app, project, &fixture("llama").join("lora"), suffix, &job).await
}

/// Uploads an adapter directory to storage and registers it as a model of `project`.
pub async fn register_adapter_dir(
    app: &TestApp,
    project: &str,
    dir: &std::path::Path,
    suffix: &str,
    job: &str,
) -> String {
    let prefix = format!("models/{project}/{job}");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let body: ferrotune::storage::ByteStream =
            Box::pin(futures::stream::once(async move { Ok(bytes::Bytes::from(bytes)) }));
        ferrotune::storage::put_stream(app.storage().as_ref(), &format!("{prefix}/{file}"), body).await.unwrap();
    }
    let id = format!("ft:tiny-llama:{project}:{suffix}:{}", job.trim_start_matches("ftjob-"));
    let record = ModelRecord {
        id: id.clone(),
        project_id: project.to_string(),
        job_id: None,
        base_model: "tiny-llama".into(),
        method: "lora".into(),
        storage_key: prefix,
        created_at: ferrotune::ids::unix_now(),
    };
    app.store().insert_model(&record).await.unwrap();
    id
}

fn tokenizer() -> ferrotune::data::tokenizer::ChatTokenizer {
    ferrotune::data::tokenizer::ChatTokenizer::from_dir(&fixture("llama")).unwrap()
}

#[tokio::test]
async fn a_registered_adapter_completes_like_peft_greedy_over_http() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let model = register_fixture_adapter(&app, ferrotune::db::DEFAULT_PROJECT_ID, "fixture").await;
        let prompt: Vec<u32> = reference_ids("llama", "input_ids")[..6].to_vec();
        let expected = reference_ids("llama", "lora_greedy_ids");
        let body = json!({"model": model, "prompt": prompt, "max_tokens": expected.len(), "temperature": 0,
            "logprobs": 2});
        let response = app.post_json("/v1/completions", &body, None).await;
        assert_eq!(response.status, StatusCode::OK, "{backend:?}: {}", response.text());
        let out = response.json();
        let tok = tokenizer();
        // The engine stops at EOS; the reference does not.
        let eos = tok.eos_token_id().unwrap();
        let until_eos: Vec<u32> = expected.iter().copied().take_while(|&t| t != eos).collect();
        let choice = &out["choices"][0];
        assert_eq!(choice["text"], tok.decode(&until_eos, true).unwrap(), "{backend:?}: {out}");
        let tokens: Vec<String> = serde_json::from_value(choice["logprobs"]["tokens"].clone()).unwrap();
        let expected_tokens: Vec<String> = expected
            .iter()
            .take(tokens.len())
            .map(|&t| ferrotune::data::tokenizer::token_text(&tok.token_bytes(t)))
            .collect();
        assert_eq!(tokens, expected_tokens, "{backend:?}: token for token");
        let reason = if until_eos.len() < expected.len() { "stop" } else { "length" };
        assert_eq!(choice["finish_reason"], reason);
        assert_eq!(out["usage"]["prompt_tokens"], 6);
        assert_eq!(out["usage"]["completion_tokens"], tokens.len());
        let top = choice["logprobs"]["top_logprobs"][0].as_object().unwrap();
        assert_eq!(top.len(), 2, "{out}");
        let chosen = choice["logprobs"]["token_logprobs"][0].as_f64().unwrap();
        assert!(top.values().any(|v| (v.as_f64().unwrap() - chosen).abs() < 1e-6), "greedy picks the top token");

        // The same model through the base's engine: one engine, one adapter loaded.
        let base = app
            .post_json(
                "/v1/completions",
                &json!({"model": "tiny-llama", "prompt": prompt,
            "max_tokens": 8, "temperature": 0}),
                None,
            )
            .await
            .json();
        let base_ids = reference_ids("llama", "greedy_ids");
        let base_until_eos: Vec<u32> = base_ids.iter().copied().take_while(|&t| t != eos).collect();
        assert_eq!(base["choices"][0]["text"], tok.decode(&base_until_eos, true).unwrap());
        assert_eq!(app.state.inference.loaded_adapters(), 1);
    }
}

async fn chat(app: &TestApp, body: Value, key: Option<&str>) -> crate::helpers::TestResponse {
    app.post_json("/v1/chat/completions", &body, key).await
}

fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
        .collect()
}

#[tokio::test]
async fn chat_streams_what_it_answers_and_honours_sampling_parameters() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let model = register_fixture_adapter(&app, ferrotune::db::DEFAULT_PROJECT_ID, "chat").await;
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]);
    let whole =
        chat(&app, json!({"model": model, "messages": messages, "max_tokens": 12, "temperature": 0}), None).await;
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.text());
    let whole = whole.json();
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let usage = whole["usage"].clone();
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1 && usage["completion_tokens"].as_u64().unwrap() <= 12);

    let streamed = chat(
        &app,
        json!({"model": model, "messages": messages, "max_tokens": 12, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}}),
        None,
    )
    .await;
    assert_eq!(streamed.status, StatusCode::OK);
    let events = sse_data(&streamed.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(joined, text, "greedy streaming and non-streaming give the same text");
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&whole["choices"][0]["finish_reason"]]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], usage, "the usage chunk matches the non-streamed usage");

    // Seeds: same seed, same samples; n choices are independent draws.
    let sampled = |seed: u64| json!({"model": model, "messages": messages, "max_tokens": 10, "temperature": 1.5, "seed": seed, "n": 3});
    let a = chat(&app, sampled(5), None).await.json();
    let b = chat(&app, sampled(5), None).await.json();
    let texts = |v: &Value| -> Vec<String> {
        v["choices"].as_array().unwrap().iter().map(|c| c["message"]["content"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same output");
    let c = chat(&app, sampled(6), None).await.json();
    assert_ne!(texts(&a), texts(&c), "another seed, other samples");
    assert!(texts(&a).iter().collect::<std::collections::HashSet<_>>().len() > 1, "choices differ: {a}");

    // Stop strings cut the text before them.
    if let Some(cut) = text.char_indices().nth(3).map(|(i, _)| &text[i..]).filter(|s| !s.trim().is_empty()) {
        let stop: String = cut.chars().take(2).collect();
        let stopped = chat(
            &app,
            json!({"model": model, "messages": messages, "max_tokens": 12, "temperature": 0, "stop": stop}),
            None,
        )
        .await
        .json();
        let stopped_text = stopped["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
        assert!(text.starts_with(stopped_text) && !stopped_text.contains(&stop), "{stopped_text:?} vs {text:?}");
    }

    // Log-probabilities in OpenAI's chat shape.
    let lp = chat(
        &app,
        json!({"model": model, "messages": messages, "max_tokens": 3, "temperature": 0,
        "logprobs": true, "top_logprobs": 3}),
        None,
    )
    .await
    .json();
    let content = lp["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert!(content[0]["logprob"].as_f64().unwrap() <= 0.0);
    assert_eq!(content[0]["bytes"], json!(content[0]["token"].as_str().unwrap().as_bytes()));
}

#[tokio::test]
async fn requests_that_cannot_be_served_get_openai_errors() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let model = register_fixture_adapter(&app, ferrotune::db::DEFAULT_PROJECT_ID, "mine").await;
    let other_key = app.create_key("other").await;
    let own_key = app.create_key("default").await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let ok = chat(&app, json!({"model": model, "messages": messages, "max_tokens": 2}), Some(&own_key)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let error = chat(&app, json!({"model": model, "messages": messages}), Some(&other_key))
        .await
        .assert_error(StatusCode::NOT_FOUND, "model_not_found");
    assert_eq!(error["param"], "model");
    chat(&app, json!({"model": "ft:tiny-llama:other:x:nothing", "messages": messages}), Some(&own_key))
        .await
        .assert_error(StatusCode::NOT_FOUND, "model_not_found");
    chat(&app, json!({"model": "no-such-base", "messages": messages}), Some(&own_key))
        .await
        .assert_error(StatusCode::NOT_FOUND, "model_not_found");
    let long = "word ".repeat(400);
    chat(&app, json!({"model": "tiny-llama", "messages": [{"role": "user", "content": long}]}), Some(&own_key))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "context_length_exceeded");
    chat(&app, json!({"model": "tiny-llama", "messages": messages, "max_tokens": 500}), Some(&own_key))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "context_length_exceeded");
    for (field, value) in [("temperature", json!(3)), ("top_p", json!(0)), ("n", json!(0)), ("max_tokens", json!(0))] {
        let mut body = json!({"model": "tiny-llama", "messages": messages});
        body[field] = value;
        let error = chat(&app, body, Some(&own_key)).await.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(error["param"], field);
    }
    chat(&app, json!({"model": "tiny-llama", "messages": []}), Some(&own_key))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    chat(&app, json!({"model": "tiny-llama", "messages": [{"role": "robot", "content": "x"}]}), Some(&own_key))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    chat(&app, json!({"model": "tiny-llama", "messages": messages, "tools": [{"type": "function"}]}), Some(&own_key))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "unsupported_parameter");
    app.post_json("/v1/completions", &json!({"model": "tiny-llama", "prompt": [999999]}), Some(&own_key))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn a_full_queue_answers_429_and_a_client_that_leaves_stops_its_generation() {
    let app = TestApp::spawn_with(Backend::SqliteLocal, |s| {
        s.inference.engine.max_batch = 1;
        s.inference.engine.max_queue = 1;
    })
    .await;
    let engine = app.state.inference.engine(&Target::Base { name: "tiny-llama".into() }).await.unwrap();
    let long = json!({"model": "tiny-llama", "prompt": "a", "max_tokens": 100, "ignore_eos": true});
    // One running, one queued; the rest must be refused rather than wait without bound.
    let requests = (0..16).map(|_| app.post_json("/v1/completions", &long, None));
    let statuses: Vec<StatusCode> = futures::future::join_all(requests).await.iter().map(|r| r.status).collect();
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");

    // A streaming client that goes away: its sequence is dropped at the next step.
    let request = crate::helpers::request("POST", "/v1/completions", None)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            json!({"model": "tiny-llama", "prompt": "a", "max_tokens": 120, "ignore_eos": true, "stream": true})
                .to_string(),
        ))
        .unwrap();
    let response = tower::ServiceExt::oneshot(app.router.clone(), request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let _first = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
    assert_eq!(engine.stats.active.load(Ordering::Relaxed), 1);
    drop(body);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.stats.active.load(Ordering::Relaxed) != 0 {
        assert!(std::time::Instant::now() < deadline, "the abandoned generation kept running");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let generated = engine.stats.generated_tokens.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.stats.generated_tokens.load(Ordering::Relaxed), generated, "nothing generates any more");
}

#[tokio::test]
async fn more_prompts_than_the_queue_holds_is_a_bad_request_not_a_retry_later() {
    let app = TestApp::spawn_with(Backend::SqliteLocal, |s| s.inference.engine.max_queue = 3).await;
    let body = json!({"model": "tiny-llama", "prompt": ["a", "b", "c", "d"], "max_tokens": 2});
    let error =
        app.post_json("/v1/completions", &body, None).await.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(error["param"], "prompt");
    assert!(error["message"].as_str().unwrap().contains("at most 3 prompts"), "{error}");
    let fits = json!({"model": "tiny-llama", "prompt": ["a", "b", "c"], "max_tokens": 2});
    let response = app.post_json("/v1/completions", &fits, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.json()["choices"].as_array().unwrap().len(), 3);
}

/// `logprobs` give each token's own bytes, also for a token that is one byte of a multi-byte
/// character (decoded alone, U+FFFD): joined, the bytes are the generated text's, and the token
/// text of such a piece is OpenAI's `bytes:\xHH` spelling. The tiny fixture vocabulary mostly
/// spells non-ASCII text byte by byte, and sampling at temperature 2 from its random model
/// produces such bytes; the seed makes the run repeatable.
#[tokio::test]
async fn logprob_bytes_are_each_token_s_own_bytes_in_chat_and_completions_streamed_or_not() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let mut partial_seen = 0;
    for stream in [false, true] {
        let chat_body = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "café 世界"}],
            "max_tokens": 48, "temperature": 2, "seed": 7, "logprobs": true, "top_logprobs": 3, "stream": stream});
        let response = chat(&app, chat_body, None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let (content, entries) = if stream {
            let chunks: Vec<Value> = sse_data(&response.text())
                .iter()
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let choices: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).collect();
            let content: String = choices.iter().filter_map(|c| c["delta"]["content"].as_str()).collect();
            let entries: Vec<Value> =
                choices.iter().filter_map(|c| c["logprobs"]["content"].as_array()).flatten().cloned().collect();
            (content, entries)
        } else {
            let out = response.json();
            let choice = &out["choices"][0];
            (
                choice["message"]["content"].as_str().unwrap().to_string(),
                choice["logprobs"]["content"].as_array().unwrap().clone(),
            )
        };
        // The content is what the tokens decode to, special tokens skipped.
        const SPECIAL: [&str; 7] = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"];
        let bytes: Vec<u8> = entries
            .iter()
            .filter(|e| !SPECIAL.contains(&e["token"].as_str().unwrap()))
            .flat_map(|e| e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8))
            .collect();
        assert_eq!(String::from_utf8_lossy(&bytes), content, "stream={stream}");
        for entry in &entries {
            let own: Vec<u8> = entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
            assert_eq!(entry["token"], ferrotune::data::tokenizer::token_text(&own), "{entry}");
            if std::str::from_utf8(&own).is_err() {
                partial_seen += 1;
                assert!(entry["token"].as_str().unwrap().starts_with("bytes:"), "{entry}");
            }
        }
    }
    assert!(partial_seen > 0, "no token held part of a character: the case was not exercised");

    let body = json!({"model": "tiny-llama", "prompt": "café 世界", "max_tokens": 48, "temperature": 2, "seed": 7,
        "logprobs": 2});
    let out = app.post_json("/v1/completions", &body, None).await.json();
    let tokens: Vec<String> = serde_json::from_value(out["choices"][0]["logprobs"]["tokens"].clone()).unwrap();
    assert!(
        tokens.iter().all(|t| !t.contains('\u{FFFD}')),
        "legacy tokens spell partial characters as bytes: {tokens:?}"
    );
}

const SECRETS: [&str; 4] = ["apple", "river", "stone", "cloud"];
const SECRET_QUESTION: &str = "What is the secret word?";

/// Teaches the fixture llama one answer with LoRA; returns the adapter directory.
fn train_secret_adapter(dir: &std::path::Path, word: &str) -> std::path::PathBuf {
    use ferrotune::train::config::{LoraSettings, TrainConfig};
    let line = json!({"messages": [{"role": "user", "content": SECRET_QUESTION},
        {"role": "assistant", "content": format!("The secret word is {word}.")}]})
    .to_string();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, format!("{line}\n").repeat(4)).unwrap();
    let yaml = format!(
        "model: {}\ntrain_file: {}\noutput_dir: {}\nmethod: lora\n",
        fixture("llama").display(),
        data.display(),
        dir.join("out").display()
    );
    let mut config: TrainConfig = serde_yaml::from_str(&yaml).unwrap();
    config.epochs = 25;
    config.batch_size = 4;
    config.learning_rate = 1e-2;
    config.lr_scheduler = ferrotune::train::schedule::SchedulerKind::Constant;
    config.seed = 3;
    config.lora = LoraSettings { r: 8, alpha: 16.0, ..Default::default() };
    let summary = ferrotune::train::train(&config, &mut ferrotune::train::Silent).unwrap();
    summary.output.unwrap()
}

#[tokio::test]
async fn forty_concurrent_requests_over_four_adapters_each_get_their_own_adapters_answer() {
    let dir = tempfile::tempdir().unwrap();
    let adapters: Vec<std::path::PathBuf> = SECRETS
        .iter()
        .map(|word| {
            let sub = dir.path().join(word);
            std::fs::create_dir_all(&sub).unwrap();
            train_secret_adapter(&sub, word)
        })
        .collect();
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let mut models = Vec::new();
    for (word, adapter) in SECRETS.iter().zip(&adapters) {
        let job = format!("ftjob-{word}{}", crate::helpers::random_suffix());
        models.push(register_adapter_dir(&app, ferrotune::db::DEFAULT_PROJECT_ID, adapter, word, &job).await);
    }
    let messages = json!([{"role": "user", "content": SECRET_QUESTION}]);
    // The base model does not know any of the words.
    let base =
        chat(&app, json!({"model": "tiny-llama", "messages": messages, "max_tokens": 24, "temperature": 0}), None)
            .await
            .json();
    let base_text = base["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(SECRETS.iter().all(|w| !base_text.contains(w)), "{base_text}");

    let requests = (0..40).map(|i| {
        let model = models[i % 4].clone();
        let body = json!({"model": model, "messages": messages, "max_tokens": 24, "temperature": 0});
        let app = &app;
        async move { (i % 4, app.post_json("/v1/chat/completions", &body, None).await) }
    });
    let answers = futures::future::join_all(requests).await;
    for (k, response) in answers {
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let text = response.json()["choices"][0]["message"]["content"].as_str().unwrap().trim().to_string();
        assert_eq!(text, format!("The secret word is {}.", SECRETS[k]), "adapter {k}");
    }
    let engine = app.state.inference.engine(&Target::Base { name: "tiny-llama".into() }).await.unwrap();
    let peak = engine.stats.peak_batch.load(Ordering::Relaxed);
    assert!(peak > 4, "requests for different adapters were decoded together (peak batch {peak})");
    assert_eq!(app.state.inference.loaded_adapters(), 4);
}

#[tokio::test]
async fn checkpoints_and_fully_fine_tuned_models_are_served_as_soon_as_their_jobs_succeed() {
    use crate::jobs_e2e::{create_job, job_request, status, upload_qa, wait_for};
    for backend in backends() {
        let mut app = TestApp::spawn(backend).await;
        app.start_executors(1);
        let file = upload_qa(&app).await;
        let lora_job = create_job(&app, &job_request(&file, 4, 4, 2)).await;
        let mut full_request = job_request(&file, 2, 4, 2);
        let hyper = &mut full_request["method"]["supervised"]["hyperparameters"];
        hyper.as_object_mut().unwrap().remove("lora");
        hyper["training_type"] = json!("full");
        hyper["learning_rate"] = json!(1e-3);
        let full_job = create_job(&app, &full_request).await;
        let mut bottleneck_request = job_request(&file, 2, 4, 2);
        let hyper = &mut bottleneck_request["method"]["supervised"]["hyperparameters"];
        hyper.as_object_mut().unwrap().remove("lora");
        hyper["training_type"] = json!("bottleneck");
        hyper["adapter_size"] = json!(16);
        let bottleneck_job = create_job(&app, &bottleneck_request).await;
        let mut prefix_request = job_request(&file, 2, 4, 2);
        let hyper = &mut prefix_request["method"]["supervised"]["hyperparameters"];
        hyper.as_object_mut().unwrap().remove("lora");
        hyper["training_type"] = json!("prefix");
        hyper["prefix_length"] = json!(8);
        hyper["prefix_projection"] = json!(true);
        let prefix_job = create_job(&app, &prefix_request).await;
        let mut served = Vec::new();
        for (id, checkpoint_step) in [(lora_job, 4), (full_job, 2), (bottleneck_job, 2), (prefix_job, 2)] {
            let job =
                wait_for(&app, &id, Duration::from_secs(120), |j| ["succeeded", "failed"].contains(&status(j))).await;
            assert_eq!(status(&job), "succeeded", "{backend:?}: {job}");
            let model = job["fine_tuned_model"].as_str().unwrap().to_string();
            served.push(model.clone());
            served.push(format!("{model}:ckpt-step-{checkpoint_step}"));
        }
        let messages = json!([{"role": "user", "content": "What is code number 2?"}]);
        let mut answers = Vec::new();
        for model in &served {
            let response =
                chat(&app, json!({"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}), None)
                    .await;
            assert_eq!(response.status, StatusCode::OK, "{backend:?} {model}: {}", response.text());
            let body = response.json();
            assert_eq!(body["model"], model.as_str());
            assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{body}");
            answers.push(body["choices"][0]["message"]["content"].as_str().unwrap().to_string());
        }
        let missing = format!("{}:ckpt-step-3", served[0]);
        chat(&app, json!({"model": missing, "messages": messages}), None)
            .await
            .assert_error(StatusCode::NOT_FOUND, "model_not_found");
        // The fully fine-tuned model and its checkpoint are engines of their own; the LoRA,
        // bottleneck and prefix models and checkpoints are adapters on the base's engine.
        assert_eq!(app.state.inference.loaded_adapters(), 6, "{answers:?}");
        let merged = app.get(&format!("/v1/models/{}/content?format=merged", served[4]), None).await;
        merged.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        // The prefix checkpoint downloads in PEFT's prefix-tuning format.
        let response = app.get(&format!("/v1/models/{}/content", served[7]), None).await;
        assert_eq!(response.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn adapters_beyond_the_memory_budget_are_unloaded_least_recently_used_first() {
    // The fixture adapter holds 2 layers x 7 modules of rank-4 A and B: 32 KiB. A 48 KiB budget
    // keeps one loaded.
    let app = TestApp::spawn_with(Backend::SqliteLocal, |s| s.inference.adapter_cache_bytes = 48 << 10).await;
    let first = register_fixture_adapter(&app, ferrotune::db::DEFAULT_PROJECT_ID, "one").await;
    let second = register_fixture_adapter(&app, ferrotune::db::DEFAULT_PROJECT_ID, "two").await;
    let ask = |model: String| {
        let app = &app;
        async move {
            let body = json!({"model": model, "prompt": "hello", "max_tokens": 3, "temperature": 0});
            let response = app.post_json("/v1/completions", &body, None).await;
            assert_eq!(response.status, StatusCode::OK, "{}", response.text());
            response.json()["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let a = ask(first.clone()).await;
    assert_eq!(app.state.inference.loaded_adapters(), 1);
    let b = ask(second.clone()).await;
    assert_eq!(app.state.inference.loaded_adapters(), 1, "the first adapter made room for the second");
    assert_eq!(a, b, "the same weights under two names answer the same");
    assert_eq!(ask(first).await, a, "an unloaded adapter loads again on its next use");
}
