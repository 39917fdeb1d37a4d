//! The safe bindings, on the real default model.

mod common;

use chunkkv::llama::{ChatMessage, KvPart, Sampler, SamplingParams, StreamDecoder, Token};
use chunkkv::pipeline;
use common::{default_model, small_ctx};

const PROMPT: &str = "The capital of France is Paris. The capital of Italy is";

fn greedy(n: usize) -> (Vec<Token>, String) {
    let model = default_model();
    let mut ctx = small_ctx(model, 512);
    let tokens = model.tokenize(PROMPT, true, false).unwrap();
    let mut sampler = Sampler::new(&SamplingParams::greedy());
    let g = pipeline::generate(&mut ctx, &mut sampler, &tokens, n, None, |_| {}).unwrap();
    (g.tokens, g.text)
}

#[test]
fn greedy_generation_is_deterministic() {
    let (a, text_a) = greedy(16);
    let (b, text_b) = greedy(16);
    assert_eq!(a.len(), 16);
    assert_eq!(a, b);
    assert_eq!(text_a, text_b);
    assert!(
        text_a.contains("Rome"),
        "unexpected continuation: {text_a:?}"
    );
}

#[test]
fn tokenize_detokenize_round_trips() {
    let model = default_model();
    for text in [
        "Hello, world!",
        "  leading spaces and ünïcödé 日本語 🎉",
        "line\nbreaks\tand tabs",
    ] {
        let tokens = model.tokenize(text, false, false).unwrap();
        assert!(!tokens.is_empty());
        assert_eq!(model.detokenize(&tokens, false), text);
        // Streaming one token at a time yields the same text, never a broken character.
        let mut d = StreamDecoder::new();
        let mut streamed = String::new();
        for &t in &tokens {
            let piece = d.push(model, t);
            assert!(
                !piece.contains(char::REPLACEMENT_CHARACTER),
                "split character in {text:?}"
            );
            streamed.push_str(&piece);
        }
        streamed.push_str(&d.finish());
        assert_eq!(streamed, text);
    }
}

#[test]
fn chat_template_renders_roles_and_assistant_prefix() {
    let model = default_model();
    assert!(model.chat_template().is_some());
    let text = model
        .apply_chat_template(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi there"),
            ],
            true,
        )
        .unwrap();
    let sys_at = text.find("Be brief.").expect("system text");
    let user_at = text.find("Hi there").expect("user text");
    assert!(sys_at < user_at);
    assert!(text.contains("<|im_start|>user"), "{text}");
    assert!(text.trim_end().ends_with("<|im_start|>assistant"), "{text}");
}

#[test]
fn sequence_state_restores_to_identical_logits() {
    let model = default_model();
    let tokens = model.tokenize(PROMPT, true, false).unwrap();
    let next = model.tokenize(" Rome", false, false).unwrap();

    let mut ctx = small_ctx(model, 512);
    ctx.decode_tokens(&tokens, 0, 0, true).unwrap();
    let saved = ctx.state_seq_get(0).unwrap();
    ctx.decode_tokens(&next, tokens.len() as i32, 0, true)
        .unwrap();
    let expected = ctx.logits_ith(-1).unwrap().to_vec();

    // Restore into a fresh context and continue the same way.
    let mut other = small_ctx(model, 512);
    other.state_seq_set(0, &saved).unwrap();
    assert_eq!(other.seq_pos_max(0), Some(tokens.len() as i32 - 1));
    other
        .decode_tokens(&next, tokens.len() as i32, 0, true)
        .unwrap();
    assert_eq!(other.logits_ith(-1).unwrap(), &expected[..]);
}

#[test]
fn seq_rm_frees_cells_and_kv_stats_follow() {
    let model = default_model();
    let tokens = model.tokenize(PROMPT, true, false).unwrap();
    let n = tokens.len() as u32;
    let mut ctx = small_ctx(model, 512);
    let empty = ctx.kv_stats(KvPart::Base).unwrap();
    assert_eq!(empty.cells_used, 0);
    assert_eq!(empty.bytes_live, 0);
    assert_eq!(empty.size, 512);
    assert!(
        ctx.kv_stats(KvPart::Swa).is_none(),
        "SmolLM2 has no sliding-window cache"
    );

    ctx.decode_tokens(&tokens, 0, 0, true).unwrap();
    let full = ctx.kv_stats(KvPart::Base).unwrap();
    assert_eq!(full.cells_used, n);
    // 30 layers x (K + V) x 3 KV heads x 64 dims x 2 bytes (f16) per cell.
    assert_eq!(full.bytes_live, n as u64 * 30 * 2 * 3 * 64 * 2);
    assert_eq!(full.bytes_allocated, 512 * 30 * 2 * 3 * 64 * 2);
    assert_eq!(full.attn_width, 256);
    assert!(full.v_trans, "flash attention off stores V transposed");

    assert!(ctx.seq_rm(0, 4, 8));
    let after = ctx.kv_stats(KvPart::Base).unwrap();
    assert_eq!(after.cells_used, n - 4);
    assert_eq!(after.bytes_live, (n - 4) as u64 * 30 * 2 * 3 * 64 * 2);
    assert_eq!(ctx.seq_pos_max(0), Some(n as i32 - 1));
    assert_eq!(ctx.seq_pos_min(0), Some(0));
}

#[test]
fn model_info_matches_smollm2() {
    let info = default_model().info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(
        (info.n_layer, info.n_head, info.n_head_kv, info.head_dim),
        (30, 9, 3, 64)
    );
    assert_eq!(info.n_ctx_train, 8192);
    assert!(info.swa_layers.is_empty());
}

/// Long synthetic prompts are built from blocks: still exactly the length
/// asked for, BOS first, and the same for the same seed.
#[test]
fn long_synthetic_prompts_have_the_exact_length() {
    let model = default_model();
    let a = chunkkv::workload::prompt_tokens(model, 30_000, 5).unwrap();
    assert_eq!(a.len(), 30_000);
    let short = chunkkv::workload::prompt_tokens(model, 100, 5).unwrap();
    assert_eq!(a[0], short[0], "BOS (or the first word) leads both");
    assert_eq!(
        a,
        chunkkv::workload::prompt_tokens(model, 30_000, 5).unwrap()
    );
}
