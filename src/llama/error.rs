//! One error enum per operation, so callers match on what can actually go wrong.

use std::path::PathBuf;

/// Loading a GGUF model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a GGUF file (it does not start with the GGUF magic)")]
    NotGguf(PathBuf),
    #[error("llama.cpp could not load {0} (truncated or corrupt GGUF, or an unsupported architecture; run with -v for llama.cpp's log)")]
    Rejected(PathBuf),
    #[error("path is not valid UTF-8 without NUL bytes: {0}")]
    BadPath(PathBuf),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("{0}")]
    Devices(String),
}

/// Reaching or serving ggml's RPC backend.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("RPC server `{0}` is not HOST:PORT")]
    BadEndpoint(String),
    #[error("cannot reach RPC server {endpoint}: {reason} (start one with `chunkkv rpc-server --host HOST --port PORT` there)")]
    Unreachable { endpoint: String, reason: String },
    #[error("this build has no RPC backend")]
    NoBackend,
    #[error("no device named `{0}` (see `chunkkv info`)")]
    UnknownDevice(String),
}

/// Creating a context on a model.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("a quantized V cache ({0}) needs flash attention: use -fa on or -fa auto")]
    QuantizedVNeedsFlashAttention(&'static str),
    #[error("invalid context parameters: {0}")]
    Invalid(String),
    #[error("llama.cpp could not create the context (out of memory for n_ctx = {n_ctx}? run with -v for llama.cpp's log)")]
    Rejected { n_ctx: u32 },
}

/// Running `llama_decode`, with every return code of the pinned llama.cpp mapped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("no KV-cache slot for the batch: the context is full ({n_ctx} cells)")]
    NoKvSlot { n_ctx: u32 },
    #[error("decode aborted")]
    Aborted,
    #[error("invalid batch (bad token id, position or sequence id)")]
    InvalidBatch,
    #[error("llama_decode failed with code {0}")]
    Fatal(i32),
    #[error("empty batch")]
    Empty,
    #[error("{needed} tokens do not fit: the context holds {n_ctx} and {used} are in use")]
    ContextFull {
        needed: usize,
        used: u32,
        n_ctx: u32,
    },
}

impl DecodeError {
    pub(crate) fn from_code(code: i32, n_ctx: u32) -> Result<(), DecodeError> {
        match code {
            0 => Ok(()),
            1 => Err(DecodeError::NoKvSlot { n_ctx }),
            2 => Err(DecodeError::Aborted),
            -1 => Err(DecodeError::InvalidBatch),
            c => Err(DecodeError::Fatal(c)),
        }
    }
}

/// Turning text into tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("text contains a NUL byte")]
    Nul,
    #[error("text too long to tokenize")]
    TooLong,
}

/// Rendering a chat with a template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the model has no chat template")]
    Missing,
    #[error("llama.cpp does not support this chat template")]
    Unsupported,
    #[error("chat text contains a NUL byte")]
    Nul,
}

/// Saving or restoring a sequence's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the sequence state could not be read")]
    Read,
    #[error("the sequence state was rejected by this context (different model, cache types or too few cells)")]
    Rejected,
}
