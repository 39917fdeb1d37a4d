//! Side-by-side comparison of cache configurations on the same prompt:
//! llama.cpp's default cache (f16), its quantized caches, and every
//! compression method at every budget — memory, speed, overhead, and agreement
//! with the default cache's greedy continuation.
//!
//! One prefill per prompt and cache configuration: the state before the
//! observation window is saved, and each row restores it, then either decodes
//! the window plainly or scores with it and compresses (H2O's every-query
//! scores come from a second, scored head prefill, timed as H2O's overhead;
//! reconstruction scores from one pass shared by its rows). Compressed sequences
//! are moved into a context sized for what they keep plus the generation, so
//! the allocated bytes reported are memory really freed.

use std::time::Instant;

use crate::bench::{ctx_size, mean_std, ms_since};
use crate::compress::{
    Budget, ChunkKv, CompressError, Compressor, Method, MethodSpec, Reconstruction, Scorer,
    TurnState,
};
use crate::llama::{
    CacheType, Context, ContextError, ContextParams, DecodeError, FlashAttn, KvPart, Model,
    StateError, Token,
};
use crate::pipeline::SEQ;

/// One cache configuration to run.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSpec {
    pub method: Method,
    pub budget: Option<Budget>,
    pub cache_type_k: CacheType,
    pub cache_type_v: CacheType,
}

/// What one row measured (mean over repetitions where noted).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompareRow {
    pub n_prompt: usize,
    pub method: String,
    /// Kept share of the prompt (1.0 without compression).
    pub budget: f64,
    pub cache_type_k: CacheType,
    pub cache_type_v: CacheType,
    pub flash_attn: FlashAttn,
    pub cells: u32,
    pub bytes_live: u64,
    pub bytes_allocated: u64,
    pub prefill_tok_s: f64,
    pub ttft_ms: f64,
    pub decode_tok_s: f64,
    pub decode_tok_s_std: f64,
    pub overhead_ms: f64,
    pub overhead_pct: f64,
    /// Share of greedy tokens equal to the default cache's, position by position.
    pub agreement: f64,
    /// Mean KL divergence (nats) from the default cache's next-token
    /// distributions, teacher-forced on its continuation.
    pub kl: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Compress(#[from] CompressError),
    #[error("{0}")]
    Config(String),
}

/// Settings shared by all rows.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub rows: Vec<RowSpec>,
    pub n_gen: usize,
    pub reps: usize,
    /// ChunkKV's shape; the baselines take its window.
    pub chunk: ChunkKv,
    pub reuse: usize,
    /// What the scored methods rank by (`kvzip` always reconstructs).
    pub scorer: Scorer,
}

/// The default cache's continuation: tokens and the distributions that produced them.
struct Reference {
    tokens: Vec<Token>,
    /// Log-probabilities per step (step 0: after the prompt).
    logprobs: Vec<Vec<f64>>,
}

pub(crate) fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(P || Q) from log-probabilities.
pub fn kl_divergence(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
        .sum::<f64>()
        .max(0.0)
}

fn argmax(logits: &[f32]) -> Token {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    Token(best as i32)
}

/// Greedy continuation from `first_logits` at position `at`, `reps` times.
/// Returns the tokens, the logits of each step and tokens/s (mean, std).
#[allow(clippy::type_complexity)]
fn free_decode(
    ctx: &mut Context<'_>,
    first_logits: &[f32],
    at: usize,
    n: usize,
    reps: usize,
) -> Result<(Vec<Token>, Vec<Vec<f32>>, f64, f64), CompareError> {
    let mut rates = Vec::new();
    let mut tokens = Vec::new();
    let mut steps = Vec::new();
    for rep in 0..reps.max(1) {
        let mut toks = Vec::with_capacity(n);
        let mut cur = first_logits.to_vec();
        let t = Instant::now();
        for i in 0..n {
            let tok = argmax(&cur);
            toks.push(tok);
            if rep == 0 {
                steps.push(cur.clone());
            }
            if i + 1 < n {
                ctx.decode_tokens(&[tok], (at + i) as i32, SEQ, true)?;
                cur = ctx.logits_ith(-1).ok_or(DecodeError::Fatal(-100))?.to_vec();
            }
        }
        if n > 1 {
            rates.push((n - 1) as f64 * 1e3 / ms_since(t));
        }
        ctx.seq_rm(SEQ, at as i32, -1);
        if rep == 0 {
            tokens = toks;
        }
    }
    let (mean, std) = mean_std(&rates);
    Ok((tokens, steps, mean, std))
}

