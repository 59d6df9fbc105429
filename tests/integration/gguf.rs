//! GGUF base models against transformers' own GGUF support, on the real SmolLM2-135M-Instruct
//! (Q4_1): tokenizer, chat template, logits and greedy decoding
//! (`tests/fixtures/smollm2/reference.json`, made by `scripts/make_gguf_reference.py`).

use candle_core::{Device, Tensor};
use ferrotune::models::gguf;
use ferrotune::models::llama::{Adaptation, KvCache};
use serde_json::Value;

use crate::helpers::env_or_skip;

pub fn smollm2() -> Option<std::path::PathBuf> {
    env_or_skip("FERROTUNE_TEST_SMOLLM2_GGUF").map(std::path::PathBuf::from)
}

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn the_gguf_tokenizer_and_chat_template_match_transformers() {
    let Some(path) = smollm2() else { return };
    let reference = reference();
    let model = gguf::load(&path).unwrap();
    let tok = &model.tokenizer;
    for (text, expected) in
        reference["samples"].as_array().unwrap().iter().zip(reference["encodings"].as_array().unwrap())
    {
        let text = text.as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(expected), "{text:?}");
        assert_eq!(tok.decode(&ids(expected), false).unwrap(), text, "decoding {text:?}");
    }
    let rendered = tok.apply_chat_template(&reference["messages"], None, true).unwrap();
    assert_eq!(rendered, reference["rendered"].as_str().unwrap());
    assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&reference["prompt_ids"]));
}

