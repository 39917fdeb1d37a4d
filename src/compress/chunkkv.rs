//! ChunkKV (paper v5): keep whole chunks of consecutive tokens, ranked by the
//! attention the observation window pays them, with one kept set for all
//! KV heads of a layer.

use super::policy::{LayerCandidates, Policy};
use super::CompressError;
use crate::llama::{Pos, ScoreReduce, ScoreRows};

/// How a chunk's score is formed from its tokens' scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ChunkScore {
    /// Sum of token scores (the paper).
    #[default]
    Sum,
    /// Mean of token scores (NVIDIA kvpress).
    Mean,
    /// The highest token score: a chunk is worth its most needed token
    /// (reconstruction scores are spiky: one surprising token per fact).
    Max,
}

/// Where chunks begin (`--chunk-by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Chunking {
    /// Every `c` positions, aligned to position 0 (the paper).
    #[default]
    Tokens,
    /// After each sentence end, a chunk split when it reaches 2·`c` tokens.
    Sentences,
}

/// ChunkKV's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkKv {
    /// Tokens per chunk (`c`, default 10).
    pub chunk_size: usize,
    /// Observation window (`w`, default 32): its queries score, it is always kept.
    pub window: usize,
    pub chunk_score: ChunkScore,
    /// Average-pool token scores with this odd kernel before chunking (kvpress: 5); None: off.
    pub pool: Option<usize>,
    pub chunking: Chunking,
    /// A token scores at least what any of the `trail` positions before it
    /// scored (0: off). A question attends to a fact's key ("the number for
    /// marble"), not to the value that follows it, and fixed chunks cut the
    /// value off.
    pub trail: usize,
    /// How the window's queries (and each KV head's query group) combine
    /// their attention: summed (the paper) or the largest (KVzip's rule: a
    /// cell one query needs, say a copied value, is not outvoted by the many
    /// that look elsewhere).
    pub reduce: ScoreReduce,
    /// The sequence's first positions, kept in every layer whatever they
    /// score (attention sinks; [`Policy::sinks`]).
    pub sinks: usize,
}

impl ChunkKv {
    /// Refuses a zero chunk size or window (the baselines use the window too).
    pub fn check(&self) -> Result<(), CompressError> {
        if self.window == 0 {
            return Err(CompressError::Config(
                "--kv-window must be at least 1".into(),
            ));
        }
        if self.chunk_size == 0 {
            return Err(CompressError::Config(
                "--chunk-size must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl Default for ChunkKv {
    fn default() -> Self {
        Self {
            chunk_size: 10,
            window: 32,
            chunk_score: ChunkScore::Sum,
            pool: None,
            chunking: Chunking::Tokens,
            trail: 0,
            reduce: ScoreReduce::Sum,
            sinks: 0,
        }
    }
}

/// Average pooling with a centred kernel, shrinking at the edges.
pub fn avg_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(x.len());
            x[lo..hi].iter().sum::<f32>() / (hi - lo) as f32
        })
        .collect()
}

/// Each score raised to the highest score of the positions up to `n` before
/// it (`pos` ascending; gaps in positions count). One pass with a deque of
/// falling maxima.
pub fn trail_max(scores: &[f32], pos: &[Pos], n: usize) -> Vec<f32> {
    debug_assert_eq!(scores.len(), pos.len());
    let mut maxima: std::collections::VecDeque<usize> = Default::default();
    let mut out = Vec::with_capacity(scores.len());
    for (i, &s) in scores.iter().enumerate() {
        while maxima.back().is_some_and(|&j| scores[j] <= s) {
            maxima.pop_back();
        }
        maxima.push_back(i);
        while maxima
            .front()
            .is_some_and(|&j| i64::from(pos[j]) + (n as i64) < i64::from(pos[i]))
        {
            maxima.pop_front();
        }
        out.push(maxima.front().map_or(s, |&j| scores[j]));
    }
    out
}

impl ChunkKv {
    /// Indices of the kept tokens, given one score per token and chunk ids.
    pub fn select_tokens(&self, scores: &[f32], chunk: &[u32], n_select: usize) -> Vec<usize> {
        let n = scores.len();
        let n_select = n_select.min(n);
        // Too small a budget for a chunk: keep the most recent tokens.
        if n_select <= self.chunk_size {
            return (n - n_select..n).collect();
        }
        let pooled;
        let scores = match self.pool {
            Some(k) if k > 1 => {
                pooled = avg_pool(scores, k);
                &pooled[..]
            }
            _ => scores,
        };
        // Chunks as index ranges.
        let mut chunks: Vec<(usize, usize, f32)> = Vec::new();
        let mut start = 0;
        for i in 1..=n {
            if i == n || chunk[i] != chunk[start] {
                let span = &scores[start..i];
                let score = match self.chunk_score {
                    ChunkScore::Sum => span.iter().sum(),
                    ChunkScore::Mean => span.iter().sum::<f32>() / span.len() as f32,
                    ChunkScore::Max => span.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                };
                chunks.push((start, i, score));
                start = i;
            }
        }
        // Highest score first; ties go to the earlier chunk.
        let mut order: Vec<usize> = (0..chunks.len()).collect();
        order.sort_by(|&a, &b| chunks[b].2.total_cmp(&chunks[a].2).then(a.cmp(&b)));
        let mut keep = Vec::with_capacity(n_select);
        for c in order {
            let (s, e, _) = chunks[c];
            let take = (e - s).min(n_select - keep.len());
            keep.extend(s..s + take);
            if keep.len() == n_select {
                break;
            }
        }
        keep.sort_unstable();
        keep
    }
}

impl Policy for ChunkKv {
    fn name(&self) -> &'static str {
        "chunkkv"
    }

