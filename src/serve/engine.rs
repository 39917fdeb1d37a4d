//! The engine: one thread owns the model and a context of `-np` slots (one
//! sequence and one KV stream each) and runs every request on them.
//!
//! Each step decodes one token for every generating slot and, in the same
//! batch, up to [`PREFILL_CHUNK`] prompt tokens of each prefilling slot
//! while the batch holds the context's `-b` tokens, so a long prompt never
//! starves the others and many prompts fill the device together. A prompt's last `w` tokens (its
//! observation window) are decoded on their own with importance on and the
//! slot is compressed right there, as `chat` compresses a turn: that is the
//! longest any slot waits for another. A prompt longer than the slot's free
//! cells goes in the same chunks, and whenever the slot runs out of cells its
//! next `w` tokens score it and it is compressed to its budget (one
//! compression per fill, not per chunk); with recall, once more before its
//! question when the document's tail would crowd the question's recall out
//! (`stream::settles`). Only a prompt scored by
//! reconstruction goes through the segmented prefill of `compress::stream`,
//! a segment per step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::api::{ApiError, FinishReason, Usage};
use super::metrics::{EngineWork, Metrics};
use crate::compress::stream::{self, Cursor};
use crate::compress::{
    Budget, ChunkKv, ChunkScore, Chunking, Compressor, Keep, Method, RecallMode, RecallStore,
    Reconstruction, Scorer, TurnState,
};
use crate::llama::{
    mib, Batch, CacheType, ChatMessage, Context, ContextParams, KvPart, KvStats, Model, Pos,
    Sampler, SamplingParams, SeqId, StreamDecoder, Token,
};

/// Prompt tokens of one slot per step, beside the other slots' work.
pub const PREFILL_CHUNK: usize = 256;

/// A prompt longer than its slot's free cells is compressed rather than fed
/// in chunks smaller than this (unless that is all that is left of it).
const MIN_CHUNK: usize = 64;

/// New prompt tokens from which `auto` scoring treats a prompt as a document
/// and scores it by reconstruction (its questions may come in later turns,
/// which window scoring cannot know; see docs/results/eval-query-agnostic.md).
pub const DOCUMENT_TOKENS: usize = 512;

/// What a request asks for.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Chat messages, rendered with the model's template.
    Chat(Vec<ChatMessage>),
    /// Raw text (`/v1/completions`).
    Text(String),
}

/// One request, as the HTTP side hands it over.
#[derive(Debug)]
pub struct Job {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Per-request `chunkkv` settings; `None` keeps the server's.
    pub method: Option<Method>,
    pub budget: Option<Budget>,
    /// `Some` forces a scorer; `None` is the server's choice.
    pub score: Option<ScoreChoice>,
    /// Unbounded: the engine never waits for a slow reader.
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    /// Counted in the queue until the engine finishes it.
    pub admitted: Arc<std::sync::atomic::AtomicUsize>,
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// Text as it is generated (complete UTF-8 pieces).
    Text(String),
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Error(ApiError),
}

/// What scores a slot's cache when a prompt comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreChoice {
    /// Reconstruction for a conversation that opens with [`DOCUMENT_TOKENS`]
    /// tokens or more (a document), the observation window for the rest.
    /// With recall the window always: each question re-ranks the evicted
    /// chunks anyway, and reconstruction costs 2.6-3x the prefill.
    Auto,
    Fixed(Scorer),
}

/// The server's compression defaults and the context's shape.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub n_slots: usize,
    pub context: ContextParams,
    pub method: Method,
    pub budget: Budget,
    pub shape: ChunkKv,
    pub reuse: usize,
    pub seed: u64,
    pub score: ScoreChoice,
    /// `--kv-recall`: each ChunkKV slot keeps its evicted rows (host memory,
    /// or a file in `recall_dir`) and every turn may bring chunks back.
    pub recall: RecallMode,
    pub recall_dir: Option<std::path::PathBuf>,
    pub recall_cells: Option<usize>,
    /// Reply tokens a recalling turn drafts to score its cache.
    pub recall_probe: usize,
    /// `--kv-recall-pin`: draft-attended positions kept in every layer.
    pub recall_pin: usize,
    /// `--kv-recall-unify`: every layer group recalls and keeps the same chunks.
    pub recall_unify: bool,
    /// `--kv-trace`: text whose tokens are followed through compressions.
    pub trace: Option<String>,
    /// `--batch-replies`: how long a compressed turn's reply may wait for
    /// the other waiting turns' compressions, so the replies start together
    /// and decode in one batch (zero: each reply starts at once).
    pub batch_replies: Duration,
    /// `--kv-compact-after-reply`: with recall, a turn's reply is decoded
    /// over everything the turn brought back (or all of a prompt that fit
    /// its slot); the compaction waits for the next turn.
    pub compact_after_reply: bool,
    /// `--decode-share`: how much decoding pays a compression back.
    pub share: Share,
    /// `--stream-batch`: the most tokens a step carries while replies
    /// stream (`None`: the context's `-b`), which bounds a streamed token's
    /// wait for the prompt chunks decoded with it.
    pub stream_batch: Option<usize>,
}

/// How the engine shares itself between compressions and streaming replies
/// (`--decode-share`). A compression holds every slot up for its whole
/// length; while replies stream, the next one waits until it is paid back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Share {
    /// As long again of decoding: the streaming replies together keep at
    /// least half of the engine.
    Half,
    /// As long again for each streaming reply: every request, streaming or
    /// waiting for its compression, gets an equal share of the engine, so
    /// replies are cut less the more of them stream. On an H100 it decoded
    /// 59% faster than `Half` with 256-token replies and as fast with short
    /// ones (docs/results/serve-load.md, "Shares").
    PerReply,
    /// Replies first: while replies stream, a compression waits as with
    /// `PerReply` and in any case [`REPLIES_FIRST_WAIT`] from when it is
    /// first held. A short reply then streams without a stall, however
    /// finely its neighbours' turns are cut into steps (three ranking
    /// passes of 40 ms, the turn, a held-back compaction on a GPU), while a
    /// long one still lets a turn in every half second or so. The default:
    /// on an H100 it decoded 1.54x as fast as `PerReply` (1.74x with
    /// replies batched), with time to first token as short
    /// (docs/results/serve-load.md, "H100: replies first by default").
    #[default]
    Replies,
}

/// With `--decode-share replies`, the longest a compression waits for the
/// streaming replies before it runs anyway.
pub const REPLIES_FIRST_WAIT: Duration = Duration::from_millis(500);

