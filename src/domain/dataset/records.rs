//! One JSONL record: detect its format from its keys and check its fields.

use serde::Serialize;
use serde_json::{Map, Value};

use super::messages::{check_assistant_outputs, check_messages, check_tools, MessageRules};

/// The dataset formats we train on; one per file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `{"messages": [...], "tools"?: [...]}`
    Chat,
    /// `{"prompt": "...", "completion": "..."}`
    PromptCompletion,
    /// `{"text": "..."}`: continued pre-training / domain adaptation.
    Text,
    /// `{"text": "...", "text_pair"?: "...", "label": "..." | 3}`
    Classification,
    /// `{"tokens": [...], "tags": [...]}`
    TokenClassification,
    /// `{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}`
    Preference,
    /// `{"anchor": "...", "positive": "..."}`: embedding fine-tuning with in-batch negatives.
    Embedding,
}

impl DatasetFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::PromptCompletion => "prompt_completion",
            Self::Text => "text",
            Self::Classification => "classification",
            Self::TokenClassification => "token_classification",
            Self::Preference => "preference",
            Self::Embedding => "embedding",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Chat,
            Self::PromptCompletion,
            Self::Text,
            Self::Classification,
            Self::TokenClassification,
            Self::Preference,
            Self::Embedding,
        ]
        .into_iter()
        .find(|f| f.as_str() == text)
    }

    pub fn human_name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::PromptCompletion => "prompt/completion",
            Self::Text => "plain text",
            Self::Classification => "classification",
            Self::TokenClassification => "token classification",
            Self::Preference => "preference",
            Self::Embedding => "embedding pair",
        }
    }

    /// Whether encoder models (not decoders) train on this format.
    pub fn for_encoders(self) -> bool {
        matches!(self, Self::Classification | Self::TokenClassification | Self::Embedding)
    }

    /// The code for a record that lacks this format's defining key.
    pub(super) fn missing_key_code(self) -> &'static str {
        match self {
            Self::Chat => "missing_messages",
            Self::PromptCompletion => "missing_prompt",
            Self::Text | Self::Classification => "missing_text",
            Self::TokenClassification => "missing_tokens",
            Self::Preference => "missing_input",
            Self::Embedding => "missing_anchor",
        }
    }

    pub(super) fn shape_hint(self) -> &'static str {
        match self {
            Self::Chat => "expected {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}",
            Self::PromptCompletion => "expected {\"prompt\": \"...\", \"completion\": \"...\"}",
            Self::Text => "expected {\"text\": \"...\"}",
            Self::Classification => "expected {\"text\": \"...\", \"label\": ...}",
            Self::TokenClassification => "expected {\"tokens\": [...], \"tags\": [...]}",
            Self::Preference => {
                "expected {\"input\": {\"messages\": [...]}, \"preferred_output\": [...], \"non_preferred_output\": [...]}"
            }
            Self::Embedding => "expected {\"anchor\": \"...\", \"positive\": \"...\"}",
        }
    }
}

pub(super) const UNRECOGNIZED_MESSAGE: &str = "the record matches no dataset format; expected one of \
    {\"messages\": [...]} (chat), {\"prompt\", \"completion\"}, {\"text\"}, {\"text\", \"label\"}, \
    {\"tokens\", \"tags\"}, {\"anchor\", \"positive\"} or {\"input\", \"preferred_output\", \"non_preferred_output\"}";

/// Why one record is invalid. `format` is the format its keys point to, when they point to one.
#[derive(Debug)]
pub(super) struct LineError {
    pub format: Option<DatasetFormat>,
    pub field: Option<String>,
    pub code: &'static str,
    pub message: String,
}

impl LineError {
    pub fn new(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { format: None, field: Some(field.into()), code, message: message.into() }
    }

    fn in_format(mut self, format: DatasetFormat) -> Self {
        self.format = Some(format);
        self
    }
}

