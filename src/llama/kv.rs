//! KV-cache statistics from the patched llama.cpp (`llama_kv_stats_get`).

use super::context::CacheType;
use crate::sys;

/// Which attention cache of a context: the full-attention one, or the
/// sliding-window one of an iSWA model (Gemma 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvPart {
    Base,
    Swa,
}

impl KvPart {
    pub(crate) fn raw(self) -> sys::llama_kv_part {
        match self {
            KvPart::Base => sys::LLAMA_KV_PART_BASE,
            KvPart::Swa => sys::LLAMA_KV_PART_SWA,
        }
    }
}

/// Bytes in MiB, as every report of KV memory prints them.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// What one attention cache holds and costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvStats {
    /// Cells allocated.
    pub size: u32,
    /// Cells holding a token.
    pub cells_used: u32,
    /// Keys the next decode attends over (llama.cpp's `n_kv`, padded to 256).
    pub attn_width: u32,
    /// Layers that own K/V tensors.
    pub n_layer: u32,
    /// Bytes of K and V rows of used cells, over all storage layers.
    pub bytes_live: u64,
    /// Bytes of the K and V tensors.
    pub bytes_allocated: u64,
    pub type_k: Option<CacheType>,
    pub type_v: Option<CacheType>,
    /// V is stored transposed (flash attention off when the cache was made).
    pub v_trans: bool,
}

impl KvStats {
    pub(crate) fn from_raw(r: &sys::llama_kv_stats) -> Self {
        KvStats {
            size: r.size * r.n_stream,
            cells_used: r.cells_used,
            attn_width: r.n_kv,
            n_layer: r.n_layer,
            bytes_live: r.bytes_live,
            bytes_allocated: r.bytes_allocated,
            type_k: CacheType::from_ggml(r.type_k),
            type_v: CacheType::from_ggml(r.type_v),
            v_trans: r.v_trans,
        }
    }
}

/// Which query rows of a decode score the keys (patch 0002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreRows {
    /// The last `n` rows of each micro-batch (an observation window).
    Last(u32),
    /// Every row (H2O's accumulated attention).
    All,
}

/// How importance combines over query rows, the query heads of a KV head's
/// group, micro-batches and calls (patch 0005).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ScoreReduce {
    /// Summed (the observation window, H2O).
    #[default]
    Sum,
    /// The largest attention any scored query paid (KVzip's reconstruction).
    Max,
}

/// Attention importance of one model layer, head-major: head `h`'s score of
/// cell `c` at `h * n_cells + c`, as llama.cpp returns it (one flat buffer,
/// so reading a layer back is one copy).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerImportance {
    pub layer: u32,
    scores: Vec<f32>,
    n_cells: usize,
}

impl LayerImportance {
    /// Scores of `n_heads` heads over `n_cells` cells, head-major.
    ///
    /// # Panics
    /// If `scores` does not hold a whole number of heads of `n_cells`.
    pub fn new(layer: u32, n_cells: usize, scores: Vec<f32>) -> Self {
        assert!(
            scores.len() % n_cells.max(1) == 0,
            "{} scores are not whole heads of {n_cells} cells",
            scores.len()
        );
        LayerImportance {
            layer,
            scores,
            n_cells,
        }
    }

    /// From one score vector per head (all of one length).
    pub fn from_heads(layer: u32, heads: Vec<Vec<f32>>) -> Self {
        let n_cells = heads.first().map_or(0, Vec::len);
        assert!(
            heads.iter().all(|h| h.len() == n_cells),
            "heads differ in length"
        );
        LayerImportance::new(layer, n_cells, heads.concat())
    }

    pub fn n_heads(&self) -> usize {
        self.scores.len() / self.n_cells.max(1)
    }

    /// Head `h`'s scores by cell.
    pub fn head(&self, h: usize) -> &[f32] {
        &self.scores[h * self.n_cells..(h + 1) * self.n_cells]
    }

    /// Head `h`'s score of cell `c`, if both exist.
    pub fn get(&self, h: usize, c: usize) -> Option<f32> {
        (c < self.n_cells)
            .then(|| self.scores.get(h * self.n_cells + c).copied())
            .flatten()
    }

    pub fn heads(&self) -> impl Iterator<Item = &[f32]> {
        self.scores.chunks_exact(self.n_cells.max(1))
    }

    pub fn n_cells(&self) -> usize {
        self.n_cells
    }

    /// Adds `by` to head `h`'s score of cell `c` (nothing if either is out of range).
    pub fn raise(&mut self, h: usize, c: usize, by: f32) {
        if c < self.n_cells {
            if let Some(s) = self.scores.get_mut(h * self.n_cells + c) {
                *s += by;
            }
        }
    }