/// A slot: one sequence, its compressed history and what it is doing.
struct Slot {
    seq: SeqId,
    compressor: Option<Compressor>,
    /// The method `compressor` was built for.
    method: Method,
    /// The rendered text whose tokens are in this slot's cache.
    cached: String,
    cursor: Cursor,
    last_used: Instant,
    work: Option<Work>,
    /// Positions `--kv-trace` follows in this conversation.
    traced: Vec<std::ops::Range<Pos>>,
}

/// A request running on a slot.
struct Work {
    job: Job,
    sampler: Sampler,
    budget: Option<Budget>,
    /// Prompt tokens not yet decoded; the last `window` of them are decoded
    /// with importance when compressing.
    pending: Vec<Token>,
    /// Where `pending` starts.
    start: Pos,
    /// Score this prompt by reconstruction rather than by its window.
    reconstruct: bool,
    /// How the prompt goes in (decided when it first does not fit).
    fill: Fill,
    done: usize,
    window: usize,
    /// The rendered text once the prompt is in the cache.
    rendered: String,
    n_prompt: usize,
    generated: usize,
    text: String,
    /// Text held back while it could still become a stop string.
    held: String,
    detok: StreamDecoder,
    /// Generated tokens decoded into the cache.
    decoded: Vec<Token>,
    /// The token to decode next (sampled, not yet in the cache).
    next: Option<Token>,
    /// While the reply waits for other slots' turns ([`Schedule::batch`]):
    /// since when, and the text it has not streamed yet.
    parked: Option<(Instant, String)>,
}

impl Work {
    /// The prompt is in but for its window: the turn waits for its
    /// (compressed) scoring.
    fn awaits_turn(&self) -> bool {
        self.next.is_none()
            && self.fill != Fill::Segmented
            && self.done + self.window >= self.pending.len()
    }

    /// A short turn (a prompt of one step's chunk, no document) waits for
    /// its scoring, or will within a step: replies parked meanwhile wait for
    /// it. A document's compression can take far longer than a turn's (a
    /// reconstruction on a CPU: tens of seconds), so none waits for one.
    fn turn_near(&self) -> bool {
        self.next.is_none()
            && self.fill == Fill::Fits
            && !self.reconstruct
            && self.pending.len() <= PREFILL_CHUNK + self.window
            && self.done + self.window + PREFILL_CHUNK >= self.pending.len()
    }

    /// Streams `out`, or keeps it while the reply is parked. False when the
    /// client went away.
    fn emit(&mut self, out: String) -> bool {
        match self.parked.as_mut() {
            Some((_, text)) => {
                text.push_str(&out);
                true
            }
            None => self.job.events.send(Event::Text(out)).is_ok(),
        }
    }

    /// Starts a parked reply: what it held back goes out.
    fn unpark(&mut self) {
        if let Some((_, text)) = self.parked.take() {
            if !text.is_empty() {
                let _ = self.job.events.send(Event::Text(text));
            }
        }
    }
}

/// How a prompt enters its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// In chunks beside the other slots, compressed once its window is in.
    Fits,
    /// Longer than the slot's free cells and scored by windows: in chunks,
    /// compressed whenever the free cells run out.
    Chunked,
    /// Longer than the slot's free cells and scored by reconstruction: a
    /// segment per step, each compressed before the next (`compress::stream`).
    Segmented,
}

impl Slot {
    fn free(&self) -> bool {
        self.work.is_none()
    }

    /// Whether its reply is generating (its next token goes in the next batch).
    fn streams(&self) -> bool {
        self.work
            .as_ref()
            .is_some_and(|w| w.parked.is_none() && w.next.is_some())
    }
}

/// What the server's memory holds, told once the context exists: operators
/// compare servers "in the same memory" by these bytes, not by `-c` (a q8_0
/// cache holds twice the cells of an f16 one in the same bytes).
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub n_slots: usize,
    /// Cells of one slot's stream (`-c / -np`, padded by llama.cpp).
    pub slot_cells: usize,
    /// The KV cache's K and V tensors over all slots, if it has one.
    pub kv: Option<KvStats>,
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} slots of {} cells", self.n_slots, self.slot_cells)?;
        if let Some(kv) = self.kv {
            let name = |t: Option<CacheType>| t.map_or("?", CacheType::name);
            write!(
                f,
                "; KV cache {:.1} MiB, {}/{}",
                mib(kv.bytes_allocated),
                name(kv.type_k),
                name(kv.type_v)
            )?;
        }
        Ok(())
    }
}