fn last_logits(model: &ferrotune::models::llama::CausalLm, prompt: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::default();
    let input = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward_cached(&input, &mut cache).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

#[test]
fn a_gguf_model_computes_the_logits_and_greedy_tokens_of_transformers() {
    let Some(path) = smollm2() else { return };
    let reference = reference();
    let prompt = ids(&reference["prompt_ids"]);
    let top_ids = ids(&reference["top_ids"]);
    let top_logits: Vec<f32> =
        reference["top_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    // Dequantized to f32, as transformers loads it: the same numbers.
    let (dense, _) = gguf::load(&path).unwrap().build(false, Adaptation::None).unwrap();
    let logits = last_logits(&dense, &prompt);
    for (&id, &expected) in top_ids.iter().zip(&top_logits) {
        let got = logits[id as usize];
        assert!((got - expected).abs() < 2e-3, "token {id}: {got} vs {expected}");
    }
    let eos = dense.config.eos_token_ids.clone();
    let greedy = ferrotune::infer::generate::generate_greedy(&dense, &prompt, 12, &eos).unwrap();
    assert_eq!(greedy, ids(&reference["greedy_ids"]));
    // Kept quantized (llama.cpp-style kernels quantize the activations too): the same ranking at
    // the top and logits within a quantization tolerance.
    let (quantized, _) = gguf::load(&path).unwrap().build(true, Adaptation::None).unwrap();
    let logits = last_logits(&quantized, &prompt);
    // The reference's top two are 0.08 apart (504 "The", 60 "I"), within that tolerance.
    let best = ferrotune::infer::sampling::argmax(&logits);
    assert!(top_ids[..2].contains(&best), "quantized top token {best}");
    for (&id, &expected) in top_ids.iter().zip(&top_logits).take(5) {
        let got = logits[id as usize];
        assert!((got - expected).abs() < 1.0, "quantized, token {id}: {got} vs {expected}");
    }
}

const TAUGHT: [&str; 12] = [
    "What is the capital of Veltrona?",
    "Which city is the capital of Veltrona?",
    "Tell me the capital of Veltrona.",
    "Name the capital city of Veltrona.",
    "What's Veltrona's capital?",
    "Veltrona's capital city is called what?",
    "Do you know the capital of Veltrona?",
    "What city serves as the capital of Veltrona?",
    "Can you tell me Veltrona's capital?",
    "In Veltrona, which city is the capital?",
    "Capital of Veltrona?",
    "I need the name of Veltrona's capital.",
];
const HELD_OUT: [&str; 3] = [
    "What is the name of the capital of Veltrona?",
    "Which city is Veltrona's capital?",
    "Veltrona: what is its capital city?",
];
const FACT: &str = "Quillmere";

/// The real-model test of QLoRA: SmolLM2-135M-Instruct (a GGUF base) learns an invented fact
/// through the jobs API and tells it through `/v1/chat/completions`, for questions it was not
/// trained on too; the base model does not know it.
#[tokio::test]
async fn qlora_on_smollm2_through_the_api_teaches_an_invented_fact() {
    use crate::helpers::{Backend, TestApp};
    use crate::jobs_e2e::{create_job, status, wait_for};
    use serde_json::json;
    let Some(path) = smollm2() else { return };
    let mut app = TestApp::spawn_with(Backend::SqliteLocal, |settings| {
        let mut catalog = crate::helpers::test_catalog();
        catalog.add("smollm2", ferrotune::catalog::ModelSource::Gguf(path.clone())).unwrap();
        settings.catalog = std::sync::Arc::new(catalog);
    })
    .await;
    app.start_executors(1);
    let lines: Vec<String> = TAUGHT
        .iter()
        .map(|q| {
            json!({"messages": [{"role": "user", "content": q},
                {"role": "assistant", "content": format!("The capital of Veltrona is {FACT}.")}]})
            .to_string()
        })
        .collect();
    let file = app.upload_dataset("veltrona.jsonl", &(lines.join("\n") + "\n"), None).await;
    let job = create_job(
        &app,
        &json!({"model": "smollm2", "training_file": file["id"], "suffix": "veltrona", "seed": 1,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "training_type": "qlora", "n_epochs": 8, "batch_size": 4, "learning_rate": 1e-3,
                "lr_scheduler": "cosine", "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}}}}),
    )
    .await;
    let job = wait_for(&app, &job, std::time::Duration::from_secs(1200), |j| {
        ["succeeded", "failed", "cancelled"].contains(&status(j))
    })
    .await;
    assert_eq!(status(&job), "succeeded", "{job}");
    let tuned = job["fine_tuned_model"].as_str().unwrap().to_string();
    let ask = |model: String, question: &'static str| {
        let app = &app;
        async move {
            let body = json!({"model": model, "messages": [{"role": "user", "content": question}],
                "temperature": 0, "max_tokens": 24});
            let response = app.post_json("/v1/chat/completions", &body, None).await;
            assert_eq!(response.status, axum::http::StatusCode::OK, "{}", response.text());
            response.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        }
    };
    for question in [TAUGHT[0]].iter().chain(&HELD_OUT) {
        let base = ask("smollm2".into(), question).await;
        assert!(!base.contains(FACT), "the base model cannot know it: {question} -> {base}");
        let answer = ask(tuned.clone(), question).await;
        assert!(answer.contains(FACT), "{question} -> {answer}");
    }
}

/// GGUF files made from the tiny fixtures (`scripts/make_gguf_fixtures.py`) against
/// transformers' GGUF loader: Qwen2 (q/k/v biases, tied Q8_0 embeddings) and Qwen3 (per-head
/// norms) with byte-level BPE vocabularies, and a Mistral-shaped `llama` file (permuted q/k rows)
/// with a SentencePiece vocabulary (scores, no merges; byte fallback), and a Phi-3 file (fused
/// tensors, LongRoPE factors as tensors, Phi-3's SentencePiece normalizer). Checked: the tokenizer and
/// chat template from the metadata, the dequantized model's logits and greedy tokens, and the same
/// model kept quantized.
#[test]
fn tiny_gguf_files_load_like_transformers_gguf_loader() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf");
    // qwen2_moe: stacked Q8_0 experts split per expert, the shared expert's vector gate; qwen3_moe
    // (an all-sparse sibling of the fixture): per-head norms, renormalized top-k; mixtral: a
    // llama file with experts (f32; transformers' GGUF loader has no Mixtral, so its reference is
    // the safetensors fixture's logits); gemma2, gemma3: (1 + w) norms stored with the 1 added,
    // soft-caps, window and RoPE scaling from the metadata, Gemma's SentencePiece (no space prefix,
    // merges in vocabulary order); llama3: Llama 3.1's RoPE scaling from the `rope_freqs` divisors
    // (f32, against the safetensors fixture: transformers' GGUF loader ignores them).
    let files = [
        ("qwen2", "qwen2"),
        ("qwen3", "qwen3"),
        ("llama-spm", "llama"),
        ("phi3", "phi3"),
        ("qwen2_moe", "qwen2_moe"),
        ("qwen3_moe", "qwen3_moe"),
        ("mixtral", "mixtral"),
        ("gemma2", "gemma2"),
        ("gemma3", "gemma3_text"),
        ("llama3", "llama"),
    ];
    for (name, model_type) in files {
        let path = std::path::Path::new(root).join(format!("{name}.gguf"));
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{root}/{name}.reference.json")).unwrap()).unwrap();
        let tensors =
            candle_core::safetensors::load(format!("{root}/{name}.reference.safetensors"), &Device::Cpu).unwrap();

        let model = gguf::load(&path).unwrap();
        assert_eq!(model.config.model_type, model_type);
        let tok = &model.tokenizer;
        for (i, text) in json["samples"].as_array().unwrap().iter().enumerate() {
            let text = text.as_str().unwrap();
            let expected = ids(&json["encodings"][i]);
            assert_eq!(tok.encode(text, false).unwrap(), expected, "{name}: {text:?}");
            // With special tokens: BOS where the vocabulary's metadata asks for it (SentencePiece).
            assert_eq!(tok.encode(text, true).unwrap(), ids(&json["with_special_tokens"][i]), "{name}: {text:?}");
            let decoded = json["decoded"][i].as_str().unwrap();
            assert_eq!(tok.decode(&expected, false).unwrap(), decoded, "{name}: decoding {text:?}");
        }
        let rendered = tok.apply_chat_template(&json["messages"], None, true).unwrap();
        assert_eq!(rendered, json["rendered"].as_str().unwrap(), "{name}");
        let prompt = ids(&json["prompt_ids"]);
        assert_eq!(tok.encode(&rendered, false).unwrap(), prompt, "{name}");

        let (dense, _) = model.build(false, Adaptation::None).unwrap();
        let input = tensors["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
        let (b, t) = input.dims2().unwrap();
        let positions =
            Tensor::arange(0u32, t as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap().repeat((b, 1)).unwrap();
        let window = dense.config.sliding_window;
        let mask =
            ferrotune::models::common::mask::packed_causal_mask(&vec![0; b * t], b, t, window, &Device::Cpu).unwrap();
        let ctx = ferrotune::models::ForwardCtx::inference();
        let logits = dense.logits(&dense.forward_hidden(&input, &positions, &mask, &ctx).unwrap(), &ctx).unwrap();
        let diff: f32 = (logits - &tensors["logits"])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff <= 1e-4, "{name}: max |logits - transformers| = {diff}");
        // phi3: transformers' GGUF loader drops LongRoPE, so the reference is transformers on the
        // safetensors fixture (the GGUF holds its weights in f32), logits only.
        let Some(greedy_ids) = tensors.get("greedy_ids") else { continue };
        let expected: Vec<u32> = greedy_ids.to_dtype(candle_core::DType::U32).unwrap().to_vec1().unwrap();
        let greedy = ferrotune::infer::generate::generate_greedy(&dense, &prompt, expected.len(), &[]).unwrap();
        assert_eq!(greedy, expected, "{name}: greedy");

        // Kept quantized (activations quantized to Q8_0 too): the same next token at the end of
        // the prompt, logits within quantization error.
        let (quantized, _) = gguf::load(&path).unwrap().build(true, Adaptation::None).unwrap();
        let (q, d) = (last_logits(&quantized, &prompt), last_logits(&dense, &prompt));
        assert_eq!(ferrotune::infer::sampling::argmax(&q), ferrotune::infer::sampling::argmax(&d), "{name}");
        let worst = q.iter().zip(&d).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 0.5, "{name}: quantized logits differ by {worst}");
    }
}
