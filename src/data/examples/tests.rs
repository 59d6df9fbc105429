use serde_json::{json, Value};

use super::*;
use crate::data::fixtures::{self, MODELS};

const OPTS: EncodeOptions = EncodeOptions { max_seq_len: 4096, train_on_inputs: false };

fn conversation() -> Value {
    json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello! Grüße 👋"},
        {"role": "assistant", "content": "Hi there. How can I help?\n"},
        {"role": "user", "content": "Tell me a joke about tensors."},
        {"role": "assistant", "content": "Why did the tensor cross the road? To get broadcast."},
    ]})
}

/// What each fixture template writes for an assistant turn after its generation prompt.
fn expected_turn(model: &str, content: &str) -> String {
    match model {
        "llama" | "mistral" => format!("{content}</s>\n"),
        "llama3" => format!("{}<|eot_id|>", content.trim()),
        "qwen2" => format!("{content}<|im_end|>\n"),
        other => panic!("no expectation for {other}"),
    }
}

/// The decoded text of each run of consecutive trained tokens.
fn trained_runs(tok: &ChatTokenizer, example: &TokenizedExample) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = 0;
    for (&id, &m) in example.input_ids.iter().zip(&example.loss_mask) {
        match (previous, m) {
            (0, 1) => runs.push(vec![id]),
            (1, 1) => runs.last_mut().unwrap().push(id),
            _ => {}
        }
        previous = m;
    }
    runs.iter().map(|ids| tok.decode(ids, false).unwrap()).collect()
}

#[test]
fn chat_masks_cover_exactly_the_assistant_answers_and_their_end_of_turn() {
    for model in MODELS {
        let tok = fixtures::tokenizer(model);
        let record = conversation();

        let example = encode_record(&tok, &record, DatasetFormat::Chat, &OPTS).unwrap().unwrap();

        let expected = vec![
            expected_turn(model, "Hi there. How can I help?\n"),
            expected_turn(model, "Why did the tensor cross the road? To get broadcast."),
        ];
        assert_eq!(trained_runs(&tok, &example), expected, "{model}");
        let full = tok.apply_chat_template(&record["messages"], None, false).unwrap();
        assert_eq!(example.input_ids, tok.encode(&full, false).unwrap(), "{model}");
        assert!(!example.truncated);
    }
}

#[test]
fn an_assistant_turn_with_weight_zero_is_context_only() {
    let tok = fixtures::tokenizer("qwen2");
    let mut record = conversation();
    record["messages"][2]["weight"] = json!(0);
    record["messages"][4]["weight"] = json!(1);

    let example = encode_record(&tok, &record, DatasetFormat::Chat, &OPTS).unwrap().unwrap();

    let expected = vec![expected_turn("qwen2", "Why did the tensor cross the road? To get broadcast.")];
    assert_eq!(trained_runs(&tok, &example), expected);
    let unweighted = encode_record(&tok, &conversation(), DatasetFormat::Chat, &OPTS).unwrap().unwrap();
    assert_eq!(example.input_ids, unweighted.input_ids, "the weight must not reach the template");
}

#[test]
fn train_on_inputs_trains_every_token_but_the_first() {
    let tok = fixtures::tokenizer("llama3");
    let opts = EncodeOptions { train_on_inputs: true, ..OPTS };

    let example = encode_record(&tok, &conversation(), DatasetFormat::Chat, &opts).unwrap().unwrap();

    assert_eq!(example.loss_mask[0], 0);
    assert!(example.loss_mask[1..].iter().all(|&m| m == 1));
    assert_eq!(example.trained_tokens(), example.input_ids.len() - 1);
}

