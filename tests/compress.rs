//! The ChunkKV hook on real models: exact row moves, real shrinking, reuse
//! groups, and quality where the full cache succeeds.

mod common;

use chunkkv::compress::{Budget, ChunkKv, Compressor};
use chunkkv::llama::{
    Backend, CacheType, ChatMessage, Context, ContextParams, DeadSlots, FlashAttn, KvPart, Model,
    ModelParams, Sampler, SamplingParams,
};
use chunkkv::pipeline::{self, Hook};
use common::{default_model, essays, parse_kv_state};

fn ctx_with(model: &Model, n_ctx: u32, fa: FlashAttn, k: CacheType, v: CacheType) -> Context<'_> {
    let p = ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_n_threads(2)
        .with_flash_attn(fa)
        .with_type_k(k)
        .with_type_v(v);
    Context::new(model, &p).expect("context")
}

fn chunkkv(ctx: &Context<'_>, reuse: usize) -> Compressor {
    Compressor::new(ctx, Box::new(ChunkKv::default()), 32, reuse).expect("compressor")
}

fn greedy() -> Sampler {
    Sampler::new(&SamplingParams::greedy())
}

/// Compacts a ~700-token prompt to 25% and checks that every kept slot of
/// every storage layer and KV head holds exactly the bytes its position held.
fn assert_rows_move_exactly(fa: FlashAttn, k: CacheType, v: CacheType) {
    let model = default_model();
    let tokens = model.tokenize(&essays(3000), true, false).unwrap();
    let n = tokens.len();
    assert!(n > 500, "prompt of {n} tokens");
    let mut ctx = ctx_with(model, 1024, fa, k, v);
    let mut c = chunkkv(&ctx, 2);

    // Reference: the same prompt prefilled the way the hook does (all but the
    // 32-token window, then the window), so every K/V row is computed alike.
    let mut reference = ctx_with(model, 1024, fa, k, v);
    reference
        .decode_tokens(&tokens[..n - 32], 0, 0, false)
        .unwrap();
    reference
        .decode_tokens(&tokens[n - 32..], (n - 32) as i32, 0, true)
        .unwrap();
    let before = parse_kv_state(&reference.state_seq_get(0).unwrap());
    assert_eq!(before.pos, (0..n as i32).collect::<Vec<_>>());

    let n_keep = Budget::Ratio(0.25).cells_for(n);
    let done = c
        .prefill(&mut ctx, &tokens, 0, n_keep, Budget::Ratio(0.25).json())
        .unwrap();
    assert!(done.compressed);
    let stats = ctx.kv_stats(KvPart::Base).unwrap();
    assert_eq!(stats.cells_used as usize, n_keep);
    assert_eq!(done.report.cells_after as usize, n_keep);
    assert_eq!(
        stats.attn_width, 256,
        "attention width is the padded budget"
    );
    assert_eq!(done.report.attn_width_before, 768);
    assert_eq!(stats.v_trans, before.v_trans);

    let after = parse_kv_state(&ctx.state_seq_get(0).unwrap());
    assert_eq!(after.pos.len(), n_keep);
    let table = c.slot_table();
    let heads = model.info().n_head_kv as usize;
    for l in 0..after.k.len() {
        for h in 0..heads {
            for i in 0..n_keep {
                let p = table.position(l, h, i, &[]).unwrap() as usize;
                assert_eq!(
                    after.k_head(l, i, h, heads),
                    before.k_head(l, p, h, heads),
                    "K layer {l} head {h} slot {i} (pos {p})"
                );
                assert_eq!(
                    after.v_head(l, i, h, heads),
                    before.v_head(l, p, h, heads),
                    "V layer {l} head {h} slot {i} (pos {p})"
                );
            }
        }
    }
    // Generation continues after the compacted cache.
    let (toks, text, _, _) =
        pipeline::decode(&mut ctx, &mut greedy(), n as i32, 16, |_| {}).unwrap();
    assert_eq!(toks.len(), 16);
    assert!(text.chars().any(char::is_alphabetic), "{text:?}");
}

#[test]
fn rows_move_exactly_f16_flash_attention_on() {
    assert_rows_move_exactly(FlashAttn::On, CacheType::F16, CacheType::F16);
}

