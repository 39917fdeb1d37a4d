//! Prompt prefill and token generation on one sequence, timed.
//!
//! Later stages (KV compression after prefill) hook in between the two.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::compress::{stream, Budget, CompressError, CompressionReport, Compressor};
use crate::llama::{Context, DecodeError, KvPart, KvStats, Pos, Sampler, StreamDecoder, Token};

/// The sequence every single-conversation pipeline uses.
pub const SEQ: i32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt is {n_prompt} tokens but the context holds {n_ctx} (raise -c, or shorten the prompt)")]
    PromptTooLong { n_prompt: usize, n_ctx: u32 },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Compress(#[from] CompressError),
    #[error("the prompt does not fit even compressed: {0} (raise -c or lower --kv-budget)")]
    Stream(crate::compress::stream::StreamError),
}

/// KV compression to run right after the prompt's prefill.
#[derive(Debug)]
pub struct Hook<'a> {
    pub compressor: &'a mut Compressor,
    pub budget: Budget,
    /// Prefill in segments that each fill the free cells and are compressed
    /// (`--kv-stream`): prompts longer than the context pass through it.
    pub stream: bool,
}

/// What a segmented prefill did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StreamReport {
    pub segments: usize,
    pub compressions: usize,
    pub cells_after: u32,
    pub bytes_live_after: u64,
}

/// Wall-clock timings of one generation, llama.cpp style.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub prefill_tok_s: f64,
    /// Prompt submitted to first token sampled.
    pub ttft_ms: f64,
    pub decode_ms: f64,
    /// Tokens decoded after the first, per second.
    pub decode_tok_s: f64,
}

/// The outcome of [`generate`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<Token>,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Why generation stopped.
    pub stop: StopReason,
    pub timings: Timings,
    /// What the hook did, when one ran.
    pub compression: Option<CompressionReport>,
    /// What a segmented prefill did (`--kv-stream`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model emitted an end-of-generation token.
    EndOfGeneration,
    /// `n_predict` tokens were generated.
    Length,
    /// The context ran out of cells.
    ContextFull,
    /// The caller asked to stop (Ctrl-C in a chat).
    Interrupted,
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// Checks that a prompt fits before any work is done.
pub fn check_prompt(ctx: &Context<'_>, n_prompt: usize) -> Result<(), PipelineError> {
    if n_prompt == 0 {
        return Err(PipelineError::EmptyPrompt);
    }
    // One cell must stay free for the first generated token.
    if n_prompt >= ctx.n_ctx() as usize {
        return Err(PipelineError::PromptTooLong {
            n_prompt,
            n_ctx: ctx.n_ctx(),
        });
    }
    Ok(())
}