/// Runs the engine until `jobs` closes or `stop` is set; `ready` gets the
/// outcome of creating the context before any job is taken.
pub fn run(
    model: &Model,
    cfg: &EngineConfig,
    jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<Capacity, String>>,
) {
    let params = cfg.context.clone().with_n_seq_max(cfg.n_slots as u32);
    let mut ctx = match Context::new(model, &params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let mut slots: Vec<Slot> = (0..cfg.n_slots)
        .map(|i| Slot {
            seq: i as SeqId,
            compressor: None,
            method: Method::None,
            cached: String::new(),
            cursor: Cursor::default(),
            last_used: Instant::now(),
            work: None,
            traced: Vec::new(),
        })
        .collect();
    let _ = ready.send(Ok(Capacity {
        n_slots: cfg.n_slots,
        slot_cells: ctx.seq_capacity(),
        kv: ctx.kv_stats(KvPart::Base),
    }));
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut batch = Batch::new(ctx.n_batch() as usize + cfg.n_slots);
    let mut sched = Schedule {
        batch: cfg.batch_replies,
        share: cfg.share,
        ..Schedule::default()
    };
    let mut gauges_at = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let busy = slots.iter().any(|s| !s.free()) || !waiting.is_empty();
        // Idle: wait for work (waking now and then to notice a shutdown).
        if !busy {
            match jobs.recv_timeout(Duration::from_millis(200)) {
                Ok(j) => waiting.push_back(j),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(j) = jobs.try_recv() {
            waiting.push_back(j);
        }
        assign(
            model,
            &mut ctx,
            cfg,
            &mut slots,
            &mut waiting,
            &metrics,
            &mut sched,
        );
        step(&mut ctx, cfg, &mut slots, &mut batch, &metrics, &mut sched);
        sched.tick = sched.tick.wrapping_add(1);
        // The per-slot gauges walk every cell: a few times a second is enough,
        // and always once the work is done.
        let idle = slots.iter().all(Slot::free) && waiting.is_empty();
        if idle || gauges_at.elapsed() >= Duration::from_millis(250) {
            gauges_at = Instant::now();
            for s in &slots {
                if let Some(kv) = ctx.seq_kv_stats(KvPart::Base, s.seq) {
                    metrics.set_slot(s.seq as usize, kv.cells_used, kv.bytes_live);
                }
                let held = s
                    .compressor
                    .as_ref()
                    .and_then(Compressor::recall_store)
                    .map_or(0, |r| r.bytes());
                metrics.set_recall_held(s.seq as usize, held);
            }
        }
    }
    for s in &mut slots {
        end(&ctx, s, FinishReason::Stop, true);
    }
}

/// PyramidKV keeps a different count per layer through one dead-slot mask
/// for the whole context, which slots of their own cannot share.
pub fn pyramid_refused() -> ApiError {
    ApiError::bad_request(
        "pyramidkv needs a context-wide dead-slot mask, which a server's slots cannot share".into(),
        Some("chunkkv.kv_method"),
    )
}

/// The text a prompt renders to.
fn render(model: &Model, prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(messages) => crate::chat::render(model, messages, true),
    }
}

/// Gives waiting jobs to free slots: the slot whose cached text the prompt
/// continues (only the new part is prefilled), else the least recently used.
fn assign(
    model: &Model,
    ctx: &mut Context<'_>,
    cfg: &EngineConfig,
    slots: &mut [Slot],
    waiting: &mut VecDeque<Job>,
    metrics: &Metrics,
    sched: &mut Schedule,
) {
    while let Some(job) = waiting.front() {
        if job.events.is_closed() {
            let job = waiting.pop_front().expect("front exists");
            job.admitted.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let rendered = render(model, &job.prompt);
        let reuse = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.free() && !s.cached.is_empty() && rendered.starts_with(&s.cached))
            .max_by_key(|(_, s)| s.cached.len())
            .map(|(i, _)| i);
        let lru = || {
            slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.free())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
        };
        let Some(i) = reuse.or_else(lru) else {
            return;
        };
        // A held-back compaction is a compression like any other: while
        // replies stream it waits its turn (the job with it).
        let unsettled = reuse.is_some()
            && slots[i]
                .compressor
                .as_ref()
                .is_some_and(Compressor::unsettled);
        if unsettled && !sched.may_compress(slots.iter().any(Slot::streams)) {
            sched.hold();
            return;
        }
        let job = waiting.pop_front().expect("front exists");
        let streaming = streaming_now(slots);
        let slot = &mut slots[i];
        // The conversation goes on from its compacted cache; if that
        // compaction fails, the whole conversation is prefilled again.
        let t0 = Instant::now();
        let settled = reuse.is_some() && settle(ctx, slot, metrics);
        if unsettled {
            sched.compressed(t0, streaming);
        }
        if !settled {
            // A new conversation (or one whose held-back compaction failed):
            // the slot starts over.
            ctx.seq_rm(slot.seq, -1, -1);
            slot.cached.clear();
            slot.cursor = Cursor::default();
            if let Some(c) = slot.compressor.as_mut() {
                c.reset();
            }
        }
        match start(model, ctx, cfg, slot, job, rendered) {
            Ok(()) => metrics.requests.fetch_add(1, Ordering::Relaxed),
            Err((job, e)) => {
                job.admitted.fetch_sub(1, Ordering::AcqRel);
                let _ = job.events.send(Event::Error(e));
                0
            }
        };
    }
}

/// The compaction the slot's last turn held back for its reply
/// (`--kv-compact-after-reply`), before the slot takes the conversation's
/// next turn. False when it failed (the slot must start over).
fn settle(ctx: &mut Context<'_>, slot: &mut Slot, metrics: &Metrics) -> bool {
    let Some(c) = slot.compressor.as_mut() else {
        return true;
    };
    let recalled = c.recalled_total();
    let t = Instant::now();
    let settled = c.settle(ctx);
    metrics.engine_time(EngineWork::Settle, t);
    match settled {
        Ok(_) => {
            metrics
                .recalled
                .fetch_add(c.recalled_total() - recalled, Ordering::Relaxed);
            true
        }
        Err(e) => {
            tracing::warn!(
                "seq {}: the held-back compaction failed ({e}): prefilling the conversation again",
                slot.seq
            );
            false
        }
    }
}

/// A slot's compressor: ChunkKV's shape for turns, sentences ranked by
/// mean for documents (as `chat` does), reconstruction prompts that open
/// inside the user's message (the head ends mid-message).
fn new_compressor(
    ctx: &Context<'_>,
    cfg: &EngineConfig,
    policy: Box<dyn crate::compress::Policy>,
    reuse: usize,
    method: Method,
    seq: SeqId,
) -> Result<Compressor, String> {
    let rec = Reconstruction::for_model(ctx.model(), TurnState::Open)
        .map_err(|e| format!("reconstruction prompts: {e}"))?;
    let mut c = Compressor::new(ctx, policy, cfg.shape.window, reuse)
        .map_err(|e| e.to_string())?
        .with_seq(seq)
        .with_reconstruction(rec);
    if method == Method::Chunkkv {
        let mut doc = cfg.shape.clone();
        doc.chunking = Chunking::Sentences;
        doc.chunk_score = ChunkScore::Mean;
        c = c.with_document_policy(Box::new(doc));
        if cfg.recall != RecallMode::Off {
            let dir = (cfg.recall == RecallMode::Disk)
                .then(|| cfg.recall_dir.clone().unwrap_or_else(std::env::temp_dir));
            let store = RecallStore::new(ctx, seq, dir.as_deref()).map_err(|e| e.to_string())?;
            c = c
                .with_recall(store)
                .map_err(|e| e.to_string())?
                .with_recall_cells(cfg.recall_cells.unwrap_or(usize::MAX))
                .with_recall_probe(cfg.recall_probe)
                .with_recall_pin(cfg.recall_pin)
                .with_recall_unify(cfg.recall_unify);
        }
    }
    Ok(c)
}

