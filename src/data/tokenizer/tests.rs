use std::path::Path;

use serde_json::{json, Value};

use super::*;
use crate::data::fixtures::{self, ids, MODELS};

fn conversations(reference: &Value, model: &str) -> Vec<Value> {
    reference["models"][model]["conversations"].as_array().expect("conversations").clone()
}

#[test]
fn fixture_conversations_render_exactly_like_transformers() {
    let reference = fixtures::chat_templates();
    for model in MODELS {
        let tok = fixtures::tokenizer(model);
        for case in conversations(&reference, model) {
            let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();

            let text = tok.apply_chat_template(&case["messages"], None, add_generation_prompt).unwrap();

            assert_eq!(text, case["text"].as_str().unwrap(), "{model} / {}", case["name"]);
        }
    }
}

#[test]
fn rendered_conversations_tokenize_to_the_reference_ids() {
    let reference = fixtures::chat_templates();
    for model in MODELS {
        let tok = fixtures::tokenizer(model);
        for case in conversations(&reference, model) {
            let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
            let text = tok.apply_chat_template(&case["messages"], None, add_generation_prompt).unwrap();

            let encoded = tok.encode(&text, false).unwrap();

            assert_eq!(encoded, ids(&case["ids"]), "{model} / {}", case["name"]);
        }
    }
}

#[test]
fn plain_text_encodings_and_decodings_match_transformers() {
    let reference = fixtures::chat_templates();
    for model in MODELS {
        let tok = fixtures::tokenizer(model);
        for case in reference["models"][model]["encodings"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();

            let with_special = tok.encode(text, true).unwrap();
            let without = tok.encode(text, false).unwrap();
            let tokens = tok.inner().encode(text, false).unwrap().get_tokens().to_vec();
            let decoded = tok.decode(&with_special, false).unwrap();

            assert_eq!(with_special, ids(&case["ids_add_special_tokens_true"]), "{model} / {text:?}");
            assert_eq!(without, ids(&case["ids_add_special_tokens_false"]), "{model} / {text:?}");
            assert_eq!(Value::from(tokens), case["tokens_add_special_tokens_false"], "{model} / {text:?}");
            assert_eq!(decoded, case["decoded_add_special_tokens_true"].as_str().unwrap(), "{model} / {text:?}");
        }
    }
}

#[test]
fn special_token_ids_come_from_the_config() {
    let reference = fixtures::chat_templates();
    for model in MODELS {
        let tok = fixtures::tokenizer(model);
        let expected = &reference["models"][model]["special_token_ids"];
        let id = |token: &str| expected[token].as_u64().map(|id| id as u32);

        assert_eq!(tok.bos_token_id(), id("<s>"), "{model}");
        assert_eq!(tok.eos_token_id(), id("</s>"), "{model}");
        assert_eq!(tok.pad_token_id(), id("<pad>"), "{model}");
        for (token, _) in expected.as_object().unwrap() {
            assert_eq!(tok.token_to_id(token), id(token), "{model} / {token}");
        }
    }
}

#[test]
fn offsets_are_byte_spans_of_the_text_and_empty_for_added_bos() {
    let tok = fixtures::tokenizer("llama");
    let text = "héllo wörld </s> 日本";

    let (ids, offsets) = tok.encode_with_offsets(text, true).unwrap();

    assert_eq!(ids.len(), offsets.len());
    assert_eq!((ids[0], offsets[0]), (tok.bos_token_id().unwrap(), (0, 0)));
    let eos_at = ids.iter().position(|&id| Some(id) == tok.eos_token_id()).unwrap();
    assert_eq!(&text[offsets[eos_at].0..offsets[eos_at].1], "</s>");
    assert_eq!(offsets.last().unwrap().1, text.len());
    assert!(offsets.windows(2).all(|w| w[0].0 <= w[1].0 && w[1].1 <= text.len()));
}

/// A tokenizer directory with the llama fixture's `tokenizer.json` and the given config files.
fn tokenizer_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures::model_dir("llama").join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

