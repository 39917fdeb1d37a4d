//! KV-cache compression: budgets, selection policies (ChunkKV), layer-wise
//! index reuse, the slot→position table, and the hook that compacts the cache.

pub mod baselines;
pub mod budget;
pub mod chunkkv;
pub mod compressor;
pub mod policy;
pub mod reuse;
pub mod slots;
pub mod verify;

pub use budget::Budget;
pub use chunkkv::{ChunkKv, ChunkScore};
pub use compressor::{CompressError, CompressionReport, Compressor, Prefilled, StageMs};
pub use policy::{HeadCandidates, LayerCandidates, Policy};

/// `--kv-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// llama.cpp's cache, uncompressed.
    None,
    /// ChunkKV: whole chunks ranked by window attention, reused across layer groups.
    #[default]
    Chunkkv,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Chunkkv => "chunkkv",
        }
    }
}
