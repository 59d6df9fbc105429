use super::*;

const LIMITS: Limits = Limits { max_line_bytes: 4096, min_examples: 1 };

fn validate_with(limits: Limits, text: &str) -> Outcome {
    let mut validator = DatasetValidator::new(limits);
    validator.feed(text.as_bytes());
    validator.finish()
}

fn validate(text: &str) -> Outcome {
    validate_with(LIMITS, text)
}

/// The (line, code) pairs of an invalid outcome.
fn problems(outcome: Outcome) -> Vec<(Option<u64>, &'static str)> {
    match outcome {
        Outcome::Invalid { problems, .. } => problems.iter().map(|p| (p.line, p.code)).collect(),
        other => panic!("expected an invalid dataset, got {other:?}"),
    }
}

const CHAT: &str = r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;

#[test]
fn valid_chat_file_reports_format_and_example_count() {
    let text = format!("{CHAT}\n{CHAT}\n\n{CHAT}\n");
    assert_eq!(validate(&text), Outcome::Valid(Summary { format: DatasetFormat::Chat, examples: 3 }));
}

#[test]
fn result_does_not_depend_on_chunk_boundaries() {
    let text = format!("{CHAT}\r\n{{\"messages\": 3}}\n{CHAT}");
    let whole = validate(&text);
    for chunk in [1, 2, 7, 64] {
        let mut validator = DatasetValidator::new(LIMITS);
        for piece in text.as_bytes().chunks(chunk) {
            validator.feed(piece);
        }
        assert_eq!(validator.finish(), whole, "chunk size {chunk}");
    }
    assert_eq!(problems(whole), vec![(Some(2), "invalid_messages")]);
}

#[test]
fn every_broken_line_is_named_with_its_code() {
    let text = [
        CHAT,
        "{not json",
        r#"{"messages":[{"role":"robot","content":"x"},{"role":"assistant","content":"y"}]}"#,
        CHAT,
        r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant"}]}"#,
        r#"{"messages":[{"role":"user","content":"only a question"}]}"#,
        r#"{"id": 7}"#,
        "[1,2]",
    ]
    .join("\n");
    assert_eq!(
        problems(validate(&text)),
        vec![
            (Some(2), "invalid_json"),
            (Some(3), "unrecognized_role"),
            (Some(5), "missing_content"),
            (Some(6), "no_assistant_message"),
            (Some(7), "missing_messages"),
            (Some(8), "not_an_object"),
        ]
    );
}

