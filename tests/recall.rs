//! Recall (`--kv-recall`): evicted chunks kept off the device come back when
//! a later turn needs them, the budget holds, and a broken recall file turns
//! recall off without ending the conversation. Real Qwen2.5-0.5B on the CPU.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use chunkkv::chat::ChatSession;
use chunkkv::compress::{Budget, ChunkKv, Compressor, Keep, RecallStore, Scorer};
use chunkkv::llama::{
    Backend, CacheType, Context, ContextParams, FlashAttn, KvPart, Model, ModelParams, Pos,
    Sampler, SamplingParams, ScoreReduce, Token,
};
use chunkkv::pipeline::{self, SEQ};
use common::{essays, model_path};

fn qwen() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::load(
            Backend::init(),
            &model_path("qwen2.5-0.5b"),
            &ModelParams::default().with_n_gpu_layers(0),
        )
        .expect("load qwen")
    })
}

fn ctx(model: &Model, n_ctx: u32, fa: FlashAttn) -> Context<'_> {
    ctx_of(model, n_ctx, fa, (CacheType::F16, CacheType::F16))
}

/// [`ctx`] with K and V of types `kv`.
fn ctx_of(model: &Model, n_ctx: u32, fa: FlashAttn, kv: (CacheType, CacheType)) -> Context<'_> {
    let p = ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_n_threads(2)
        .with_flash_attn(fa)
        .with_type_k(kv.0)
        .with_type_v(kv.1);
    Context::new(model, &p).expect("context")
}

fn chunkkv(ctx: &Context<'_>) -> Compressor {
    let shape = ChunkKv::default();
    let window = shape.window;
    Compressor::new(ctx, Box::new(shape), window, 2).expect("compressor")
}

/// ChunkKV with its evicted rows kept in host memory.
fn recalling(ctx: &Context<'_>) -> Compressor {
    let store = RecallStore::new(ctx, SEQ, None).unwrap();
    chunkkv(ctx).with_recall(store).unwrap()
}

/// The document compressed to 10% before its question exists (its own end
/// scores it); returns the budget in cells.
fn load_document(ctx: &mut Context<'_>, c: &mut Compressor, doc: &[Token]) -> usize {
    let n_keep = Budget::Ratio(0.1).cells_for(doc.len());
    c.prefill(ctx, doc, 0, n_keep, serde_json::json!(0.1))
        .unwrap();
    n_keep
}

/// What a server's turn keeps: the history whole, the window, and room to
/// bring evicted chunks back (as `serve` asks for each turn).
fn turn_keep() -> Keep {
    Keep {
        from: Pos::MAX,
        history: true,
        short: true,
        recall: true,
    }
}

fn tok(model: &Model, text: &str, bos: bool) -> Vec<Token> {
    model.tokenize(text, bos, true).expect("tokenize")
}

const FACT: &str = " The secret code of the blue lighthouse is 7319. ";
const QUESTION: &str = "<|im_end|>\n<|im_start|>user\nWhat is the secret code of the blue lighthouse? Answer with the code.<|im_end|>\n<|im_start|>assistant\n";

/// A document of about 1,300 tokens with the fact in its middle, as tokens,
/// and the positions the fact's tokens take.
fn document(model: &Model) -> (Vec<Token>, std::ops::Range<usize>) {
    let hay = essays(7000);
    let cut = hay[..hay.len() / 2].rfind(' ').unwrap();
    let mut tokens = tok(
        model,
        &format!("<|im_start|>user\nRead this text.\n{}", &hay[..cut]),
        true,
    );
    let start = tokens.len();
    tokens.extend(tok(model, FACT, false));
    let fact = start..tokens.len();
    tokens.extend(tok(model, &hay[cut..], false));
    (tokens, fact)
}

/// Greedy answer of up to `n` tokens after the cache's last token at `at`.
fn answer(ctx: &mut Context<'_>, at: usize, n: usize) -> String {
    let mut greedy = Sampler::new(&SamplingParams::greedy());
    let (_, text, _, _) = pipeline::decode(ctx, &mut greedy, at as i32, n, |_| {}).unwrap();
    text
}

