//! Generated token ids to text, a piece at a time: never emits half a UTF-8 character, never
//! emits text that may turn out to be the start of a stop string, and cuts the text where a stop
//! string begins (the stop string itself is not returned, as in OpenAI's API).

use crate::data::tokenizer::ChatTokenizer;
use crate::data::DataError;

pub struct TextStream {
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    emitted: usize,
    stops: Vec<String>,
}

/// What one more token produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text that is final (possibly empty while a character or a possible stop string is pending).
    Text(String),
    /// A stop string appeared: the text before it, and generation ends.
    Stopped(String),
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self { ids: Vec::new(), emitted: 0, stops: stops.into_iter().filter(|s| !s.is_empty()).collect() }
    }

    pub fn push(&mut self, tokenizer: &ChatTokenizer, id: u32) -> Result<Piece, DataError> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true)?;
        let from = floor_char_boundary(&text, self.emitted.min(text.len()));
        // A stop string may straddle the previous emission point only in held-back text, which
        // starts at `from`; search from the earliest place a stop could still begin.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let search_from = floor_char_boundary(&text, from.saturating_sub(longest));
        if let Some(at) = self.stops.iter().filter_map(|s| text[search_from..].find(s.as_str())).min() {
            let end = (search_from + at).max(from);
            self.emitted = text.len();
            return Ok(Piece::Stopped(text[from..end].to_string()));
        }
        // An incomplete character decodes as U+FFFD at the end: wait for its next bytes.
        let complete = text.trim_end_matches('\u{FFFD}').len();
        let mut end = complete;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if text[..complete].ends_with(&stop[..i]) {
                    end = end.min(complete - i);
                }
            }
        }
        let end = end.max(from);
        self.emitted = end;
        Ok(Piece::Text(text[from..end].to_string()))
    }

    /// The text still held back when generation ends without a stop string.
    pub fn finish(&mut self, tokenizer: &ChatTokenizer) -> Result<String, DataError> {
        let text = tokenizer.decode(&self.ids, true)?;
        let from = floor_char_boundary(&text, self.emitted.min(text.len()));
        self.emitted = text.len();
        Ok(text[from..].to_string())
    }
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> (ChatTokenizer, Vec<u32>) {
        let tok = crate::data::fixtures::tokenizer("llama3");
        let ids = tok.encode("Hello world, the answer is: forty two. Then more", false).unwrap();
        (tok, ids)
    }

    fn run(stops: &[&str]) -> (String, bool) {
        let (tok, ids) = tokenizer();
        let mut stream = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for id in ids {
            match stream.push(&tok, id).unwrap() {
                Piece::Text(t) => out.push_str(&t),
                Piece::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&stream.finish(&tok).unwrap());
        (out, false)
    }

    #[test]
    fn pieces_add_up_to_the_decoded_text() {
        let (tok, ids) = tokenizer();
        assert_eq!(run(&[]), (tok.decode(&ids, true).unwrap(), false));
    }

    #[test]
    fn a_stop_string_cuts_the_text_before_it() {
        assert_eq!(run(&["forty"]), ("Hello world, the answer is: ".to_string(), true));
        assert_eq!(run(&["zzz", ". Then"]), ("Hello world, the answer is: forty two".to_string(), true));
        assert!(!run(&["not there"]).1);
    }
}
