//! A Hugging Face tokenizer directory loaded as transformers loads it: `tokenizer.json` for the
//! token ids, `tokenizer_config.json` (or `chat_template.jinja`) for the special tokens and the chat
//! template. The ids must equal transformers' for the same text, so this wrapper adds nothing to
//! the tokenizers library's encoding; it owns loading and the special-token conventions.

mod config;
mod token_bytes;
pub use token_bytes::token_text;

#[cfg(test)]
mod tests;

use std::path::Path;

use tokenizers::Tokenizer;

use super::template::ChatTemplate;
use super::DataError;

/// The byte span `(start, end)` in the encoded text of each token.
pub type Offsets = Vec<(usize, usize)>;

/// A tokenizer with its special tokens and (optional) chat template.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    special_tokens: Vec<(String, String)>,
    template: Option<ChatTemplate>,
    bytes: token_bytes::TokenBytes,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json`, `special_tokens_map.json`,
    /// `chat_template.jinja` and `additional_chat_templates/*.jinja` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = match Tokenizer::from_file(&path) {
            Ok(tokenizer) => tokenizer,
            Err(e) => match e.downcast::<std::io::Error>() {
                Ok(io) => return Err(DataError::Io { path, source: *io }),
                Err(e) => return Err(DataError::InvalidFile { path, message: e.to_string() }),
            },
        };
        let settings = config::read_settings(dir)?;
        Self::new(tokenizer, settings.special_tokens, settings.templates)
    }

    /// Assembles a tokenizer from parts (for tokenizers built in memory, e.g. from GGUF metadata).
    /// `special_tokens` maps names such as `eos_token` to token strings; `templates` are named chat
    /// templates (`default`, optionally `tool_use`).
    pub fn new(
        mut tokenizer: Tokenizer,
        special_tokens: Vec<(String, String)>,
        templates: Vec<(String, String)>,
    ) -> Result<Self, DataError> {
        // transformers switches off truncation and padding stored in tokenizer.json unless a call
        // asks for them; so must we, or long records would be cut silently.
        tokenizer.with_truncation(None).map_err(DataError::Tokenizer)?;
        tokenizer.with_padding(None);
        let template = if templates.is_empty() {
            None
        } else {
            Some(ChatTemplate::from_named(templates)?.with_special_tokens(special_tokens.clone()))
        };
        let bytes = token_bytes::TokenBytes::new(&tokenizer);
        Ok(Self { tokenizer, special_tokens, template, bytes })
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (BOS for Llama-style models).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, DataError> {
        let encoding = self.tokenizer.encode_fast(text, add_special_tokens).map_err(DataError::Tokenizer)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids and, for each, its byte span in `text`. Tokens added by the post-processor have
    /// an empty span.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Offsets), DataError> {
        let encoding = self.tokenizer.encode(text, add_special_tokens).map_err(DataError::Tokenizer)?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, DataError> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(DataError::Tokenizer)
    }

    /// The raw bytes token `id` stands for, as its vocabulary spells them: a token may hold part
    /// of a UTF-8 character, which decoding it alone turns into U+FFFD. Empty for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.tokenizer.id_to_token(id) {
            Some(token) => self.bytes.bytes(id, &token),
            None => Vec::new(),
        }
    }

    /// The id of a token string (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Number of token ids, added tokens included (the model's embedding may be larger).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The string of a named special token (`"eos_token"` → `"</s>"`), as the config gives it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }

    fn special_token_id(&self, name: &str) -> Option<u32> {
        self.special_token(name).and_then(|token| self.token_to_id(token))
    }

    /// The id of `eos_token`, appended to prompt/completion and text examples.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_token_id("eos_token")
    }

    /// The id of `bos_token` (templates and post-processors add it; this is for inspection).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_token_id("bos_token")
    }

    /// The padding id; models without a pad token pad with EOS, as trainers do (padding is
    /// masked out of the loss, so its value does not matter beyond being a valid id).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_token_id("pad_token").or_else(|| self.eos_token_id())
    }

    /// Whether chat records and chat requests can be rendered.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders a conversation as transformers' `apply_chat_template(messages, tools=tools,
    /// add_generation_prompt=..., tokenize=False)` does. Tokenize the result with
    /// `add_special_tokens = false`: the template writes BOS itself where the model wants it.
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let template = self.template.as_ref().ok_or(DataError::MissingTemplate)?;
        template.render(messages, tools, add_generation_prompt)
    }

    /// The underlying tokenizers-library tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_tokens", &self.special_tokens)
            .field("template", &self.template)
            .finish()
    }
}