/// How many of the fact's positions each storage layer keeps.
fn fact_kept(c: &Compressor, fact: &std::ops::Range<usize>) -> Vec<usize> {
    let table = c.slot_table();
    (0..table.n_layers())
        .map(|l| {
            let kept = table.positions(l, 0);
            fact.clone().filter(|&p| kept.contains(&(p as i32))).count()
        })
        .collect()
}

/// The fact's tokens kept per layer after its question; `probe` reply
/// tokens drafted, the `pin` positions the draft attends to most kept everywhere.
fn run_recall_case(fa: FlashAttn, probe: usize, pin: usize, unify: bool) -> Vec<usize> {
    run_recall_case_on(fa, (CacheType::F16, CacheType::F16), probe, pin, unify)
}

/// [`run_recall_case`] on a cache of types `kv` (K, V).
fn run_recall_case_on(
    fa: FlashAttn,
    kv: (CacheType, CacheType),
    probe: usize,
    pin: usize,
    unify: bool,
) -> Vec<usize> {
    let model = qwen();
    let mut ctx = ctx_of(model, 4096, fa, kv);
    let (doc, fact) = document(model);
    let n = doc.len();
    let store = RecallStore::new(&ctx, SEQ, None).unwrap();
    let mut c = chunkkv(&ctx)
        .with_recall(store)
        .unwrap()
        .with_recall_probe(probe)
        .with_recall_pin(pin)
        .with_recall_unify(unify);
    // The document is compressed before its question exists (its own end scores it).
    let n_keep = Budget::Ratio(0.1).cells_for(n);
    let done = c
        .prefill(&mut ctx, &doc, 0, n_keep, serde_json::json!(0.1))
        .unwrap();
    assert!(done.compressed);
    let held = c.recall_store().unwrap().bytes();
    assert!(held > 0, "the evicted rows are kept");
    // The fact was evicted: most layers keep none of its tokens, or only some.
    let n_layers = ctx.kv_layers(KvPart::Base).len();
    let before = fact_kept(&c, &fact);
    assert!(
        before.iter().sum::<usize>() < n_layers * fact.len(),
        "the fact must be (partly) evicted at load time to test recall: {before:?}"
    );

    let ask = tok(model, QUESTION, false);
    let turn = c
        .recall_window(&mut ctx, &ask, n as i32, n_keep, serde_json::json!(0.1))
        .unwrap();
    let r = c.last_recall().expect("recall ran");
    assert!(r.uploaded > 0 && r.tokens > 0 && r.chunks > 0, "{r:?}");
    assert!(r.bytes_up > 0 && r.transient_cells as usize >= n_keep + r.uploaded);
    // The fact came back in layers where it was evicted, and the device holds the budget.
    let back = fact_kept(&c, &fact);
    eprintln!("fact tokens kept per layer: {before:?} before, {back:?} after the question");
    let used = ctx.seq_kv_stats(KvPart::Base, SEQ).unwrap().cells_used as usize;
    assert!(
        used <= n_keep,
        "{used} cells after the turn, budget {n_keep}"
    );
    assert_eq!(turn.report.cells_after as usize, used);
    // A drafted reply is gone again: the cache ends with the question.
    assert_eq!(ctx.seq_pos_max(SEQ), Some((n + ask.len() - 1) as i32));
    let text = answer(&mut ctx, n + ask.len(), 12);
    eprintln!("answer {text:?}");
    assert!(
        back.iter().sum::<usize>() > before.iter().sum::<usize>(),
        "the fact came back"
    );
    assert!(
        text.contains("7319"),
        "the recalled fact answers the question: {text:?}"
    );
    back
}

#[test]
fn a_fact_evicted_at_load_time_comes_back_when_its_question_needs_it() {
    run_recall_case(FlashAttn::On, 0, 0, false);
}

#[test]
fn recall_works_with_a_transposed_v_cache() {
    run_recall_case(FlashAttn::Off, 0, 0, false);
}

/// A q8_0 cache holds 1.88x the cells of f16 in the same bytes (the room a
/// server's recalling turn needs): its blocks are stored, uploaded and
/// compacted as they are.
#[test]
fn recall_works_with_a_q8_0_cache() {
    run_recall_case_on(
        FlashAttn::On,
        (CacheType::Q8_0, CacheType::Q8_0),
        0,
        0,
        false,
    );
}

