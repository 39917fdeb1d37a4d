//! A loaded GGUF model: weights, vocabulary, metadata and chat template.

use std::ffi::{c_char, CString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::backend::{cstr, Backend};
use super::error::{ChatTemplateError, LoadError, TokenizeError};
use crate::sys;

/// A token id of the model's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Token(pub i32);

/// How a model is spread over several devices (llama.cpp's `-sm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitMode {
    /// One device (`-mg`) holds every offloaded layer.
    None,
    /// Whole layers, and their KV cache, per device.
    #[default]
    Layer,
    /// Layers split by rows where the backend can; KV cache per layer's device.
    Row,
    /// Tensor parallelism: the KV cache itself is split across devices.
    Tensor,
}

impl SplitMode {
    fn raw(self) -> sys::llama_split_mode {
        match self {
            SplitMode::None => sys::LLAMA_SPLIT_MODE_NONE,
            SplitMode::Layer => sys::LLAMA_SPLIT_MODE_LAYER,
            SplitMode::Row => sys::LLAMA_SPLIT_MODE_ROW,
            SplitMode::Tensor => sys::LLAMA_SPLIT_MODE_TENSOR,
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelParams {
    n_gpu_layers: i32,
    split_mode: SplitMode,
    main_gpu: i32,
    tensor_split: Vec<f32>,
    rpc: Vec<String>,
}

impl Default for ModelParams {
    /// All layers on the GPU when there is one (llama.cpp's own default).
    fn default() -> Self {
        Self {
            n_gpu_layers: -1,
            split_mode: SplitMode::Layer,
            main_gpu: 0,
            tensor_split: Vec::new(),
            rpc: Vec::new(),
        }
    }
}

impl ModelParams {
    /// Layers to offload to the GPU; negative means all.
    pub fn with_n_gpu_layers(mut self, n: i32) -> Self {
        self.n_gpu_layers = n;
        self
    }
    pub fn with_split_mode(mut self, mode: SplitMode) -> Self {
        self.split_mode = mode;
        self
    }
    /// The device that holds everything with `SplitMode::None`.
    pub fn with_main_gpu(mut self, device: i32) -> Self {
        self.main_gpu = device;
        self
    }
    /// Share of the offloaded model per device, in device order.
    pub fn with_tensor_split(mut self, split: Vec<f32>) -> Self {
        self.tensor_split = split;
        self
    }
    /// ggml RPC servers (`host:port`) whose devices hold offloaded layers.
    pub fn with_rpc_servers(mut self, servers: Vec<String>) -> Self {
        self.rpc = servers;
        self
    }
}

/// The facts of a model that KV-cache compression depends on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub description: String,
    pub architecture: String,
    pub n_params: u64,
    pub size_bytes: u64,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_embd: u32,
    pub n_ctx_train: u32,
    pub n_vocab: u32,
    /// Sliding-window span, 0 when the model has no sliding-window layers.
    pub n_swa: u32,
    /// Indices of the layers that attend through a sliding window.
    pub swa_layers: Vec<u32>,
    pub is_recurrent: bool,
    pub is_hybrid: bool,
}

/// A model loaded from a GGUF file. Contexts borrow it, so it outlives them.
#[derive(Debug)]
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    path: PathBuf,
    split_mode: SplitMode,
}

// SAFETY: a llama_model is immutable after loading; llama.cpp shares it across
// contexts on different threads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the pointer; contexts borrowing the model are gone.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl Model {
    /// Loads a GGUF file. The file is checked before llama.cpp sees it, so a
    /// missing or non-GGUF path gets a precise error.
    pub fn load(backend: &Backend, path: &Path, params: &ModelParams) -> Result<Model, LoadError> {
        if !path.exists() {
            return Err(LoadError::NotFound(path.to_path_buf()));
        }
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut magic = [0u8; 4];
        let mut file = std::fs::File::open(path).map_err(io)?;
        if file.read_exact(&mut magic).is_err() || &magic != GGUF_MAGIC {
            return Err(LoadError::NotGguf(path.to_path_buf()));
        }
        let c_path = path
            .to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| LoadError::BadPath(path.to_path_buf()))?;
        for server in &params.rpc {
            backend.add_rpc_server(server)?;
        }
        // SAFETY: llama_max_devices is a constant of the build.
        let max_devices = unsafe { sys::llama_max_devices() };
        if params.tensor_split.len() > max_devices {
            return Err(LoadError::Devices(format!(
                "-ts names {} devices; this build handles at most {max_devices}",
                params.tensor_split.len()
            )));
        }
        let mut split = params.tensor_split.clone();
        split.resize(max_devices, 0.0);
        // SAFETY: plain C struct from llama.cpp's defaults; c_path and split
        // (llama_max_devices floats) outlive the call.
        let ptr = unsafe {
            let mut p = sys::llama_model_default_params();
            p.n_gpu_layers = params.n_gpu_layers;
            p.split_mode = params.split_mode.raw();
            p.main_gpu = params.main_gpu;
            if !params.tensor_split.is_empty() {
                p.tensor_split = split.as_ptr();
            }
            sys::llama_model_load_from_file(c_path.as_ptr(), p)
        };
        NonNull::new(ptr)
            .map(|ptr| Model {
                ptr,
                path: path.to_path_buf(),
                split_mode: params.split_mode,
            })
            .ok_or_else(|| LoadError::Rejected(path.to_path_buf()))
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the model was spread over devices.
    pub fn split_mode(&self) -> SplitMode {
        self.split_mode
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: valid model; the vocab lives as long as the model.
        unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) }
    }

    /// A GGUF metadata value as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf is writable for buf.len() bytes.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.ptr.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                return Some(String::from_utf8_lossy(&buf[..n as usize]).into_owned());
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    pub fn n_layer(&self) -> u32 {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) as u32 }
    }

    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) as u32 }
    }

    pub fn n_vocab(&self) -> u32 {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) as u32 }
    }

    /// Whether layer `il` attends through a sliding window.
    pub fn layer_is_swa(&self, il: u32) -> bool {
        // SAFETY: valid model; out-of-range il returns false.
        unsafe { sys::llama_model_layer_is_swa(self.ptr.as_ptr(), il as i32) }
    }

    /// KV heads of layer `il` (0 when out of range).
    pub fn layer_n_head_kv(&self, il: u32) -> u32 {
        // SAFETY: valid model; out-of-range il returns 0.
        unsafe { sys::llama_model_layer_n_head_kv(self.ptr.as_ptr(), il as i32) }
    }

    pub fn info(&self) -> ModelInfo {
        let m = self.ptr.as_ptr();
        // SAFETY: valid model; all calls are read-only getters.
        unsafe {
            let mut desc = vec![0u8; 256];
            let n = sys::llama_model_desc(m, desc.as_mut_ptr() as *mut c_char, desc.len()).max(0)
                as usize;
            let n_layer = self.n_layer();
            ModelInfo {
                description: String::from_utf8_lossy(&desc[..n.min(desc.len())]).into_owned(),
                architecture: self.meta("general.architecture").unwrap_or_default(),
                n_params: sys::llama_model_n_params(m),
                size_bytes: sys::llama_model_size(m),
                n_layer,
                n_head: sys::llama_model_n_head(m) as u32,
                n_head_kv: sys::llama_model_n_head_kv(m) as u32,
                head_dim: sys::llama_model_layer_head_dim_k(m, 0),
                n_embd: sys::llama_model_n_embd(m) as u32,
                n_ctx_train: self.n_ctx_train(),
                n_vocab: self.n_vocab(),
                n_swa: sys::llama_model_n_swa(m).max(0) as u32,
                swa_layers: (0..n_layer).filter(|&il| self.layer_is_swa(il)).collect(),
                is_recurrent: sys::llama_model_is_recurrent(m),
                is_hybrid: sys::llama_model_is_hybrid(m),
            }
        }
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the model wants;
    /// `parse_special` turns control-token text (e.g. `<|im_start|>`) into tokens.
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>, TokenizeError> {
        let len = i32::try_from(text.len()).map_err(|_| TokenizeError::TooLong)?;
        let mut out: Vec<i32> = vec![0; text.len() + 8];
        for _ in 0..2 {
            // SAFETY: text is valid for len bytes (not NUL-terminated, llama.cpp takes the length);
            // out is writable for out.len() tokens.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const c_char,
                    len,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n == i32::MIN {
                return Err(TokenizeError::TooLong);
            }
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out.into_iter().map(Token).collect());
            }
            out.resize((-n) as usize, 0);
        }
        Err(TokenizeError::TooLong)
    }

    /// The bytes of one token. A token may hold part of a UTF-8 character, so
    /// this is bytes, not text; see [`super::StreamDecoder`].
    pub fn token_bytes(&self, token: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        loop {
            // SAFETY: buf is writable for buf.len() bytes.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token.0,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// Text of a token sequence (invalid UTF-8 replaced).
    pub fn detokenize(&self, tokens: &[Token], special: bool) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| self.token_bytes(t, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn bos(&self) -> Option<Token> {
        // SAFETY: valid vocab.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        (t >= 0).then_some(Token(t))
    }

    /// End-of-generation tokens (EOS, EOT, ...).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token.0) }
    }

    /// The model's built-in chat template, if its GGUF has one.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: returns a string owned by the model, or NULL.
        let p = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        (!p.is_null()).then(|| unsafe { cstr(p) })
    }

    /// Renders `messages` with the model's chat template; `add_assistant` ends
    /// the text with the assistant turn's opening.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_assistant: bool,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self.chat_template().ok_or(ChatTemplateError::Missing)?;
        apply_template(&tmpl, messages, add_assistant)
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders messages with a chat template (one of llama.cpp's built-in set).
pub fn apply_template(
    tmpl: &str,
    messages: &[ChatMessage],
    add_assistant: bool,
) -> Result<String, ChatTemplateError> {
    let c_tmpl = CString::new(tmpl).map_err(|_| ChatTemplateError::Nul)?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|m| {
            Ok((
                CString::new(m.role.as_str())?,
                CString::new(m.content.as_str())?,
            ))
        })
        .collect::<Result<_, std::ffi::NulError>>()
        .map_err(|_| ChatTemplateError::Nul)?;
    let chat: Vec<sys::llama_chat_message> = owned
        .iter()
        .map(|(r, c)| sys::llama_chat_message {
            role: r.as_ptr(),
            content: c.as_ptr(),
        })
        .collect();
    let mut buf = vec![
        0u8;
        messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum::<usize>()
            * 2
            + 256
    ];
    loop {
        // SAFETY: chat points at CStrings alive for the call; buf is writable for buf.len() bytes.
        let n = unsafe {
            sys::llama_chat_apply_template(
                c_tmpl.as_ptr(),
                chat.as_ptr(),
                chat.len(),
                add_assistant,
                buf.as_mut_ptr() as *mut c_char,
                buf.len() as i32,
            )
        };
        if n < 0 {
            return Err(ChatTemplateError::Unsupported);
        }
        if (n as usize) <= buf.len() {
            buf.truncate(n as usize);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.resize(n as usize, 0);
    }
}