/// Sets a job up on a slot: the compressor it asks for, the new tokens, the
/// check that they fit.
// A refused job goes back with its error, for the caller to answer it: rare,
// so its size does not matter.
#[allow(clippy::result_large_err)]
fn start(
    model: &Model,
    ctx: &mut Context<'_>,
    cfg: &EngineConfig,
    slot: &mut Slot,
    job: Job,
    rendered: String,
) -> Result<(), (Job, ApiError)> {
    let method = job.method.unwrap_or(cfg.method);
    let budget = job.budget.unwrap_or(cfg.budget);
    if method == Method::Pyramidkv {
        return Err((job, pyramid_refused()));
    }
    let compress = method != Method::None;
    if compress && (slot.compressor.is_none() || slot.method != method) {
        let reuse = if method == Method::Chunkkv {
            cfg.reuse
        } else {
            1
        };
        let policy = match method.policy(&cfg.shape, cfg.seed) {
            Ok(p) => p,
            Err(e) => {
                return Err((
                    job,
                    ApiError::bad_request(e.to_string(), Some("chunkkv.kv_method")),
                ))
            }
        };
        match slot.compressor.as_mut() {
            // History compacted under another method stays; the new one takes over.
            Some(c) => c.set_policy(policy, reuse),
            None => match new_compressor(ctx, cfg, policy, reuse, method, slot.seq) {
                Ok(c) => slot.compressor = Some(c),
                Err(e) => return Err((job, ApiError::bad_request(e, Some("chunkkv.kv_method")))),
            },
        }
        slot.method = method;
    }
    let delta = &rendered[slot.cached.len()..];
    let tokens = match model.tokenize(delta, slot.cursor.next_pos == 0, true) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) => {
            return Err((
                job,
                ApiError::bad_request(
                    "the prompt adds nothing to the conversation".into(),
                    Some("messages"),
                ),
            ))
        }
        Err(e) => return Err((job, ApiError::bad_request(e.to_string(), Some("messages")))),
    };
    let capacity = ctx.seq_capacity();
    let used = ctx.seq_used(slot.seq);
    let window = cfg.shape.window.min(tokens.len());
    // What the slot must hold once this prompt is in and compressed, plus the reply.
    let kept = if compress {
        budget
            .cells_for(slot.cursor.prefilled + tokens.len())
            .max(window)
    } else {
        used + tokens.len()
    };
    if kept + job.max_tokens + 1 > capacity {
        let msg = format!(
            "this request needs {} cells ({} for the conversation{}, {} for max_tokens) but a slot holds {capacity}",
            kept + job.max_tokens + 1,
            kept,
            if compress { " compressed to its budget" } else { "" },
            job.max_tokens
        );
        return Err((job, ApiError::context_length(msg)));
    }
    if let Some(text) = &cfg.trace {
        slot.traced = traced_positions(model, &rendered, text);
    }
    let sampler = Sampler::new(&job.sampling);
    slot.last_used = Instant::now();
    let n_prompt = slot.cursor.prefilled + tokens.len();
    let scores = compress && slot.compressor.as_ref().is_some_and(Compressor::has_scores);
    let reconstruct = scores
        && match job.score.unwrap_or(cfg.score) {
            // Only a conversation's opening prompt: a later one's reconstruction
            // would score only itself, against the turns before it still uncompressed.
            ScoreChoice::Auto => {
                slot.cursor.next_pos == 0
                    && tokens.len() >= DOCUMENT_TOKENS
                    && slot
                        .compressor
                        .as_ref()
                        .is_some_and(|c| c.document_scorer() == Scorer::Reconstruct)
            }
            ScoreChoice::Fixed(s) => s == Scorer::Reconstruct,
        };
    slot.work = Some(Work {
        sampler,
        budget: compress.then_some(budget),
        start: slot.cursor.next_pos,
        reconstruct,
        fill: Fill::Fits,
        pending: tokens,
        done: 0,
        window,
        rendered,
        n_prompt,
        generated: 0,
        text: String::new(),
        held: String::new(),
        detok: StreamDecoder::new(),
        decoded: Vec::new(),
        next: None,
        parked: None,
        job,
    });
    Ok(())
}

/// What the engine remembers between steps to share itself fairly.
#[derive(Debug, Default)]
struct Schedule {
    /// Where the next step's prompt chunks start, so no slot waits behind the others.
    tick: usize,
    /// While replies stream, no compression starts before this: a
    /// compression holds every slot up for its whole length, so each one is
    /// followed by as long again of decoding (replies keep at least half the
    /// engine's time, and the slots whose turns wait meanwhile start their
    /// replies together, in one batch).
    quiet_until: Option<Instant>,
    /// How long a reply may stay parked while other turns wait for their
    /// compressions. Decoding 20 replies in one batch costs about what one
    /// costs, so replies that start together use the GPU far better than
    /// replies started one compression apart; the price is time to first
    /// token, bounded by this.
    batch: Duration,
    /// How long the last compression took: the next one likely takes as
    /// long, so parked replies do not wait for one that would end past `batch`.
    last: Duration,
    /// How much decoding pays a compression back.
    share: Share,
    /// Since when a compression has waited for streaming replies
    /// (`Share::Replies`).
    held_since: Option<Instant>,
}

impl Schedule {
    /// Whether a compression may run now, `streaming` telling whether any
    /// slot is generating.
    fn may_compress(&self, streaming: bool) -> bool {
        if !streaming {
            return true;
        }
        match self.share {
            Share::Replies => {
                self.paid_back()
                    && self
                        .held_since
                        .is_some_and(|t| t.elapsed() >= REPLIES_FIRST_WAIT)
            }
            Share::Half | Share::PerReply => self.paid_back(),
        }
    }

    /// The last compression's quiet time is over.
    fn paid_back(&self) -> bool {
        self.quiet_until.is_none_or(|t| Instant::now() >= t)
    }

    /// A compression could run but waits for the streaming replies.
    fn hold(&mut self) {
        self.held_since.get_or_insert_with(Instant::now);
    }

    /// Books a compression that started at `t0` and ends now, with
    /// `streaming` replies generating.
    fn compressed(&mut self, t0: Instant, streaming: usize) {
        let now = Instant::now();
        self.last = now - t0;
        self.held_since = None;
        let times = match self.share {
            Share::Half => 1,
            Share::PerReply | Share::Replies => streaming.max(1) as u32,
        };
        self.quiet_until = Some(now + self.last * times);
    }

    /// Whether parked replies start now: no other turn waits for its
    /// compression (`waiting`), or the first parked one (`since`) would
    /// wait past its time for another compression as long as the last.
    fn unparks(&self, since: Instant, waiting: bool) -> bool {
        !waiting || since.elapsed() + self.last >= self.batch
    }
}

/// Prompt tokens a step may carry next to `replies` reply tokens: what is
/// left of `-b`, or of `stream_batch` while replies stream, but at least one
/// small chunk (within `-b`) so prompts still move when replies fill the cap.
fn prompt_room(n_batch: usize, stream_batch: Option<usize>, replies: usize) -> usize {
    let cap = match stream_batch {
        Some(n) if replies > 0 => n.min(n_batch),
        _ => n_batch,
    };
    let left = n_batch.saturating_sub(replies);
    cap.saturating_sub(replies).max(MIN_CHUNK.min(left))
}

