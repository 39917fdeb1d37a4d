//! Shared helpers: the real default model, fetched once into the model cache.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use chunkkv::llama::{Backend, Context, ContextParams, FlashAttn, Model, ModelParams};

/// Path of a built-in model (fetched on first use).
pub fn model_path(name: &str) -> PathBuf {
    chunkkv::models::resolve(name).unwrap_or_else(|e| panic!("model {name}: {e}"))
}

/// The default model, loaded once per test binary.
pub fn default_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model_path(chunkkv::models::DEFAULT_MODEL);
        Model::load(
            Backend::init(),
            &path,
            &ModelParams::default().with_n_gpu_layers(0),
        )
        .expect("load default model")
    })
}

/// A small CPU context: 2 threads, flash attention off (faster on CPU).
pub fn small_ctx(model: &Model, n_ctx: u32) -> Context<'_> {
    let p = ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_n_threads(2)
        .with_flash_attn(FlashAttn::Off);
    Context::new(model, &p).expect("context")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_chunkkv")
}

/// One attention cache as serialized by `llama_state_seq_get_data`
/// (the layout written by llama_kv_cache::state_write of the pinned llama.cpp).
#[derive(Debug, Clone)]
pub struct KvDump {
    /// Position of each serialized cell, in cell order.
    pub pos: Vec<i32>,
    pub v_trans: bool,
    /// Per storage layer: (row bytes, cell-major rows).
    pub k: Vec<(usize, Vec<u8>)>,
    /// Per storage layer: row bytes and rows; when `v_trans`, (element bytes, dim-major elements).
    pub v: Vec<(usize, Vec<u8>)>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
}

/// Parses the first (full-attention) cache of a single-stream sequence state.
pub fn parse_kv_state(blob: &[u8]) -> KvDump {
    let mut r = Reader(blob);
    let (_magic, _seq) = (r.u32(), r.i32());
    assert_eq!(r.u32(), 1, "one stream");
    let n_cells = r.u32() as usize;
    let mut pos = Vec::with_capacity(n_cells);
    for _ in 0..n_cells {
        pos.push(r.i32());
        let n_seq = r.u32();
        for _ in 0..n_seq {
            r.i32();
        }
    }
    let v_trans = r.u32() == 1;
    let n_layer = r.u32() as usize;
    let (_rot_k, _rot_v) = (r.u32(), r.u32());
    let mut k = Vec::new();
    for _ in 0..n_layer {
        let _type = r.i32();
        let row = r.u64() as usize;
        k.push((row, r.take(row * n_cells).to_vec()));
    }
    let mut v = Vec::new();
    for _ in 0..n_layer {
        let _type = r.i32();
        if v_trans {
            let el = r.u32() as usize;
            let n_embd = r.u32() as usize;
            v.push((el, r.take(el * n_embd * n_cells).to_vec()));
        } else {
            let row = r.u64() as usize;
            v.push((row, r.take(row * n_cells).to_vec()));
        }
    }
    KvDump { pos, v_trans, k, v }
}

/// The shared data directory: `$CHUNKKV_DATA`, else `../shared/data` beside the repo.
pub fn data_dir() -> PathBuf {
    std::env::var_os("CHUNKKV_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// About `n_chars` of Paul Graham essays (the needle-in-a-haystack haystack).
pub fn essays(n_chars: usize) -> String {
    let dir = data_dir().join("paul-graham-essays");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (set CHUNKKV_DATA)", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt") && !p.ends_with("SOURCE-LICENSE.txt"))
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        text.push_str(&std::fs::read_to_string(f).unwrap());
        text.push('\n');
        if text.len() >= n_chars {
            break;
        }
    }
    let mut end = n_chars.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}
