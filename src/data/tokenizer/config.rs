//! What transformers reads from a tokenizer directory besides `tokenizer.json`: the named special
//! tokens and the chat templates, with transformers 5's precedence rules.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::data::DataError;

/// The special tokens (`bos_token` → `<s>`...) and named chat templates of a tokenizer directory.
#[derive(Debug, Default)]
pub(super) struct TokenizerSettings {
    pub special_tokens: Vec<(String, String)>,
    pub templates: Vec<(String, String)>,
}

pub(super) fn read_settings(dir: &Path) -> Result<TokenizerSettings, DataError> {
    let config = read_json_object(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
    let mut special_tokens = named_tokens(&config);
    // Legacy layout: special tokens in their own file, consulted (and winning) only when the config
    // does not list its added tokens, as in transformers.
    if !config.contains_key("added_tokens_decoder") {
        if let Some(legacy) = read_json_object(&dir.join("special_tokens_map.json"))? {
            for (name, content) in named_tokens(&legacy) {
                set_token(&mut special_tokens, name, content);
            }
        }
    }
    let mut templates = template_files(dir)?;
    if templates.is_empty() {
        templates = config_templates(&config, &dir.join("tokenizer_config.json"))?;
    }
    Ok(TokenizerSettings { special_tokens, templates })
}

/// transformers 5 passes every `*_token` entry whose value is a token (a string, or an added-token
/// object with `content`) to the template, plus the named entries of an `extra_special_tokens`
/// object. A list of `additional_special_tokens`/`extra_special_tokens` is not passed.
fn named_tokens(config: &Map<String, Value>) -> Vec<(String, String)> {
    let mut tokens = Vec::new();
    let extra = config.get("extra_special_tokens").and_then(Value::as_object);
    let named = config.iter().filter(|(key, _)| key.ends_with("_token")).chain(extra.into_iter().flatten());
    for (name, value) in named {
        let content = match value {
            Value::String(s) => Some(s.as_str()),
            Value::Object(token) => token.get("content").and_then(Value::as_str),
            _ => None,
        };
        if let Some(content) = content {
            set_token(&mut tokens, name.clone(), content.to_string());
        }
    }
    tokens
}

fn set_token(tokens: &mut Vec<(String, String)>, name: String, content: String) {
    match tokens.iter_mut().find(|(n, _)| *n == name) {
        Some(entry) => entry.1 = content,
        None => tokens.push((name, content)),
    }
}

/// `chat_template.jinja` (the default) and `additional_chat_templates/<name>.jinja`, which
/// transformers 5 writes instead of config entries and which take priority over them.
fn template_files(dir: &Path) -> Result<Vec<(String, String)>, DataError> {
    let mut templates = Vec::new();
    if let Some(source) = read_optional(&dir.join("chat_template.jinja"))? {
        templates.push(("default".to_string(), source));
    }
    let extra_dir = dir.join("additional_chat_templates");
    let entries = match std::fs::read_dir(&extra_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(templates),
        Err(source) => return Err(DataError::Io { path: extra_dir, source }),
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".jinja"));
        if let Some(name) = name {
            let source =
                std::fs::read_to_string(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
            templates.push((name.to_string(), source));
        }
    }
    Ok(templates)
}

/// `chat_template` in the config: one template, or a list of `{"name", "template"}`.
fn config_templates(config: &Map<String, Value>, path: &Path) -> Result<Vec<(String, String)>, DataError> {
    let invalid = |message: &str| DataError::InvalidFile { path: path.to_path_buf(), message: message.to_string() };
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(source)) => Ok(vec![("default".to_string(), source.clone())]),
        Some(Value::Array(entries)) => entries
            .iter()
            .map(|entry| {
                let name = entry.get("name").and_then(Value::as_str);
                let source = entry.get("template").and_then(Value::as_str);
                match (name, source) {
                    (Some(name), Some(source)) => Ok((name.to_string(), source.to_string())),
                    _ => Err(invalid("each chat_template entry needs a `name` and a `template` string")),
                }
            })
            .collect(),
        Some(_) => Err(invalid("chat_template must be a string or a list of {name, template}")),
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, DataError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DataError::Io { path: path.to_path_buf(), source }),
    }
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>, DataError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(DataError::InvalidFile { path: path.to_path_buf(), message: "not a JSON object".into() }),
        Err(e) => Err(DataError::InvalidFile { path: path.to_path_buf(), message: e.to_string() }),
    }
}
