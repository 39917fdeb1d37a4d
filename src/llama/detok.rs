//! Streaming detokenization that never splits a UTF-8 character.

use super::model::{Model, Token};

/// Turns tokens into text as they arrive. A token can end in the middle of a
/// multi-byte character; those bytes wait for the next token.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text that `token` completes (possibly empty).
    pub fn push(&mut self, model: &Model, token: Token) -> String {
        let bytes = model.token_bytes(token, false);
        self.push_bytes(&bytes)
    }

    /// Appends raw bytes; returns every complete character so far.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY: from_utf8 vouched for the first `valid` bytes.
                    out.push_str(unsafe { std::str::from_utf8_unchecked(&self.pending[..valid]) });
                    match e.error_len() {
                        // Incomplete character at the end: keep it for later.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become a character.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of generation (an unfinished character).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_pushes_come_out_whole() {
        let text = "héllo 日本 🎉!";
        let bytes = text.as_bytes();
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for b in bytes {
            let piece = d.push_bytes(std::slice::from_ref(b));
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = StreamDecoder::new();
        let out = d.push_bytes(&[b'a', 0xff, b'b']);
        assert_eq!(out, "a\u{FFFD}b");
        assert_eq!(d.push_bytes(&[0xe6, 0x97]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
