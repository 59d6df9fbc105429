//! Rendering checked against transformers 5.24 / jinja2 3.1.6. The expected strings were produced in
//! the perf venv (`~/.cache/ferrotune-perf/.venv/bin/python`) with
//! `transformers.utils.chat_template_utils.render_jinja_template(conversations=[messages], tools=...,
//! chat_template=CHATML, add_generation_prompt=..., bos_token="<s>", eos_token="<|im_end|>")` for the
//! conversations, and `_compile_jinja_template(template).render(**variables)` for `PYTHON_CASES`,
//! then pasted here as literals.

use serde_json::json;

use super::*;

/// A ChatML template in the style of SmolLM2's: `.strip()`, `loop.first`, `tojson` with and without
/// options, `continue`, `raise_exception`, and both `{%- -%}` and trim/lstrip-dependent layout.
const CHATML: &str = "{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}
{{- messages[0]['content'].strip() + '\\n\\n' }}
{%- endif %}
{{- 'You may call these tools:\\n' }}
{%- for tool in tools %}
{{- tool | tojson + '\\n' }}
{%- endfor %}
{{- 'Schema: ' + (tools[0] | tojson(indent=2, sort_keys=true)) }}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
{{- raise_exception('Unexpected role: ' + message.role) }}
{%- endif %}
{%- if loop.first and message.role != 'system' and not tools %}
{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}
{%- endif %}
{%- if message.role == 'system' and tools %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.tool_calls is defined %}
    {% for call in message.tool_calls %}
<tool_call>{{ call.function | tojson(separators=(',', ':')) }}</tool_call>
    {% endfor %}
{% else %}
{{ message.content.strip() }}
{% endif %}
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}";

fn chatml() -> ChatTemplate {
    let specials = vec![("bos_token".to_string(), "<s>".to_string()), ("eos_token".into(), "<|im_end|>".into())];
    ChatTemplate::new(CHATML).unwrap().with_special_tokens(specials)
}

#[test]
fn chatml_strips_contents_like_python() {
    let messages = json!([
        {"role": "system", "content": "  You are terse.  \n"},
        {"role": "user", "content": "Café ☕ or \"tea\"?"},
        {"role": "assistant", "content": "\nTea.\n"},
    ]);

    let text = chatml().render(&messages, None, false).unwrap();

    assert_eq!(
        text,
        "<|im_start|>system\nYou are terse.\n<|im_end|>\n<|im_start|>user\nCafé ☕ or \"tea\"?\n<|im_end|>\n<|im_start|>assistant\nTea.\n<|im_end|>\n"
    );
}

#[test]
fn chatml_adds_the_default_system_prompt_and_the_generation_prompt() {
    let messages = json!([{"role": "user", "content": "Hi!"}]);

    let text = chatml().render(&messages, None, true).unwrap();

    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi!\n<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chatml_writes_tools_and_tool_calls_with_python_json() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Météo du jour — \"now\"",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1},
        "ratio": {"type": "number", "default": 1.5}, "metric": {"type": "boolean", "default": true}, "extra": null,
        "empty_obj": {}, "empty_list": []}, "required": ["city"]}}}]);
    let messages = json!([
        {"role": "system", "content": "Use tools.\n"},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21°C"},
        {"role": "assistant", "content": "It is 21°C."},
    ]);

    let text = chatml().render(&messages, Some(&tools), false).unwrap();

    assert_eq!(
        text,
        "<|im_start|>system\nUse tools.\n\nYou may call these tools:\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Météo du jour — \\\"now\\\"\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"days\": {\"type\": \"integer\", \"default\": 1}, \"ratio\": {\"type\": \"number\", \"default\": 1.5}, \"metric\": {\"type\": \"boolean\", \"default\": true}, \"extra\": null, \"empty_obj\": {}, \"empty_list\": []}, \"required\": [\"city\"]}}}\nSchema: {\n  \"function\": {\n    \"description\": \"Météo du jour — \\\"now\\\"\",\n    \"name\": \"get_weather\",\n    \"parameters\": {\n      \"properties\": {\n        \"city\": {\n          \"type\": \"string\"\n        },\n        \"days\": {\n          \"default\": 1,\n          \"type\": \"integer\"\n        },\n        \"empty_list\": [],\n        \"empty_obj\": {},\n        \"extra\": null,\n        \"metric\": {\n          \"default\": true,\n          \"type\": \"boolean\"\n        },\n        \"ratio\": {\n          \"default\": 1.5,\n          \"type\": \"number\"\n        }\n      },\n      \"required\": [\n        \"city\"\n      ],\n      \"type\": \"object\"\n    }\n  },\n  \"type\": \"function\"\n}<|im_end|>\n<|im_start|>user\nWeather in Zürich?\n<|im_end|>\n<|im_start|>assistant\n<tool_call>{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\": \\\"Zürich\\\"}\"}</tool_call>\n<|im_end|>\n<|im_start|>tool\n21°C\n<|im_end|>\n<|im_start|>assistant\nIt is 21°C.\n<|im_end|>\n"
    );
}

