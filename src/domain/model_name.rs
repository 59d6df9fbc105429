//! Names of fine-tuned models and their checkpoints, in OpenAI's shape:
//! `ft:<base>:<project>:<suffix>:<job>` and `…:ckpt-step-<N>`.
//!
//! The name is known from the moment a job is created (it depends only on the request), so
//! checkpoints can carry it before the job succeeds.

/// The longest `suffix` a job may give (OpenAI's limit).
pub const MAX_SUFFIX_LEN: usize = 64;

const JOB_ID_PREFIX: &str = "ftjob-";

/// Whether `suffix` may appear in a model name: 1 to 64 of `[A-Za-z0-9_-]`, so that it cannot
/// add a `:` (the separator) or anything a URL path would need to escape.
pub fn is_valid_suffix(suffix: &str) -> bool {
    (1..=MAX_SUFFIX_LEN).contains(&suffix.len())
        && suffix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `ft:<base>:<project>:<suffix or empty>:<job id without "ftjob-">`. A job that starts from a
/// fine-tuned model names the base model at the root of the chain, as OpenAI does.
pub fn fine_tuned_model_name(base: &str, project: &str, suffix: Option<&str>, job_id: &str) -> String {
    let job = job_id.strip_prefix(JOB_ID_PREFIX).unwrap_or(job_id);
    format!("ft:{}:{project}:{}:{job}", root_base_model(base), suffix.unwrap_or(""))
}

/// The catalog base model under `model`: `model` itself, or `<base>` of `ft:<base>:…` (base
/// names cannot hold a `:`).
pub fn root_base_model(model: &str) -> &str {
    match model.strip_prefix("ft:") {
        Some(rest) => rest.split(':').next().unwrap_or(rest),
        None => model,
    }
}

/// The name of the checkpoint saved at `step` of the model `model`.
pub fn checkpoint_model_name(model: &str, step: i64) -> String {
    format!("{model}:ckpt-step-{step}")
}

/// What a fine-tuned model name refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedName {
    /// The model's name without any checkpoint part.
    pub model: String,
    /// The job that made it (`ftjob-…`).
    pub job_id: String,
    /// The checkpoint step, for `…:ckpt-step-<N>`.
    pub checkpoint_step: Option<i64>,
}

/// Parses `ft:<base>:<project>:<suffix>:<job>[:ckpt-step-<N>]`; `None` for other names.
pub fn parse_fine_tuned_name(name: &str) -> Option<ParsedName> {
    if !name.starts_with("ft:") {
        return None;
    }
    let (model, step) = match name.rsplit_once(":ckpt-step-") {
        Some((model, step)) => (model, Some(step.parse::<i64>().ok()?)),
        None => (name, None),
    };
    let job = model.rsplit(':').next().filter(|j| !j.is_empty())?;
    Some(ParsedName { model: model.to_string(), job_id: format!("{JOB_ID_PREFIX}{job}"), checkpoint_step: step })
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_parse_back_to_their_job_and_checkpoint() {
        let model = fine_tuned_model_name("org/base", "p", Some("s"), "ftjob-abc");
        let parsed = parse_fine_tuned_name(&checkpoint_model_name(&model, 12)).unwrap();
        assert_eq!(
            (parsed.model.as_str(), parsed.job_id.as_str(), parsed.checkpoint_step),
            (model.as_str(), "ftjob-abc", Some(12))
        );
        assert_eq!(parse_fine_tuned_name(&model).unwrap().checkpoint_step, None);
        assert!(parse_fine_tuned_name("tiny-llama").is_none());
        assert!(parse_fine_tuned_name("ft:a:b:c:j:ckpt-step-x").is_none());
    }

    use super::*;

    #[test]
    fn names_follow_openais_shape() {
        assert_eq!(
            fine_tuned_model_name("tiny-llama", "acme", Some("support-v2"), "ftjob-abc123"),
            "ft:tiny-llama:acme:support-v2:abc123"
        );
    }

    #[test]
    fn a_missing_suffix_leaves_its_field_empty() {
        assert_eq!(fine_tuned_model_name("org/base", "default", None, "ftjob-x9"), "ft:org/base:default::x9");
        let parent = "ft:org/base:default:v1:x9";
        assert_eq!(root_base_model(parent), "org/base");
        assert_eq!(root_base_model("org/base"), "org/base");
        assert_eq!(fine_tuned_model_name(parent, "default", Some("v2"), "ftjob-y1"), "ft:org/base:default:v2:y1");
    }

    #[test]
    fn checkpoints_extend_the_model_name_with_their_step() {
        let model = fine_tuned_model_name("tiny", "p", None, "ftjob-j");
        assert_eq!(checkpoint_model_name(&model, 40), "ft:tiny:p::j:ckpt-step-40");
    }

    #[test]
    fn suffixes_are_short_and_plain() {
        assert!(is_valid_suffix("my_model-2"));
        assert!(is_valid_suffix(&"a".repeat(64)));
        assert!(!is_valid_suffix(""));
        assert!(!is_valid_suffix(&"a".repeat(65)));
        assert!(!is_valid_suffix("has:colon"));
        assert!(!is_valid_suffix("has space"));
        assert!(!is_valid_suffix("ünï"));
    }
}