/// Checks one non-blank line. `Ok(None)`: valid JSON object of no recognisable format.
pub(super) fn check_line(raw: &[u8]) -> Result<Option<DatasetFormat>, LineError> {
    let text = std::str::from_utf8(raw).map_err(|e| LineError {
        format: None,
        field: None,
        code: "invalid_utf8",
        message: format!("the line is not valid UTF-8 (at byte {})", e.valid_up_to()),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| LineError {
        format: None,
        field: None,
        code: "invalid_json",
        message: format!("the line is not valid JSON: {e}"),
    })?;
    let Value::Object(record) = value else {
        return Err(LineError {
            format: None,
            field: None,
            code: "not_an_object",
            message: format!("each line must be a JSON object, found {}", type_name(&value)),
        });
    };
    let Some(format) = detect_format(&record) else {
        return Ok(None);
    };
    check_record(format, &record).map(|()| Some(format)).map_err(|e| e.in_format(format))
}

fn detect_format(record: &Map<String, Value>) -> Option<DatasetFormat> {
    let has = |key: &str| record.contains_key(key);
    if has("messages") {
        Some(DatasetFormat::Chat)
    } else if has("input") || has("preferred_output") || has("non_preferred_output") {
        Some(DatasetFormat::Preference)
    } else if has("prompt") || has("completion") {
        Some(DatasetFormat::PromptCompletion)
    } else if has("anchor") || has("positive") {
        Some(DatasetFormat::Embedding)
    } else if has("tokens") || has("tags") {
        Some(DatasetFormat::TokenClassification)
    } else if has("label") || has("text_pair") {
        Some(DatasetFormat::Classification)
    } else if has("text") {
        Some(DatasetFormat::Text)
    } else {
        None
    }
}

fn check_record(format: DatasetFormat, record: &Map<String, Value>) -> Result<(), LineError> {
    match format {
        DatasetFormat::Chat => {
            check_messages(record.get("messages"), "messages", MessageRules::CHAT)?;
            check_tools(record.get("tools"), "tools")
        }
        DatasetFormat::PromptCompletion => {
            required_string(record, "prompt", "missing_prompt", "invalid_prompt")?;
            let completion = required_string(record, "completion", "missing_completion", "invalid_completion")?;
            if completion.is_empty() {
                return Err(LineError::new(
                    "empty_completion",
                    "completion",
                    "`completion` is empty: there is nothing to learn",
                ));
            }
            Ok(())
        }
        DatasetFormat::Text => non_empty_text(record),
        DatasetFormat::Classification => {
            non_empty_text(record)?;
            if let Some(pair) = record.get("text_pair") {
                if !pair.is_string() {
                    return Err(LineError::new(
                        "invalid_text_pair",
                        "text_pair",
                        format!("`text_pair` must be a string, found {}", type_name(pair)),
                    ));
                }
            }
            match record.get("label") {
                None | Some(Value::Null) => {
                    Err(LineError::new("missing_label", "label", "a classification example needs a `label`"))
                }
                Some(Value::String(s)) if !s.is_empty() => Ok(()),
                Some(Value::Number(n)) if n.is_u64() => Ok(()),
                Some(other) => Err(LineError::new(
                    "invalid_label",
                    "label",
                    format!("`label` must be a non-empty string or a non-negative integer, found {}", describe(other)),
                )),
            }
        }
        DatasetFormat::TokenClassification => check_token_tags(record),
        DatasetFormat::Preference => check_preference(record),
        DatasetFormat::Embedding => {
            for key in ["anchor", "positive"] {
                let code = if key == "anchor" { "missing_anchor" } else { "missing_positive" };
                let text = required_string(record, key, code, "invalid_text")?;
                if text.trim().is_empty() {
                    return Err(LineError::new("empty_text", key, format!("`{key}` is empty")));
                }
            }
            Ok(())
        }
    }
}

fn check_token_tags(record: &Map<String, Value>) -> Result<(), LineError> {
    let tokens = match record.get("tokens") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        None => {
            return Err(LineError::new("missing_tokens", "tokens", "a token classification example needs `tokens`"))
        }
        Some(_) => {
            return Err(LineError::new("invalid_tokens", "tokens", "`tokens` must be a non-empty array of strings"))
        }
    };
    if let Some(i) = tokens.iter().position(|t| !t.is_string()) {
        return Err(LineError::new("invalid_tokens", format!("tokens[{i}]"), "every token must be a string"));
    }
    let tags = match record.get("tags") {
        Some(Value::Array(items)) => items,
        None => return Err(LineError::new("missing_tags", "tags", "a token classification example needs `tags`")),
        Some(_) => return Err(LineError::new("invalid_tags", "tags", "`tags` must be an array")),
    };
    if let Some(i) = tags.iter().position(|t| !(t.as_str().is_some_and(|s| !s.is_empty()) || t.is_u64())) {
        return Err(LineError::new(
            "invalid_tags",
            format!("tags[{i}]"),
            "every tag must be a non-empty string or a non-negative integer",
        ));
    }
    if tags.len() != tokens.len() {
        return Err(LineError::new(
            "tags_length_mismatch",
            "tags",
            format!("{} tokens but {} tags; there must be one tag per token", tokens.len(), tags.len()),
        ));
    }
    Ok(())
}

fn check_preference(record: &Map<String, Value>) -> Result<(), LineError> {
    let input = match record.get("input") {
        Some(Value::Object(input)) => input,
        None => {
            return Err(LineError::new("missing_input", "input", "a preference example needs `input` with `messages`"))
        }
        Some(other) => {
            return Err(LineError::new(
                "invalid_input",
                "input",
                format!("`input` must be an object with `messages`, found {}", type_name(other)),
            ))
        }
    };
    check_messages(input.get("messages"), "input.messages", MessageRules::PROMPT)?;
    check_tools(input.get("tools"), "input.tools")?;
    for key in ["preferred_output", "non_preferred_output"] {
        check_assistant_outputs(record.get(key), key)?;
    }
    if record.get("preferred_output") == record.get("non_preferred_output") {
        return Err(LineError::new(
            "identical_outputs",
            "non_preferred_output",
            "`preferred_output` and `non_preferred_output` are identical; a preference needs two different answers",
        ));
    }
    Ok(())
}

fn non_empty_text(record: &Map<String, Value>) -> Result<(), LineError> {
    let text = required_string(record, "text", "missing_text", "invalid_text")?;
    if text.trim().is_empty() {
        return Err(LineError::new("empty_text", "text", "`text` is empty"));
    }
    Ok(())
}

fn required_string<'a>(
    record: &'a Map<String, Value>,
    key: &str,
    missing: &'static str,
    invalid: &'static str,
) -> Result<&'a str, LineError> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(LineError::new(missing, key, format!("`{key}` is missing"))),
        Some(other) => {
            Err(LineError::new(invalid, key, format!("`{key}` must be a string, found {}", type_name(other))))
        }
    }
}

pub(super) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a value for messages: strings and numbers in full (clipped), others by type.
pub(super) fn describe(value: &Value) -> String {
    match value {
        Value::String(s) if s.chars().count() > 40 => {
            format!("{:?}…", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_string(),
    }
}