#[test]
fn raise_exception_rejects_the_conversation_with_its_message() {
    let messages = json!([{"role": "narrator", "content": "x"}]);

    let err = chatml().render(&messages, None, false).unwrap_err();

    assert!(matches!(&err, DataError::TemplateException(m) if m == "Unexpected role: narrator"), "{err:?}");
}

/// (template, variables as JSON, what jinja2 rendered).
const PYTHON_CASES: &[(&str, &str, &str)] = &[
    ("{{ x | tojson }}", "{\"x\": {\"b\": [1, 2.5, null, true], \"a\": \"é\\\"\\\\\\n\\t\\u0001\u{7f}/\"}}", "{\"b\": [1, 2.5, null, true], \"a\": \"é\\\"\\\\\\n\\t\\u0001\u{7f}/\"}"),
    ("{{ x | tojson(ensure_ascii=true) }}", "{\"x\": [\"é😀\u{7f}\", \"plain\"]}", "[\"\\u00e9\\ud83d\\ude00\\u007f\", \"plain\"]"),
    ("{{ x | tojson(indent=2) }}", "{\"x\": {\"a\": [], \"b\": {}, \"c\": [1, {\"d\": null}]}}", "{\n  \"a\": [],\n  \"b\": {},\n  \"c\": [\n    1,\n    {\n      \"d\": null\n    }\n  ]\n}"),
    ("{{ x | tojson(indent=0) }}", "{\"x\": [1, [2]]}", "[\n1,\n[\n2\n]\n]"),
    ("{{ x | tojson(indent='\\t', separators=(',', ' = ')) }}", "{\"x\": {\"k\": [1, 2]}}", "{\n\t\"k\" = [\n\t\t1,\n\t\t2\n\t]\n}"),
    ("{{ x | tojson(sort_keys=true) }}", "{\"x\": {\"b\": 1, \"a\": {\"d\": 1, \"c\": 2}}}", "{\"a\": {\"c\": 2, \"d\": 1}, \"b\": 1}"),
    ("{{ x | tojson }}", "{\"x\": [1e+20, 1e-05, 0.1, 100.0, -0.0, 1e+16, 1000000000000000.0, 123456789.125, 9223372036854775808]}", "[1e+20, 1e-05, 0.1, 100.0, -0.0, 1e+16, 1000000000000000.0, 123456789.125, 9223372036854775808]"),
    ("{{ none }}|{{ true }}|{{ x }}|{{ 1e20 }}|{{ 1e-05 }}|{{ 2.0 }}|{{ 7 / 2 }}", "{\"x\": [null, true, \"it's\", 1.5]}", "None|True|[None, True, \"it's\", 1.5]|1e+20|1e-05|2.0|3.5"),
    ("{{ m }}", "{\"m\": {\"role\": \"user\", \"n\": null}}", "{'role': 'user', 'n': None}"),
    ("{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}{{ m.get('zz', 'dflt') }}|{{ m.zz is defined }}|{{ m.zz }}", "{\"m\": {\"role\": \"user\", \"content\": \"hi\"}}", "role=user;content=hi;dflt|False|"),
    ("{{ '  a b  '.strip() }}|{{ 'abc'.startswith('ab') }}|{{ 'a,b'.split(',') }}|{{ 'x'.upper() }}|{{ ' x '.lstrip() }}|{{ 'xyx'.rstrip('x') }}", "{}", "a b|True|['a', 'b']|X|x |xy"),
    ("{%- for m in l %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{{ m }}{% if loop.last %}.{% endif %}{% endfor %}", "{\"l\": [1, 2, 3]}", "13."),
    ("{% set ns = namespace(found=false) %}{% for m in l %}{% if m == 2 %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.found }}", "{\"l\": [1, 2, 3]}", "True"),
    ("{{ l[1:] }}|{{ l[-1] }}|{{ l | length }}|{{ l | join('-') }}|{{ 'ab' ~ 3 }}", "{\"l\": [1, 2, 3]}", "[2, 3]|3|3|1-2-3|ab3"),
    ("a\n  {% if true %}\n  b\n  {% endif %}\nc\n", "{}", "a\n  b\nc"),
    ("{{ 'ab' is sequence }}{{ m is sequence }}{{ l is sequence }}{{ 3 is sequence }}{{ none is sequence }}", "{\"m\": {\"a\": 1}, \"l\": [1]}", "TrueTrueTrueFalseFalse"),
    ("{% for m in l %}{{ loop.revindex }}{{ loop.previtem if loop.previtem else '-' }}{{ loop.nextitem if loop.nextitem else '-' }}{{ loop.cycle('a', 'b') }}{{ loop.length }}|{% endfor %}", "{\"l\": [1, 2, 3]}", "3-2a3|213b3|12-a3|"),
    ("{% macro turn(m) %}<{{ m }}>{% endmacro %}{% for m in l if m != 2 %}{{ turn(m) }}{% else %}none{% endfor %}", "{\"l\": [1, 2, 3]}", "<1><3>"),
    ("a\n{%+ if true %}\n  x\n{% endif %}\n{% raw %}{{ not rendered }}{% endraw %}\nend\n\n", "{}", "a\n  x\n{{ not rendered }}end\n"),
    ("{{ s.split(' ')[0] }}|{{ '{} and {}'.format('a', 2) }}|{{ 'a-b-c'.split('-', 1) }}|{{ d | dictsort }}|{{ dict(a=1) }}|{{ (1, 'a') }}", "{\"s\": \"Be brief\", \"d\": {\"b\": 1, \"a\": 2}}", "Be|a and 2|['a', 'b-c']|[('a', 2), ('b', 1)]|{'a': 1}|(1, 'a')"),
    ("{{ 1 / 3 }}|{{ 0.1 * 3 }}|{{ 2 ** 0.5 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 3.14159 | round(2) }}|{{ 2.5 | round }}|{{ '3.7' | float | int }}", "{}", "0.3333333333333333|0.30000000000000004|1.4142135623730951|-4|2|3.14|2.0|3"),
    ("{% generation %}x{% endgeneration %}\n{%- generation -%}\n y \n{%- endgeneration %}", "{}", "xy"),
];

