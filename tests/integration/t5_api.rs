//! T5 through the API: a LoRA job on `prompt_completion` data teaches the tiny T5 a mapping, and
//! the fine-tuned model and its checkpoints answer at `/v1/completions` (whole, streamed, with
//! several choices, stop sequences and token limits); what does not apply to an encoder-decoder is
//! refused with the parameter named.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use ferrotune::models::adaptation::Adaptation;

use crate::helpers::{backends, test_catalog, Backend, TestApp};
use crate::jobs_e2e::{create_job, status, wait_for};
use crate::t5::t5_fixture;

const PAIRS: [(&str, &str); 6] = [
    ("translate: the cat", "die katze"),
    ("translate: the dog", "der hund"),
    ("translate: the house", "das haus"),
    ("translate: my invoice", "meine rechnung"),
    ("translate: a refund", "eine erstattung"),
    ("translate: the password", "das passwort"),
];

async fn app_with_t5(backend: Backend) -> TestApp {
    let mut app = TestApp::spawn_with(backend, |settings| {
        let mut catalog = test_catalog();
        catalog.add("tiny-t5", ferrotune::catalog::ModelSource::Directory(t5_fixture("t5-gated"))).unwrap();
        settings.catalog = Arc::new(catalog);
    })
    .await;
    app.start_executors(1);
    app
}

fn job(model: &str, file: &str, hyperparameters: Value) -> Value {
    json!({
        "model": model, "training_file": file, "seed": 5,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    })
}

async fn complete(app: &TestApp, body: Value) -> Value {
    let response = app.post_json("/v1/completions", &body, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    response.json()
}

fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
        .collect()
}

/// What the T5 model directory `dir` greedily decodes for `prompt` (at most 16 tokens).
fn greedy_text(dir: &std::path::Path, prompt: &str) -> String {
    let model = crate::t5::load_dir(dir, Adaptation::None);
    let tokenizer = ferrotune::data::encoder::EncoderTokenizer::from_dir(dir).unwrap();
    let ids = tokenizer.encode_text(prompt, None, 64).unwrap().ids;
    let greedy = ferrotune::infer::sampling::Sampler::new(
        ferrotune::infer::sampling::SamplingParams { temperature: 0.0, ..Default::default() },
        0,
    );
    let out = ferrotune::infer::seq2seq::generate(&model, &[ids], 16, &mut [greedy]).unwrap();
    tokenizer.decode(&out[0].tokens, true).unwrap()
}

