//! Query-agnostic compression: reconstruction scores on real models, and a
//! document compressed before its question still answers it.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use chunkkv::compress::{Budget, ChunkKv, Compressor, Method, Reconstruction, TurnState};
use chunkkv::llama::{
    Backend, ChatMessage, Context, ContextParams, FlashAttn, KvPart, Model, ModelParams, Sampler,
    SamplingParams,
};
use chunkkv::pipeline::{self, SEQ};
use common::{bin, default_model, model_path};

const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const FACT: &str = "The access code for the north gate of the old observatory is 7391.";

fn ctx(model: &Model, n_ctx: u32) -> Context<'_> {
    let p = ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_n_threads(2)
        .with_flash_attn(FlashAttn::Off);
    Context::new(model, &p).expect("context")
}

/// A fact inside repetitive filler, as the user turn of a chat template.
fn document(model: &Model, repeats: usize) -> (String, String) {
    let filler = vec![FILLER; repeats].join(" ");
    let half = repeats / 2 * (FILLER.len() + 1);
    let doc = format!("{}{FACT} {}", &filler[..half], &filler[half..]);
    let open = model
        .apply_chat_template(&[ChatMessage::new("user", "\u{1}")], false)
        .map(|t| t.split('\u{1}').next().unwrap_or("").to_string())
        .unwrap_or_default();
    (format!("{open}{doc}"), doc)
}

/// The reconstruction's max attention singles out the one unique sentence
/// among repetitive filler: its tokens score far above the filler's, in the
/// leader layers ChunkKV ranks by. Scores that were noise, sums over a window
/// that cannot see the fact, or the wrong cells would fail this.
#[test]
fn reconstruction_ranks_a_planted_fact_above_filler() {
    let model = default_model();
    let (text, _) = document(model, 40);
    let tokens = model.tokenize(&text, true, true).unwrap();
    let n = tokens.len();
    assert!((500..1200).contains(&n), "{n} tokens");
    let mut ctx = ctx(model, 2048);
    ctx.decode_tokens(&tokens, 0, SEQ, false).unwrap();
    let before = ctx.state_seq_get(SEQ).unwrap();

    let rec = Reconstruction::for_model(model, TurnState::Open).unwrap();
    let layers: Vec<bool> = (0..model.n_layer()).map(|_| true).collect();
    let scores = rec.score(&mut ctx, SEQ, &tokens, &layers).unwrap();
    // The cache is as it was: the reconstruction left no cell behind.
    assert_eq!(ctx.state_seq_get(SEQ).unwrap(), before);
    assert_eq!(ctx.kv_stats(KvPart::Base).unwrap().cells_used as usize, n);

    // Which cells hold the fact's tokens (cells = positions in a fresh cache).
    let fact_tokens = model.tokenize(FACT, false, false).unwrap();
    let start = (0..n - fact_tokens.len())
        .find(|&i| {
            let piece = model.detokenize(&tokens[i..i + fact_tokens.len()], false);
            piece.trim_start().starts_with("The access code")
        })
        .expect("the fact is in the prompt");
    let fact = start + 2..start + fact_tokens.len() - 2;
    let filler: Vec<usize> = (8..n - 8)
        .filter(|c| !(start..start + fact_tokens.len() + 2).contains(c))
        .collect();
    let mut wins = 0;
    for layer in &scores {
        let s: Vec<f32> = (0..n)
            .map(|c| layer.heads().map(|h| h[c]).sum::<f32>())
            .collect();
        let mean = |cells: &mut dyn Iterator<Item = usize>| {
            let v: Vec<f32> = cells.map(|c| s[c]).collect();
            v.iter().sum::<f32>() / v.len() as f32
        };
        let fact_mean = mean(&mut fact.clone());
        let filler_mean = mean(&mut filler.iter().copied());
        assert!(s.iter().all(|x| x.is_finite() && *x >= 0.0));
        if fact_mean > 2.0 * filler_mean {
            wins += 1;
        }
    }
    assert!(
        wins * 4 >= scores.len() * 3,
        "the fact outscores the filler 2:1 in only {wins} of {} layers",
        scores.len()
    );
}

