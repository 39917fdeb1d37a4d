//! Every method through the same hook on the real default model: exact
//! budgets, the window kept, sinks for StreamingLLM, per-head sets for the
//! per-head methods.

mod common;

use chunkkv::compress::{Budget, Compressor, Method};
use chunkkv::llama::{CacheType, Context, ContextParams, FlashAttn, KvPart};
use common::{default_model, essays};

fn compress_with(method: Method, n_keep: usize) -> (Compressor, Context<'static>, usize) {
    let model = default_model();
    let tokens = model.tokenize(&essays(3000), true, false).unwrap();
    let p = ContextParams::default()
        .with_n_ctx(1024)
        .with_n_threads(2)
        .with_flash_attn(FlashAttn::Off)
        .with_type_k(CacheType::F16)
        .with_type_v(CacheType::F16);
    let mut ctx = Context::new(model, &p).unwrap();
    let policy = method.policy(32, 10, 7).unwrap();
    let reuse = if method == Method::Chunkkv { 2 } else { 1 };
    let mut c = Compressor::new(&ctx, policy, 32, reuse).unwrap();
    let done = c
        .prefill(&mut ctx, &tokens, 0, n_keep, Budget::Tokens(n_keep).json())
        .unwrap();
    assert!(done.compressed, "{method:?}");
    (c, ctx, tokens.len())
}

#[test]
fn every_method_keeps_exactly_its_budget_and_the_window() {
    for method in [
        Method::Chunkkv,
        Method::Streaming,
        Method::H2o,
        Method::Snapkv,
        Method::Random,
    ] {
        let n_keep = 150;
        let (c, ctx, n) = compress_with(method, n_keep);
        assert_eq!(
            ctx.kv_stats(KvPart::Base).unwrap().cells_used as usize,
            n_keep,
            "{method:?}"
        );
        let t = c.slot_table();
        for l in 0..30 {
            for h in 0..3 {
                let pos: Vec<i32> = (0..n_keep)
                    .map(|i| t.position(l, h, i, &[]).unwrap())
                    .collect();
                assert!(
                    pos.windows(2).all(|w| w[0] < w[1]),
                    "{method:?}: kept in original order"
                );
                let window: Vec<i32> = (n as i32 - 32..n as i32).collect();
                assert_eq!(
                    &pos[n_keep - 32..],
                    &window[..],
                    "{method:?} layer {l} head {h} keeps the window"
                );
                if method == Method::Streaming {
                    assert_eq!(&pos[..4], &[0, 1, 2, 3], "sinks");
                    assert_eq!(
                        pos[4],
                        n as i32 - (n_keep as i32 - 4),
                        "then the most recent"
                    );
                }
            }
        }
    }
}

#[test]
fn per_head_methods_choose_per_head_and_chunkkv_does_not() {
    for (method, per_head) in [
        (Method::H2o, true),
        (Method::Snapkv, true),
        (Method::Chunkkv, false),
    ] {
        let (c, _ctx, _) = compress_with(method, 150);
        let t = c.slot_table();
        let head = |l: usize, h: usize| {
            (0..150)
                .map(|i| t.position(l, h, i, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let differs = (0..30).any(|l| head(l, 0) != head(l, 1) || head(l, 1) != head(l, 2));
        assert_eq!(differs, per_head, "{method:?}");
    }
}

#[test]
fn pyramidkv_is_refused_with_a_clear_error() {
    let err = Method::Pyramidkv.policy(32, 10, 1).err().expect("refused");
    assert!(
        err.to_string().contains("different kept count per layer"),
        "{err}"
    );
}
