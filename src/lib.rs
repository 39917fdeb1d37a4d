//! chunkkv: ChunkKV KV-cache compression inside llama.cpp.
//!
//! - [`llama`]: safe bindings to the pinned, patched llama.cpp.
//! - [`compress`]: ChunkKV selection, layer reuse and the compaction hook.
//! - [`models`]: built-in model names and their fetch-and-verify cache.
//! - [`pipeline`]: prefill and generation on one sequence.
//! - [`serve`]: the OpenAI-compatible server, one compressed sequence per slot.
//! - [`cli`]: the `chunkkv` command line.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod compare;
pub mod compress;
pub mod eval;
pub mod hardware;
pub mod llama;
pub mod models;
pub mod pipeline;
pub mod serve;
pub mod synth;
pub(crate) mod sys;
pub mod threads;
pub mod workload;