/// Prefills `prompt` at positions `start..` (logits for its last token) and
/// returns the milliseconds it took.
pub fn prefill(ctx: &mut Context<'_>, prompt: &[Token], start: Pos) -> Result<f64, PipelineError> {
    let t = Instant::now();
    ctx.decode_tokens(prompt, start, SEQ, true)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Samples up to `n_predict` tokens after a prefill that ended at position
/// `next_pos - 1`, streaming text pieces to `on_text`.
pub fn decode(
    ctx: &mut Context<'_>,
    sampler: &mut Sampler,
    next_pos: Pos,
    n_predict: usize,
    on_text: impl FnMut(&str),
) -> Result<(Vec<Token>, String, StopReason, f64), PipelineError> {
    decode_until(
        ctx,
        sampler,
        next_pos,
        n_predict,
        &AtomicBool::new(false),
        on_text,
    )
}

/// [`decode`] that also stops, between two tokens, once `stop` is set.
pub fn decode_until(
    ctx: &mut Context<'_>,
    sampler: &mut Sampler,
    next_pos: Pos,
    n_predict: usize,
    stop_flag: &AtomicBool,
    mut on_text: impl FnMut(&str),
) -> Result<(Vec<Token>, String, StopReason, f64), PipelineError> {
    let model = ctx.model();
    let mut detok = StreamDecoder::new();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut pos = next_pos;
    let t = Instant::now();
    let mut stop = StopReason::Length;
    while tokens.len() < n_predict {
        if stop_flag.load(Ordering::Relaxed) {
            stop = StopReason::Interrupted;
            break;
        }
        let tok = sampler.sample(ctx, -1);
        if model.is_eog(tok) {
            stop = StopReason::EndOfGeneration;
            break;
        }
        tokens.push(tok);
        let piece = detok.push(model, tok);
        on_text(&piece);
        text.push_str(&piece);
        if tokens.len() == n_predict {
            break;
        }
        match ctx.decode_tokens(&[tok], pos, SEQ, true) {
            Ok(()) => pos += 1,
            Err(DecodeError::ContextFull { .. } | DecodeError::NoKvSlot { .. }) => {
                stop = StopReason::ContextFull;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let rest = detok.finish();
    on_text(&rest);
    text.push_str(&rest);
    Ok((tokens, text, stop, t.elapsed().as_secs_f64() * 1e3))
}

/// Prefill (then the hook, if any), then decode, from an empty sequence.
pub fn generate(
    ctx: &mut Context<'_>,
    sampler: &mut Sampler,
    prompt: &[Token],
    n_predict: usize,
    hook: Option<Hook<'_>>,
    on_text: impl FnMut(&str),
) -> Result<Generation, PipelineError> {
    let streamed = hook.as_ref().is_some_and(|h| h.stream);
    if !streamed || prompt.is_empty() {
        check_prompt(ctx, prompt.len())?;
    }
    let mut stream_report = None;
    let (prefill_ms, compression) = match hook {
        None => (prefill(ctx, prompt, 0)?, None),
        Some(h) if h.stream => {
            let t = Instant::now();
            let reserve = (n_predict + 1).min(ctx.n_ctx() as usize / 2);
            let scorer = h.compressor.scorer();
            let mut cursor = stream::Cursor::default();
            let mut segments = 0;
            stream::feed(
                ctx,
                h.compressor,
                prompt,
                &mut cursor,
                h.budget,
                reserve,
                scorer,
                true,
                &mut |_| segments += 1,
            )
            .map_err(|e| match e {
                stream::StreamError::Compress(e) => PipelineError::Compress(e),
                full => PipelineError::Stream(full),
            })?;
            let kv = ctx.kv_stats(KvPart::Base);
            stream_report = Some(StreamReport {
                segments,
                compressions: cursor.compressions,
                cells_after: kv.map_or(0, |k| k.cells_used),
                bytes_live_after: kv.map_or(0, |k| k.bytes_live),
            });
            (t.elapsed().as_secs_f64() * 1e3, None)
        }
        Some(h) => {
            let n_keep = h.budget.cells_for(prompt.len());
            let done = h
                .compressor
                .prefill(ctx, prompt, 0, n_keep, h.budget.json())?;
            (done.ms, Some(done.report))
        }
    };
    let t_first = Instant::now();
    let (tokens, text, stop, decode_ms) =
        decode(ctx, sampler, prompt.len() as Pos, n_predict, on_text)?;
    // The first token costs one sample after prefill; later ones a decode each.
    let first_ms = if tokens.is_empty() {
        0.0
    } else {
        t_first.elapsed().as_secs_f64() * 1e3 - decode_ms
    };
    let n_decoded = tokens.len().saturating_sub(1);
    Ok(Generation {
        n_prompt: prompt.len(),
        n_gen: tokens.len(),
        text,
        tokens,
        stop,
        compression,
        stream: stream_report,
        timings: Timings {
            prefill_ms,
            prefill_tok_s: rate(prompt.len(), prefill_ms),
            ttft_ms: prefill_ms + first_ms.max(0.0),
            decode_ms,
            decode_tok_s: rate(n_decoded, decode_ms),
        },
    })
}

/// KV statistics of both attention caches, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KvReport {
    pub cells_used: u32,
    pub bytes_live: u64,
    pub bytes_allocated: u64,
    pub attn_width: u32,
    pub size: u32,
    pub type_k: Option<crate::llama::CacheType>,
    pub type_v: Option<crate::llama::CacheType>,
    /// The sliding-window cache of an iSWA model, reported separately.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swa: Option<KvStats>,
}

impl KvReport {
    pub fn of(ctx: &Context<'_>) -> Option<KvReport> {
        let base = ctx.kv_stats(KvPart::Base)?;
        Some(KvReport {
            cells_used: base.cells_used,
            bytes_live: base.bytes_live,
            bytes_allocated: base.bytes_allocated,
            attn_width: base.attn_width,
            size: base.size,
            type_k: base.type_k,
            type_v: base.type_v,
            swa: ctx.kv_stats(KvPart::Swa),
        })
    }
}
