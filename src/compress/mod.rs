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
pub use compressor::{CompressError, CompressionReport, Compressor, Keep, Prefilled, StageMs};
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
    /// StreamingLLM: 4 sink tokens and the most recent.
    Streaming,
    /// H2O (prefill variant): attention of every prompt query, top per KV head.
    H2o,
    /// SnapKV: window attention, max-pooled, top per KV head.
    Snapkv,
    /// PyramidKV: SnapKV scores, per-layer budgets decreasing from bottom to top.
    Pyramidkv,
    /// A seeded random subset: the floor.
    Random,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Chunkkv => "chunkkv",
            Method::Streaming => "streaming",
            Method::H2o => "h2o",
            Method::Snapkv => "snapkv",
            Method::Pyramidkv => "pyramidkv",
            Method::Random => "random",
        }
    }

    /// The selection policy of a compressing method (`None` has none).
    /// `shape` is ChunkKV's (chunk size, window, chunk score, pooling); the
    /// baselines take its window.
    pub fn policy(self, shape: &ChunkKv, seed: u64) -> Result<Box<dyn Policy>, CompressError> {
        shape.check()?;
        let window = shape.window;
        Ok(match self {
            Method::None => {
                return Err(CompressError::Config(
                    "method `none` does not compress".into(),
                ))
            }
            Method::Chunkkv => Box::new(shape.clone()),
            Method::Streaming => Box::new(baselines::Streaming::default()),
            Method::H2o => Box::new(baselines::H2o),
            Method::Snapkv => Box::new(baselines::SnapKv { window, kernel: 7 }),
            Method::Random => Box::new(baselines::RandomKeep { seed }),
            Method::Pyramidkv => Box::new(baselines::PyramidKv {
                snap: baselines::SnapKv { window, kernel: 7 },
                ..baselines::PyramidKv::default()
            }),
        })
    }
}
