//! End-to-end speed and memory of compressed caches, llama-bench style:
//! prefill `pp{d}`, then decode `tg{n} @ d{d}` with the full cache, with
//! ChunkKV at each budget (in place, and moved into a right-sized context),
//! and with a fresh context holding only the budget's worth of tokens (the
//! bound a perfect compaction approaches).

use std::time::Instant;

use crate::compress::{stream, Budget, ChunkKv, CompressError, Compressor};
use crate::llama::{
    Context, ContextError, ContextParams, DecodeError, KvPart, Model, StateError, Token,
};
use crate::pipeline::SEQ;
use crate::workload::prompt_tokens;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub depths: Vec<usize>,
    pub n_gen: usize,
    pub budgets: Vec<Budget>,
    pub reps: usize,
    pub chunkkv: ChunkKv,
    pub reuse: usize,
    /// `--kv-stream`: prompts of any depth streamed through a cache of this
    /// many cells, compressed segment by segment to the first budget.
    pub stream_cells: Option<u32>,
    /// Run one small prefill, compression and decode before measuring.
    pub warmup: bool,
}

/// One small prefill, compression and decode in a throwaway context, like
/// llama-bench's warm-up: a backend loads each kernel on its first use (CUDA
/// loads modules lazily; the first compression of a process paid about 85 ms
/// for it on an H200), which is no cost of the compression being measured.
pub fn warm_up(
    model: &Model,
    params: &ContextParams,
    shape: &ChunkKv,
    reuse: usize,
) -> Result<(), BenchError> {
    let w = shape.window;
    let tokens = prompt_tokens(model, 512 + 2, 7)?;
    let (prompt, feed) = tokens.split_at(512);
    let mut ctx = Context::new(model, &params.clone().with_n_ctx(1024))?;
    let mut c = Compressor::new(&ctx, Box::new(shape.clone()), w, reuse)?;
    c.prefill(&mut ctx, prompt, 0, 64, serde_json::json!(64))?;
    decode_speed(&mut ctx, feed, prompt.len(), 1)?;
    let mut plain = Context::new(model, &params.clone().with_n_ctx(1024))?;
    plain.decode_tokens(prompt, 0, SEQ, true)?;
    decode_speed(&mut plain, feed, prompt.len(), 1)?;
    Ok(())
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub depth: usize,
    /// `full`, `chunkkv`, `chunkkv-resized` or `bound`.
    pub method: String,
    pub budget: f64,
    pub cells: u32,
    pub bytes_live: u64,
    pub bytes_allocated: u64,
    pub attn_width: u32,
    pub prefill_ms: f64,
    pub prefill_tok_s: f64,
    /// Extra prefill time of compression (importance, selection, compaction):
    /// the mean of -r compressions of the same prompt in one context.
    pub overhead_ms: f64,
    pub overhead_pct: f64,
    /// The context's first compression, which also allocates (ChunkKV rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead_first_ms: Option<f64>,
    pub decode_tok_s: f64,
    pub decode_tok_s_std: f64,
    /// Where a compression's time went (ChunkKV rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<crate::compress::StageMs>,
    /// Streamed rows: segments, compressions and the peak memory of the run
    /// (device memory in use on a GPU, else the process's peak RSS), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamRow>,
}

/// What a streamed prefill did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StreamRow {
    pub segments: usize,
    pub compressions: usize,
    pub peak_mib: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Compress(#[from] CompressError),
    #[error(transparent)]
    Tokenize(#[from] crate::llama::TokenizeError),
    #[error("{0}")]
    Config(String),
}

/// Milliseconds since `t`.
pub(crate) fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Mean and population standard deviation.
pub(crate) fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Decodes `n` tokens one at a time after position `at`, `reps` times
/// (removing them in between), like llama-bench's `tg`. Returns tokens/s.
fn decode_speed(
    ctx: &mut Context<'_>,
    feed: &[Token],
    at: usize,
    reps: usize,
) -> Result<(f64, f64), BenchError> {
    let mut rates = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        for (i, &tok) in feed.iter().enumerate() {
            ctx.decode_tokens(&[tok], (at + i) as i32, SEQ, true)?;
        }
        rates.push(feed.len() as f64 * 1e3 / ms_since(t));
        ctx.seq_rm(SEQ, at as i32, -1);
    }
    Ok(mean_std(&rates))
}

