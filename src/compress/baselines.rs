//! The baselines the paper compares ChunkKV against, through the same hook
//! and budget semantics: StreamingLLM, H2O (prefill variant), SnapKV,
//! PyramidKV and a seeded random floor.

use super::policy::{LayerCandidates, Policy};
use crate::llama::ScoreRows;

/// Indices of the `k` highest scores, returned in increasing index order;
/// ties go to the earlier index. Linear time: a selection, not a sort.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(scores.len());
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            scores[b].total_cmp(&scores[a]).then(a.cmp(&b))
        });
    }
    idx.truncate(k);
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

    fn per_head(&self) -> bool {
        true
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

    fn per_head(&self) -> bool {
        true
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

/// PyramidKV: SnapKV's selection with per-layer counts decreasing linearly
/// from the bottom layer to the top, averaging to the budget.
#[derive(Debug, Clone, PartialEq)]
pub struct PyramidKv {
    pub snap: SnapKv,
    /// Ratio of the mean count to the top layer's count (the paper's β = 20).
    pub beta: f64,
}

impl Default for PyramidKv {
    fn default() -> Self {
        Self {
            snap: SnapKv::default(),
            beta: 20.0,
        }
    }
}

/// Per-layer counts of PyramidKV: linear from `max` (bottom) to `min = mean/β`
/// (top) with `max = 2·mean − min`, so they sum to `n_layers·mean`. Counts are
/// capped at `cap`; what a cap cuts goes to the layers below it that have room,
/// so the sum is kept whenever `n_layers·cap` allows.
pub fn pyramid_counts(n_layers: usize, mean: usize, cap: usize, beta: f64) -> Vec<usize> {
    if n_layers == 0 {
        return Vec::new();
    }
    let total = (n_layers * mean).min(n_layers * cap);
    if n_layers == 1 {
        return vec![total];
    }
    let min = mean as f64 / beta;
    let max = 2.0 * mean as f64 - min;
    let step = (max - min) / (n_layers - 1) as f64;
    let mut counts: Vec<usize> = (0..n_layers)
        .map(|l| ((max - step * l as f64).round() as usize).min(cap))
        .collect();
    // Rounding and capping: settle the difference one token at a time,
    // adding to the lowest layers with room and taking from the highest non-empty ones.
    let mut sum: usize = counts.iter().sum();
    let mut l = 0;
    while sum < total {
        if counts[l % n_layers] < cap {
            counts[l % n_layers] += 1;
            sum += 1;
        }
        l += 1;
    }
    let mut l = n_layers;
    while sum > total {
        l = if l == 0 { n_layers - 1 } else { l - 1 };
        if counts[l] > 0 {
            counts[l] -= 1;
            sum -= 1;
        }
    }
    counts
}

impl Policy for PyramidKv {
    fn name(&self) -> &'static str {
        "pyramidkv"
    }

    fn per_head(&self) -> bool {
        true
    }

    fn uniform_counts(&self) -> bool {
        false
    }

    fn score_rows(&self) -> Option<ScoreRows> {
        self.snap.score_rows()
    }

    fn layer_counts(&self, n_groups: usize, n_select: usize, n_cand: usize) -> Vec<usize> {
        pyramid_counts(n_groups, n_select, n_cand, self.beta)
    }

    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>> {
        self.snap.select(layer, n_select)
    }
}

/// KVzip (Kim et al., NeurIPS 2025), token level: context-reconstruction
/// scores, top per KV head. The same scores `chunkkv --kv-score reconstruct`
/// ranks by chunk. Budgets are uniform over layers and heads (llama.cpp's
/// cache has one cell count for all), unlike KVzip's global ranking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvZip;

impl Policy for KvZip {
    fn name(&self) -> &'static str {
        "kvzip"
    }

    fn per_head(&self) -> bool {
        true
    }

    fn score_rows(&self) -> Option<ScoreRows> {
        // Scored rows are the reconstruction's, all of them.
        Some(ScoreRows::All)
    }

    fn needs_reconstruction(&self) -> bool {
        true
    }

    /// H2O's selection (top per head), on reconstruction scores.
    fn select(&self, layer: &LayerCandidates, n_select: usize) -> Vec<Vec<usize>> {
        H2o.select(layer, n_select)
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
                    pos: (0..n as i32).collect::<Vec<_>>().into(),
                    score: s.to_vec(),
                    chunk: (0..n as u32).collect::<Vec<_>>().into(),
                    cell: (0..n).collect::<Vec<_>>().into(),
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
    fn pyramid_counts_decrease_and_average_to_the_budget() {
        // mean 100, β 20: min 5, max 195, linear over 5 layers.
        assert_eq!(
            pyramid_counts(5, 100, 1000, 20.0),
            vec![195, 148, 100, 53, 4]
        );
        let c = pyramid_counts(30, 37, 10_000, 20.0);
        assert_eq!(c.iter().sum::<usize>(), 30 * 37);
        assert!(c.windows(2).all(|w| w[0] >= w[1]), "{c:?}");
        // A cap moves the surplus of the bottom layers up.
        let c = pyramid_counts(4, 100, 150, 20.0);
        assert_eq!(c.iter().sum::<usize>(), 400);
        assert!(c.iter().all(|&n| n <= 150), "{c:?}");
        // Everything fits: every layer keeps everything.
        assert_eq!(pyramid_counts(3, 10, 8, 20.0), vec![8, 8, 8]);
        assert_eq!(pyramid_counts(1, 10, 50, 20.0), vec![10]);
    }

    #[test]
    fn pyramidkv_selects_like_snapkv_per_head() {
        let l = layer(&[
            &[5., 1., 4., 0., 3., 0., 0., 9.],
            &[0., 9., 0., 0., 0., 0., 8., 0.],
        ]);
        let p = PyramidKv::default();
        assert_eq!(p.select(&l, 3), SnapKv::default().select(&l, 3));
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