    fn score_rows(&self) -> Option<ScoreRows> {
        Some(ScoreRows::Last(self.window as u32))
    }

    fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    fn chunking(&self) -> Chunking {
        self.chunking
    }

    fn trail(&self) -> usize {
        self.trail
    }

    fn score_reduce(&self) -> ScoreReduce {
        self.reduce
    }

    fn sinks(&self) -> usize {
        self.sinks
    }

    /// One set for all heads: token scores summed over KV heads.
    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>> {
        let Some(first) = layer.heads.first() else {
            return Vec::new();
        };
        let mut total = vec![0f32; first.len()];
        for head in &layer.heads {
            debug_assert_eq!(
                head.pos, first.pos,
                "ChunkKV needs one position per slot across heads"
            );
            for (t, s) in total.iter_mut().zip(&head.score) {
                *t += s;
            }
        }
        if self.trail > 0 {
            total = trail_max(&total, &first.pos, self.trail);
        }
        let keep = self.select_tokens(&total, &first.chunk, n_select);
        vec![keep; layer.heads.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks_of(n: usize, c: usize) -> Vec<u32> {
        (0..n).map(|i| (i / c) as u32).collect()
    }

    #[test]
    fn keeps_the_best_chunks_whole_and_truncates_the_last() {
        let ckv = ChunkKv {
            chunk_size: 4,
            ..ChunkKv::default()
        };
        // 12 tokens, chunks [0..4) [4..8) [8..12); chunk 2 best, then chunk 0.
        let scores = [1., 1., 1., 1., 0., 0., 0., 0.5, 3., 3., 3., 3.];
        let keep = ckv.select_tokens(&scores, &chunks_of(12, 4), 6);
        assert_eq!(keep, vec![0, 1, 8, 9, 10, 11]);
    }

    #[test]
    fn sum_and_mean_rank_a_partial_last_chunk_differently() {
        // Chunks of 4: [0..4) sum 4 / mean 1, [4..8) sum 3 / mean 0.75, [8..9) sum 2 / mean 2.
        let scores = [1., 1., 1., 1., 3., 0., 0., 0., 2.];
        let chunk = chunks_of(9, 4);
        let sum = ChunkKv {
            chunk_size: 4,
            chunk_score: ChunkScore::Sum,
            ..ChunkKv::default()
        };
        let mean = ChunkKv {
            chunk_size: 4,
            chunk_score: ChunkScore::Mean,
            ..ChunkKv::default()
        };
        assert_eq!(sum.select_tokens(&scores, &chunk, 5), vec![0, 1, 2, 3, 4]);
        assert_eq!(mean.select_tokens(&scores, &chunk, 5), vec![0, 1, 2, 3, 8]);
    }

    #[test]
    fn budget_within_one_chunk_keeps_the_most_recent_tokens() {
        let ckv = ChunkKv {
            chunk_size: 10,
            ..ChunkKv::default()
        };
        let scores: Vec<f32> = (0..50).map(|i| if i < 5 { 100.0 } else { 0.0 }).collect();
        assert_eq!(
            ckv.select_tokens(&scores, &chunks_of(50, 10), 7),
            (43..50).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_trail_carries_a_score_forward_over_positions_not_indices() {
        let s = [0., 5., 0., 0., 0., 1., 0.];
        let p = [0, 1, 2, 3, 9, 10, 11];
        assert_eq!(trail_max(&s, &p, 2), vec![0., 5., 5., 5., 0., 1., 1.]);
        assert_eq!(trail_max(&s, &p, 0), s.to_vec());
        // A falling run keeps its maxima in order.
        let s = [4., 3., 2., 1., 0.];
        let p = [0, 1, 2, 3, 4];
        assert_eq!(trail_max(&s, &p, 1), vec![4., 4., 3., 2., 1.]);
    }

    #[test]
    fn a_trail_keeps_the_value_after_its_key() {
        // Chunks of 4; the key spikes at the end of chunk 1, the value fills chunk 2.
        let mut scores = vec![0.1f32; 16];
        scores[7] = 5.0;
        let chunk = chunks_of(16, 4);
        let pos: Vec<Pos> = (0..16).collect();
        let plain = ChunkKv {
            chunk_size: 4,
            ..ChunkKv::default()
        };
        let trailed = trail_max(&scores, &pos, 4);
        assert_eq!(
            plain.select_tokens(&scores, &chunk, 8),
            vec![0, 1, 2, 3, 4, 5, 6, 7]
        );
        assert_eq!(
            plain.select_tokens(&trailed, &chunk, 8),
            vec![4, 5, 6, 7, 8, 9, 10, 11]
        );
    }

    #[test]
    fn pooling_spreads_a_spike_over_neighbours() {
        assert_eq!(avg_pool(&[0., 0., 3., 0., 0.], 3), vec![0., 1., 1., 1., 0.]);
    }
}