/// One step: decode tokens of the generating slots and chunks of the
/// prefilling slots together (up to the context's `-b` tokens in all,
/// [`PREFILL_CHUNK`] per slot, starting at slot `sched.tick` so none waits
/// behind the others), then compress one slot whose prompt is in or whose
/// cells ran out, unless replies are streaming and the last compression's
/// time has not been paid back to them yet ([`Schedule`]).
fn step(
    ctx: &mut Context<'_>,
    cfg: &EngineConfig,
    slots: &mut [Slot],
    batch: &mut Batch,
    metrics: &Metrics,
    sched: &mut Schedule,
) {
    let tick = sched.tick;
    let parked_since = slots
        .iter()
        .filter_map(|s| Some(s.work.as_ref()?.parked.as_ref()?.0))
        .min();
    if let Some(since) = parked_since {
        let waiting = slots
            .iter()
            .any(|s| s.work.as_ref().is_some_and(Work::turn_near));
        if sched.unparks(since, waiting) {
            tracing::debug!(
                "replies start together after {:.0} ms parked (another turn near: {waiting})",
                since.elapsed().as_secs_f64() * 1e3
            );
            unpark_all(slots);
        }
    }
    batch.clear();
    let mut rows: Vec<(usize, i32)> = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        if let Some(tok) = s.work.as_ref().filter(|_| s.streams()).and_then(|w| w.next) {
            rows.push((i, batch.len() as i32));
            batch.push(tok, s.cursor.next_pos, s.seq, true);
        }
    }
    // Prefilling slots add a chunk of their prompt (all but its window) while
    // the batch has room; a prompt longer than its free cells is compressed
    // after the batch when its chunk would not fit (or, scored by
    // reconstruction, takes a segment): one such compression per step.
    let mut room = prompt_room(ctx.n_batch() as usize, cfg.stream_batch, rows.len());
    let mut chunks: Vec<(usize, usize)> = Vec::new();
    let mut segment = None;
    let mut squeeze = None;
    let n_slots = slots.len();
    for i in (0..n_slots).map(|k| (tick + k) % n_slots.max(1)) {
        let prefilling = slots[i].work.as_ref().is_some_and(|w| {
            w.next.is_none()
                && if w.fill == Fill::Segmented {
                    w.done < w.pending.len()
                } else {
                    w.done + w.window < w.pending.len()
                }
        });
        if !prefilling {
            continue;
        }
        let s = &mut slots[i];
        let free = ctx.seq_capacity().saturating_sub(ctx.seq_used(s.seq));
        let by_window = s
            .compressor
            .as_ref()
            .is_some_and(|c| !c.needs_reconstruction());
        let recalls = s.compressor.as_ref().is_some_and(Compressor::holds_evicted);
        let w = s.work.as_mut().expect("prefilling slot has work");
        let head = w.pending.len() - w.window;
        // Reconstruction decodes its prompts and a chunk (64 tokens at least) on top.
        let extra = match (&s.compressor, w.reconstruct) {
            (Some(c), true) => c.reconstruction_room(64),
            _ => 0,
        };
        let fits = w.pending.len() - w.done + w.job.max_tokens + extra < free;
        if !fits && w.fill == Fill::Fits && w.budget.is_some() {
            w.fill = if w.reconstruct || !by_window {
                Fill::Segmented
            } else {
                Fill::Chunked
            };
        }
        if w.fill == Fill::Segmented {
            segment = segment.or(Some(i));
            continue;
        }
        let mut left = head - w.done;
        if w.fill == Fill::Chunked && recalls {
            if left > w.window {
                // The head's last window is held back for `settles` below.
                left -= w.window;
            } else if settles(w, s.cursor.prefilled, free, ctx.seq_capacity()) {
                squeeze = squeeze.or(Some(i));
                continue;
            }
        }
        let mut n = left.min(PREFILL_CHUNK);
        if w.fill == Fill::Chunked && !fits {
            // Cells stay free for the window that scores the next compression.
            n = n.min(free.saturating_sub(w.window + 1));
        }
        if n == 0 || n < left.min(MIN_CHUNK) {
            squeeze = squeeze.or(Some(i));
            continue;
        }
        // The batch is full for this step: the slot goes on in the next.
        let n = n.min(room);
        if n == 0 || n < left.min(MIN_CHUNK) {
            continue;
        }
        for (k, &t) in w.pending[w.done..w.done + n].iter().enumerate() {
            batch.push(t, s.cursor.next_pos + k as Pos, s.seq, false);
        }
        room -= n;
        chunks.push((i, n));
    }
    let t_batch = Instant::now();
    if !batch.is_empty() {
        if let Err(e) = ctx.decode(batch) {
            let err = ApiError::server(format!("decode failed: {e}"));
            for s in slots.iter_mut().filter(|s| !s.free()) {
                fail(ctx, s, err.clone());
            }
            return;
        }
    }
    for &(i, n) in &chunks {
        let s = &mut slots[i];
        if let Some(w) = s.work.as_mut() {
            w.done += n;
        }
        s.cursor.next_pos += n as Pos;
        s.cursor.prefilled += n;
    }
    for &(i, row) in &rows {
        let s = &mut slots[i];
        s.cursor.next_pos += 1;
        s.cursor.prefilled += 1;
        sample(ctx, s, row, metrics);
    }
    if !batch.is_empty() {
        metrics.engine_time(EngineWork::Batch, t_batch);
    }
    if !rows.is_empty() {
        metrics.reply_steps.fetch_add(1, Ordering::Relaxed);
        metrics
            .reply_rows
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        if !chunks.is_empty() {
            metrics
                .reply_steps_with_prompt
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    // One compression per step. First a slot whose head is in (its client
    // waits for the first token): its window, scored, then compaction. A
    // slot without compression only decodes its window: never held back.
    let streaming = !rows.is_empty();
    let may = sched.may_compress(streaming);
    let t0 = Instant::now();
    let ready = |s: &Slot| {
        s.work
            .as_ref()
            .is_some_and(|w| w.awaits_turn() && (may || w.budget.is_none()))
    };
    // Parked replies wait for short turns only: those go first, and before
    // any other compression the parked replies start.
    let parked = slots
        .iter()
        .any(|s| s.work.as_ref().is_some_and(|w| w.parked.is_some()));
    let near = |s: &Slot| s.work.as_ref().is_some_and(Work::turn_near);
    let pick = parked
        .then(|| slots.iter().position(|s| ready(s) && near(s)))
        .flatten()
        .or_else(|| slots.iter().position(ready));
    if let Some(i) = pick {
        if parked && !near(&slots[i]) {
            tracing::debug!("replies start before a longer compression");
            unpark_all(slots);
            return;
        }
        // A recalling turn first ranks its held rows, one pass per step.
        if rank_ahead(ctx, &mut slots[i], metrics, cfg.compact_after_reply) {
            metrics.engine_time(EngineWork::Turn, t0);
            sched.compressed(t0, streaming_now(slots));
            return;
        }
        let compresses = slots[i].work.as_ref().is_some_and(|w| w.budget.is_some());
        // Another turn waits too (or will within a step): this reply waits
        // for it, to start with it.
        let others = slots
            .iter()
            .enumerate()
            .any(|(j, s)| j != i && s.work.as_ref().is_some_and(Work::turn_near));
        if others && sched.last < sched.batch {
            if let Some(w) = slots[i].work.as_mut() {
                w.parked = Some((Instant::now(), String::new()));
                metrics.batched.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "seq {}: reply parked for the turns near theirs",
                    slots[i].seq
                );
            }
        }
        compress_window(ctx, &mut slots[i], metrics, cfg.compact_after_reply);
        metrics.engine_time(EngineWork::Turn, t0);
        if let Some((since, _)) = slots[i].work.as_mut().and_then(|w| w.parked.as_mut()) {
            *since = Instant::now();
        }
        if compresses {
            sched.compressed(t0, streaming_now(slots));
            trace(&slots[i], "turn");
        }
        return;
    }
    if !may {
        let waits = segment.is_some()
            || squeeze.is_some()
            || slots
                .iter()
                .any(|s| s.work.as_ref().is_some_and(|w| w.awaits_turn()));
        if waits {
            sched.hold();
        }
        return;
    }
    // A prompt that does not fit the free cells: one segment, compressed.
    if let Some(i) = segment {
        prefill_segment(ctx, &mut slots[i], metrics);
        metrics.engine_time(EngineWork::Document, t0);
        sched.compressed(t0, streaming_now(slots));
        trace(&slots[i], "segment");
        return;
    }
    // A chunked prompt that filled its slot: its next tokens score, then compaction.
    if let Some(i) = squeeze {
        squeeze_slot(ctx, &mut slots[i], metrics);
        metrics.engine_time(EngineWork::Document, t0);
        sched.compressed(t0, streaming_now(slots));
        trace(&slots[i], "fill");
    }
}

