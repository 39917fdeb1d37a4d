//! The baselines the paper compares ChunkKV against, through the same hook
//! and budget semantics: StreamingLLM, H2O (prefill variant), SnapKV and a
//! seeded random floor. PyramidKV needs different kept counts per layer,
//! which the compaction (one slot count for every layer) cannot represent.

use super::policy::{LayerCandidates, Policy};
use crate::llama::ScoreRows;

/// Indices of the `k` highest scores, returned in increasing index order;
/// ties go to the earlier index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k.min(scores.len()));
    idx.sort_unstable();
    idx
}

/// Max pooling with a centred kernel, shrinking at the edges.
pub fn max_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(x.len());
            x[lo..hi].iter().copied().fold(f32::NEG_INFINITY, f32::max)
        })
        .collect()
}

/// StreamingLLM: the first `sinks` tokens and the most recent ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streaming {
    pub sinks: usize,
}

impl Default for Streaming {
    fn default() -> Self {
        Self { sinks: 4 }
    }
}

impl Policy for Streaming {
    fn name(&self) -> &'static str {
        "streaming"
    }

    fn score_rows(&self) -> Option<ScoreRows> {
        None
    }

    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>> {
        let n = layer.heads.first().map_or(0, |h| h.len());
        let sinks = self.sinks.min(n_select);
        let keep: Vec<usize> = (0..sinks).chain(n - (n_select - sinks)..n).collect();
        vec![keep; layer.heads.len()]
    }
}

/// H2O, prefill variant: attention from every prompt query, summed; top per KV head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct H2o;

impl Policy for H2o {
    fn name(&self) -> &'static str {
        "h2o"
    }

    fn score_rows(&self) -> Option<ScoreRows> {
        Some(ScoreRows::All)
    }

    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>> {
        layer
            .heads
            .iter()
            .map(|h| top_k(&h.score, n_select))
            .collect()
    }
}

/// SnapKV: window attention, max-pooled (kernel 7), top per KV head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapKv {
    pub window: usize,
    pub kernel: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self {
            window: 32,
            kernel: 7,
        }
    }
}

impl Policy for SnapKv {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn score_rows(&self) -> Option<ScoreRows> {
        Some(ScoreRows::Last(self.window as u32))
    }

    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>> {
        layer
            .heads
            .iter()
            .map(|h| top_k(&max_pool(&h.score, self.kernel), n_select))
            .collect()
    }
}

/// A seeded random subset (one set for all heads): the floor any method must beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomKeep {
    pub seed: u64,
}

impl Policy for RandomKeep {
    fn name(&self) -> &'static str {
        "random"
    }

    fn score_rows(&self) -> Option<ScoreRows> {
        None
    }

    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>> {
        let n = layer.heads.first().map_or(0, |h| h.len());
        let mut state = self.seed ^ (u64::from(layer.layer) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        let mut idx: Vec<usize> = (0..n).collect();
        // Partial Fisher-Yates: the first n_select entries become a uniform sample.
        for i in 0..n_select.min(n) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let j = i + (state % (n - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(n_select.min(n));
        idx.sort_unstable();
        vec![idx; layer.heads.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::policy::HeadCandidates;

    fn layer(scores: &[&[f32]]) -> LayerCandidates {
        let n = scores[0].len();
        LayerCandidates {
            layer: 0,
            heads: scores
                .iter()
                .map(|s| HeadCandidates {
                    pos: (0..n as i32).collect(),
                    score: s.to_vec(),
                    chunk: (0..n as u32).collect(),
                    cell: (0..n).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn streaming_keeps_sinks_and_the_most_recent() {
        let l = layer(&[&[0.0; 20], &[0.0; 20]]);
        let keep = Streaming::default().select(&l, 7);
        assert_eq!(keep[0], vec![0, 1, 2, 3, 17, 18, 19]);
        assert_eq!(keep[1], keep[0]);
        assert_eq!(Streaming::default().select(&l, 3)[0], vec![0, 1, 2]);
    }

    #[test]
    fn h2o_picks_the_top_tokens_of_each_head() {
        let l = layer(&[&[5., 1., 4., 0., 3.], &[0., 9., 0., 8., 1.]]);
        let keep = H2o.select(&l, 2);
        assert_eq!(keep, vec![vec![0, 2], vec![1, 3]]);
    }

    #[test]
    fn snapkv_max_pools_before_ranking() {
        // A lone spike at 5 pools over 2..=8; ranking then prefers the spike's neighbours
        // over an isolated middling score at 15.
        let mut s = vec![0.0f32; 20];
        s[5] = 10.0;
        s[15] = 6.0;
        let keep = SnapKv {
            window: 8,
            kernel: 7,
        }
        .select(&layer(&[&s]), 8);
        assert_eq!(keep[0], vec![2, 3, 4, 5, 6, 7, 8, 12]);
    }

    #[test]
    fn random_is_seeded_sized_and_sorted() {
        let l = layer(&[&[0.0; 100]]);
        let a = RandomKeep { seed: 1 }.select(&l, 10);
        assert_eq!(a, RandomKeep { seed: 1 }.select(&l, 10));
        assert_ne!(a, RandomKeep { seed: 2 }.select(&l, 10));
        assert_eq!(a[0].len(), 10);
        assert!(a[0].windows(2).all(|w| w[0] < w[1]));
    }
}