/// K and V of different block types (q8_0 K, q4_0 V: 1.31x the cells of
/// q8_0 in the same bytes): each part's rows are stored and moved with
/// their own row size.
#[test]
fn recall_works_with_a_q8_0_k_and_q4_0_v_cache() {
    run_recall_case_on(
        FlashAttn::On,
        (CacheType::Q8_0, CacheType::Q4_0),
        0,
        0,
        false,
    );
}

/// Whether every layer keeps at least as many of the fact's tokens in `more` as in `less`.
fn keeps_at_least(more: &[usize], less: &[usize]) -> bool {
    more.iter().zip(less).all(|(m, l)| m >= l)
}

/// With a drafted reply scoring the recall, the draft is gone before the
/// reply (the cache ends with the question; `run_recall_case` checks it),
/// the budget holds, the fact comes back and answers, and no layer keeps
/// fewer of its tokens than with the question alone. (The grid where the
/// draft matters is multi-key RULER on the GPU: docs/results/eval-recall.md.)
#[test]
fn a_drafted_reply_leaves_no_trace_and_the_fact_still_comes_back() {
    let plain = run_recall_case(FlashAttn::On, 0, 0, false);
    let probed = run_recall_case(FlashAttn::On, 8, 0, false);
    eprintln!("fact tokens kept per layer: {plain:?} question only, {probed:?} with a draft");
    assert!(
        keeps_at_least(&probed, &plain),
        "a draft must not lose the fact's tokens in any layer"
    );
}

/// Pinning what the draft attends to keeps the copied fact in every layer:
/// no layer holds fewer of its tokens than without pins, and every layer
/// holds some (the layers that carry a copy otherwise each keep a part).
#[test]
fn pinned_draft_positions_keep_the_fact_in_every_layer() {
    let unpinned = run_recall_case(FlashAttn::On, 8, 0, false);
    let pinned = run_recall_case(FlashAttn::On, 8, 16, false);
    eprintln!("fact tokens kept per layer: {unpinned:?} unpinned, {pinned:?} pinned");
    assert!(
        keeps_at_least(&pinned, &unpinned),
        "pins must not lose the fact's tokens in any layer"
    );
    assert!(
        pinned.iter().all(|&k| k > 0),
        "every layer keeps the fact: {pinned:?}"
    );
}

/// A turn whose compaction waits for its reply (`serve
/// --kv-compact-after-reply`): no draft before the reply, which sees every
/// row the question brought back; at `settle` the reply's own first tokens
/// score the cache in one decode and what they copied is pinned. Returns
/// the fact's tokens kept per layer after the compaction, and checks that
/// the conversation goes on from the compacted cache.
fn run_deferred_case(scored_by_reply: bool) -> Vec<usize> {
    let model = qwen();
    let mut ctx = ctx(model, 4096, FlashAttn::On);
    let (doc, fact) = document(model);
    let n = doc.len();
    let mut c = recalling(&ctx)
        .with_recall_probe(8)
        .with_recall_pin(16)
        .with_recall_unify(false);
    let n_keep = load_document(&mut ctx, &mut c, &doc);
    let ask = tok(model, QUESTION, false);
    let end = (n + ask.len()) as i32;
    c.defer_compaction(16);
    c.recall_window(&mut ctx, &ask, n as i32, n_keep, serde_json::json!(0.1))
        .unwrap();
    assert!(c.unsettled(), "the compaction waits for the reply");
    // No draft: the cache ends with the question, the rows brought back still in.
    assert_eq!(ctx.seq_pos_max(SEQ), Some(end - 1));
    let used = |ctx: &Context<'_>| ctx.seq_kv_stats(KvPart::Base, SEQ).unwrap().cells_used as usize;
    assert!(used(&ctx) > n_keep, "{} cells before the reply", used(&ctx));
    let mut greedy = Sampler::new(&SamplingParams::greedy());
    let (reply, text, _, _) = pipeline::decode(&mut ctx, &mut greedy, end, 12, |_| {}).unwrap();
    assert!(
        text.contains("7319"),
        "the reply sees the recalled fact: {text:?}"
    );
    let in_cache = (ctx.seq_pos_max(SEQ).unwrap() - end + 1) as usize;
    if scored_by_reply {
        c.replied(&reply[..in_cache]);
    }
    assert!(c.settle(&mut ctx).unwrap());
    assert!(!c.unsettled());
    // The budget holds again, the reply kept whole after the question.
    assert!(
        used(&ctx) <= n_keep + in_cache,
        "{} cells after settling",
        used(&ctx)
    );
    assert_eq!(ctx.seq_pos_max(SEQ), Some(end - 1 + in_cache as i32));
    let kept = fact_kept(&c, &fact);
    // The reply's tokens came back intact: the conversation goes on.
    let again = tok(
        model,
        "<|im_end|>\n<|im_start|>user\nSay the code once more.<|im_end|>\n<|im_start|>assistant\n",
        false,
    );
    let at = end + in_cache as i32;
    ctx.decode_tokens(&again, at, SEQ, true).unwrap();
    let text = answer(&mut ctx, at as usize + again.len(), 12);
    assert!(
        text.contains("7319"),
        "the next turn still knows the code: {text:?}"
    );
    kept
}

