//! What a selection policy sees and returns.
//!
//! The hook turns the cache into candidates: for one scored layer and each
//! KV head, the tokens outside the observation window in position order, with
//! their importance and the chunk each belongs to. A policy picks which of
//! them to keep; the window is always kept by the hook.

use std::sync::Arc;

use crate::llama::{Pos, ScoreRows};

/// One KV head's candidate tokens, in position order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadCandidates {
    /// Positions, shared by the heads that hold the same ones (all of them,
    /// unless an earlier compaction kept different tokens per head).
    pub pos: Arc<[Pos]>,
    /// Attention importance (over the scoring queries and the head's query group).
    pub score: Vec<f32>,
    /// Chunk id of each token: equal ids are one chunk, ids never decrease.
    pub chunk: Arc<[u32]>,
    /// The cache cell holding each token in this layer and head.
    pub cell: Arc<[usize]>,
}

impl HeadCandidates {
    pub fn len(&self) -> usize {
        self.pos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
}

/// The candidates of one scored (leader) layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCandidates {
    /// Model layer index.
    pub layer: u32,
    pub heads: Vec<HeadCandidates>,
}

/// A KV-cache selection policy.
pub trait Policy: Send + Sync {
    /// Name as `--kv-method` spells it.
    fn name(&self) -> &'static str;

    /// Which queries must score the keys, or `None` if the policy needs no scores.
    fn score_rows(&self) -> Option<ScoreRows>;

    /// Whether each KV head keeps its own tokens (SnapKV, H2O, PyramidKV,
    /// KVzip) rather than one set for all heads of a layer.
    fn per_head(&self) -> bool {
        false
    }

    /// Whether every layer keeps the same count (PyramidKV does not: its
    /// short layers' surplus slots are masked dead).
    fn uniform_counts(&self) -> bool {
        true
    }

    /// Whether the policy is defined on reconstruction scores (`kvzip`).
    fn needs_reconstruction(&self) -> bool {
        false
    }

    /// Tokens per chunk the candidates are grouped into (1: single tokens).
    fn chunk_size(&self) -> usize {
        1
    }

    /// Where chunks of fresh tokens begin.
    fn chunking(&self) -> super::Chunking {
        super::Chunking::Tokens
    }

    /// How far a token's score carries to the positions after it (0: not at all).
    fn trail(&self) -> usize {
        0
    }

    /// How the scoring window's queries combine their attention.
    fn score_reduce(&self) -> crate::llama::ScoreReduce {
        crate::llama::ScoreReduce::Sum
    }

    /// The sequence's first positions, kept in every layer whatever they
    /// score: most heads park attention on the first tokens (attention
    /// sinks, StreamingLLM), a window's attention does not always show it
    /// in the first layers, and a layer that lost them spreads that
    /// attention over the rest of a compressed cache.
    fn sinks(&self) -> usize {
        0
    }

    /// How many candidates each of `n_groups` scored layer groups (bottom
    /// first) selects when the mean is `n_select`; none may exceed `n_cand`.
    /// Uniform unless the policy budgets layers differently (PyramidKV).
    fn layer_counts(&self, n_groups: usize, n_select: usize, n_cand: usize) -> Vec<usize> {
        vec![n_select.min(n_cand); n_groups]
    }

    /// Picks `n_select` candidates of each head; returns, per head, the kept
    /// candidate indices in increasing order. `n_select` never exceeds the
    /// number of candidates.
    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>>;
}
