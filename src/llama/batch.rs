//! A token batch for `llama_decode`, owned and freed in Rust.

use super::context::{Pos, SeqId};
use super::model::Token;
use crate::sys;

/// Tokens with positions, one sequence id each, and per-token logits flags.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

impl Batch {
    /// A batch for up to `capacity` tokens.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // SAFETY: allocates arrays for `capacity` tokens with one seq id each.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        Batch { raw, capacity }
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Appends a token. Panics if the batch is full (a programming error).
    pub fn push(&mut self, token: Token, pos: Pos, seq: SeqId, logits: bool) {
        let i = self.len();
        assert!(
            i < self.capacity,
            "batch capacity {} exceeded",
            self.capacity
        );
        // SAFETY: i < capacity, and every array was allocated for capacity entries.
        unsafe {
            *self.raw.token.add(i) = token.0;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}