/// The reply scores a held-back compaction as a draft would have: what it
/// copied stays in every layer, and no layer keeps fewer of the fact's
/// tokens than when the window alone scores.
#[test]
fn a_held_back_compaction_is_scored_by_the_reply_itself() {
    let window_only = run_deferred_case(false);
    let by_reply = run_deferred_case(true);
    eprintln!("fact tokens kept per layer: {window_only:?} window only, {by_reply:?} by the reply");
    assert!(
        keeps_at_least(&by_reply, &window_only),
        "the reply's scores must not lose the fact's tokens in any layer"
    );
    assert!(
        by_reply.iter().all(|&k| k > 0),
        "every layer keeps the fact the reply copied: {by_reply:?}"
    );
}

/// A conversation's first prompt that fits its slot whole (nothing held yet,
/// so nothing to bring back) waits for its reply too (`serve
/// --kv-compact-after-reply`): the reply reads every cell of the document and
/// question, not the budget's tenth, and `settle` then compacts to the
/// budget, the evicted rows going to the store for later turns.
#[test]
fn a_prompt_that_fits_its_slot_is_read_whole_by_its_reply() {
    let model = qwen();
    let mut ctx = ctx(model, 4096, FlashAttn::On);
    let (mut prompt, fact) = document(model);
    prompt.extend(tok(model, QUESTION, false));
    let n = prompt.len();
    let n_keep = Budget::Ratio(0.1).cells_for(n);
    // Recall's serve defaults: the reply scores, what it copied is pinned.
    let mut c = recalling(&ctx)
        .with_recall_probe(8)
        .with_recall_pin(16)
        .with_recall_unify(true);
    let keep = turn_keep();
    c.defer_compaction(16);
    let done = c
        .prefill_turn(
            &mut ctx,
            &prompt,
            0,
            n_keep,
            keep,
            Scorer::Window,
            serde_json::json!(0.1),
        )
        .unwrap();
    assert!(
        c.last_recall().is_none_or(|r| r.uploaded == 0),
        "nothing was held"
    );
    assert!(c.unsettled(), "the compaction waits for the reply");
    let used = |ctx: &Context<'_>| ctx.seq_kv_stats(KvPart::Base, SEQ).unwrap().cells_used as usize;
    assert_eq!(used(&ctx), n, "the reply reads the whole prompt: {done:?}");
    let mut greedy = Sampler::new(&SamplingParams::greedy());
    let (reply, text, _, _) =
        pipeline::decode(&mut ctx, &mut greedy, n as Pos, 12, |_| {}).unwrap();
    assert!(text.contains("7319"), "{text:?}");
    let in_cache = (ctx.seq_pos_max(SEQ).unwrap() + 1) as usize - n;
    c.replied(&reply[..in_cache]);
    assert!(c.settle(&mut ctx).unwrap());
    assert!(
        used(&ctx) <= n_keep + in_cache,
        "{} cells after settling, budget {n_keep}",
        used(&ctx)
    );
    let store = c.recall_store().expect("recall stays on");
    let held = store.entries(0, 0).count();
    assert!(
        held + n_keep + in_cache >= n,
        "{held} rows held for later turns"
    );
    let kept = fact_kept(&c, &fact);
    assert!(
        kept.iter().all(|&k| k > 0),
        "the copied fact stays: {kept:?}"
    );
}

