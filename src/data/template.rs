//! Hugging Face chat templates, rendered byte for byte like transformers' `apply_chat_template(...,
//! tokenize=False)`.
//!
//! transformers compiles templates with jinja2's sandbox (`trim_blocks`, `lstrip_blocks`, loop
//! controls), its own `tojson` (Python's `json.dumps`), the globals `raise_exception` and
//! `strftime_now`, and passes `messages`, `tools`, `documents`, `add_generation_prompt` and the
//! tokenizer's special tokens. This module reproduces that environment on minijinja; it owns the
//! rendering only, not tokenization (see `tokenizer`).

mod json;
mod values;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};

use super::DataError;

const DEFAULT: &str = "default";
/// transformers picks this template over the default one when tools are passed.
const TOOL_USE: &str = "tool_use";

/// A compiled chat template (or a named set of them) together with the special tokens it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    /// Compiles a single template, used for every conversation.
    pub fn new(source: &str) -> Result<Self, DataError> {
        Self::from_named([(DEFAULT.to_string(), source.to_string())])
    }

    /// Compiles named templates, as a tokenizer config's list of `{name, template}` gives them:
    /// `default` renders conversations, `tool_use` (when present) conversations with tools.
    pub fn from_named(templates: impl IntoIterator<Item = (String, String)>) -> Result<Self, DataError> {
        let mut env = environment();
        for (name, source) in templates {
            let source = rewrite_generation_tags(&source).into_owned();
            env.add_template_owned(name, source).map_err(template_error)?;
        }
        Ok(Self { env, special_tokens: Vec::new() })
    }

    /// Sets the variables the template sees besides the conversation (`bos_token`, `eos_token`...).
    pub fn with_special_tokens(mut self, tokens: Vec<(String, String)>) -> Self {
        self.special_tokens = tokens;
        self
    }

    /// Renders a conversation (a JSON array of messages) and optional tool definitions.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let tools = tools.filter(|t| !t.is_null());
        let name = if tools.is_some() && self.env.get_template(TOOL_USE).is_ok() { TOOL_USE } else { DEFAULT };
        let template = self.env.get_template(name).map_err(|_| DataError::MissingTemplate)?;
        let mut ctx: BTreeMap<String, Value> =
            self.special_tokens.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        ctx.insert("messages".into(), normalize_messages(messages)?);
        ctx.insert("tools".into(), tools.map_or(Value::from(()), values::from_json));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        template.render(Value::from(ctx)).map_err(template_error)
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.templates().map(|(name, _)| name).collect();
        f.debug_struct("ChatTemplate").field("templates", &names).finish_non_exhaustive()
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let mut syntax = SyntaxConfig::builder();
    syntax.trim_blocks(true).lstrip_blocks(true);
    env.set_syntax(syntax.build().expect("the default delimiters are valid"));
    // A template named `x.html` must not start HTML-escaping messages.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // `.strip()`, `.startswith()`, `.items()`, `.get()`... as on Python strings and dicts.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", json::tojson);
    // jinja2's test is `len(x)` and `x[...]` succeeding: strings and dicts are sequences too.
    env.add_test("sequence", |value: &Value| {
        matches!(value.kind(), ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Bytes)
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Prints floats as Python's `str(float)` does (`1e+20`, `1e-05`); everything else already prints
/// like Python in minijinja (`None`, `True`, `['a', 1]`).
fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    if value.is_number() && !value.is_integer() {
        if let Ok(f) = f64::try_from(value.clone()) {
            return out.write_str(&json::py_float_repr(f)).map_err(Error::from);
        }
    }
    minijinja::escape_formatter(out, state, value)
}

/// Marks the error raised by `raise_exception`, so that its message reaches the caller verbatim.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// `datetime.now().strftime(format)`, in UTC (the server's clock; containers run in UTC).
fn strftime_now(state: &State, format: &str) -> Result<String, Error> {
    // The contrib filter reads these words as named formats; Python's strftime prints them as is.
    if matches!(format, "short" | "medium" | "long" | "full" | "iso" | "unix") {
        return Ok(format.to_string());
    }
    let kwargs = Kwargs::from_iter([("format", Value::from(format))]);
    minijinja_contrib::filters::datetimeformat(state, minijinja_contrib::globals::now(), kwargs)
}

fn template_error(err: Error) -> DataError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&err);
    while let Some(cause) = source {
        if let Some(raised) = cause.downcast_ref::<Raised>() {
            return DataError::TemplateException(raised.0.clone());
        }
        source = cause.source();
    }
    DataError::Template(err.to_string())
}

/// What transformers does to a conversation before rendering: keys whose value is `None` are
/// dropped (templates handle a missing key but print `None`), and a message's reasoning is also
/// offered as `thinking` and `reasoning_content`, the names templates read.
fn normalize_messages(messages: &serde_json::Value) -> Result<Value, DataError> {
    let serde_json::Value::Array(messages) = messages else {
        return Err(DataError::Template("messages must be a list of message objects".into()));
    };
    let mut out = Vec::with_capacity(messages.len());
    for message in messages {
        let serde_json::Value::Object(fields) = message else {
            return Err(DataError::Template(format!("chat messages must be objects, found {message}")));
        };
        let mut entries: Vec<(String, &serde_json::Value)> =
            fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v)).collect();
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|key| entries.iter().find(|(k, _)| k == key).map(|(_, v)| *v));
        if let Some(reasoning) = reasoning {
            // `{"thinking": r, **message, "reasoning_content": r}`: existing keys keep their place.
            for (key, at_start) in [("thinking", true), ("reasoning_content", false)] {
                match entries.iter_mut().find(|(k, _)| k == key) {
                    Some(entry) => entry.1 = reasoning,
                    None if at_start => entries.insert(0, (key.to_string(), reasoning)),
                    None => entries.push((key.to_string(), reasoning)),
                }
            }
        }
        let entries = entries.into_iter().map(|(k, v)| (Value::from(k), values::from_json(v))).collect();
        out.push(Value::from_object(values::OrderedMap(entries)));
    }
    Ok(Value::from(out))
}

/// transformers' `{% generation %}...{% endgeneration %}` extension (which marks assistant text
/// for its token masks) renders its body unchanged. minijinja has no such tag, so it becomes an
/// always-true `if` block, which has the same whitespace behaviour under `trim_blocks` and
/// `lstrip_blocks`.
fn rewrite_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        let Some(end) = tag.find("%}") else {
            rest = tag;
            break;
        };
        let inner = &tag[2..end];
        let word = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        match word {
            "generation" => out.push_str(&format!("{{%{}%}}", inner.replacen(word, "if true", 1))),
            "endgeneration" => out.push_str(&format!("{{%{}%}}", inner.replacen(word, "endif", 1))),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}
