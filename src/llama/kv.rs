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