fn row(depth: usize, method: &str, budget: f64, ctx: &Context<'_>) -> BenchRow {
    let kv = ctx.kv_stats(KvPart::Base).expect("attention cache");
    BenchRow {
        depth,
        method: method.into(),
        budget,
        cells: kv.cells_used,
        bytes_live: kv.bytes_live,
        bytes_allocated: kv.bytes_allocated,
        attn_width: kv.attn_width,
        prefill_ms: 0.0,
        prefill_tok_s: 0.0,
        overhead_ms: 0.0,
        overhead_pct: 0.0,
        overhead_first_ms: None,
        decode_tok_s: 0.0,
        decode_tok_s_std: 0.0,
        stages: None,
        stream: None,
    }
}

/// Memory in use now, MiB: the most any GPU holds, else this process's peak RSS.
fn memory_in_use_mib() -> f64 {
    let gpu = crate::llama::Backend::init()
        .devices()
        .into_iter()
        .filter(|d| d.kind != crate::llama::DeviceKind::Cpu && d.memory_total > 0)
        .map(|d| (d.memory_total - d.memory_free) as f64 / (1u64 << 20) as f64)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    gpu.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    })
}

/// `--kv-stream`: each depth's prompt through a cache of `cells` cells,
/// compressed segment by segment to `budget`, then decoded.
fn run_stream(
    model: &Model,
    params: &ContextParams,
    cfg: &BenchConfig,
    cells: u32,
    on_row: &mut dyn FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, BenchError> {
    let budget = *cfg
        .budgets
        .first()
        .ok_or_else(|| BenchError::Config("--kv-stream needs a --kv-budget".into()))?;
    let mut rows = Vec::new();
    for &depth in &cfg.depths {
        let tokens = prompt_tokens(model, depth + cfg.n_gen, depth as u64)?;
        let (prompt, feed) = tokens.split_at(depth);
        let mut ctx = Context::new(model, &params.clone().with_n_ctx(cells))?;
        let mut c = Compressor::new(
            &ctx,
            Box::new(cfg.chunkkv.clone()),
            cfg.chunkkv.window,
            cfg.reuse,
        )?;
        c.observe(model, prompt, 0);
        let mut cursor = stream::Cursor::default();
        let mut segments = 0;
        let mut peak = memory_in_use_mib();
        let t = Instant::now();
        stream::feed(
            &mut ctx,
            &mut c,
            prompt,
            &mut cursor,
            budget,
            cfg.n_gen + 1,
            crate::compress::Scorer::Window,
            true,
            &mut |_| {
                segments += 1;
                peak = peak.max(memory_in_use_mib());
            },
        )
        .map_err(|e| BenchError::Config(format!("streaming d{depth}: {e}")))?;
        let prefill_ms = ms_since(t);
        let b = match budget {
            Budget::Ratio(x) => x,
            Budget::Tokens(t) => t as f64 / depth as f64,
        };
        let mut r = row(depth, "chunkkv-stream", b, &ctx);
        r.prefill_ms = prefill_ms;
        r.prefill_tok_s = depth as f64 * 1e3 / prefill_ms;
        (r.decode_tok_s, r.decode_tok_s_std) = decode_speed(&mut ctx, feed, depth, cfg.reps)?;
        r.stream = Some(StreamRow {
            segments,
            compressions: cursor.compressions,
            peak_mib: peak.max(memory_in_use_mib()),
        });
        on_row(&r);
        rows.push(r);
    }
    Ok(rows)
}

/// Context size for `tokens` plus generation, padded like llama.cpp (256).
pub(crate) fn ctx_size(tokens: usize) -> u32 {
    (tokens.div_ceil(256) * 256).max(256) as u32
}

/// Runs every configuration at every depth; `on_row` sees rows as they finish.
pub fn run(
    model: &Model,
    params: &ContextParams,
    cfg: &BenchConfig,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, BenchError> {
    if cfg.warmup {
        warm_up(model, params, &cfg.chunkkv, cfg.reuse)?;
    }
    if let Some(cells) = cfg.stream_cells {
        return run_stream(model, params, cfg, cells, &mut on_row);
    }
    let w = cfg.chunkkv.window;
    let mut rows = Vec::new();
    let mut push = |r: BenchRow, rows: &mut Vec<BenchRow>| {
        on_row(&r);
        rows.push(r);
    };
    for &depth in &cfg.depths {
        if depth <= w + 1 {
            return Err(BenchError::Config(format!(
                "depth {depth} must exceed the window ({w})"
            )));
        }
        let tokens = prompt_tokens(model, depth + cfg.n_gen, depth as u64)?;
        let (prompt, feed) = tokens.split_at(depth);
        let (head, window) = prompt.split_at(depth - w);
        let full_params = params.clone().with_n_ctx(ctx_size(depth + cfg.n_gen));
        let mut ctx = Context::new(model, &full_params)?;

        // Full cache: prefill (head, then window), decode.
        let t = Instant::now();
        ctx.decode_tokens(head, 0, SEQ, false)?;
        ctx.synchronize();
        let head_ms = ms_since(t);
        let head_state = ctx.save_seq(SEQ)?;
        // Timed until the device is done: a compression has to wait for its
        // scores, and a plain prefill for its logits. The plain window runs
        // once, like a turn's last micro-batch (a fresh graph); each
        // compression below runs -r times on the restored head, and their
        // mean is what a later turn pays (a context's first compression also
        // allocates; it is reported apart).
        let t = Instant::now();
        ctx.decode_tokens(window, (depth - w) as i32, SEQ, true)?;
        ctx.synchronize();
        let window_ms = ms_since(t);
        let prefill_ms = head_ms + window_ms;
        let mut r = row(depth, "full", 1.0, &ctx);
        (r.decode_tok_s, r.decode_tok_s_std) = decode_speed(&mut ctx, feed, depth, cfg.reps)?;
        r.prefill_ms = prefill_ms;
        r.prefill_tok_s = depth as f64 * 1e3 / prefill_ms;
        push(r, &mut rows);

        for &budget in &cfg.budgets {
            let n_keep = budget.cells_for(depth);
            let b = match budget {
                Budget::Ratio(x) => x,
                Budget::Tokens(t) => t as f64 / depth as f64,
            };
            // ChunkKV in place: restore the head, score with the window, compact.
            let mut runs = Vec::with_capacity(cfg.reps.max(1));
            for _ in 0..cfg.reps.max(1) {
                ctx.memory_clear(true);
                ctx.restore_seq(SEQ, &head_state)?;
                let mut c = Compressor::new(&ctx, Box::new(cfg.chunkkv.clone()), w, cfg.reuse)?;
                c.observe(model, head, 0);
                runs.push(c.compress_window(
                    &mut ctx,
                    window,
                    (depth - w) as i32,
                    n_keep,
                    budget.json(),
                )?);
            }
            let n = runs.len() as f64;
            let done_ms = runs.iter().map(|d| d.ms).sum::<f64>() / n;
            let mut stages = crate::compress::StageMs::default();
            for d in &runs {
                let m = d.report.ms;
                stages.importance += m.importance / n;
                stages.readback += m.readback / n;
                stages.select += m.select / n;
                stages.compact += m.compact / n;
            }
            let mut r = row(depth, "chunkkv", b, &ctx);
            r.stages = Some(stages);
            r.overhead_ms = (done_ms - window_ms).max(0.0);
            r.overhead_first_ms = Some((runs[0].ms - window_ms).max(0.0));
            r.overhead_pct = 100.0 * r.overhead_ms / prefill_ms;
            r.prefill_ms = head_ms + done_ms;
            r.prefill_tok_s = depth as f64 * 1e3 / r.prefill_ms;
            (r.decode_tok_s, r.decode_tok_s_std) = decode_speed(&mut ctx, feed, depth, cfg.reps)?;
            let (overhead_ms, overhead_pct, pf_ms, pf) =
                (r.overhead_ms, r.overhead_pct, r.prefill_ms, r.prefill_tok_s);
            push(r, &mut rows);

            // The same cells moved into a context sized for them: memory freed.
            let compact_state = ctx.save_seq(SEQ)?;
            let small = params.clone().with_n_ctx(ctx_size(n_keep + cfg.n_gen));
            let mut sctx = Context::new(model, &small)?;
            sctx.restore_seq(SEQ, &compact_state)?;
            let mut r = row(depth, "chunkkv-resized", b, &sctx);
            (r.overhead_ms, r.overhead_pct, r.prefill_ms, r.prefill_tok_s) =
                (overhead_ms, overhead_pct, pf_ms, pf);
            (r.decode_tok_s, r.decode_tok_s_std) = decode_speed(&mut sctx, feed, depth, cfg.reps)?;
            push(r, &mut rows);
            drop(sctx);

            // Bound: a fresh context (same size as the full one) holding only n_keep tokens.
            let mut fresh = Context::new(model, &full_params)?;
            let t = Instant::now();
            fresh.decode_tokens(&prompt[..n_keep], 0, SEQ, true)?;
            let fresh_ms = ms_since(t);
            let mut r = row(depth, "bound", b, &fresh);
            r.prefill_ms = fresh_ms;
            r.prefill_tok_s = n_keep as f64 * 1e3 / fresh_ms;
            (r.decode_tok_s, r.decode_tok_s_std) =
                decode_speed(&mut fresh, feed, n_keep, cfg.reps)?;
            push(r, &mut rows);
        }
    }
    Ok(rows)
}