/// Teacher-forced on `reference`: mean KL of this context's distributions.
fn teacher_forced_kl(
    ctx: &mut Context<'_>,
    first_logits: &[f32],
    at: usize,
    reference: &Reference,
) -> Result<f64, CompareError> {
    let mut total = kl_divergence(&reference.logprobs[0], &log_softmax(first_logits));
    for i in 1..reference.logprobs.len() {
        ctx.decode_tokens(&[reference.tokens[i - 1]], (at + i - 1) as i32, SEQ, true)?;
        let q = log_softmax(ctx.logits_ith(-1).ok_or(DecodeError::Fatal(-100))?);
        total += kl_divergence(&reference.logprobs[i], &q);
    }
    ctx.seq_rm(SEQ, at as i32, -1);
    Ok(total / reference.logprobs.len() as f64)
}

fn budget_share(b: Option<Budget>, n: usize) -> f64 {
    match b {
        None => 1.0,
        Some(Budget::Ratio(r)) => r,
        Some(Budget::Tokens(t)) => (t as f64 / n as f64).min(1.0),
    }
}

/// Runs every row on one prompt. The first row must be the default cache
/// (f16, no compression): it is the reference for agreement and KL.
pub fn run_prompt(
    model: &Model,
    params: &ContextParams,
    prompt: &[Token],
    cfg: &CompareConfig,
    mut on_row: impl FnMut(&CompareRow),
) -> Result<Vec<CompareRow>, CompareError> {
    let n = prompt.len();
    let w = cfg.chunk.window;
    if n <= w + 1 {
        return Err(CompareError::Config(format!(
            "the prompt ({n} tokens) must be longer than the window ({w})"
        )));
    }
    let (head, window) = prompt.split_at(n - w);
    let mut out: Vec<CompareRow> = Vec::new();
    let mut reference: Option<Reference> = None;

    // Group rows by cache configuration: one head prefill per group.
    let mut groups: Vec<(CacheType, CacheType, Vec<&RowSpec>)> = Vec::new();
    for r in &cfg.rows {
        match groups
            .iter_mut()
            .find(|g| g.0 == r.cache_type_k && g.1 == r.cache_type_v)
        {
            Some(g) => g.2.push(r),
            None => groups.push((r.cache_type_k, r.cache_type_v, vec![r])),
        }
    }
    for (tk, tv, rows) in groups {
        let mut p = params
            .clone()
            .with_n_ctx(ctx_size(n + cfg.n_gen))
            .with_type_k(tk)
            .with_type_v(tv);
        if (tv.is_quantized() || tk.is_quantized()) && p.flash_attn() == FlashAttn::Off {
            p = p.with_flash_attn(FlashAttn::On);
        }
        let mut ctx = Context::new(model, &p)?;
        // The plain head prefill, timed alone: every row's prefill starts from it.
        let t = Instant::now();
        ctx.decode_tokens(head, 0, SEQ, false)?;
        let head_ms = ms_since(t);
        let head_state = ctx.save_seq(SEQ)?;
        // H2O scores with every prompt query: a second, scored prefill of the
        // head gives its scores, and what it costs beyond the plain one is H2O's.
        let h2o = rows
            .iter()
            .any(|r| r.method == Method::H2o && r.budget.is_some());
        let (head_scores, h2o_ms) = if h2o {
            ctx.memory_clear(true);
            let scorer = Compressor::new(&ctx, Method::H2o.policy(&cfg.chunk, 0)?, w, 1)?;
            let t = Instant::now();
            let scores = scorer.prefill_head_scored(&mut ctx, head)?;
            (scores, (ms_since(t) - head_ms).max(0.0))
        } else {
            (Vec::new(), 0.0)
        };
        // Reconstruction scores every layer once for the rows that use it, in a
        // context with room for its chunks (so the rows' own contexts stay as
        // llama.cpp would size them); its time is part of each such row's overhead.
        let reconstructs = |m: Method| {
            MethodSpec {
                method: m,
                scorer: None,
                recall: false,
            }
            .scorer_or(cfg.scorer)
                == Scorer::Reconstruct
                && m.scores()
        };
        let (rec_scores, rec_ms) = if rows
            .iter()
            .any(|r| r.budget.is_some() && reconstructs(r.method))
        {
            let rec = Reconstruction::for_model(model, TurnState::Open)
                .map_err(|e| CompareError::Config(format!("reconstruction prompts: {e}")))?;
            let mut flags = vec![false; model.n_layer() as usize];
            for il in ctx.kv_layers(KvPart::Base) {
                flags[il as usize] = true;
            }
            let mut roomy = Context::new(model, &p.clone().with_n_ctx(ctx_size(n + 2048 + 256)))?;
            roomy.restore_seq(SEQ, &head_state)?;
            let t = Instant::now();
            let scores = rec.score(&mut roomy, SEQ, head, &flags)?;
            (scores, ms_since(t))
        } else {
            (Vec::new(), 0.0)
        };
        let mut window_ms = None;

        for spec in rows {
            ctx.memory_clear(true);
            ctx.restore_seq(SEQ, &head_state)?;
            let budget = budget_share(spec.budget, n);
            let (prefill_ms, overhead_ms, compressed) = match (spec.method, spec.budget) {
                (Method::None, _) | (_, None) => {
                    let t = Instant::now();
                    ctx.decode_tokens(window, (n - w) as i32, SEQ, true)?;
                    let ms = ms_since(t);
                    window_ms.get_or_insert(ms);
                    (head_ms + ms, 0.0, false)
                }
                (method, Some(b)) => {
                    let n_keep = b.cells_for(n);
                    let reuse = if method == Method::Chunkkv {
                        cfg.reuse
                    } else {
                        1
                    };
                    let policy = method.policy(&cfg.chunk, 0)?;
                    if reconstructs(method) {
                        let mut c = Compressor::new(&ctx, policy, w, reuse)?;
                        c.observe(model, head, 0);
                        let done = c.compress_with_scores(
                            &mut ctx,
                            &rec_scores,
                            window,
                            (n - w) as i32,
                            n_keep,
                            b.json(),
                        )?;
                        let plain = window_ms.unwrap_or(0.0);
                        (
                            head_ms + rec_ms + done.ms,
                            (rec_ms + done.ms - plain).max(0.0),
                            done.compressed,
                        )
                    } else if method == Method::H2o {
                        let mut c = Compressor::new(&ctx, policy, w, reuse)?;
                        c.observe(model, head, 0);
                        let done = c.compress_window_with(
                            &mut ctx,
                            window,
                            (n - w) as i32,
                            n_keep,
                            &head_scores,
                            b.json(),
                        )?;
                        let plain = window_ms.unwrap_or(0.0);
                        (
                            head_ms + h2o_ms + done.ms,
                            (h2o_ms + done.ms - plain).max(0.0),
                            done.compressed,
                        )
                    } else {
                        let mut c = Compressor::new(&ctx, policy, w, reuse)?;
                        c.observe(model, head, 0);
                        let done =
                            c.compress_window(&mut ctx, window, (n - w) as i32, n_keep, b.json())?;
                        let plain = window_ms.unwrap_or(0.0);
                        (
                            head_ms + done.ms,
                            (done.ms - plain).max(0.0),
                            done.compressed,
                        )
                    }
                }
            };
            let first = ctx.logits_ith(-1).ok_or(DecodeError::Fatal(-100))?.to_vec();
            let ttft_ms = prefill_ms;

            // Compressed sequences move into a context sized for them.
            let mut resized;
            let run_ctx: &mut Context<'_> = if compressed {
                // The saved state carries PyramidKV's per-layer dead-slot mask along.
                let state = ctx.save_seq(SEQ)?;
                let kept = ctx
                    .kv_stats(KvPart::Base)
                    .map_or(n, |s| s.cells_used as usize);
                resized = Context::new(model, &p.clone().with_n_ctx(ctx_size(kept + cfg.n_gen)))?;
                resized.restore_seq(SEQ, &state)?;
                &mut resized
            } else {
                &mut ctx
            };
            let kv = run_ctx
                .kv_stats(KvPart::Base)
                .ok_or_else(|| CompareError::Config("no attention cache".into()))?;
            let (tokens, steps, decode_tok_s, decode_tok_s_std) =
                free_decode(run_ctx, &first, n, cfg.n_gen, cfg.reps)?;
            let (agreement, kl) = match &reference {
                None => {
                    reference = Some(Reference {
                        tokens: tokens.clone(),
                        logprobs: steps.iter().map(|l| log_softmax(l)).collect(),
                    });
                    (1.0, 0.0)
                }
                Some(r) => {
                    let same = tokens.iter().zip(&r.tokens).filter(|(a, b)| a == b).count();
                    (
                        same as f64 / r.tokens.len().max(1) as f64,
                        teacher_forced_kl(run_ctx, &first, n, r)?,
                    )
                }
            };
            let row = CompareRow {
                n_prompt: n,
                method: MethodSpec {
                    method: spec.method,
                    scorer: None,
                    recall: false,
                }
                .label(cfg.scorer),
                budget,
                cache_type_k: tk,
                cache_type_v: tv,
                flash_attn: p.flash_attn(),
                cells: kv.cells_used,
                bytes_live: kv.bytes_live,
                bytes_allocated: kv.bytes_allocated,
                prefill_tok_s: n as f64 * 1e3 / prefill_ms,
                ttft_ms,
                decode_tok_s,
                decode_tok_s_std,
                overhead_ms,
                overhead_pct: 100.0 * overhead_ms / (head_ms + window_ms.unwrap_or(0.0)).max(1e-9),
                agreement,
                kl,
            };
            on_row(&row);
            out.push(row);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_for_different_distributions() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        assert!(kl_divergence(&p, &p).abs() < 1e-12);
        let q = log_softmax(&[3.0, 2.0, 1.0]);
        let kl = kl_divergence(&p, &q);
        // Hand computation: p = softmax(1,2,3); KL = sum p (log p - log q) = 2 (p3 - p1).
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let z: f64 = e.iter().sum();
        assert!((kl - 2.0 * (e[2] - e[0]) / z).abs() < 1e-9);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), Token(1));
    }
}