#[test]
fn a_chat_template_jinja_file_takes_priority_over_the_config() {
    let config = json!({
        "chat_template": "from the config",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": true},
    });
    let dir = tokenizer_dir(&[
        ("tokenizer_config.json", &config.to_string()),
        ("chat_template.jinja", "from the file {{ eos_token }}"),
    ]);

    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();

    assert_eq!(tok.apply_chat_template(&json!([]), None, false).unwrap(), "from the file </s>");
}

#[test]
fn a_list_of_named_templates_renders_with_the_default_one() {
    let config = json!({"chat_template": [
        {"name": "rag", "template": "rag"},
        {"name": "default", "template": "default {{ bos_token }}"},
    ], "bos_token": "<s>"});
    let dir = tokenizer_dir(&[("tokenizer_config.json", &config.to_string())]);

    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();

    assert_eq!(tok.apply_chat_template(&json!([]), None, false).unwrap(), "default <s>");
}

#[test]
fn the_pad_token_falls_back_to_eos() {
    let dir = tokenizer_dir(&[("tokenizer_config.json", r#"{"eos_token": "</s>"}"#)]);

    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();

    assert_eq!(tok.pad_token_id(), tok.token_to_id("</s>"));
    assert_eq!(tok.bos_token_id(), None);
    assert!(!tok.has_chat_template());
    assert!(matches!(tok.apply_chat_template(&json!([]), None, false), Err(DataError::MissingTemplate)));
}

#[test]
fn truncation_stored_in_tokenizer_json_is_ignored() {
    let source = fixtures::model_dir("llama").join("tokenizer.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
    json["truncation"] = json!({"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0});
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();

    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();

    assert!(tok.encode("the cat and the dog run to the river", false).unwrap().len() > 3);
}

#[test]
fn a_missing_tokenizer_json_is_an_io_error_naming_the_file() {
    let err = ChatTokenizer::from_dir(Path::new("/nonexistent/model")).err().unwrap();

    assert!(matches!(&err, DataError::Io { path, .. } if path.ends_with("tokenizer.json")), "{err:?}");
}

#[test]
fn byte_level_token_bytes_add_up_to_the_text_even_inside_a_character() {
    let text = "naïve café: 世界 🙂 ok";
    for model in MODELS {
        let tok = fixtures::tokenizer(model);
        let ids = tok.encode(text, false).unwrap();
        let pieces: Vec<Vec<u8>> = ids.iter().map(|&id| tok.token_bytes(id)).collect();
        // The tiny fixture vocabularies split most non-ASCII characters into single bytes.
        assert!(pieces.iter().any(|p| std::str::from_utf8(p).is_err()), "{model}: no partial character to check");
        assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap().as_bytes(), "{model}");
    }
}

#[test]
fn added_tokens_are_their_own_text() {
    let tok = fixtures::tokenizer("qwen2");
    let id = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(tok.token_bytes(id), b"<|im_start|>");
}

/// A SentencePiece-style BPE as Llama 2's and Mistral's tokenizer.json have it: `▁` for spaces,
/// `<0xHH>` byte pieces, and a decoder that replaces, falls back to bytes, fuses and strips.
fn sentencepiece_style() -> ChatTokenizer {
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": {"<s>": 0, "<0xE2>": 1, "<0x82>": 2, "<0xAC>": 3, "\u{2581}Hello": 4, "\u{2581}": 5},
            "merges": []}
    });
    let tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
    ChatTokenizer::new(tokenizer, Vec::new(), Vec::new()).unwrap()
}

#[test]
fn sentencepiece_byte_pieces_are_their_byte_and_spaces_are_spaces() {
    let tok = sentencepiece_style();
    assert_eq!(tok.token_bytes(1), vec![0xE2]);
    assert_eq!(tok.token_bytes(2), vec![0x82]);
    assert_eq!(tok.token_bytes(4), b" Hello");
    assert_eq!(tok.token_bytes(0), b"<s>");
    assert_eq!([tok.token_bytes(1), tok.token_bytes(2), tok.token_bytes(3)].concat(), "€".as_bytes());
    assert_eq!(tok.decode(&[1, 2, 3], false).unwrap(), "€");
}