#[test]
fn rows_move_exactly_f16_flash_attention_off_transposed_v() {
    assert_rows_move_exactly(FlashAttn::Off, CacheType::F16, CacheType::F16);
}

#[test]
fn rows_move_exactly_q8_0_flash_attention_on() {
    assert_rows_move_exactly(FlashAttn::On, CacheType::Q8_0, CacheType::Q8_0);
}

#[test]
fn rows_move_exactly_q8_0_k_f16_v_flash_attention_off() {
    assert_rows_move_exactly(FlashAttn::Off, CacheType::Q8_0, CacheType::F16);
}

#[test]
fn full_budget_gives_the_same_logits_as_no_compression() {
    let model = default_model();
    let tokens = model.tokenize(&essays(2000), true, false).unwrap();
    let mut plain = ctx_with(model, 1024, FlashAttn::Off, CacheType::F16, CacheType::F16);
    let g0 = pipeline::generate(&mut plain, &mut greedy(), &tokens, 8, None, |_| {}).unwrap();
    let logits0 = plain.logits_ith(-1).unwrap().to_vec();

    let mut ctx = ctx_with(model, 1024, FlashAttn::Off, CacheType::F16, CacheType::F16);
    let mut c = chunkkv(&ctx, 2);
    let hook = Hook {
        compressor: &mut c,
        budget: Budget::Ratio(1.0),
        stream: false,
    };
    let g1 = pipeline::generate(&mut ctx, &mut greedy(), &tokens, 8, Some(hook), |_| {}).unwrap();
    assert_eq!(g0.tokens, g1.tokens);
    assert_eq!(ctx.logits_ith(-1).unwrap(), &logits0[..]);
    let report = g1.compression.unwrap();
    assert_eq!(report.cells_after, report.cells_before, "nothing evicted");
    assert_eq!(report.ms.compact, 0.0);
}

