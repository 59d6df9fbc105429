//! Encoders through the API: a real MiniLM learns an intent classifier through a job and serves
//! it at `/v1/classifications`; its embeddings equal sentence-transformers'; tiny fixtures train
//! token classification (LoRA) and embeddings (bottleneck) end to end; impossible model/data
//! pairs are refused.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::encoder_numerics::encoder_fixture;
use crate::helpers::{backends, env_or_skip, test_catalog, TestApp};
use crate::jobs_e2e::{all_events, create_job, results_csv, status, wait_for};

const INTENTS: [(&str, [&str; 12]); 3] = [
    (
        "billing",
        [
            "I was charged twice for my subscription",
            "Why is there an extra fee on my invoice",
            "Please refund the duplicate payment",
            "My credit card was billed the wrong amount",
            "How do I update my payment method",
            "The invoice total looks incorrect",
            "I need a copy of last month's receipt",
            "Can you explain this charge on my statement",
            "I was billed after I cancelled",
            "The price on my bill went up without notice",
            "Where can I download my invoices",
            "My payment failed but the money left my account",
        ],
    ),
    (
        "shipping",
        [
            "Where is my package right now",
            "My order has not arrived yet",
            "The tracking number does not work",
            "Can I change the delivery address",
            "The parcel was delivered to the wrong house",
            "How long does delivery take to Canada",
            "My box arrived damaged",
            "The courier left without delivering",
            "Do you ship internationally",
            "My shipment is stuck in customs",
            "When will my order be dispatched",
            "The delivery date keeps getting pushed back",
        ],
    ),
    (
        "account",
        [
            "I forgot my password",
            "How do I change the email on my profile",
            "I cannot log in to my account",
            "Please delete my account and my data",
            "How do I enable two-factor authentication",
            "My account was locked after too many attempts",
            "I want to change my username",
            "The verification code never arrives",
            "Someone else signed in to my account",
            "How do I reset my security questions",
            "I need to merge two accounts",
            "Sign-in keeps failing on the mobile app",
        ],
    ),
];

/// Held-out questions, none of them in the training file.
const HELD_OUT: [(&str, &str); 12] = [
    ("billing", "There is a charge I do not recognise on my card"),
    ("billing", "Could I get my money back for the double charge"),
    ("billing", "Send me the receipt for my last payment"),
    ("billing", "Why did my monthly fee increase"),
    ("shipping", "My parcel still has not shown up"),
    ("shipping", "Can the package be sent to my office instead"),
    ("shipping", "The item came broken in the mail"),
    ("shipping", "How many days until my order is delivered"),
    ("account", "I am unable to sign in"),
    ("account", "Help me recover access, I lost my password"),
    ("account", "How can I update the email address for my login"),
    ("account", "Close my profile permanently"),
];

/// Validation examples for early stopping (neither trained on nor part of the held-out test).
const VALIDATION: [(&str, &str); 6] = [
    ("billing", "I think you overcharged me this month"),
    ("billing", "Please send a corrected invoice"),
    ("shipping", "The order is late, where is it"),
    ("shipping", "Was my parcel sent to the right address"),
    ("account", "I can't get into my account"),
    ("account", "How do I change my login password"),
];

fn minilm() -> Option<std::path::PathBuf> {
    env_or_skip("FERROTUNE_TEST_MINILM").map(std::path::PathBuf::from)
}

async fn app_with(bases: &[(&str, std::path::PathBuf)], backend: crate::helpers::Backend) -> TestApp {
    let bases: Vec<(String, std::path::PathBuf)> = bases.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
    let mut app = TestApp::spawn_with(backend, move |settings| {
        let mut catalog = test_catalog();
        for (name, dir) in bases {
            catalog.add(&name, ferrotune::catalog::ModelSource::Directory(dir)).unwrap();
        }
        settings.catalog = Arc::new(catalog);
    })
    .await;
    app.start_executors(1);
    app
}

