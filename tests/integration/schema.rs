//! Every response the in-process tests receive is checked against `openapi.yaml` (see
//! `TestApp::send`): its status must be documented for the operation, its content type too, and
//! its body must validate against the documented schema. A streamed body is split into its
//! server-sent events; each must validate against the media type's `itemSchema` (OpenAPI 3.2),
//! and an event's JSON `data` against the `contentSchema` the item schema names for it.
//!
//! A test that sends requests through `TestApp` therefore also checks that the document tells
//! the truth about what it saw.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{json, Value};

struct Document {
    doc: Value,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

static DOCUMENT: LazyLock<Document> = LazyLock::new(|| {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("openapi.yaml is YAML");
    Document { doc: serde_json::to_value(yaml).expect("openapi.yaml is JSON-compatible"), validators: Mutex::default() }
});

/// Follows `$ref`s (`#/components/...`) until an object that is not a reference.
fn resolve<'a>(doc: &'a Value, mut node: &'a Value) -> &'a Value {
    while let Some(reference) = node.get("$ref").and_then(Value::as_str) {
        let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {reference}"));
        node = doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {reference}"));
    }
    node
}

/// The documented path template that `path` (no query) is an instance of.
fn path_template(doc: &Value, path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split('/').collect();
    let mut matches: Vec<&String> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
        })
        .collect();
    // The most literal template wins (`/a/b` over `/a/{x}`).
    matches.sort_by_key(|t| t.matches('{').count());
    matches.first().map(|t| t.to_string())
}

impl Document {
    /// A validator for the schema at `schema` (a node of the document), cached under `key`. The
    /// schema becomes the root, with the document's `components` beside it so that every
    /// `#/components/...` reference resolves.
    fn validator(&self, key: &str, schema: &Value) -> Arc<jsonschema::Validator> {
        let mut validators = self.validators.lock().unwrap();
        if let Some(v) = validators.get(key) {
            return v.clone();
        }
        let mut root = match schema {
            Value::Object(map) => map.clone(),
            other => panic!("{key}: the schema is not an object: {other}"),
        };
        root.insert("components".into(), self.doc["components"].clone());
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&Value::Object(root))
            .unwrap_or_else(|e| panic!("{key}: openapi.yaml's schema does not compile: {e}"));
        let validator = Arc::new(validator);
        validators.insert(key.to_string(), validator.clone());
        validator
    }

    fn assert_valid(&self, key: &str, schema: &Value, instance: &Value, what: &str) {
        let errors: Vec<String> = self
            .validator(key, schema)
            .iter_errors(instance)
            .map(|e| format!("  at `{}`: {}", e.instance_path(), e))
            .collect();
        assert!(errors.is_empty(), "{what} breaks openapi.yaml ({key}):\n{}\n{instance}", errors.join("\n"));
    }
}

/// Checks one response; see the module documentation.
pub fn check_response(method: &str, uri: &str, status: u16, content_type: Option<&str>, body: &[u8]) {
    let document = &*DOCUMENT;
    let doc = &document.doc;
    let path = uri.split('?').next().unwrap_or(uri);
    let Some(template) = path_template(doc, path) else { return };
    let method = method.to_lowercase();
    let Some(operation) = doc["paths"][&template].get(&method) else { return };
    let what = format!("{} {path} -> {status}", method.to_uppercase());
    let responses = &operation["responses"];
    let response = responses
        .get(status.to_string())
        .or_else(|| responses.get(format!("{}XX", status / 100)))
        .or_else(|| responses.get("default"))
        .unwrap_or_else(|| panic!("{what}: openapi.yaml documents no {status} response for {template}"));
    let response = resolve(doc, response);
    let Some(content) = response.get("content") else { return };
    let media = content_type.unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
    let media_object = content
        .get(&media)
        .unwrap_or_else(|| panic!("{what}: openapi.yaml documents no `{media}` body for {status} of {template}"));
    let key = format!("{method} {template} {status} {media}");
    if media == "application/json" {
        let instance: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {}", String::from_utf8_lossy(body)));
        document.assert_valid(&key, &media_object["schema"], &instance, &what);
    } else if media == "text/event-stream" {
        let item = media_object
            .get("itemSchema")
            .unwrap_or_else(|| panic!("{what}: the event stream of {template} has no itemSchema"));
        let data_schema = content_schema_of_data(doc, item);
        let text = std::str::from_utf8(body).unwrap_or_else(|e| panic!("{what}: the event stream is not UTF-8: {e}"));
        for event in sse_events(text) {
            document.assert_valid(&format!("{key} item"), item, &event, &what);
            let data = event["data"].as_str().unwrap();
            if data == "[DONE]" {
                continue;
            }
            let parsed: Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("{what}: an event's data is not JSON ({e}): {data}"));
            let schema =
                data_schema.unwrap_or_else(|| panic!("{what}: the itemSchema names no contentSchema for data"));
            document.assert_valid(&format!("{key} data"), schema, &parsed, &what);
        }
    }
}

/// The `contentSchema` an item schema gives its `data` (directly or in one of `anyOf`/`oneOf`).
fn content_schema_of_data<'a>(doc: &'a Value, item: &'a Value) -> Option<&'a Value> {
    let data = resolve(doc, resolve(doc, item).get("properties")?.get("data")?);
    if let Some(schema) = data.get("contentSchema") {
        return Some(schema);
    }
    ["anyOf", "oneOf"]
        .iter()
        .filter_map(|k| data.get(*k).and_then(Value::as_array))
        .flatten()
        .find_map(|branch| resolve(doc, branch).get("contentSchema"))
}

/// Server-sent events as a client sees them: `{data, event, id?}` per event (the `data` lines
/// joined, `event` defaulting to `message`), comments and keep-alives skipped.
pub fn sse_events(text: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for block in text.replace("\r\n", "\n").split("\n\n") {
        let mut data: Vec<&str> = Vec::new();
        let mut event = json!({"event": "message"});
        for line in block.lines() {
            if line.starts_with(':') || line.is_empty() {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => data.push(value),
                "id" | "event" => event[field] = json!(value),
                _ => {}
            }
        }
        if !data.is_empty() {
            event["data"] = json!(data.join("\n"));
            events.push(event);
        }
    }
    events
}

#[test]
fn a_response_that_breaks_the_document_is_caught() {
    let bad = json!({"id": "file-x", "object": "file", "bytes": "many"});
    let caught = std::panic::catch_unwind(|| {
        check_response("GET", "/v1/files/file-x", 200, Some("application/json"), bad.to_string().as_bytes())
    });
    assert!(caught.is_err(), "a string `bytes` must not validate");
    let undocumented =
        std::panic::catch_unwind(|| check_response("GET", "/v1/files/file-x", 418, Some("application/json"), b"{}"));
    assert!(undocumented.is_err(), "an undocumented status must be caught");
    let stream = "id: ftevent-1\ndata: {\"object\": \"nope\"}\n\n";
    let caught = std::panic::catch_unwind(|| {
        check_response("GET", "/v1/fine_tuning/jobs/ftjob-1/events", 200, Some("text/event-stream"), stream.as_bytes())
    });
    assert!(caught.is_err(), "an event that is not a job event must not validate");
}