/// ChunkKV at 20% on reconstruction scores keeps the fact's chunk; a compressor
/// without reconstruction prompts refuses `kvzip` clearly.
#[test]
fn chunkkv_on_reconstruction_scores_keeps_the_fact() {
    let model = default_model();
    let (text, _) = document(model, 40);
    let tokens = model.tokenize(&text, true, true).unwrap();
    let n = tokens.len();
    let mut ctx = ctx(model, 2048);
    let rec = Reconstruction::for_model(model, TurnState::Open).unwrap();
    let mut c = Compressor::new(&ctx, Box::new(ChunkKv::default()), 32, 2)
        .unwrap()
        .with_reconstruction(rec);
    let n_keep = Budget::Ratio(0.2).cells_for(n);
    let done = c
        .prefill(&mut ctx, &tokens, 0, n_keep, Budget::Ratio(0.2).json())
        .unwrap();
    assert!(done.compressed);
    assert_eq!(done.report.cells_after as usize, n_keep);
    assert_eq!(done.report.cells_before as usize, n);
    // The first layers attend by position, not content (the scores above): the
    // fact must survive in most layers, where the model reads content.
    let n_layers = ctx.kv_layers(KvPart::Base).len();
    let keeping: Vec<usize> = (0..n_layers)
        .filter(|&l| {
            let kept = c.slot_table().positions(l, 0);
            let text = model.detokenize(
                &kept.iter().map(|&p| tokens[p as usize]).collect::<Vec<_>>(),
                false,
            );
            text.contains("7391") && text.contains("observatory")
        })
        .collect();
    assert!(
        keeping.len() * 4 >= n_layers * 3,
        "the fact is kept at 20% in layers {keeping:?} of {n_layers}"
    );
    // Generation goes on from the compressed cache.
    let (toks, _, _, _) = pipeline::decode(
        &mut ctx,
        &mut Sampler::new(&SamplingParams::greedy()),
        n as i32,
        4,
        |_| {},
    )
    .unwrap();
    assert!(!toks.is_empty());

    let ctx2 = self::ctx(model, 1024);
    let mut bare = Compressor::new(
        &ctx2,
        Method::Kvzip.policy(&ChunkKv::default(), 1).unwrap(),
        32,
        1,
    )
    .unwrap();
    let mut ctx2 = ctx2;
    let e = bare
        .prefill(&mut ctx2, &tokens[..600], 0, 100, serde_json::json!(100))
        .unwrap_err()
        .to_string();
    assert!(e.contains("reconstruction"), "{e}");
}

fn qwen() -> Model {
    Model::load(
        Backend::init(),
        &model_path("qwen2.5-0.5b"),
        &ModelParams::default().with_n_gpu_layers(0),
    )
    .expect("load qwen")
}

/// A 2k-token document loaded with `chat -f` is compressed to 20% before
/// any question exists, and the question piped afterwards is still answered.
#[test]
fn chat_recalls_a_fact_of_a_document_compressed_before_the_question() {
    let model = qwen();
    let hay = common::essays(7000);
    let mut cut = hay.len() * 2 / 3;
    while !hay.is_char_boundary(cut) {
        cut -= 1;
    }
    let doc = format!("{} {FACT} {}", &hay[..cut], &hay[cut..]);
    let n = model.tokenize(&doc, false, false).unwrap().len();
    assert!((1500..2600).contains(&n), "{n} tokens");
    drop(model);
    let dir = std::env::temp_dir().join(format!("chunkkv-recon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("doc.txt");
    std::fs::write(&file, &doc).unwrap();

    let mut child = Command::new(bin())
        .args([
            "chat",
            "-m",
            "qwen2.5-0.5b",
            "-c",
            "4096",
            "-n",
            "24",
            "-t",
            "2",
        ])
        .args(["--kv-budget", "20%", "--temp", "0"])
        .arg("-f")
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"/stats\nWhat is the access code for the north gate of the old observatory?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Right after loading: live cells within the budget of the document (+ window).
    let line = out
        .lines()
        .find(|l| l.starts_with("cache:"))
        .unwrap_or_else(|| panic!("no /stats line in {out}"));
    let live: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(live <= n / 5 + 64, "{line} for a {n}-token document");
    assert!(out.contains("7391"), "reply: {out}");
}
