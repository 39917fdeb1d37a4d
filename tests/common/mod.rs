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

/// Parses the full-attention cache of a sequence state.
pub fn parse_kv_state(blob: &[u8]) -> chunkkv::llama::KvDump {
    chunkkv::llama::KvDump::parse(blob).expect("parse sequence state")
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