/// With unified layer groups (`--kv-recall-unify`, the CLI's default) every
/// group writes back and keeps the same chunks, so the fact comes back in
/// every layer, and in none with fewer of its tokens than the split choice
/// keeps in its weakest layer.
#[test]
fn unified_groups_bring_the_fact_back_in_every_layer() {
    let split = run_recall_case(FlashAttn::On, 0, 0, false);
    let unified = run_recall_case(FlashAttn::On, 0, 0, true);
    eprintln!("fact tokens kept per layer: {split:?} per group, {unified:?} unified");
    let weakest = split.iter().copied().min().unwrap_or(0);
    assert!(
        unified.iter().all(|&k| k > 0 && k >= weakest),
        "every layer keeps the fact: {unified:?} (per group: {split:?})"
    );
}

fn session<'m>(ctx: Context<'m>, recall: Option<&std::path::Path>) -> ChatSession<'m> {
    let store = RecallStore::new(&ctx, SEQ, recall).unwrap();
    let c = chunkkv(&ctx).with_recall(store).unwrap();
    ChatSession::new(
        ctx,
        Sampler::new(&SamplingParams::greedy()),
        Some(c),
        true,
        Budget::Ratio(0.1),
        12,
        None,
    )
    .unwrap()
}

#[test]
fn the_budget_holds_across_ten_recalling_turns() {
    let model = qwen();
    let mut chat = session(ctx(model, 4096, FlashAttn::On), None);
    chat.add_document(&essays(5000), &mut |_| {}).unwrap();
    let never = AtomicBool::new(false);
    let mut recalled_turns = 0;
    for i in 0..10 {
        let before = chat.stats().unwrap();
        let reply = chat
            .turn(
                &format!("Question {i}: name one idea from the text."),
                &never,
                &mut |_| {},
                |_| {},
            )
            .unwrap();
        let s = chat.stats().unwrap();
        // Everything prefilled so far (the reply's tokens excepted) at 10%, or
        // the turn's window when that is more, plus the reply on top.
        let prompt_total = before.prefilled + reply.n_prompt;
        let budget = Budget::Ratio(0.1).cells_for(prompt_total).max(32);
        assert!(
            s.kv.cells_used as usize <= budget + reply.n_gen,
            "turn {i}: {} cells live, budget {budget} + reply {}",
            s.kv.cells_used,
            reply.n_gen
        );
        if let Some(r) = s.recall_last {
            if r.uploaded > 0 {
                recalled_turns += 1;
                assert!(r.transient_cells as usize > budget, "{r:?}");
            }
        }
        assert!(chat.take_warning().is_none());
    }
    assert!(
        recalled_turns >= 9,
        "every turn after the document recalls: {recalled_turns}"
    );
}

fn recall_file(dir: &std::path::Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(files.len(), 1, "one recall file: {files:?}");
    files[0].clone()
}