#[test]
fn problems_name_the_field() {
    let text = r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y","weight":2}]}"#;
    match validate(text) {
        Outcome::Invalid { problems, .. } => {
            assert_eq!(problems[0].code, "invalid_weight");
            assert_eq!(problems[0].field.as_deref(), Some("messages[1].weight"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn mixing_formats_is_rejected_on_the_odd_lines() {
    let text = format!("{CHAT}\n{{\"prompt\":\"a\",\"completion\":\"b\"}}\n{CHAT}");
    assert_eq!(problems(validate(&text)), vec![(Some(2), "mixed_formats")]);
}

#[test]
fn each_format_is_detected() {
    let cases = [
        (r#"{"prompt":"2+2=","completion":"4"}"#, DatasetFormat::PromptCompletion),
        (r#"{"text":"Some domain text."}"#, DatasetFormat::Text),
        (r#"{"text":"great film","label":"positive"}"#, DatasetFormat::Classification),
        (r#"{"text":"a","text_pair":"b","label":1}"#, DatasetFormat::Classification),
        (r#"{"tokens":["Paris","is"],"tags":["B-LOC","O"]}"#, DatasetFormat::TokenClassification),
        (r#"{"anchor":"reset my password","positive":"how do I change my password"}"#, DatasetFormat::Embedding),
        (
            r#"{"input":{"messages":[{"role":"user","content":"q"}]},"preferred_output":[{"role":"assistant","content":"good"}],"non_preferred_output":[{"role":"assistant","content":"bad"}]}"#,
            DatasetFormat::Preference,
        ),
        (
            r#"{"messages":[{"role":"user","content":"weather?"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"w","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"sunny"},{"role":"assistant","content":"Sunny.","weight":1}],"tools":[{"type":"function","function":{"name":"w","parameters":{"type":"object"}}}]}"#,
            DatasetFormat::Chat,
        ),
    ];
    for (line, format) in cases {
        assert_eq!(validate(line), Outcome::Valid(Summary { format, examples: 1 }), "{line}");
    }
}

#[test]
fn format_specific_mistakes_have_specific_codes() {
    let cases = [
        (r#"{"tokens":["a","b"],"tags":["O"]}"#, "tags_length_mismatch"),
        (r#"{"text":"x","label":[1]}"#, "invalid_label"),
        (r#"{"prompt":"x","completion":""}"#, "empty_completion"),
        (r#"{"prompt":"x"}"#, "missing_completion"),
        (r#"{"text":"   "}"#, "empty_text"),
        (
            r#"{"input":{"messages":[{"role":"user","content":"q"}]},"preferred_output":[{"role":"user","content":"a"}],"non_preferred_output":[{"role":"assistant","content":"b"}]}"#,
            "invalid_output",
        ),
        (r#"{"messages":[{"role":"tool","content":"x"},{"role":"assistant","content":"y"}]}"#, "missing_tool_call_id"),
        (
            r#"{"messages":[{"role":"user","content":"x","mood":1},{"role":"assistant","content":"y"}]}"#,
            "unrecognized_message_key",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y","weight":0}]}"#,
            "no_trainable_message",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y"}],"tools":[{"type":"function"}]}"#,
            "invalid_tools",
        ),
    ];
    for (line, code) in cases {
        assert_eq!(problems(validate(line)), vec![(Some(1), code)], "{line}");
    }
}

#[test]
fn empty_and_small_files_are_rejected_at_file_level() {
    assert_eq!(problems(validate("")), vec![(None, "empty_file")]);
    assert_eq!(problems(validate("\n  \n")), vec![(None, "empty_file")]);
    let limits = Limits { min_examples: 10, ..LIMITS };
    assert_eq!(problems(validate_with(limits, CHAT)), vec![(None, "too_few_examples")]);
}

#[test]
fn a_line_over_the_limit_stops_validation_with_its_number() {
    let limits = Limits { max_line_bytes: 200, ..LIMITS };
    let long = format!("{{\"text\":\"{}\"}}", "a".repeat(300));
    let text = format!("{CHAT}\n{long}\n{CHAT}\n");
    assert_eq!(validate_with(limits, &text), Outcome::LineTooLong { line: 2, limit: 200 });
    // Also when the long line arrives in small pieces and never ends.
    let mut validator = DatasetValidator::new(limits);
    for piece in long.as_bytes().chunks(10) {
        validator.feed(piece);
    }
    assert_eq!(validator.finish(), Outcome::LineTooLong { line: 1, limit: 200 });
}

#[test]
fn invalid_utf8_and_bom_are_handled() {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(CHAT.as_bytes());
    bytes.extend_from_slice(b"\n{\"text\":\"\xff\"}\n");
    let mut validator = DatasetValidator::new(LIMITS);
    validator.feed(&bytes);
    assert_eq!(problems(validator.finish()), vec![(Some(2), "invalid_utf8")]);
}

#[test]
fn reported_problems_are_capped_but_all_are_counted() {
    let text = "nope\n".repeat(MAX_REPORTED_PROBLEMS + 5);
    match validate(&text) {
        Outcome::Invalid { problems, total } => {
            assert_eq!(problems.len(), MAX_REPORTED_PROBLEMS);
            assert_eq!(total, MAX_REPORTED_PROBLEMS as u64 + 5);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_embedding_pair_needs_both_texts() {
    let Outcome::Invalid { problems, .. } = validate(r#"{"anchor":"reset my password","positive":"  "}"#) else {
        panic!("an empty positive must be refused")
    };
    assert_eq!((problems[0].code, problems[0].field.as_deref()), ("empty_text", Some("positive")));
    let Outcome::Invalid { problems, .. } = validate(r#"{"anchor":"reset my password"}"#) else {
        panic!("a missing positive must be refused")
    };
    assert_eq!(problems[0].code, "missing_positive");
}