/// Slots whose replies are generating.
fn streaming_now(slots: &[Slot]) -> usize {
    slots.iter().filter(|s| s.streams()).count()
}

/// Starts every parked reply.
fn unpark_all(slots: &mut [Slot]) {
    for w in slots.iter_mut().filter_map(|s| s.work.as_mut()) {
        w.unpark();
    }
}

/// Tokens after each occurrence of the traced text that are followed too
/// (a fact's value comes after its key).
const TRACE_TAIL: Pos = 12;

/// The positions of every occurrence of `text` in a conversation's
/// rendered messages (by tokenizing what precedes it: exact up to how the
/// tokenizer splits at the boundary), each with [`TRACE_TAIL`] tokens more.
fn traced_positions(model: &Model, rendered: &str, text: &str) -> Vec<std::ops::Range<Pos>> {
    let len = |s: &str| model.tokenize(s, true, true).map_or(0, |t| t.len()) as Pos;
    let span = len(text) + TRACE_TAIL;
    rendered
        .match_indices(text)
        .map(|(at, _)| {
            let start = len(&rendered[..at]);
            start..start + span
        })
        .collect()
}

/// `--kv-trace`: how many of each traced span's positions every layer
/// holds after one of the slot's compressions (`what`).
fn trace(s: &Slot, what: &str) {
    let Some(c) = s.compressor.as_ref() else {
        return;
    };
    let table = c.slot_table();
    for r in &s.traced {
        let kept: Vec<String> = (0..table.n_layers())
            .map(|l| {
                let held = table.positions(l, 0);
                r.clone().filter(|p| held.contains(p)).count().to_string()
            })
            .collect();
        tracing::info!(
            "trace (seq {}, {what}, {} prefilled): positions {}..{} kept per layer [{}]",
            s.seq,
            s.cursor.prefilled,
            r.start,
            r.end,
            kept.join(" ")
        );
    }
}

/// [`stream::settles`] for a chunked prompt whose head is in but for its
/// last window (held back to score that compression).
fn settles(w: &Work, prefilled: usize, free: usize, capacity: usize) -> bool {
    w.budget.is_some_and(|budget| {
        stream::settles(stream::Settle {
            budget,
            capacity,
            free,
            prefilled,
            left: w.pending.len() - w.done,
            window: w.window,
            reserve: w.job.max_tokens + 1,
        })
    })
}