fn adapter_task_type(dir: &std::path::Path) -> String {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    config["task_type"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn t5_learns_through_a_lora_job_and_answers_at_completions() {
    // Each pair three times: 50 epochs (the API's most) of 3 steps each.
    let lines: Vec<String> = PAIRS
        .iter()
        .cycle()
        .take(3 * PAIRS.len())
        .map(|(p, c)| json!({"prompt": p, "completion": c}).to_string())
        .collect();
    for backend in backends() {
        let app = app_with_t5(backend).await;
        let file = app.upload_dataset("pairs.jsonl", &(lines.join("\n") + "\n"), None).await;
        assert_eq!(file["format"], "prompt_completion", "{file}");
        let file_id = file["id"].as_str().unwrap();
        let hyperparameters = json!({"n_epochs": 50, "batch_size": 6, "learning_rate": 1e-2,
            "lr_scheduler": "constant", "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16}, "n_checkpoints": 2});
        let id = create_job(&app, &job("tiny-t5", file_id, hyperparameters)).await;
        let finished =
            wait_for(&app, &id, Duration::from_secs(600), |j| ["succeeded", "failed"].contains(&status(j))).await;
        assert_eq!(status(&finished), "succeeded", "{finished}");
        let model = finished["fine_tuned_model"].as_str().unwrap().to_string();

        // Every taught prompt, in one request, decodes greedily to its completion.
        let prompts: Vec<&str> = PAIRS.iter().map(|(p, _)| *p).collect();
        let body = complete(&app, json!({"model": model, "prompt": prompts, "temperature": 0, "max_tokens": 16})).await;
        let choices = body["choices"].as_array().unwrap();
        assert_eq!(choices.len(), PAIRS.len());
        for (choice, (prompt, completion)) in choices.iter().zip(PAIRS) {
            assert_eq!(choice["text"], completion, "{prompt}: {choice}");
            assert_eq!(choice["finish_reason"], "stop");
        }
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= PAIRS.len() as u64);

        // The base model does not answer so.
        let base = complete(
            &app,
            json!({"model": "tiny-t5", "prompt": "translate: the cat", "temperature": 0,
            "max_tokens": 8}),
        )
        .await;
        assert_ne!(base["choices"][0]["text"], "die katze");

        // Streamed: the deltas make the same text, then a finish reason, then [DONE].
        let stream = json!({"model": model, "prompt": "translate: my invoice", "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}});
        let response = app.post_json("/v1/completions", &stream, None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let events = sse_data(&response.text());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(text, "meine rechnung");
        assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "stop"));
        assert!(chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap() > 0);

        // A stop sequence ends the text before it; a token limit ends it with "length".
        let stopped = complete(
            &app,
            json!({"model": model, "prompt": "translate: the dog", "temperature": 0,
            "stop": " hu"}),
        )
        .await;
        assert_eq!(stopped["choices"][0]["text"], "der");
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
        let cut = complete(
            &app,
            json!({"model": model, "prompt": "translate: the dog", "temperature": 0,
            "max_tokens": 1}),
        )
        .await;
        assert_eq!(cut["choices"][0]["finish_reason"], "length");
        assert_eq!(cut["usage"]["completion_tokens"], 1);

        // Sampled choices are seeded: the same seed gives the same texts.
        let sampled = json!({"model": model, "prompt": "translate: the house", "n": 3, "temperature": 1.5,
            "seed": 7, "max_tokens": 6, "logprobs": 2});
        let first = complete(&app, sampled.clone()).await;
        let again = complete(&app, sampled).await;
        assert_eq!(first["choices"], again["choices"]);
        assert_eq!(first["choices"].as_array().unwrap().len(), 3);
        let logprobs = &first["choices"][0]["logprobs"];
        assert!(logprobs["token_logprobs"].as_array().is_some_and(|l| !l.is_empty()), "{logprobs}");

        // Its checkpoints answer too.
        let checkpoints = app.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints"), None).await.json();
        let checkpoints = checkpoints["data"].as_array().unwrap();
        assert!(!checkpoints.is_empty());
        for checkpoint in checkpoints {
            let name = checkpoint["fine_tuned_model_checkpoint"].as_str().unwrap();
            complete(&app, json!({"model": name, "prompt": "translate: the cat", "max_tokens": 4})).await;
        }

        // The adapter downloads as PEFT's SEQ_2_SEQ_LM; merged, it is a T5 model directory that
        // decodes what was taught without the adapter.
        let adapter = crate::jobs_e2e::download_tar(&app, &model, "").await;
        assert_eq!(adapter_task_type(adapter.path()), "SEQ_2_SEQ_LM");
        let merged = crate::jobs_e2e::download_tar(&app, &model, "?format=merged").await;
        assert_eq!(crate::t5::decoded_right(&crate::t5::load_dir(merged.path(), Adaptation::None), merged.path()), 6);
        // A checkpoint downloads as an adapter too, or merged.
        let checkpoint = checkpoints[0]["fine_tuned_model_checkpoint"].as_str().unwrap();
        let adapter = crate::jobs_e2e::download_tar(&app, checkpoint, "").await;
        assert_eq!(adapter_task_type(adapter.path()), "SEQ_2_SEQ_LM");
        assert!(
            adapter.path().join("adapter_model.safetensors").exists() && adapter.path().join("tokenizer.json").exists()
        );
        let merged = crate::jobs_e2e::download_tar(&app, checkpoint, "?format=merged").await;
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(merged.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "T5ForConditionalGeneration");
        // The merged checkpoint decodes what the served checkpoint answers.
        let served = complete(
            &app,
            json!({"model": checkpoint, "prompt": "translate: the cat", "temperature": 0,
            "max_tokens": 16}),
        )
        .await;
        assert_eq!(served["choices"][0]["text"], greedy_text(merged.path(), "translate: the cat"), "{served}");
        // T5 does not chat.
        let chat = json!({"model": model, "messages": [{"role": "user", "content": "translate: the cat"}]});
        app.post_json("/v1/chat/completions", &chat, None)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "model_not_supported");

        // A job continues from the fine-tuned model (its adapter merged into the base) and teaches
        // it more; the child answers at completions and downloads merged.
        let more = [("translate: the tree", "der baum"), ("translate: the book", "das buch")];
        let lines: Vec<String> = more
            .iter()
            .chain(&PAIRS[..2])
            .cycle()
            .take(16)
            .map(|(p, c)| json!({"prompt": p, "completion": c}).to_string())
            .collect();
        let file = app.upload_dataset("more.jsonl", &(lines.join("\n") + "\n"), None).await;
        let hyperparameters = json!({"n_epochs": 50, "batch_size": 4, "learning_rate": 1e-2,
            "lr_scheduler": "constant", "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16}});
        let id = create_job(&app, &job(&model, file["id"].as_str().unwrap(), hyperparameters)).await;
        let finished =
            wait_for(&app, &id, Duration::from_secs(600), |j| ["succeeded", "failed"].contains(&status(j))).await;
        assert_eq!(status(&finished), "succeeded", "{finished}");
        let child = finished["fine_tuned_model"].as_str().unwrap().to_string();
        let prompts: Vec<&str> = more.iter().map(|(p, _)| *p).collect();
        let body = complete(&app, json!({"model": child, "prompt": prompts, "temperature": 0, "max_tokens": 16})).await;
        for (choice, (prompt, completion)) in body["choices"].as_array().unwrap().iter().zip(more) {
            assert_eq!(choice["text"], completion, "{prompt}: {choice}");
        }
        let merged = crate::jobs_e2e::download_tar(&app, &child, "?format=merged").await;
        for (prompt, completion) in more {
            assert_eq!(greedy_text(merged.path(), prompt), completion, "merged child: {prompt}");
        }
    }
}

#[tokio::test]
async fn t5_refuses_data_and_methods_that_do_not_apply() {
    let app = app_with_t5(Backend::SqliteLocal).await;
    let chat = app
        .upload_dataset(
            "chat.jsonl",
            &"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n"
                .repeat(2),
            None,
        )
        .await;
    let pairs = app.upload_dataset("pairs.jsonl", &"{\"prompt\":\"a\",\"completion\":\"b\"}\n".repeat(2), None).await;
    let (chat, pairs) = (chat["id"].as_str().unwrap(), pairs["id"].as_str().unwrap());
    let refused = [
        (job("tiny-t5", chat, json!({})), "invalid_file_format", "training_file"),
        (
            job("tiny-t5", pairs, json!({"training_type": "prefix"})),
            "invalid_hyperparameters",
            "method.supervised.hyperparameters.training_type",
        ),
        (
            job("tiny-t5", pairs, json!({"training_type": "qlora"})),
            "invalid_hyperparameters",
            "method.supervised.hyperparameters.training_type",
        ),
        (
            json!({"model": "tiny-t5", "training_file": pairs, "method": {"type": "dpo"}}),
            "model_not_supported",
            "model",
        ),
    ];
    for (body, code, param) in refused {
        let error =
            app.post_json("/v1/fine_tuning/jobs", &body, None).await.assert_error(StatusCode::BAD_REQUEST, code);
        assert_eq!(error["param"], param, "{body}: {error}");
    }
    // Prompts longer than the engine encodes are refused, not truncated.
    let long = json!({"model": "tiny-t5", "prompt": "a ".repeat(3000)});
    let error = app
        .post_json("/v1/completions", &long, None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "context_length_exceeded");
    assert_eq!(error["param"], "prompt");
}
