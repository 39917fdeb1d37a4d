//! The synthetic random-weights GGUF loads in llama.cpp and decodes.

use std::path::PathBuf;

use chunkkv::llama::{
    Backend, Context, ContextParams, FlashAttn, Model, ModelParams, Sampler, SamplingParams,
};
use chunkkv::synth::{write_random_gguf, SynthShape};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("chunkkv-synth-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn tiny_model_loads_and_decodes() {
    let dir = TempDir::new("load");
    let path = dir.0.join("tiny.gguf");
    let shape = SynthShape::tiny();
    let n = write_random_gguf(&path, &shape, 42).unwrap();
    assert_eq!(n, std::fs::metadata(&path).unwrap().len());
    // Only the final file is left behind.
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);

    let model = Model::load(
        Backend::init(),
        &path,
        &ModelParams::default().with_n_gpu_layers(0),
    )
    .unwrap();
    let info = model.info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.n_layer, shape.n_layer);
    assert_eq!(info.n_embd, shape.n_embd);
    assert_eq!(info.n_head, shape.n_head);
    assert_eq!(info.n_head_kv, shape.n_head_kv);
    assert_eq!(info.head_dim, shape.n_embd / shape.n_head);
    assert_eq!(info.n_vocab, shape.n_vocab);
    assert_eq!(info.n_ctx_train, shape.n_ctx_train);
    assert!(!info.is_recurrent && !info.is_hybrid && info.swa_layers.is_empty());
    assert_eq!(model.bos().map(|t| t.0), Some(1));

    let mut ctx = Context::new(
        &model,
        &ContextParams::default()
            .with_n_ctx(256)
            .with_n_threads(2)
            .with_flash_attn(FlashAttn::Off),
    )
    .unwrap();
    let toks = model.tokenize("hello world", true, false).unwrap();
    assert_eq!(toks[0].0, 1, "BOS first");
    assert!(toks.len() > 2);
    let gen = chunkkv::pipeline::generate(
        &mut ctx,
        &mut Sampler::new(&SamplingParams::greedy()),
        &toks,
        8,
        None,
        |_| {},
    )
    .unwrap();
    assert!(!gen.tokens.is_empty() || gen.stop == chunkkv::pipeline::StopReason::EndOfGeneration);
    let logits = ctx.logits_ith(-1).expect("logits of the last decode");
    assert_eq!(logits.len(), shape.n_vocab as usize);
    assert!(logits.iter().all(|x| x.is_finite()), "non-finite logits");
    // Random weights still give logits that differ across the vocabulary.
    let (lo, hi) = logits
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    assert!(hi > lo);
}

#[test]
fn same_seed_same_bytes() {
    let dir = TempDir::new("seed");
    let shape = SynthShape::tiny();
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.0.join(format!("{n}.gguf")));
    write_random_gguf(&a, &shape, 7).unwrap();
    write_random_gguf(&b, &shape, 7).unwrap();
    write_random_gguf(&c, &shape, 8).unwrap();
    let [a, b, c] = [a, b, c].map(|p| std::fs::read(p).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

#[test]
fn invalid_shape_is_rejected_without_a_file() {
    let dir = TempDir::new("bad");
    let path = dir.0.join("bad.gguf");
    let mut shape = SynthShape::tiny();
    shape.n_head = 3; // 256 is not a multiple of 3
    let err = write_random_gguf(&path, &shape, 1).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[test]
fn shapes_by_name() {
    assert_eq!(SynthShape::by_name("tiny"), Some(SynthShape::tiny()));
    assert_eq!(
        SynthShape::by_name("llama3-8b"),
        Some(SynthShape::llama3_8b())
    );
    assert_eq!(SynthShape::by_name("llama3-70b"), None);
    let s = SynthShape::llama3_8b();
    assert_eq!(
        (s.n_layer, s.n_embd, s.n_head, s.n_head_kv),
        (32, 4096, 32, 8)
    );
    assert_eq!(
        (s.n_ff, s.n_vocab, s.n_ctx_train),
        (14336, 128_256, 131_072)
    );
}
