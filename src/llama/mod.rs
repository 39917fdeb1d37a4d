//! Safe bindings to the patched llama.cpp. Nothing outside this module touches
//! `crate::sys`; no raw llama.cpp type appears in these signatures.

mod backend;
mod batch;
mod context;
mod detok;
mod error;
mod host_buffer;
mod kv;
mod model;
mod sampler;
mod state;

pub use backend::{Backend, Device, DeviceKind};
pub use batch::Batch;
pub use context::{CacheType, Context, ContextParams, FlashAttn, Pos, SeqId, SeqState};
pub use detok::StreamDecoder;
pub use error::{
    ChatTemplateError, ContextError, DecodeError, LoadError, RpcError, StateError, TokenizeError,
};
pub use host_buffer::HostBuffer;
pub use kv::{
    mib, CompactError, DeadSlots, ImportanceAllocError, KvLayerLayout, KvPart, KvStats,
    LayerImportance, RowsError, ScoreReduce, ScoreRows,
};
pub use model::{apply_template, ChatMessage, Model, ModelInfo, ModelParams, SplitMode, Token};
pub use sampler::{Sampler, SamplingParams};
pub use state::{DumpError, KvDump};

/// Version facts fixed at build time.
pub mod version {
    /// Version of the `llama-cpp-sys-2` crate that carries the llama.cpp source.
    pub const CARRIER: &str = env!("CHUNKKV_CARRIER_VERSION");
    pub const GGML: &str = env!("CHUNKKV_GGML_VERSION");
    /// Our patches, in the order applied.
    pub const PATCHES: &str = env!("CHUNKKV_PATCHES");
    /// ggml backends compiled into this build.
    pub const BACKENDS: &str = env!("CHUNKKV_BACKENDS");
}
