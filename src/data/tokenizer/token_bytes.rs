//! The raw bytes behind each token id, for `logprobs` (`bytes`) where one token may hold only part
//! of a UTF-8 character. Decoding a single id gives U+FFFD for such a piece; the vocabulary knows
//! the real byte:
//! - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): every byte is written as one printable
//!   character (GPT-2's `bytes_to_unicode` table: the printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ`
//!   stand for themselves, the other 68 bytes for U+0100 onwards, in order);
//! - SentencePiece-style BPE (Llama 2, Mistral): `▁` is a space and `<0xHH>` pieces are the byte
//!   HH (byte fallback);
//! - added tokens (`<|im_start|>`, ...) are their own text.

use std::collections::{HashMap, HashSet};

use tokenizers::Tokenizer;

/// How the vocabulary spells bytes, read off the tokenizer's decoder.
#[derive(Debug, Clone)]
pub(super) enum ByteSpelling {
    /// Each character is one byte (GPT-2's table, inverted).
    ByteLevel(HashMap<char, u8>),
    /// Text pieces with replacements (`▁` → space) and, with byte fallback, `<0xHH>` pieces.
    Pieces { replacements: Vec<(String, String)>, byte_fallback: bool },
}

#[derive(Debug, Clone)]
pub(super) struct TokenBytes {
    spelling: ByteSpelling,
    added: HashSet<u32>,
}

impl TokenBytes {
    pub(super) fn new(tokenizer: &Tokenizer) -> Self {
        let decoder = tokenizer.get_decoder().and_then(|d| serde_json::to_value(d).ok()).unwrap_or_default();
        let mut steps = Vec::new();
        flatten(&decoder, &mut steps);
        let has = |kind: &str| steps.iter().any(|s| s["type"] == kind);
        let spelling = if has("ByteLevel") {
            ByteSpelling::ByteLevel(byte_level_table())
        } else {
            let mut replacements = Vec::new();
            for step in &steps {
                match step["type"].as_str() {
                    Some("Replace") => {
                        if let (Some(from), Some(to)) = (step["pattern"]["String"].as_str(), step["content"].as_str()) {
                            replacements.push((from.to_string(), to.to_string()));
                        }
                    }
                    Some("Metaspace") => {
                        let from = step["replacement"].as_str().unwrap_or("\u{2581}");
                        replacements.push((from.to_string(), " ".to_string()));
                    }
                    _ => {}
                }
            }
            ByteSpelling::Pieces { replacements, byte_fallback: has("ByteFallback") }
        };
        let added = tokenizer.get_added_tokens_decoder().into_keys().collect();
        Self { spelling, added }
    }

    /// The bytes of token `id` as the tokenizer's vocabulary spells it (`token` is its string).
    pub(super) fn bytes(&self, id: u32, token: &str) -> Vec<u8> {
        if self.added.contains(&id) {
            return token.as_bytes().to_vec();
        }
        match &self.spelling {
            ByteSpelling::ByteLevel(table) => {
                let mut out = Vec::with_capacity(token.len());
                for c in token.chars() {
                    match table.get(&c) {
                        Some(&b) => out.push(b),
                        // Not a byte-level character (a hand-added vocabulary entry): its own text.
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            }
            ByteSpelling::Pieces { replacements, byte_fallback } => {
                if *byte_fallback {
                    if let Some(byte) = fallback_byte(token) {
                        return vec![byte];
                    }
                }
                let mut text = token.to_string();
                for (from, to) in replacements {
                    text = text.replace(from.as_str(), to);
                }
                text.into_bytes()
            }
        }
    }
}

/// The decoder and, for a `Sequence`, its steps in order.
fn flatten(decoder: &serde_json::Value, steps: &mut Vec<serde_json::Value>) {
    match decoder["decoders"].as_array() {
        Some(inner) if decoder["type"] == "Sequence" => inner.iter().for_each(|d| flatten(d, steps)),
        _ => steps.push(decoder.clone()),
    }
}

/// `<0xHH>` → HH.
fn fallback_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// GPT-2's `bytes_to_unicode`, inverted: character → byte.
fn byte_level_table() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).expect("U+0100 onwards are characters");
                next += 1;
                c
            };
            (c, b)
        })
        .collect()
}

/// A token's text for the API: its bytes as UTF-8 when they are, else OpenAI's spelling of a
/// partial character, `bytes:` then the text with each byte that is not part of a whole
/// character written `\xHH` (e.g. `bytes:\xe2\x80`).
pub fn token_text(bytes: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.to_string();
    }
    let mut out = String::from("bytes:");
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_table_covers_every_byte_once() {
        let table = byte_level_table();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'A'], b'A');
        // GPT-2 spells a space as 'Ġ' (U+0120) and a newline as 'Ċ' (U+010A).
        assert_eq!(table[&'\u{120}'], b' ');
        assert_eq!(table[&'\u{10A}'], b'\n');
        assert_eq!(table[&'\u{100}'], 0);
    }

    #[test]
    fn partial_characters_are_spelt_as_escaped_bytes() {
        assert_eq!(token_text("é".as_bytes()), "é");
        assert_eq!(token_text(&[0xE2, 0x80]), "bytes:\\xe2\\x80");
        assert_eq!(token_text(&[b' ', 0xF0, 0x9F]), "bytes: \\xf0\\x9f");
    }
}