    /// Adds `other`'s scores head by head and cell by cell (scores from
    /// several passes or several layers of one reuse group).
    pub fn add(&mut self, other: &LayerImportance) {
        self.merge(other, ScoreReduce::Sum);
    }

    /// Combines `other`'s scores into these head by head and cell by cell,
    /// as `reduce` combines the passes of one scoring.
    pub fn merge(&mut self, other: &LayerImportance, reduce: ScoreReduce) {
        let n = self.n_cells.min(other.n_cells);
        for h in 0..self.n_heads().min(other.n_heads()) {
            let acc = &mut self.scores[h * self.n_cells..h * self.n_cells + n];
            for (a, &x) in acc.iter_mut().zip(&other.head(h)[..n]) {
                *a = match reduce {
                    ScoreReduce::Sum => *a + x,
                    ScoreReduce::Max => a.max(x),
                };
            }
        }
    }
}

/// The device of a scored layer's cache has no room for its importance sums
/// (`n_ctx` × KV heads floats per scored layer, patch 0008).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("out of device memory for the attention-importance sums")]
pub struct ImportanceAllocError;

/// Failure of an on-device compaction (codes of `llama_kv_compact`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompactError {
    #[error("a layer mask range is invalid, or the context has more than one KV stream")]
    BadMask,
    #[error("invalid compaction arguments (a source cell is empty or out of range, or n_keep is 0 or too large)")]
    BadArguments,
    #[error("the KV stream is shared with another sequence or has a pending shift")]
    SharedStream,
    #[error("this KV-cache layout cannot be compacted (padded rows or quantized transposed V)")]
    UnsupportedLayout,
    #[error("this cache shares its cells with another cache")]
    SharedCells,
    #[error("the compaction graph failed to run on the device")]
    Compute,
    #[error("the context has no such KV cache")]
    NoCache,
    #[error("llama_kv_compact returned {0}")]
    Other(i32),
}

/// Cells `begin..end` masked out of one model layer's attention (patch 0004):
/// the surplus slots of a layer that keeps fewer tokens than the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadSlots {
    pub layer: u32,
    pub begin: u32,
    pub end: u32,
}

/// Byte layout of one storage layer of a sequence's stream (patch 0007):
/// what recall needs to cut a (cell, KV head) row out of the raw tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayerLayout {
    /// Model layer.
    pub layer: u32,
    pub n_head_kv: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    /// Cells of the stream.
    pub n_cells: usize,
    /// Bytes of one KV head's K row (quantized blocks included).
    pub k_head_bytes: usize,
    /// Bytes of one KV head's V row; 0 when the layer stores no V.
    pub v_head_bytes: usize,
    /// V stored transposed (flash attention off): element (cell `c`, dim
    /// `j`) at `j * n_cells + c`; else one row per cell like K.
    pub v_trans: bool,
    /// Bytes of the stream's K and V tensors.
    pub k_bytes: usize,
    pub v_bytes: usize,
}

impl KvLayerLayout {
    pub(crate) fn from_raw(r: &sys::llama_kv_layer_layout) -> Option<Self> {
        let n_cells = r.n_cells as usize;
        let n_head_kv = r.n_head_kv as usize;
        if n_cells == 0 || n_head_kv == 0 {
            return None;
        }
        let k_head_bytes = r.k_bytes / n_cells / n_head_kv;
        let v_head_bytes = if r.type_v < 0 {
            0
        } else {
            r.v_bytes / n_cells / n_head_kv
        };
        Some(KvLayerLayout {
            layer: r.il as u32,
            n_head_kv,
            head_dim_k: r.head_dim_k as usize,
            head_dim_v: r.head_dim_v as usize,
            n_cells,
            k_head_bytes,
            v_head_bytes,
            v_trans: r.v_trans,
            k_bytes: r.k_bytes,
            v_bytes: r.v_bytes,
        })
    }

    /// Bytes of one element of a transposed V.
    pub fn v_elem_bytes(&self) -> usize {
        self.v_head_bytes / self.head_dim_v.max(1)
    }
}

/// Failure of a raw row copy or cell claim (patch 0007).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowsError {
    #[error("the context has no such KV cache, layer or sequence")]
    NoCache,
    #[error("byte range {offset}+{len} lies outside the layer's tensor")]
    OutOfRange { offset: usize, len: usize },
    #[error("cells {c0}..{end} are not all free (or another sequence shares the stream)")]
    CellsTaken { c0: u32, end: u32 },
}
