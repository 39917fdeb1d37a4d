//! Every method through the same hook on the real default model: exact
//! budgets, the window kept, sinks for StreamingLLM, per-head sets for the
//! per-head methods.

mod common;

use chunkkv::compress::{Budget, ChunkKv, Compressor, Method};
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
    let policy = method.policy(&ChunkKv::default(), 7).unwrap();
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
fn pyramidkv_keeps_fewer_tokens_in_higher_layers_averaging_to_the_budget() {
    let n_keep = 150;
    let (c, mut ctx, n) = compress_with(Method::Pyramidkv, n_keep);
    let t = c.slot_table();
    let live = |l: usize, h: usize| {
        (0..t.n_slots())
            .filter_map(|i| t.position(l, h, i, &[]))
            .collect::<Vec<_>>()
    };
    let counts: Vec<usize> = (0..30).map(|l| live(l, 0).len()).collect();
    // 118 selected on average plus the 32-token window: 232 at the bottom, 37 at the top.
    assert_eq!(counts.iter().sum::<usize>(), 30 * n_keep, "{counts:?}");
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    assert!(counts[0] > 2 * counts[29], "{counts:?}");
    let stats = ctx.kv_stats(KvPart::Base).unwrap();
    assert_eq!(
        stats.cells_used as usize, counts[0],
        "slots = the widest layer"
    );
    assert_eq!(t.n_slots(), counts[0]);

    let window: Vec<i32> = (n as i32 - 32..n as i32).collect();
    for (l, &count) in counts.iter().enumerate() {
        for h in 0..3 {
            let pos = live(l, h);
            assert_eq!(pos.len(), count, "every head of layer {l} keeps as many");
            assert!(pos.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(
                &pos[count - 32..],
                &window[..],
                "layer {l} head {h} keeps the window"
            );
        }
    }
    // The short layers' surplus slots are masked in llama.cpp.
    let dead = ctx.dead_slots().to_vec();
    assert_eq!(
        dead.len(),
        counts.iter().filter(|&&c| c < counts[0]).count()
    );
    for d in &dead {
        assert_eq!(d.begin as usize, counts[d.layer as usize]);
        assert_eq!(d.end as usize, counts[0]);
    }
    // Decoding goes on after the window.
    let next = ctx.model().tokenize(" and", false, false).unwrap();
    ctx.decode_tokens(&next, n as i32, 0, true).unwrap();
    assert!(ctx.logits_ith(-1).unwrap().iter().all(|x| x.is_finite()));
}

#[test]
fn h2o_from_a_shared_scored_head_matches_its_own_prefill() {
    let model = default_model();
    let tokens = model.tokenize(&essays(3000), true, false).unwrap();
    let n = tokens.len();
    let (head, window) = tokens.split_at(n - 32);
    let p = ContextParams::default()
        .with_n_ctx(1024)
        .with_n_threads(2)
        .with_flash_attn(FlashAttn::Off);
    let h2o = || Method::H2o.policy(&ChunkKv::default(), 1).unwrap();

    let mut own = Context::new(model, &p).unwrap();
    let mut a = Compressor::new(&own, h2o(), 32, 1).unwrap();
    a.prefill(&mut own, &tokens, 0, 150, Budget::Tokens(150).json())
        .unwrap();

    // The shared path: a scored head prefill, its state saved and restored
    // (as compare and eval do for every row), then the window.
    let mut shared = Context::new(model, &p).unwrap();
    let mut b = Compressor::new(&shared, h2o(), 32, 1).unwrap();
    let scores = b.prefill_head_scored(&mut shared, head).unwrap();
    let state = shared.state_seq_get(0).unwrap();
    shared.memory_clear(true);
    shared.state_seq_set(0, &state).unwrap();
    b.compress_window_with(
        &mut shared,
        window,
        head.len() as i32,
        150,
        &scores,
        Budget::Tokens(150).json(),
    )
    .unwrap();
    assert_eq!(a.slot_table(), b.slot_table());
    assert_eq!(a.slot_table().n_slots(), 150);
}