fn broken_file_case(name: &str, break_it: impl FnOnce(&std::path::Path), expect: &str) {
    let model = qwen();
    let dir = std::env::temp_dir().join(format!("chunkkv-recall-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut chat = session(ctx(model, 4096, FlashAttn::On), Some(&dir));
    chat.add_document(&essays(5000), &mut |_| {}).unwrap();
    let file = recall_file(&dir);
    assert!(std::fs::metadata(&file).unwrap().len() > 0);
    assert!(chat.stats().unwrap().recall_bytes.unwrap() > 0);
    break_it(&file);
    let never = AtomicBool::new(false);
    let reply = chat
        .turn("What is the text about?", &never, &mut |_| {}, |_| {})
        .expect("the turn goes on without recall");
    assert!(reply.n_gen > 0);
    let warning = chat.take_warning().expect("a warning says recall is off");
    assert!(warning.contains(expect), "{warning}");
    assert!(
        chat.stats().unwrap().recall_bytes.is_none(),
        "recall is off"
    );
    // And the next turn is an ordinary compressed turn.
    chat.turn("Thanks.", &never, &mut |_| {}, |_| {}).unwrap();
    assert!(chat.take_warning().is_none());
    drop(chat);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_recall_file_turns_recall_off_and_the_chat_goes_on() {
    broken_file_case(
        "corrupt",
        |f| {
            let mut bytes = std::fs::read(f).unwrap();
            let mid = bytes.len() / 2;
            for b in &mut bytes[mid..mid + 4096] {
                *b ^= 0x5a;
            }
            std::fs::write(f, bytes).unwrap();
        },
        "corrupt",
    );
}

#[test]
fn a_missing_recall_file_turns_recall_off_and_the_chat_goes_on() {
    broken_file_case("missing", |f| std::fs::remove_file(f).unwrap(), "removed");
}

#[test]
fn recall_needs_chunkkv_and_is_refused_for_other_methods() {
    let model = qwen();
    let ctx = ctx(model, 1024, FlashAttn::On);
    let shape = ChunkKv::default();
    let snap = chunkkv::compress::Method::Snapkv.policy(&shape, 1).unwrap();
    let c = Compressor::new(&ctx, snap, 32, 1).unwrap();
    let store = RecallStore::new(&ctx, SEQ, None).unwrap();
    let e = c.with_recall(store).unwrap_err().to_string();
    assert!(e.contains("chunkkv"), "{e}");

    let o = std::process::Command::new(common::bin())
        .args(["chat", "--kv-method", "snapkv", "--kv-recall", "host", "-m"])
        .arg(model_path("qwen2.5-0.5b"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--kv-recall") && err.contains("chunkkv"),
        "{err}"
    );
}

#[test]
fn a_turn_ranks_more_evicted_rows_than_its_free_cells_hold() {
    // A document twice the context: prefilled in segments, then asked about
    // with a few hundred free cells for thousands of held rows.
    let model = qwen();
    let mut chat = session(ctx(model, 768, FlashAttn::On), None);
    let hay = essays(7000);
    let cut = hay[..hay.len() / 2].rfind(' ').unwrap();
    let doc = format!("{}{FACT}{}", &hay[..cut], &hay[cut..]);
    chat.add_document(&doc, &mut |_| {}).unwrap();
    let held = chat.stats().unwrap().recall_bytes.unwrap();
    let never = AtomicBool::new(false);
    let mut text = String::new();
    let reply = chat
        .turn(
            "What is the secret code of the blue lighthouse? Answer with the code.",
            &never,
            &mut |_| {},
            |t| text.push_str(t),
        )
        .unwrap();
    let s = chat.stats().unwrap();
    let r = s.recall_last.expect("the question recalled");
    assert!(r.rank_ms > 0.0, "ranking passes ran: {r:?}");
    // Every held row went up once to be ranked, the chosen ones once more.
    assert!(r.bytes_up >= held, "{} bytes up, {held} held", r.bytes_up);
    assert!(r.transient_cells <= 768 && r.tokens > 0, "{r:?}");
    let budget = Budget::Ratio(0.1)
        .cells_for(s.prefilled - reply.n_gen)
        .max(32);
    assert!(s.kv.cells_used as usize <= budget + reply.n_gen, "{s:?}");
    assert!(text.contains("7319"), "{text:?}");
}

#[test]
fn a_question_sent_with_its_document_gets_room_to_recall() {
    // Document and question in one message, four times the context: the
    // document's tail is compressed into the store before the question's
    // window goes in, so the question ranks and writes back held rows into
    // about the room a compressed cache leaves, not the few cells the
    // uncompressed tail would leave it.
    let n_ctx = 1024;
    let model = qwen();
    // Recall's defaults in `chat` (cli RECALL_*): max over the window, a
    // 16-token trail, a 32-token draft whose 32 most attended positions stay.
    let ctx = ctx(model, n_ctx, FlashAttn::On);
    let shape = ChunkKv {
        trail: 16,
        reduce: ScoreReduce::Max,
        ..ChunkKv::default()
    };
    let store = RecallStore::new(&ctx, SEQ, None).unwrap();
    let c = Compressor::new(&ctx, Box::new(shape), 32, 2)
        .unwrap()
        .with_recall(store)
        .unwrap()
        .with_recall_probe(32)
        .with_recall_pin(32);
    let sampler = Sampler::new(&SamplingParams::greedy());
    let mut chat =
        ChatSession::new(ctx, sampler, Some(c), true, Budget::Ratio(0.1), 12, None).unwrap();
    let hay = essays(14000);
    let cut = hay[..hay.len() / 3].rfind(' ').unwrap();
    let message = format!(
        "Read this text.\n{}{FACT}{}\nWhat is the secret code of the blue lighthouse? Answer with the code.",
        &hay[..cut],
        &hay[cut..]
    );
    let never = AtomicBool::new(false);
    let mut text = String::new();
    let reply = chat
        .turn(&message, &never, &mut |_| {}, |t| text.push_str(t))
        .unwrap();
    let s = chat.stats().unwrap();
    let r = s.recall_last.expect("the question recalled");
    let kept = Budget::Ratio(0.1).cells_for(reply.n_prompt);
    let settled_room = n_ctx as usize - kept - 32 - 12;
    eprintln!("{r:?}, {kept} kept, room {settled_room}, answer {text:?}");
    assert!(
        r.uploaded * 2 >= settled_room,
        "{} cells written back; a compressed cache leaves {settled_room}",
        r.uploaded
    );
    assert!(text.contains("7319"), "{text:?}");
}

#[test]
fn an_unwritable_recall_dir_is_a_clear_error() {
    let file = std::env::temp_dir().join(format!("chunkkv-recall-notadir-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let o = std::process::Command::new(common::bin())
        .args(["chat", "--kv-recall", "disk", "--kv-recall-dir"])
        .arg(file.join("sub"))
        .arg("-m")
        .arg(model_path("qwen2.5-0.5b"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("error:") && err.contains("recall file"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// The fact's document, compressed with `cells` held rows ranked per pass,
/// then asked about; `ahead`: the turn's ranking runs first, one pass per
/// call (as a server runs it between other slots' steps), after one pass
/// for another question that must not count. Returns what every layer
/// keeps, the passes (the calls that ran one), and the recalled tokens.
fn run_ranked_turn(ahead: bool) -> (Vec<Vec<i32>>, usize, usize, usize) {
    let model = qwen();
    let mut ctx = ctx(model, 4096, FlashAttn::On);
    let (doc, _) = document(model);
    let n = doc.len();
    let mut c = recalling(&ctx)
        .with_recall_cells(200)
        .with_recall_unify(true);
    let n_keep = load_document(&mut ctx, &mut c, &doc);
    let ask = tok(model, QUESTION, false);
    let mut steps = 0;
    if ahead {
        let other = tok(
            model,
            "<|im_end|>\n<|im_start|>user\nWho wrote this text?<|im_end|>\n<|im_start|>assistant\n",
            false,
        );
        assert!(
            c.rank_step(&mut ctx, &other).unwrap(),
            "another turn's pass"
        );
        while c.rank_step(&mut ctx, &ask).unwrap() {
            steps += 1;
            assert!(steps < 100, "the ranking ends");
        }
        // Passes leave the cache as they found it.
        assert_eq!(ctx.seq_pos_max(SEQ), Some(n as i32 - 1));
    }
    let keep = turn_keep();
    c.prefill_turn(
        &mut ctx,
        &ask,
        n as i32,
        n_keep,
        keep,
        Scorer::Window,
        serde_json::json!(0.1),
    )
    .unwrap();
    let r = c.last_recall().expect("the question recalled");
    let table = c.slot_table();
    let kept = (0..table.n_layers())
        .map(|l| table.positions(l, 0).to_vec())
        .collect();
    (kept, steps, r.rank.passes, r.tokens)
}

#[test]
fn a_turn_ranked_ahead_pass_by_pass_keeps_what_it_keeps_ranked_at_once() {
    let (at_once, _, passes, recalled) = run_ranked_turn(false);
    assert!(
        passes > 2,
        "held rows are ranked in several passes: {passes}"
    );
    assert!(recalled > 0, "the turn brings rows back");
    let (ahead, steps, passes_ahead, recalled_ahead) = run_ranked_turn(true);
    // The other question's pass was dropped, the turn ran no pass of its own.
    assert_eq!(steps, passes, "one pass per call");
    assert_eq!(
        passes_ahead, passes,
        "the other question's pass is not the turn's"
    );
    assert_eq!(recalled_ahead, recalled);
    assert_eq!(ahead, at_once, "the same cells kept in every layer");
}