#[test]
fn followers_keep_their_leaders_positions_and_only_leaders_are_scored() {
    let model = default_model();
    let tokens = model.tokenize(&essays(3000), true, false).unwrap();
    for reuse in [1usize, 3, 30] {
        let mut ctx = ctx_with(model, 1024, FlashAttn::Off, CacheType::F16, CacheType::F16);
        let mut c = chunkkv(&ctx, reuse);
        let n_keep = 200;
        c.prefill(&mut ctx, &tokens, 0, n_keep, Budget::Tokens(n_keep).json())
            .unwrap();
        let leaders = c.leader_layers();
        assert_eq!(leaders.len(), 30usize.div_ceil(reuse));
        for il in 0..30u32 {
            assert_eq!(
                ctx.importance(il).is_some(),
                leaders.contains(&il),
                "layer {il} scored iff leader (reuse {reuse})"
            );
        }
        let t = c.slot_table();
        let pos = |l: usize| {
            (0..n_keep)
                .map(|i| t.position(l, 0, i, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        for l in 0..30 {
            let leader = l / reuse * reuse;
            assert_eq!(
                pos(l),
                pos(leader),
                "layer {l} follows leader {leader} (reuse {reuse})"
            );
            // ChunkKV keeps one set for every KV head.
            for h in 1..3 {
                assert_eq!(t.position(l, h, 7, &[]), t.position(l, 0, 7, &[]));
            }
        }
        // The window (the last 32 prompt tokens) is always kept, at the end.
        let p = pos(0);
        assert_eq!(
            &p[n_keep - 32..],
            &(tokens.len() as i32 - 32..tokens.len() as i32).collect::<Vec<_>>()[..]
        );
        if reuse == 1 {
            assert!(
                (1..30).any(|l| pos(l) != pos(0)),
                "independent layers should not all agree"
            );
        }
    }
}

#[test]
fn a_second_compression_works_on_an_already_compressed_cache() {
    let model = default_model();
    let text = essays(6000);
    let (a, b) = text.split_at(text.len() / 2);
    let t1 = model.tokenize(a, true, false).unwrap();
    let t2 = model.tokenize(b, false, false).unwrap();
    let mut ctx = ctx_with(model, 2048, FlashAttn::Off, CacheType::F16, CacheType::F16);
    let mut c = chunkkv(&ctx, 2);
    c.prefill(&mut ctx, &t1, 0, 300, serde_json::json!(300))
        .unwrap();
    let done = c
        .prefill(&mut ctx, &t2, t1.len() as i32, 400, serde_json::json!(400))
        .unwrap();
    assert!(done.compressed);
    assert_eq!(done.report.cells_before as usize, 300 + t2.len());
    assert_eq!(ctx.kv_stats(KvPart::Base).unwrap().cells_used, 400);
    let end = (t1.len() + t2.len()) as i32;
    assert_eq!(ctx.seq_pos_max(0), Some(end - 1));
    // Positions are increasing per slot and the newest window closes the cache.
    let t = c.slot_table();
    let pos: Vec<i32> = (0..400)
        .map(|i| t.position(0, 0, i, &[]).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(pos[399], end - 1);
    let (toks, _, _, _) = pipeline::decode(&mut ctx, &mut greedy(), end, 8, |_| {}).unwrap();
    assert_eq!(toks.len(), 8);
}

fn load(name: &str) -> Model {
    Model::load(
        Backend::init(),
        &common::model_path(name),
        &ModelParams::default().with_n_gpu_layers(0),
    )
    .unwrap()
}

#[test]
fn gemma3_compresses_only_its_full_attention_cache() {
    let model = load("gemma3-270m");
    let tokens = model.tokenize(&essays(5000), true, false).unwrap();
    let mut ctx = ctx_with(
        &model,
        2048,
        FlashAttn::Auto,
        CacheType::F16,
        CacheType::F16,
    );
    let mut c = chunkkv(&ctx, 2);
    // 3 full-attention layers of 18; leaders counted over those only.
    assert_eq!(ctx.kv_layers(KvPart::Base).len(), 3);
    assert_eq!(c.leader_layers().len(), 2);
    let hook = Hook {
        compressor: &mut c,
        budget: Budget::Ratio(0.2),
        stream: false,
    };
    let g = pipeline::generate(&mut ctx, &mut greedy(), &tokens, 12, Some(hook), |_| {}).unwrap();
    let r = g.compression.unwrap();
    assert_eq!(
        r.cells_after as usize,
        Budget::Ratio(0.2).cells_for(tokens.len())
    );
    assert_eq!(g.n_gen, 12);
    let swa = ctx.kv_stats(KvPart::Swa).unwrap();
    assert!(
        swa.cells_used as usize > r.cells_after as usize,
        "the sliding-window cache is not compressed"
    );
}

#[test]
fn qwen_retrieves_a_needle_with_chunkkv_at_20_percent() {
    let model = load("qwen2.5-0.5b");
    let needle = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";
    let hay = essays(11000);
    let mut cut = hay.len() / 2;
    while !hay.is_char_boundary(cut) {
        cut -= 1;
    }
    let context = format!("{} {needle} {}", &hay[..cut], &hay[cut..]);
    let question = "What is the best thing to do in San Francisco? Answer in one sentence.";
    let prompt = model
        .apply_chat_template(
            &[ChatMessage::new(
                "user",
                &format!("{context}\n\n{question}"),
            )],
            true,
        )
        .unwrap();
    let tokens = model.tokenize(&prompt, true, true).unwrap();
    assert!(
        (2500..4000).contains(&tokens.len()),
        "{} tokens",
        tokens.len()
    );

    let answer = |hook: Option<Hook<'_>>, ctx: &mut Context<'_>| {
        pipeline::generate(ctx, &mut greedy(), &tokens, 32, hook, |_| {}).unwrap()
    };
    let mut full = ctx_with(
        &model,
        4096,
        FlashAttn::Auto,
        CacheType::F16,
        CacheType::F16,
    );
    let full_answer = answer(None, &mut full).text;
    assert!(
        full_answer.contains("Dolores Park"),
        "full cache: {full_answer:?}"
    );
    drop(full);

    let mut ctx = ctx_with(
        &model,
        4096,
        FlashAttn::Auto,
        CacheType::F16,
        CacheType::F16,
    );
    let mut c = chunkkv(&ctx, 2);
    let compressed = answer(
        Some(Hook {
            compressor: &mut c,
            budget: Budget::Ratio(0.2),
            stream: false,
        }),
        &mut ctx,
    );
    assert!(
        compressed.text.contains("Dolores Park"),
        "ChunkKV 20%: {:?}",
        compressed.text
    );
    let report = compressed.compression.unwrap();
    assert_eq!(
        report.cells_after as usize,
        Budget::Ratio(0.2).cells_for(tokens.len())
    );
    assert!(report.attn_width_after < report.attn_width_before);
}

/// Dead slots masked in every layer must act like cells llama.cpp itself
/// removed (`seq_rm`): the model no longer sees a fact stated there. Flash
/// attention on CPU accumulates in f16 and the removed cell is refilled in
/// a different order, so the comparison is by KL divergence, not bitwise.
fn assert_dead_slots_act_like_removed_cells(fa: FlashAttn) {
    let model = default_model();
    let text = essays(2400);
    let mut cut = 1200;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let mut tokens = model.tokenize(&text[..cut], true, false).unwrap();
    let b = tokens.len() as u32;
    tokens.extend(
        model
            .tokenize(" The secret word is turquoise.", false, false)
            .unwrap(),
    );
    let e = tokens.len() as u32;
    tokens.extend(model.tokenize(&text[cut..], false, false).unwrap());
    tokens.extend(model.tokenize(" The secret word is", false, false).unwrap());
    let (head, last) = tokens.split_at(tokens.len() - 1);
    let next = |mode: &str| {
        let mut ctx = ctx_with(model, 1024, fa, CacheType::F16, CacheType::F16);
        ctx.decode_tokens(head, 0, 0, false).unwrap();
        match mode {
            "removed" => assert!(ctx.seq_rm(0, b as i32, e as i32)),
            "masked" => {
                let all: Vec<DeadSlots> = ctx
                    .kv_layers(KvPart::Base)
                    .into_iter()
                    .map(|layer| DeadSlots {
                        layer,
                        begin: b,
                        end: e,
                    })
                    .collect();
                ctx.set_dead_slots(&all).unwrap();
                assert_eq!(ctx.dead_slots(), &all[..]);
            }
            _ => {}
        }
        ctx.decode_tokens(last, head.len() as i32, 0, true).unwrap();
        let logits = ctx.logits_ith(-1).unwrap().to_vec();
        if mode == "masked" {
            // Clearing the memory drops the mask with the cells.
            ctx.memory_clear(true);
            assert!(ctx.dead_slots().is_empty());
        }
        logits
    };
    let (full, removed, masked) = (next("full"), next("removed"), next("masked"));
    let argmax = |l: &[f32]| (0..l.len()).max_by(|&i, &j| l[i].total_cmp(&l[j])).unwrap();
    assert_eq!(
        model.detokenize(&[chunkkv::llama::Token(argmax(&full) as i32)], false),
        " turquoise",
        "the fact is seen with every cell"
    );
    let gone = kl(&removed, &full);
    let same = kl(&removed, &masked);
    assert!(
        gone > 1.0,
        "{fa:?}: removing the fact changed little ({gone})"
    );
    assert!(
        same < 0.02,
        "{fa:?}: masked differs from removed by KL {same}"
    );
    assert_eq!(argmax(&masked), argmax(&removed), "{fa:?}");
}

/// KL(p || q) of the softmax of two logit vectors.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::MIN, f32::max) as f64;
        let lse = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(|&x| x as f64 - lse).collect::<Vec<_>>()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

#[test]
fn dead_slots_act_like_removed_cells_flash_attention_off() {
    assert_dead_slots_act_like_removed_cells(FlashAttn::Off);
}

#[test]
fn dead_slots_act_like_removed_cells_flash_attention_on() {
    assert_dead_slots_act_like_removed_cells(FlashAttn::On);
}

#[test]
fn a_bad_dead_slot_range_is_refused() {
    let model = default_model();
    let mut ctx = ctx_with(model, 256, FlashAttn::Off, CacheType::F16, CacheType::F16);
    let bad = |layer, begin, end| DeadSlots { layer, begin, end };
    for ranges in [
        vec![bad(99, 0, 4)],
        vec![bad(0, 8, 4)],
        vec![bad(0, 0, 4096)],
        vec![bad(1, 0, 4), bad(1, 4, 8)],
    ] {
        assert!(ctx.set_dead_slots(&ranges).is_err(), "{ranges:?}");
        assert!(ctx.dead_slots().is_empty());
    }
}

/// A server's slot: sequence 1 of a two-sequence context (its own KV stream)
/// compresses exactly as a one-sequence context does, and sequence 0's cache
/// is left byte for byte as it was.
#[test]
fn a_slot_of_a_two_sequence_context_compresses_like_a_context_of_its_own() {
    let model = default_model();
    let tokens = model.tokenize(&essays(3000), true, false).unwrap();
    let n_keep = Budget::Ratio(0.25).cells_for(tokens.len());

    let mut alone = ctx_with(model, 1024, FlashAttn::Off, CacheType::F16, CacheType::F16);
    let mut c = chunkkv(&alone, 2);
    c.prefill(&mut alone, &tokens, 0, n_keep, serde_json::json!(0.25))
        .unwrap();
    let kept_alone = alone.kv_cell_positions(KvPart::Base, 0);
    let logits_alone = alone.logits_ith(-1).unwrap().to_vec();

    let p = ContextParams::default()
        .with_n_ctx(2048)
        .with_n_seq_max(2)
        .with_n_threads(2)
        .with_flash_attn(FlashAttn::Off);
    let mut shared = Context::new(model, &p).unwrap();
    assert_eq!(shared.seq_capacity(), 1024);
    let other = model.tokenize(&essays(1500)[700..], true, false).unwrap();
    shared.decode_tokens(&other, 0, 0, true).unwrap();
    let seq0 = shared.state_seq_get(0).unwrap();
    let mut c = chunkkv(&shared, 2).with_seq(1);
    let done = c
        .prefill(&mut shared, &tokens, 0, n_keep, serde_json::json!(0.25))
        .unwrap();
    assert!(done.compressed);
    assert_eq!(shared.seq_used(1), n_keep);
    assert_eq!(shared.seq_used(0), other.len());
    assert_eq!(shared.kv_cell_positions(KvPart::Base, 1), kept_alone);
    let logits = shared.logits_ith(-1).unwrap();
    let diff = logits
        .iter()
        .zip(&logits_alone)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "logits differ by {diff}");
    assert_eq!(
        shared.state_seq_get(0).unwrap(),
        seq0,
        "sequence 0 untouched"
    );
    // Compaction is per sequence: the other one may still drop its tail
    // (a reconstruction's scratch tokens, say); the compacted one may not.
    assert!(
        !shared.seq_rm(1, 5, -1),
        "partial removal over compacted slots"
    );
    let end = other.len() as i32;
    assert!(
        shared.seq_rm(0, end - 4, -1),
        "sequence 0 was never compacted"
    );
    assert_eq!(shared.seq_used(0), other.len() - 4);
}

#[test]
fn sinks_stay_in_every_layer_whatever_they_score() {
    let model = default_model();
    let tokens = model.tokenize(&essays(3000), true, false).unwrap();
    // Room for three chunks besides the window: with 25 sinks, chunks 0–2
    // (positions 0–29) take it in every layer; scored alone they rarely would.
    let n_keep = 32 + 30;
    let holds_sinks = |sinks: usize| {
        let mut ctx = ctx_with(model, 1024, FlashAttn::Off, CacheType::F16, CacheType::F16);
        let shape = ChunkKv {
            sinks,
            ..ChunkKv::default()
        };
        let mut c = Compressor::new(&ctx, Box::new(shape), 32, 1).expect("compressor");
        c.prefill(&mut ctx, &tokens, 0, n_keep, Budget::Tokens(n_keep).json())
            .unwrap();
        let t = c.slot_table();
        (0..t.n_layers())
            .filter(|&l| (0..25).all(|i| t.position(l, 0, i, &[]) == Some(i as i32)))
            .count()
    };
    assert_eq!(holds_sinks(25), 30, "every layer keeps positions 0..25");
    assert!(
        holds_sinks(0) < 30,
        "without sinks some layer keeps other chunks than the first three"
    );
}
