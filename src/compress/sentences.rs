//! Where sentences end, so chunks can follow them (`--chunk-by sentences`).
//!
//! ChunkKV's chunks are meant as semantic units; fixed chunks of `c` tokens
//! cut facts in two (a number's last digits land in the next chunk, ranked
//! with the unrelated sentence that follows). A chunk may instead run from
//! one sentence end to the next, split when it grows past a cap.

use crate::llama::{Model, Pos, Token};

/// Positions whose token ends a sentence, for the positions observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentenceEnds {
    /// Two bits per position: observed, ends a sentence.
    known: Vec<u64>,
    ends: Vec<u64>,
}

fn set(bits: &mut Vec<u64>, i: usize) {
    if bits.len() <= i / 64 {
        bits.resize(i / 64 + 1, 0);
    }
    bits[i / 64] |= 1 << (i % 64);
}

fn get(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Whether a token's text ends a sentence: `.`, `!`, `?`, `;` or `:` last
/// (closing quotes and brackets aside), or a line break anywhere.
pub fn ends_sentence(text: &str) -> bool {
    if text.contains('\n') {
        return true;
    }
    let t = text.trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, '"' | '\'' | ')' | ']' | '”' | '’')
    });
    t.ends_with(['.', '!', '?', ';', ':', '。', '！', '？'])
}

impl SentenceEnds {
    /// Records the tokens at positions `start..`.
    pub fn observe(&mut self, model: &Model, tokens: &[Token], start: Pos) {
        for (i, &t) in tokens.iter().enumerate() {
            let Ok(p) = usize::try_from(start + i as Pos) else {
                continue;
            };
            set(&mut self.known, p);
            let text = String::from_utf8_lossy(&model.token_bytes(t, false)).into_owned();
            if ends_sentence(&text) {
                set(&mut self.ends, p);
            }
        }
    }

    pub fn known(&self, p: Pos) -> bool {
        usize::try_from(p).is_ok_and(|p| get(&self.known, p))
    }

    /// Whether the token at `p` ends a sentence (false when not observed).
    pub fn ends(&self, p: Pos) -> bool {
        usize::try_from(p).is_ok_and(|p| get(&self.ends, p))
    }

    pub fn clear(&mut self) {
        self.known.clear();
        self.ends.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentence_ends_are_punctuation_or_line_breaks() {
        for t in [".", " end.", "?", "!\"", ".)", "\n", " word\n\n", ":"] {
            assert!(ends_sentence(t), "{t:?}");
        }
        for t in [" the", "3", ",", " Mr", "-", ""] {
            assert!(!ends_sentence(t), "{t:?}");
        }
    }

    #[test]
    fn marks_are_per_position() {
        let mut s = SentenceEnds::default();
        set(&mut s.known, 130);
        set(&mut s.ends, 130);
        assert!(s.known(130) && s.ends(130));
        assert!(!s.known(129) && !s.ends(131) && !s.ends(-1));
        s.clear();
        assert!(!s.known(130));
    }
}