/// The last `window` prompt tokens with importance on, and the compression
/// `chat` does per turn (history kept, the fresh cells candidates).
fn compress_window(
    ctx: &mut Context<'_>,
    s: &mut Slot,
    metrics: &Metrics,
    compact_after_reply: bool,
) {
    let Some(w) = s.work.as_mut() else { return };
    let tail = w.pending[w.done..].to_vec();
    let result = match (w.budget, s.compressor.as_mut()) {
        (Some(budget), Some(c)) => {
            let n_keep = budget
                .cells_for(s.cursor.prefilled + tail.len())
                .max(tail.len())
                .max(1);
            let keep = Keep {
                from: Pos::MAX,
                history: true,
                short: true,
                recall: true,
            };
            let recalled = c.recalled_total();
            if compact_after_reply && !w.reconstruct {
                c.defer_compaction(w.job.max_tokens);
            }
            let done = if w.reconstruct {
                let head = &w.pending[..w.done];
                c.reconstruct_prefilled(ctx, head, w.start, &tail, n_keep, keep, budget.json())
            } else {
                c.prefill_turn(
                    ctx,
                    &tail,
                    s.cursor.next_pos,
                    n_keep,
                    keep,
                    Scorer::Window,
                    budget.json(),
                )
            };
            metrics
                .recalled
                .fetch_add(c.recalled_total() - recalled, Ordering::Relaxed);
            done.map(|done| {
                let ms = &done.report.ms;
                tracing::debug!(
                    "seq {}: turn of {} tokens, {:.1} ms: scoring {:.1} (read-back {:.1}), \
                     select {:.1}, compact {:.1}, cells {} -> {}",
                    s.seq,
                    tail.len(),
                    done.ms,
                    ms.importance,
                    ms.readback,
                    ms.select,
                    ms.compact,
                    done.report.cells_before,
                    done.report.cells_after
                );
                if done.compressed {
                    metrics.compressions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| e.to_string())
        }
        _ => ctx
            .decode_tokens(&tail, s.cursor.next_pos, s.seq, true)
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = result {
        fail(ctx, s, ApiError::server(e));
        return;
    }
    w.done = w.pending.len();
    s.cursor.next_pos += tail.len() as Pos;
    s.cursor.prefilled += tail.len();
    sample(ctx, s, -1, metrics);
}

/// One ranking pass of the held rows a compressed turn may bring back
/// ([`Compressor::rank_step`]); returns whether the step was spent on it
/// (or on failing the slot). A 32k-token document holds thousands of rows
/// and each pass decodes the turn's window: run all at once they would
/// hold every other slot up for the sum.
fn rank_ahead(
    ctx: &mut Context<'_>,
    s: &mut Slot,
    metrics: &Metrics,
    compact_after_reply: bool,
) -> bool {
    let Some(w) = s.work.as_ref() else {
        return false;
    };
    let Some(c) = s
        .compressor
        .as_mut()
        .filter(|_| w.budget.is_some() && !w.reconstruct)
    else {
        return false;
    };
    if compact_after_reply {
        // The same room for the reply as the turn will leave.
        c.defer_compaction(w.job.max_tokens);
    }
    match c.rank_step(ctx, &w.pending[w.done..]) {
        Ok(ran) => {
            metrics.rank_passes.fetch_add(ran as u64, Ordering::Relaxed);
            ran
        }
        Err(e) => {
            fail(ctx, s, ApiError::server(e.to_string()));
            true
        }
    }
}

/// A chunked prompt's slot is full: its next `w` tokens are decoded with
/// importance and the slot is compressed to the budget of everything
/// prefilled (query-agnostic: the rest of the prompt, and its question, are
/// still to come), leaving room for the rest where the budget allows.
fn squeeze_slot(ctx: &mut Context<'_>, s: &mut Slot, metrics: &Metrics) {
    let Some(w) = s.work.as_mut() else { return };
    let (Some(budget), Some(c)) = (w.budget, s.compressor.as_mut()) else {
        return;
    };
    let n_ctx = ctx.seq_capacity();
    let head = w.pending.len() - w.window;
    let k = c.window().min(head - w.done).max(1);
    let tail = w.pending[w.done..w.done + k].to_vec();
    let rest = w.pending.len() - w.done - k;
    let (n_keep, keep) = stream::segment_keep(stream::SegmentAt {
        n_ctx,
        budget,
        window: c.window(),
        seg: k,
        total: s.cursor.prefilled + k,
        room: (rest + w.job.max_tokens + 1).min(n_ctx / 2),
        text_start: w.start,
        text_in_cache: (s.cursor.next_pos - w.start) as usize + k,
        recall: false,
    });
    let done = c.prefill_turn(
        ctx,
        &tail,
        s.cursor.next_pos,
        n_keep,
        keep,
        Scorer::Window,
        budget.json(),
    );
    match done {
        Ok(done) if done.compressed => {
            s.cursor.compressions += 1;
            metrics.compressions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {}
        Err(e) => {
            fail(ctx, s, ApiError::server(e.to_string()));
            return;
        }
    }
    w.done += k;
    s.cursor.next_pos += k as Pos;
    s.cursor.prefilled += k;
    let free = n_ctx.saturating_sub(ctx.seq_used(s.seq));
    if free <= w.window + 1 {
        let msg = format!(
            "the prompt does not fit its slot even compressed: {free} of {n_ctx} cells are free"
        );
        fail(ctx, s, ApiError::context_length(msg));
    }
}

/// One segment of a prompt longer than the slot's free cells, through
/// `compress::stream` (prefilled, scored, compacted before the next): about
/// half the free cells per step, so the other slots decode in between.
fn prefill_segment(ctx: &mut Context<'_>, s: &mut Slot, metrics: &Metrics) {
    let Some(w) = s.work.as_mut() else { return };
    let free = ctx.seq_capacity().saturating_sub(ctx.seq_used(s.seq));
    let rest = w.pending.len() - w.done;
    let per_step = (free / 2).max(PREFILL_CHUNK);
    // The last segment takes the prompt's end whole: its window is the question.
    let n = if rest <= per_step + w.window {
        rest
    } else {
        per_step
    };
    let part = w.pending[w.done..w.done + n].to_vec();
    let fed = match (w.budget, s.compressor.as_mut()) {
        (Some(budget), Some(c)) => {
            let before = s.cursor.compressions;
            let scorer = if w.reconstruct {
                Scorer::Reconstruct
            } else {
                Scorer::Window
            };
            let r = stream::feed(
                ctx,
                c,
                &part,
                &mut s.cursor,
                budget,
                w.job.max_tokens + 1,
                scorer,
                w.done + n == w.pending.len(),
                &mut |_| {},
            );
            let added = s.cursor.compressions - before;
            metrics
                .compressions
                .fetch_add(added as u64, Ordering::Relaxed);
            r
        }
        _ => {
            fail(
                ctx,
                s,
                ApiError::context_length("the prompt does not fit the slot".into()),
            );
            return;
        }
    };
    match fed {
        Ok(()) => {}
        Err(e @ stream::StreamError::Full { .. }) => {
            fail(ctx, s, ApiError::context_length(e.to_string()));
            return;
        }
        Err(e) => {
            fail(ctx, s, ApiError::server(e.to_string()));
            return;
        }
    }
    w.done += n;
    if w.done == w.pending.len() {
        sample(ctx, s, -1, metrics);
    }
}

/// Samples the slot's next token from output row `row` and streams its text.
fn sample(ctx: &mut Context<'_>, s: &mut Slot, row: i32, metrics: &Metrics) {
    let model = ctx.model();
    let Some(w) = s.work.as_mut() else { return };
    // The token decoded in this step is in the cache now.
    if let Some(prev) = w.next.take() {
        w.decoded.push(prev);
    }
    let tok = w.sampler.sample(ctx, row);
    if model.is_eog(tok) {
        end(ctx, s, FinishReason::Stop, true);
        return;
    }
    w.generated += 1;
    metrics.tokens.fetch_add(1, Ordering::Relaxed);
    let piece = w.detok.push(model, tok);
    w.held.push_str(&piece);
    // Stop strings: cut there; keep back a tail that could still start one.
    if let Some(at) = w
        .job
        .stop
        .iter()
        .filter_map(|st| w.held.find(st.as_str()))
        .min()
    {
        let out = w.held[..at].to_string();
        w.held.clear();
        if !out.is_empty() {
            w.text.push_str(&out);
            w.emit(out);
        }
        end(ctx, s, FinishReason::Stop, false);
        return;
    }
    let keep = w
        .job
        .stop
        .iter()
        .map(|st| longest_prefix_suffix(&w.held, st))
        .max()
        .unwrap_or(0);
    let cut = floor_char_boundary(&w.held, w.held.len() - keep);
    if cut > 0 {
        let out: String = w.held.drain(..cut).collect();
        w.text.push_str(&out);
        if !w.emit(out) {
            // The client went away: stop here; what is in the cache stays.
            end(ctx, s, FinishReason::Stop, false);
            return;
        }
    }
    if w.generated >= w.job.max_tokens {
        end(ctx, s, FinishReason::Length, true);
        return;
    }
    w.next = Some(tok);
}

/// Ends the slot's request: the rest of its text (`flush`), then `Done`
/// with the usage. The slot keeps the conversation as its cache holds it.
fn end(ctx: &Context<'_>, s: &mut Slot, reason: FinishReason, flush: bool) {
    let Some(mut w) = s.work.take() else { return };
    s.cached = w.rendered.clone() + &ctx.model().detokenize(&w.decoded, false);
    if let Some(c) = s.compressor.as_mut() {
        c.replied(&w.decoded);
    }
    s.last_used = Instant::now();
    w.unpark();
    let rest = std::mem::take(&mut w.held) + &w.detok.finish();
    if flush && !rest.is_empty() {
        w.text.push_str(&rest);
        let _ = w.job.events.send(Event::Text(rest));
    }
    let usage = Usage {
        prompt_tokens: w.n_prompt,
        completion_tokens: w.generated,
        total_tokens: w.n_prompt + w.generated,
    };
    // Released before the client hears of it, so its next turn finds room.
    w.job.admitted.fetch_sub(1, Ordering::AcqRel);
    let _ = w.job.events.send(Event::Done {
        finish: reason,
        usage,
    });
}

/// Ends the slot's request with an error; a prompt only partly in the cache
/// is dropped with the whole slot.
fn fail(ctx: &mut Context<'_>, s: &mut Slot, err: ApiError) {
    let Some(w) = s.work.take() else { return };
    w.job.admitted.fetch_sub(1, Ordering::AcqRel);
    let _ = w.job.events.send(Event::Error(err));
    ctx.seq_rm(s.seq, -1, -1);
    s.cached.clear();
    s.cursor = Cursor::default();
    if let Some(c) = s.compressor.as_mut() {
        c.reset();
    }
}

/// The longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compression of 200 ms keeps the next one off for as long while
    /// replies stream, and never holds one back when nothing streams.
    #[test]
    fn a_compression_is_paid_back_to_streaming_replies_first() {
        let mut sched = Schedule {
            share: Share::Half,
            ..Schedule::default()
        };
        assert!(sched.may_compress(true) && sched.may_compress(false));
        sched.compressed(Instant::now() - Duration::from_millis(200), 5);
        assert!(!sched.may_compress(true), "replies get the next 200 ms");
        let quiet = sched.quiet_until.unwrap() - Instant::now();
        assert!(
            quiet < Duration::from_millis(300),
            "{quiet:?}: once, however many stream"
        );
        assert!(
            sched.may_compress(false),
            "nothing streams: no reason to wait"
        );
        sched.quiet_until = Some(Instant::now() - Duration::from_millis(1));
        assert!(sched.may_compress(true), "paid back");
    }

    /// `--stream-batch` bounds a step only while replies stream, never past
    /// `-b`, and always leaves prompts a small chunk.
    #[test]
    fn stream_batch_caps_prompt_tokens_only_while_replies_stream() {
        assert_eq!(prompt_room(2048, None, 5), 2043);
        assert_eq!(prompt_room(2048, Some(512), 0), 2048);
        assert_eq!(prompt_room(2048, Some(512), 20), 492);
        assert_eq!(prompt_room(2048, Some(4096), 20), 2028);
        assert_eq!(prompt_room(2048, Some(16), 20), MIN_CHUNK);
        assert_eq!(prompt_room(80, Some(16), 40), 40);
    }

    /// Per reply, a compression is paid back once for each streaming reply
    /// (at least once), so five streaming replies get five times as long.
    #[test]
    fn per_reply_sharing_pays_back_each_streaming_reply() {
        let mut sched = Schedule {
            share: Share::PerReply,
            ..Schedule::default()
        };
        sched.compressed(Instant::now() - Duration::from_millis(100), 5);
        let quiet = sched.quiet_until.unwrap() - Instant::now();
        assert!(
            quiet > Duration::from_millis(400) && quiet < Duration::from_millis(600),
            "{quiet:?}"
        );
        assert!(!sched.may_compress(true) && sched.may_compress(false));
        sched.compressed(Instant::now() - Duration::from_millis(100), 0);
        let quiet = sched.quiet_until.unwrap() - Instant::now();
        assert!(
            quiet < Duration::from_millis(150),
            "{quiet:?}: at least once"
        );
    }

    /// Replies first: while replies stream a compression waits until it
    /// has waited `REPLIES_FIRST_WAIT` and the last one is paid back per
    /// reply; the clock starts when it is first held and stops when one runs.
    #[test]
    fn replies_first_holds_compressions_while_replies_stream() {
        let mut sched = Schedule {
            share: Share::Replies,
            ..Schedule::default()
        };
        assert!(!sched.may_compress(true), "a reply streams: wait");
        assert!(sched.may_compress(false), "none streams: no reason to wait");
        sched.hold();
        let first = sched.held_since.unwrap();
        sched.hold();
        assert_eq!(
            sched.held_since,
            Some(first),
            "the wait counts from the first hold"
        );
        assert!(!sched.may_compress(true));
        sched.held_since = Some(Instant::now() - REPLIES_FIRST_WAIT);
        assert!(sched.may_compress(true), "waited long enough: runs anyway");
        sched.compressed(Instant::now() - Duration::from_millis(10), 3);
        assert!(sched.held_since.is_none());
        assert!(!sched.may_compress(true), "the next one waits again");
        // A compression longer than the wait is paid back per reply first.
        sched.compressed(Instant::now() - Duration::from_millis(400), 2);
        sched.held_since = Some(Instant::now() - REPLIES_FIRST_WAIT);
        assert!(!sched.may_compress(true), "800 ms of payback are not over");
    }

    /// Parked replies start once no other turn is near its compression, or
    /// once another compression would keep the first past `--batch-replies`.
    #[test]
    fn parked_replies_start_when_no_turn_waits_or_their_time_is_up() {
        let sched = Schedule {
            batch: Duration::from_millis(500),
            ..Schedule::default()
        };
        let now = Instant::now();
        assert!(!sched.unparks(now, true), "another turn is coming");
        assert!(sched.unparks(now, false), "none is: no reason to wait");
        assert!(
            sched.unparks(now - Duration::from_millis(600), true),
            "waited its 500 ms"
        );
        let slow = Schedule {
            last: Duration::from_millis(300),
            ..sched
        };
        assert!(!slow.unparks(now - Duration::from_millis(100), true));
        assert!(
            slow.unparks(now - Duration::from_millis(250), true),
            "another 300 ms compression would end past 500 ms"
        );
    }

    #[test]
    fn a_stop_string_in_the_making_is_held_back() {
        assert_eq!(longest_prefix_suffix("Hello wor", "world"), 3);
        assert_eq!(longest_prefix_suffix("Hello", "world"), 0);
        assert_eq!(longest_prefix_suffix("end <", "</s>"), 1);
        assert_eq!(
            longest_prefix_suffix("ab", "ab"),
            0,
            "a whole stop string is found, not held"
        );
    }
}