#[test]
fn values_filters_and_whitespace_render_like_jinja2() {
    for (source, variables, expected) in PYTHON_CASES {
        let variables: serde_json::Value = serde_json::from_str(variables).unwrap();

        let text = render_source(source, &variables);

        assert_eq!(text.as_deref(), Ok(*expected), "template {source:?}");
    }
}

fn render_source(source: &str, variables: &serde_json::Value) -> Result<String, String> {
    let mut env = environment();
    env.add_template_owned("t", rewrite_generation_tags(source).into_owned()).map_err(|e| e.to_string())?;
    let template = env.get_template("t").map_err(|e| e.to_string())?;
    template.render(values::from_json(variables)).map_err(|e| e.to_string())
}

#[test]
fn tojson_of_undefined_is_an_error_as_in_python() {
    assert!(render_source("{{ missing | tojson }}", &json!({})).is_err());
}

#[test]
fn strftime_now_formats_the_current_date() {
    let year = render_source("{{ strftime_now('%Y') }}|{{ strftime_now('short') }}", &json!({})).unwrap();

    let (year, literal) = year.split_once('|').unwrap();
    assert!(year.len() == 4 && year.starts_with("20"), "{year}");
    assert_eq!(literal, "short");
}

#[test]
fn null_message_fields_are_dropped_and_reasoning_is_aliased() {
    let template = ChatTemplate::new(
        "{% for m in messages %}{{ m.keys() | list }}{{ m.thinking }}|{{ m.content is defined }};{% endfor %}",
    )
    .unwrap();
    let messages = json!([
        {"role": "assistant", "content": null, "reasoning": "hmm"},
        {"role": "user", "content": "hi"},
    ]);

    let text = template.render(&messages, None, false).unwrap();

    // Python: {"thinking": r, **message, "reasoning_content": r} after dropping None values.
    assert_eq!(text, "['thinking', 'role', 'reasoning', 'reasoning_content']hmm|False;['role', 'content']|True;");
}

#[test]
fn the_tool_use_template_is_chosen_when_tools_are_given() {
    let template = ChatTemplate::from_named([
        ("default".to_string(), "plain".to_string()),
        ("tool_use".to_string(), "tools: {{ tools | length }}".to_string()),
    ])
    .unwrap();

    assert_eq!(template.render(&json!([]), None, false).unwrap(), "plain");
    assert_eq!(template.render(&json!([]), Some(&json!([{"type": "function"}])), false).unwrap(), "tools: 1");
}

#[test]
fn a_syntax_error_is_a_template_error() {
    assert!(matches!(ChatTemplate::new("{% for %}"), Err(DataError::Template(_))));
}
