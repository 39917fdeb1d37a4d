//! Prompts of an exact token length for benchmarks and checks, made without
//! any data: deterministic pseudo-random English-like prose.

use crate::llama::{Model, Token, TokenizeError};

const WORDS: &[&str] = &[
    "the",
    "a",
    "river",
    "market",
    "engine",
    "quiet",
    "morning",
    "city",
    "builds",
    "carried",
    "north",
    "letters",
    "garden",
    "small",
    "company",
    "found",
    "under",
    "bridge",
    "winter",
    "measured",
    "story",
    "light",
    "across",
    "people",
    "machine",
    "slowly",
    "harbor",
    "paper",
    "question",
    "answer",
    "seven",
    "green",
    "window",
    "after",
    "history",
    "between",
    "mountain",
    "signal",
    "travelled",
    "kept",
    "of",
    "and",
    "to",
    "in",
    "was",
    "with",
    "their",
    "old",
    "new",
    "every",
    "record",
    "field",
    "stone",
    "numbers",
    "song",
    "early",
    "later",
    "because",
];

/// A xorshift generator: reproducible prose for a given seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// About `n_words` words of sentence-shaped filler.
pub fn prose(n_words: usize, seed: u64) -> String {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = String::with_capacity(n_words * 7);
    let mut sentence = 0;
    for i in 0..n_words {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        if sentence == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                out.extend(f.to_uppercase());
                out.push_str(c.as_str());
            }
        } else {
            out.push_str(w);
        }
        sentence += 1;
        if sentence > 6 && rng.next() % 5 == 0 {
            out.push_str(". ");
            sentence = 0;
        } else if i + 1 < n_words {
            out.push(' ');
        }
    }
    out.push('.');
    out
}

/// Words of prose tokenized at once for long prompts: llama.cpp's tokenizer
/// slows down superlinearly on one huge string (a 1M-token prompt did not
/// finish in 5 minutes), so those are built from blocks.
const BLOCK_WORDS: usize = 8192;

/// Exactly `n_tokens` tokens of prose (BOS first when the model wants one).
pub fn prompt_tokens(
    model: &Model,
    n_tokens: usize,
    seed: u64,
) -> Result<Vec<Token>, TokenizeError> {
    if n_tokens > BLOCK_WORDS {
        let mut tokens = Vec::with_capacity(n_tokens + BLOCK_WORDS);
        let mut block = 0u64;
        while tokens.len() < n_tokens {
            let text = prose(BLOCK_WORDS, seed.wrapping_add(block));
            let text = if block == 0 { text } else { format!(" {text}") };
            tokens.extend(model.tokenize(&text, block == 0, false)?);
            block += 1;
        }
        tokens.truncate(n_tokens);
        return Ok(tokens);
    }
    let mut words = n_tokens.max(16);
    loop {
        let tokens = model.tokenize(&prose(words, seed), true, false)?;
        if tokens.len() >= n_tokens {
            return Ok(tokens[..n_tokens].to_vec());
        }
        words = words * 3 / 2 + 16;
    }
}

#[cfg(test)]
mod tests {
    use super::prose;

    #[test]
    fn prose_is_deterministic_and_sized() {
        assert_eq!(prose(50, 7), prose(50, 7));
        assert_ne!(prose(50, 7), prose(50, 8));
        assert_eq!(prose(50, 7).split_whitespace().count(), 50);
    }
}
