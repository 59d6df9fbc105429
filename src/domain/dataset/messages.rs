//! Chat messages, tool definitions and tool calls, as in OpenAI's chat fine-tuning format.

use serde_json::{Map, Value};

use super::records::{describe, type_name, LineError};

pub(super) const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
const MESSAGE_KEYS: [&str; 6] = ["role", "content", "name", "weight", "tool_calls", "tool_call_id"];

#[derive(Debug, Clone, Copy)]
pub(super) struct MessageRules {
    /// A chat example must contain an assistant message to learn from.
    pub require_assistant: bool,
}

impl MessageRules {
    pub const CHAT: Self = Self { require_assistant: true };
    /// The prompt of a preference example: the answers are given separately.
    pub const PROMPT: Self = Self { require_assistant: false };
}

pub(super) fn check_messages(value: Option<&Value>, field: &str, rules: MessageRules) -> Result<(), LineError> {
    let messages = match value {
        Some(Value::Array(items)) if !items.is_empty() => items,
        None | Some(Value::Null) => {
            return Err(LineError::new("missing_messages", field, format!("`{field}` is missing")))
        }
        Some(Value::Array(_)) => return Err(LineError::new("invalid_messages", field, format!("`{field}` is empty"))),
        Some(other) => {
            return Err(LineError::new(
                "invalid_messages",
                field,
                format!("`{field}` must be an array of messages, found {}", type_name(other)),
            ))
        }
    };
    let mut assistants = 0;
    let mut trainable = 0;
    for (i, message) in messages.iter().enumerate() {
        let path = format!("{field}[{i}]");
        let role = check_message(message, &path)?;
        if role == "assistant" {
            assistants += 1;
            if message.get("weight").and_then(Value::as_i64) != Some(0) {
                trainable += 1;
            }
        }
    }
    if rules.require_assistant && assistants == 0 {
        return Err(LineError::new(
            "no_assistant_message",
            field,
            "the example has no assistant message to learn from",
        ));
    }
    if rules.require_assistant && trainable == 0 {
        return Err(LineError::new(
            "no_trainable_message",
            field,
            "every assistant message has `weight: 0`, so the example teaches nothing",
        ));
    }
    Ok(())
}

/// Checks one message and returns its role.
fn check_message<'a>(message: &'a Value, path: &str) -> Result<&'a str, LineError> {
    let Value::Object(message) = message else {
        return Err(LineError::new(
            "invalid_message",
            path,
            format!("each message must be an object, found {}", type_name(message)),
        ));
    };
    if let Some(key) = message.keys().find(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
        return Err(LineError::new(
            "unrecognized_message_key",
            format!("{path}.{key}"),
            format!("unknown message key `{key}`; messages take {}", MESSAGE_KEYS.join(", ")),
        ));
    }
    let role = match message.get("role") {
        None | Some(Value::Null) => {
            return Err(LineError::new("missing_role", format!("{path}.role"), "the message has no `role`"))
        }
        Some(Value::String(role)) if ROLES.contains(&role.as_str()) => role.as_str(),
        Some(other) => {
            return Err(LineError::new(
                "unrecognized_role",
                format!("{path}.role"),
                format!("role {} is not one of {}", describe(other), ROLES.join(", ")),
            ))
        }
    };
    let has_tool_calls = role == "assistant" && message.contains_key("tool_calls");
    check_content(message.get("content"), &format!("{path}.content"), has_tool_calls)?;
    if let Some(weight) = message.get("weight") {
        if role != "assistant" {
            return Err(LineError::new(
                "invalid_weight",
                format!("{path}.weight"),
                "`weight` is only allowed on assistant messages",
            ));
        }
        if !matches!(weight.as_i64(), Some(0 | 1)) || weight.is_f64() {
            return Err(LineError::new(
                "invalid_weight",
                format!("{path}.weight"),
                format!("`weight` must be 0 or 1, found {}", describe(weight)),
            ));
        }
    }
    if let Some(name) = message.get("name") {
        if !name.is_string() {
            return Err(LineError::new("invalid_name", format!("{path}.name"), "`name` must be a string"));
        }
    }
    if let Some(calls) = message.get("tool_calls") {
        if role != "assistant" {
            return Err(LineError::new(
                "invalid_tool_calls",
                format!("{path}.tool_calls"),
                "`tool_calls` is only allowed on assistant messages",
            ));
        }
        check_tool_calls(calls, &format!("{path}.tool_calls"))?;
    }
    if role == "tool" && !message.get("tool_call_id").is_some_and(Value::is_string) {
        return Err(LineError::new(
            "missing_tool_call_id",
            format!("{path}.tool_call_id"),
            "a tool message needs the `tool_call_id` it answers",
        ));
    }
    Ok(role)
}

