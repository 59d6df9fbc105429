//! Test access to the transformers-generated fixtures in `tests/fixtures` (see its README and
//! `scripts/make_fixtures.py`): tiny tokenizers for four chat-template styles and reference renders.

use std::path::PathBuf;

use super::tokenizer::ChatTokenizer;

/// The fixture models whose tokenizers have chat templates.
pub(crate) const MODELS: [&str; 4] = ["llama", "llama3", "mistral", "qwen2"];

pub(crate) fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

pub(crate) fn model_dir(model: &str) -> PathBuf {
    fixtures_dir().join("models").join(model)
}

pub(crate) fn tokenizer(model: &str) -> ChatTokenizer {
    let dir = model_dir(model);
    ChatTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("loading the {model} fixture tokenizer: {e}"))
}

/// `chat_templates.json`: `models.<name>.{conversations, encodings, special_token_ids}`.
pub(crate) fn chat_templates() -> serde_json::Value {
    let path = fixtures_dir().join("chat_templates.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("chat_templates.json is JSON")
}

/// A JSON array of token ids as `Vec<u32>`.
pub(crate) fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of ids")
        .iter()
        .map(|id| u32::try_from(id.as_u64().expect("an id")).expect("a u32 id"))
        .collect()
}
