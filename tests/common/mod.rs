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