/// Content is a string or an array of `{"type": "text", "text": "..."}` parts. An assistant
/// message that calls tools may omit it.
fn check_content(content: Option<&Value>, path: &str, may_be_absent: bool) -> Result<(), LineError> {
    match content {
        None | Some(Value::Null) if may_be_absent => Ok(()),
        None | Some(Value::Null) => Err(LineError::new("missing_content", path, "the message has no `content`")),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(parts)) => {
            for (i, part) in parts.iter().enumerate() {
                let is_text = part.get("type").and_then(Value::as_str) == Some("text")
                    && part.get("text").is_some_and(Value::is_string);
                if !is_text {
                    return Err(LineError::new(
                        "invalid_content",
                        format!("{path}[{i}]"),
                        "content parts must be {\"type\": \"text\", \"text\": \"...\"}",
                    ));
                }
            }
            Ok(())
        }
        Some(other) => Err(LineError::new(
            "invalid_content",
            path,
            format!("`content` must be a string or an array of text parts, found {}", type_name(other)),
        )),
    }
}

fn check_tool_calls(calls: &Value, path: &str) -> Result<(), LineError> {
    let Value::Array(calls) = calls else {
        return Err(LineError::new("invalid_tool_calls", path, "`tool_calls` must be an array"));
    };
    for (i, call) in calls.iter().enumerate() {
        let function = call.get("function").and_then(Value::as_object);
        let ok = call.get("id").is_some_and(Value::is_string)
            && call.get("type").and_then(Value::as_str) == Some("function")
            && function.is_some_and(|f| {
                f.get("name").is_some_and(Value::is_string) && f.get("arguments").is_some_and(Value::is_string)
            });
        if !ok {
            return Err(LineError::new(
                "invalid_tool_calls",
                format!("{path}[{i}]"),
                "a tool call must be {\"id\": \"...\", \"type\": \"function\", \"function\": {\"name\": \"...\", \"arguments\": \"<JSON string>\"}}",
            ));
        }
    }
    Ok(())
}

pub(super) fn check_tools(tools: Option<&Value>, path: &str) -> Result<(), LineError> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(LineError::new("invalid_tools", path, "`tools` must be an array")),
    };
    for (i, tool) in tools.iter().enumerate() {
        let function = tool.get("function").and_then(Value::as_object);
        let ok = tool.get("type").and_then(Value::as_str) == Some("function")
            && function.is_some_and(|f: &Map<String, Value>| {
                f.get("name").is_some_and(Value::is_string) && f.get("parameters").is_none_or(|p| p.is_object())
            });
        if !ok {
            return Err(LineError::new(
                "invalid_tools",
                format!("{path}[{i}]"),
                "a tool must be {\"type\": \"function\", \"function\": {\"name\": \"...\", \"parameters\"?: {...}}}",
            ));
        }
    }
    Ok(())
}

/// `preferred_output` / `non_preferred_output`: a non-empty array of assistant messages.
pub(super) fn check_assistant_outputs(value: Option<&Value>, field: &str) -> Result<(), LineError> {
    let messages = match value {
        Some(Value::Array(items)) if !items.is_empty() => items,
        None | Some(Value::Null) => {
            return Err(LineError::new(
                if field == "preferred_output" { "missing_preferred_output" } else { "missing_non_preferred_output" },
                field,
                format!("`{field}` is missing"),
            ))
        }
        Some(_) => {
            return Err(LineError::new(
                "invalid_output",
                field,
                format!("`{field}` must be a non-empty array of assistant messages"),
            ))
        }
    };
    for (i, message) in messages.iter().enumerate() {
        let path = format!("{field}[{i}]");
        if check_message(message, &path)? != "assistant" {
            return Err(LineError::new(
                "invalid_output",
                format!("{path}.role"),
                format!("`{field}` may only hold assistant messages"),
            ));
        }
    }
    Ok(())
}
