use std::io::Write;

use serde_json::json;

use super::*;
use crate::data::fixtures;

fn jsonl_file(content: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(content.as_bytes()).unwrap();
    file
}

fn dataset(format: DatasetFormat, records: Vec<Value>) -> LoadedDataset {
    let lines = (1..=records.len() as u64).collect();
    LoadedDataset { format, records, lines }
}

#[test]
fn load_jsonl_keeps_each_record_with_its_line_number() {
    let file = jsonl_file(
        "\u{feff}{\"prompt\": \"a\", \"completion\": \"b\"}\r\n\n   \n{\"prompt\": \"c\", \"completion\": \"d\"}\n",
    );

    let data = load_jsonl(file.path()).unwrap();

    assert_eq!(data.format, DatasetFormat::PromptCompletion);
    assert_eq!(data.records, [json!({"prompt": "a", "completion": "b"}), json!({"prompt": "c", "completion": "d"})]);
    assert_eq!(data.lines, [1, 4]);
}

#[test]
fn load_jsonl_reports_the_first_problem_with_its_line_and_code() {
    let file = jsonl_file("{\"text\": \"fine\"}\n{\"text\": \n{\"text\": 3}\n");

    let err = load_jsonl(file.path()).unwrap_err();

    match err {
        DataError::InvalidDataset { line, code, total, .. } => {
            assert_eq!((line, code.as_str(), total), (Some(2), "invalid_json", 2));
        }
        other => panic!("expected InvalidDataset, got {other:?}"),
    }
}

#[test]
fn load_jsonl_rejects_an_empty_file() {
    let file = jsonl_file("\n\n");

    let err = load_jsonl(file.path()).unwrap_err();

    assert!(matches!(&err, DataError::InvalidDataset { line: None, code, .. } if code == "empty_file"), "{err:?}");
}

#[test]
fn load_jsonl_of_a_missing_file_is_an_io_error() {
    let err = load_jsonl(Path::new("/nonexistent/train.jsonl")).unwrap_err();

    assert!(matches!(err, DataError::Io { .. }));
}

#[test]
fn encode_dataset_counts_kept_dropped_and_truncated_examples() {
    let tok = fixtures::tokenizer("llama");
    let long_prompt = "the cat and the dog ".repeat(20);
    let data = dataset(
        DatasetFormat::PromptCompletion,
        vec![
            json!({"prompt": "Hello", "completion": " world"}),
            json!({"prompt": long_prompt, "completion": " river"}),
            json!({"prompt": "Hi", "completion": " the cat and the dog run to the river in the rain"}),
        ],
    );
    let opts = EncodeOptions { max_seq_len: 8, train_on_inputs: false };

    let encoded = encode_dataset(&tok, &data, &opts).unwrap();

    let stats = encoded.stats;
    assert_eq!((stats.examples, stats.dropped, stats.truncated), (2, 1, 1));
    assert_eq!(stats.tokens, encoded.examples.iter().map(|e| e.input_ids.len()).sum::<usize>());
    assert_eq!(stats.trained_tokens, encoded.examples.iter().map(TokenizedExample::trained_tokens).sum::<usize>());
    assert_eq!(encoded.examples[1].input_ids.len(), 8);
}

#[test]
fn an_encoding_error_names_the_record_line() {
    // The mistral fixture template raises an exception for roles other than system/user/assistant.
    let tok = fixtures::tokenizer("mistral");
    let mut data = dataset(
        DatasetFormat::Chat,
        vec![
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
            json!({"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}),
        ],
    );
    data.lines = vec![3, 7];
    let opts = EncodeOptions { max_seq_len: 64, train_on_inputs: false };

    let err = encode_dataset(&tok, &data, &opts).unwrap_err();

    assert_eq!(err.line(), Some(7));
    assert!(matches!(&err, DataError::Record { source, .. }
        if matches!(source.as_ref(), DataError::TemplateException(m) if m == "unknown role: tool")));
}

#[test]
fn encode_dataset_refuses_formats_of_other_model_types() {
    let tok = fixtures::tokenizer("llama");
    let data = dataset(DatasetFormat::Classification, vec![json!({"text": "good", "label": 1})]);
    let opts = EncodeOptions { max_seq_len: 64, train_on_inputs: false };

    let err = encode_dataset(&tok, &data, &opts).unwrap_err();

    assert!(matches!(err, DataError::UnsupportedFormat(DatasetFormat::Classification)));
}

fn numbered(n: usize) -> LoadedDataset {
    dataset(DatasetFormat::Text, (0..n).map(|i| json!({"text": format!("record {i}")})).collect())
}

#[test]
fn split_validation_is_deterministic_and_keeps_file_order() {
    let (train, validation) = split_validation(numbered(25), 0.1, 42);
    let (train_again, validation_again) = split_validation(numbered(25), 0.1, 42);

    assert_eq!(validation.len(), 3); // round(2.5)
    assert_eq!(train.len(), 22);
    assert_eq!((&train, &validation), (&train_again, &validation_again));
    for part in [&train, &validation] {
        assert!(part.lines.windows(2).all(|w| w[0] < w[1]));
        for (record, line) in part.records.iter().zip(&part.lines) {
            assert_eq!(record["text"], format!("record {}", line - 1));
        }
    }
    let mut all: Vec<u64> = train.lines.iter().chain(&validation.lines).copied().collect();
    all.sort();
    assert_eq!(all, (1..=25).collect::<Vec<u64>>());
}

#[test]
fn split_validation_depends_on_the_seed() {
    let picks: Vec<Vec<u64>> = (0..4).map(|seed| split_validation(numbered(50), 0.2, seed).1.lines).collect();

    assert!(picks.windows(2).any(|w| w[0] != w[1]));
}

#[test]
fn split_validation_holds_out_at_least_one_and_never_everything() {
    assert_eq!(split_validation(numbered(10), 0.01, 1).1.len(), 1);
    assert_eq!(split_validation(numbered(10), 1.0, 1).0.len(), 1);
    assert_eq!(split_validation(numbered(10), 0.0, 1).1.len(), 0);
    assert_eq!(split_validation(numbered(1), 0.5, 1).1.len(), 0);
}