fn job(model: &str, file: &str, validation: Option<&str>, hyperparameters: Value) -> Value {
    let mut body = json!({
        "model": model, "training_file": file, "seed": 5,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    });
    if let Some(v) = validation {
        body["validation_file"] = json!(v);
    }
    body
}

async fn run_job(app: &TestApp, body: &Value) -> Value {
    let id = create_job(app, body).await;
    let job = wait_for(app, &id, Duration::from_secs(600), |j| ["succeeded", "failed"].contains(&status(j))).await;
    assert_eq!(status(&job), "succeeded", "{job}");
    job
}

#[tokio::test]
async fn minilm_learns_an_intent_classifier_through_a_job() {
    let Some(dir) = minilm() else { return };
    let train: Vec<String> = INTENTS
        .iter()
        .flat_map(|(label, texts)| texts.iter().map(move |t| json!({"text": t, "label": label}).to_string()))
        .collect();
    let validation: Vec<String> =
        VALIDATION.iter().map(|(label, text)| json!({"text": text, "label": label}).to_string()).collect();
    for backend in backends() {
        let app = app_with(&[("minilm", dir.clone())], backend).await;
        let file = app.upload_dataset("intents.jsonl", &(train.join("\n") + "\n"), None).await;
        assert_eq!(file["format"], "classification", "{file}");
        let held_out = app.upload_dataset("validation.jsonl", &(validation.join("\n") + "\n"), None).await;
        let hyperparameters = json!({
            "training_type": "full", "n_epochs": 8, "batch_size": 8, "learning_rate": 1e-4,
            "warmup_ratio": 0.1
        });
        let file_id = file["id"].as_str().unwrap();
        let finished = run_job(&app, &job("minilm", file_id, held_out["id"].as_str(), hyperparameters)).await;
        let model = finished["fine_tuned_model"].as_str().unwrap();

        // The metrics events and the results file carry the task's validation metrics.
        let events = all_events(&app, finished["id"].as_str().unwrap()).await;
        let evaluated: Vec<&Value> =
            events.iter().filter(|e| e["type"] == "metrics" && e["data"].get("valid_macro_f1").is_some()).collect();
        assert!(!evaluated.is_empty(), "no metrics event carries valid_macro_f1");
        let csv = results_csv(&app, &finished).await;
        assert!(csv.lines().next().unwrap().contains("valid_accuracy,valid_macro_f1"), "{csv}");

        // Held-out questions (never trained on) are classified right.
        let inputs: Vec<&str> = HELD_OUT.iter().map(|(_, t)| *t).collect();
        let response =
            app.post_json("/v1/classifications", &json!({"model": model, "input": inputs, "top_k": 2}), None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let body = response.json();
        let data = body["data"].as_array().unwrap();
        let right = data.iter().zip(HELD_OUT).filter(|(d, (label, _))| d["label"] == *label).count();
        let accuracy = right as f64 / HELD_OUT.len() as f64;
        eprintln!("minilm intent classifier {backend:?}: held-out accuracy {accuracy:.3} ({right}/{})", HELD_OUT.len());
        assert!(accuracy >= 0.9, "{backend:?}: held-out accuracy {accuracy}: {body}");
        assert_eq!(data[0]["scores"].as_array().unwrap().len(), 2);
        let score = data[0]["score"].as_f64().unwrap();
        assert!(score > 0.0 && score <= 1.0);
        assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 12);

        // The fine-tuned model is a transformers directory with the labels in its config.
        let downloaded = crate::jobs_e2e::download_tar(&app, model, "").await;
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(downloaded.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "BertForSequenceClassification");
        assert_eq!(config["id2label"]["0"], "account");
        assert_eq!(config["label2id"]["shipping"], 2);

        // A classifier does not embed, and an encoder does not chat.
        let response = app.post_json("/v1/embeddings", &json!({"model": model, "input": "hello"}), None).await;
        response.assert_error(StatusCode::BAD_REQUEST, "model_not_supported");
        let chat = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        app.post_json("/v1/chat/completions", &chat, None)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "model_not_supported");
    }
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test]
async fn minilm_embeddings_equal_sentence_transformers() {
    let Some(dir) = minilm() else { return };
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(encoder_fixture("minilm_vectors.json")).unwrap()).unwrap();
    let sentences = reference["sentences"].clone();
    let expected: Vec<Vec<f64>> = serde_json::from_value(reference["vectors"].clone()).unwrap();
    let app = app_with(&[("minilm", dir)], crate::helpers::Backend::SqliteLocal).await;
    let response = app.post_json("/v1/embeddings", &json!({"model": "minilm", "input": sentences}), None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let body = response.json();
    let mut worst = 1.0f64;
    for (item, expected) in body["data"].as_array().unwrap().iter().zip(&expected) {
        let ours: Vec<f64> = serde_json::from_value(item["embedding"].clone()).unwrap();
        assert_eq!(ours.len(), 384);
        worst = worst.min(cosine(&ours, expected));
    }
    eprintln!("minilm embeddings: lowest cosine to sentence-transformers over 10 sentences {worst:.7}");
    assert!(worst >= 0.9999, "lowest cosine {worst}");
    assert_eq!(body["data"].as_array().unwrap().len(), 10);

    // base64: the same floats, little-endian.
    let one = json!({"model": "minilm", "input": "How do I reset my password?", "encoding_format": "base64"});
    let response = app.post_json("/v1/embeddings", &one, None).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let encoded = response.json()["data"][0]["embedding"].as_str().unwrap().to_string();
    let bytes = decode_base64(&encoded);
    let floats: Vec<f64> = bytes.chunks(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect();
    assert!(cosine(&floats, &expected[0]) >= 0.9999);

    // What the API refuses, with the parameter named.
    let cases = [
        (json!({"model": "minilm", "input": "x", "dimensions": 128}), "unsupported_parameter", "dimensions"),
        (json!({"model": "minilm", "input": [101, 102]}), "invalid_request", "input"),
        (json!({"model": "minilm", "input": ""}), "invalid_request", "input"),
        (json!({"model": "minilm", "input": "x", "encoding_format": "int8"}), "invalid_request", "encoding_format"),
        (json!({"model": "tiny-llama", "input": "x"}), "model_not_supported", "model"),
        (json!({"model": "minilm", "input": "word ".repeat(600)}), "context_length_exceeded", "input"),
    ];
    for (body, code, param) in cases {
        let error = app.post_json("/v1/embeddings", &body, None).await.assert_error(StatusCode::BAD_REQUEST, code);
        assert_eq!(error["param"], param, "{error}");
    }
    let long = json!({"model": "minilm", "input": "word ".repeat(600), "truncate": true});
    assert_eq!(app.post_json("/v1/embeddings", &long, None).await.status, StatusCode::OK);
    let classify = json!({"model": "minilm", "input": "x"});
    app.post_json("/v1/classifications", &classify, None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "model_not_supported");
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &c)| n | (u32::from(value(c)) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

const NER: [(&[&str], &[&str]); 6] = [
    (&["alice", "met", "bob", "in", "berlin"], &["B-PER", "O", "B-PER", "O", "B-LOC"]),
    (&["paris", "is", "the", "capital", "of", "france"], &["B-LOC", "O", "O", "O", "O", "B-LOC"]),
    (&["bob", "moved", "to", "paris"], &["B-PER", "O", "O", "B-LOC"]),
    (&["alice", "is", "in", "france"], &["B-PER", "O", "O", "B-LOC"]),
    (&["the", "invoice", "was", "charged"], &["O", "O", "O", "O"]),
    (&["berlin", "and", "paris"], &["B-LOC", "O", "B-LOC"]),
];

#[tokio::test]
async fn tiny_encoders_train_token_classification_and_embeddings_through_jobs() {
    for backend in backends() {
        let app = app_with(
            &[("tiny-bert", encoder_fixture("bert-ner")), ("tiny-embed", encoder_fixture("bert-embed"))],
            backend,
        )
        .await;
        // Token classification with LoRA.
        let lines: Vec<String> =
            (0..4).flat_map(|_| NER.iter()).map(|(t, g)| json!({"tokens": t, "tags": g}).to_string()).collect();
        let file = app.upload_dataset("ner.jsonl", &(lines.join("\n") + "\n"), None).await;
        let held = app.upload_dataset("ner-val.jsonl", &(lines[..6].join("\n") + "\n"), None).await;
        let hyperparameters = json!({"n_epochs": 6, "batch_size": 4, "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8},
                   "early_stopping": {"patience": 100, "metric": "f1"}, "n_checkpoints": 2});
        let finished =
            run_job(&app, &job("tiny-bert", file["id"].as_str().unwrap(), held["id"].as_str(), hyperparameters)).await;
        let model = finished["fine_tuned_model"].as_str().unwrap();
        let events = all_events(&app, finished["id"].as_str().unwrap()).await;
        assert!(
            events.iter().any(|e| e["type"] == "metrics" && e["data"].get("valid_f1").is_some()),
            "valid_f1 reported"
        );
        let response = app
            .post_json("/v1/classifications", &json!({"model": model, "input": "alice met bob in paris"}), None)
            .await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let result = &response.json()["data"][0];
        assert_eq!(result["object"], "token_classification", "{result}");
        let tokens = result["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty());
        for token in tokens {
            let (start, end) = (token["start"].as_u64().unwrap() as usize, token["end"].as_u64().unwrap() as usize);
            assert_eq!(token["text"].as_str().unwrap(), &"alice met bob in paris"[start..end], "{token}");
        }
        // Its checkpoints serve too (LoRA factors and the head, with the job's labels).
        let checkpoints = app
            .get(&format!("/v1/fine_tuning/jobs/{}/checkpoints", finished["id"].as_str().unwrap()), None)
            .await
            .json();
        let checkpoints = checkpoints["data"].as_array().unwrap();
        assert!(!checkpoints.is_empty());
        for checkpoint in checkpoints {
            let name = checkpoint["fine_tuned_model_checkpoint"].as_str().unwrap();
            let body = json!({"model": name, "input": "bob is in berlin"});
            let response = app.post_json("/v1/classifications", &body, None).await;
            assert_eq!(response.status, StatusCode::OK, "{name}: {}", response.text());
            assert_eq!(response.json()["data"][0]["object"], "token_classification");
        }
        let adapter = crate::jobs_e2e::download_tar(&app, model, "").await;
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.path().join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["task_type"], "TOKEN_CLS");
        assert_eq!(config["modules_to_save"], json!(["classifier"]));
        // Merged, it is a transformers token classifier with the job's labels; a checkpoint
        // downloads as its adapter (with task.json) or merged.
        let merged = crate::jobs_e2e::download_tar(&app, model, "?format=merged").await;
        let config = read_json(&merged.path().join("config.json"));
        assert_eq!(config["architectures"][0], "BertForTokenClassification");
        assert_eq!(config["label2id"]["B-LOC"], 0, "{config}");
        assert!(merged.path().join("model.safetensors").exists() && merged.path().join("tokenizer.json").exists());
        assert_eq!(read_json(&merged.path().join("task.json"))["task"], "token_classification");
        let checkpoint = checkpoints[0]["fine_tuned_model_checkpoint"].as_str().unwrap();
        let adapter = crate::jobs_e2e::download_tar(&app, checkpoint, "").await;
        assert_eq!(read_json(&adapter.path().join("adapter_config.json"))["task_type"], "TOKEN_CLS");
        assert_eq!(read_json(&adapter.path().join("task.json"))["task"], "token_classification");
        let merged = crate::jobs_e2e::download_tar(&app, checkpoint, "?format=merged").await;
        assert_eq!(read_json(&merged.path().join("config.json"))["architectures"][0], "BertForTokenClassification");

        // Embeddings with bottleneck adapters, from anchor/positive pairs.
        let pairs: Vec<String> = (0..3)
            .flat_map(|_| NER.iter())
            .map(|(t, _)| {
                json!({"anchor": t.join(" "), "positive": t.iter().rev().copied().collect::<Vec<_>>().join(" ")})
                    .to_string()
            })
            .collect();
        let file = app.upload_dataset("pairs.jsonl", &(pairs.join("\n") + "\n"), None).await;
        assert_eq!(file["format"], "embedding", "{file}");
        let hyperparameters = json!({"training_type": "bottleneck", "adapter_size": 8, "n_epochs": 2, "batch_size": 6,
                                     "learning_rate": 1e-3});
        let held = app.upload_dataset("pairs-val.jsonl", &(pairs[..6].join("\n") + "\n"), None).await;
        let finished =
            run_job(&app, &job("tiny-embed", file["id"].as_str().unwrap(), held["id"].as_str(), hyperparameters)).await;
        let events = all_events(&app, finished["id"].as_str().unwrap()).await;
        assert!(events.iter().any(|e| e["data"].get("valid_recall_at_1").is_some()), "recall@1 reported");
        let model = finished["fine_tuned_model"].as_str().unwrap();
        let response =
            app.post_json("/v1/embeddings", &json!({"model": model, "input": ["alice met bob", "paris"]}), None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        let vector: Vec<f64> = serde_json::from_value(response.json()["data"][1]["embedding"].clone()).unwrap();
        assert_eq!(vector.len(), 32);
        assert!((vector.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4, "normalized");
        // Bottleneck layers cannot be merged; the adapter downloads as trained.
        let merged = app.get(&format!("/v1/models/{model}/content?format=merged"), None).await;
        let error = merged.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        assert_eq!(error["param"], "format");
        let adapter = crate::jobs_e2e::download_tar(&app, model, "").await;
        assert!(ferrotune::models::bottleneck::is_bottleneck_dir(adapter.path()));
    }
}

#[tokio::test]
async fn impossible_model_and_data_pairs_are_refused_when_the_job_is_created() {
    let app = app_with(&[("tiny-bert", encoder_fixture("bert-cls"))], crate::helpers::Backend::SqliteLocal).await;
    let chat = crate::jobs_e2e::upload_qa(&app).await;
    let classification = app
        .upload_dataset("c.jsonl", "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"y\"}\n", None)
        .await;
    let classification = classification["id"].as_str().unwrap();
    for (model, file) in [("tiny-bert", chat.as_str()), ("tiny-llama", classification)] {
        let response = app.post_json("/v1/fine_tuning/jobs", &job(model, file, None, json!({})), None).await;
        let error = response.assert_error(StatusCode::BAD_REQUEST, "invalid_file_format");
        assert_eq!(error["param"], "training_file", "{error}");
    }
    let mut dpo = job("tiny-bert", classification, None, json!({}));
    dpo["method"] = json!({"type": "dpo", "dpo": {"hyperparameters": {}}});
    app.post_json("/v1/fine_tuning/jobs", &dpo, None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "model_not_supported");
    // A training type encoders cannot use is refused before any work, naming the field.
    let qlora = job("tiny-bert", classification, None, json!({"training_type": "qlora"}));
    let response = app.post_json("/v1/fine_tuning/jobs", &qlora, None).await;
    let error = response.assert_error(StatusCode::BAD_REQUEST, "invalid_hyperparameters");
    assert_eq!(error["param"], "method.supervised.hyperparameters.training_type", "{error}");
    let jobs = app.get("/v1/fine_tuning/jobs", None).await.json();
    assert!(jobs["data"].as_array().unwrap().is_empty(), "no job was recorded: {jobs}");
}