#[test]
fn truncation_keeps_the_first_tokens_and_flags_the_example() {
    let tok = fixtures::tokenizer("llama");
    let full = encode_record(&tok, &conversation(), DatasetFormat::Chat, &OPTS).unwrap().unwrap();
    let second_answer_start = full.loss_mask.iter().rposition(|&m| m == 0).unwrap() + 1;
    let opts = EncodeOptions { max_seq_len: second_answer_start, ..OPTS };

    let example = encode_record(&tok, &conversation(), DatasetFormat::Chat, &opts).unwrap().unwrap();

    assert!(example.truncated);
    assert_eq!(example.input_ids, full.input_ids[..second_answer_start]);
    assert_eq!(example.loss_mask, full.loss_mask[..second_answer_start]);
    assert_eq!(trained_runs(&tok, &example), vec![expected_turn("llama", "Hi there. How can I help?\n")]);
}

#[test]
fn an_example_cut_before_any_answer_is_dropped() {
    let tok = fixtures::tokenizer("llama");
    let opts = EncodeOptions { max_seq_len: 8, ..OPTS };

    let example = encode_record(&tok, &conversation(), DatasetFormat::Chat, &opts).unwrap();

    assert_eq!(example, None);
}

#[test]
fn prompt_completion_trains_the_completion_and_eos() {
    let tok = fixtures::tokenizer("llama");
    let record = json!({"prompt": "The cat and the dog", "completion": " run to the river."});

    let example = encode_record(&tok, &record, DatasetFormat::PromptCompletion, &OPTS).unwrap().unwrap();

    let prompt = tok.encode("The cat and the dog", true).unwrap();
    let completion = tok.encode(" run to the river.", false).unwrap();
    let eos = tok.eos_token_id().unwrap();
    assert_eq!(example.input_ids, [prompt.clone(), completion.clone(), vec![eos]].concat());
    let expected_mask = [vec![0; prompt.len()], vec![1; completion.len() + 1]].concat();
    assert_eq!(example.loss_mask, expected_mask);
}

#[test]
fn text_trains_every_token_after_the_first() {
    let tok = fixtures::tokenizer("mistral");
    let record = json!({"text": "Rain on the river, light on the stone."});

    let example = encode_record(&tok, &record, DatasetFormat::Text, &OPTS).unwrap().unwrap();

    let expected = [tok.encode("Rain on the river, light on the stone.", true).unwrap(), vec![2]].concat();
    assert_eq!(example.input_ids, expected);
    assert_eq!(example.input_ids[0], tok.bos_token_id().unwrap());
    assert_eq!(example.loss_mask, [vec![0], vec![1; expected.len() - 1]].concat());
}

#[test]
fn classification_records_are_not_for_causal_models() {
    let tok = fixtures::tokenizer("llama");
    let record = json!({"text": "great film", "label": "positive"});

    let err = encode_record(&tok, &record, DatasetFormat::Classification, &OPTS).unwrap_err();

    assert!(matches!(err, DataError::UnsupportedFormat(DatasetFormat::Classification)));
}

#[test]
fn a_template_that_rewrites_earlier_turns_is_rejected() {
    // Like templates that drop the reasoning of earlier turns: only the last message is kept whole.
    let template =
        "{% for m in messages %}{% if loop.last %}{{ m.content }}{% else %}{{ m.content[:1] }}{% endif %}{% endfor %}";
    let llama = fixtures::tokenizer("llama");
    let tok = ChatTokenizer::new(llama.inner().clone(), vec![], vec![("default".into(), template.into())]).unwrap();

    let err = encode_record(&tok, &conversation(), DatasetFormat::Chat, &OPTS).unwrap_err();

    assert!(matches!(err, DataError::TemplateNotPrefixStable { message: 2 }), "{err:?}");
}

#[test]
fn the_tools_of_a_record_reach_the_template() {
    let template = "{{ tools | tojson }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
                    {% if add_generation_prompt %}<assistant>{% endif %}";
    let llama = fixtures::tokenizer("llama");
    let tok = ChatTokenizer::new(llama.inner().clone(), vec![], vec![("default".into(), template.into())]).unwrap();
    let record = json!({
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    });

    let example = encode_record(&tok, &record, DatasetFormat::Chat, &OPTS).unwrap().unwrap();

    let text = tok.decode(&example.input_ids, false).unwrap();
    assert_eq!(text, "[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]<user>hi<assistant>yes");
    assert_eq!(trained_runs(&tok, &example), vec!["yes"]);
}
