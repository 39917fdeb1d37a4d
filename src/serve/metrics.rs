//! Counters `GET /metrics` reports in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// What the engine thread spends its time on: every step's batched decode,
/// then at most one compression. Compressions hold every slot up, so their
/// share of the engine's time is what streaming replies wait for.
#[derive(Debug, Clone, Copy)]
pub enum EngineWork {
    /// The batched decode of every streaming slot's next token and the
    /// prefill chunks beside it, with the sampling after it.
    Batch,
    /// A turn's scored window and its compression (with recall, its ranking).
    Turn,
    /// A long prompt's compression as it fills its slot.
    Document,
    /// A compaction held back for its reply (`--kv-compact-after-reply`).
    Settle,
}

impl EngineWork {
    const ALL: [EngineWork; 4] = [
        EngineWork::Batch,
        EngineWork::Turn,
        EngineWork::Document,
        EngineWork::Settle,
    ];

    fn label(self) -> &'static str {
        match self {
            EngineWork::Batch => "batch",
            EngineWork::Turn => "turn",
            EngineWork::Document => "document",
            EngineWork::Settle => "settle",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub tokens: AtomicU64,
    pub compressions: AtomicU64,
    pub rejected: AtomicU64,
    /// Per slot: (cells used, bytes live) of its KV stream.
    slots: Mutex<Vec<(u32, u64)>>,
    /// Per slot: bytes of evicted rows held for recall.
    recall: Mutex<Vec<u64>>,
    /// Tokens (per layer) that recall brought back into a slot's cache.
    pub recalled: AtomicU64,
    /// Replies that waited for other turns, to start with them (`--batch-replies`).
    pub batched: AtomicU64,
    /// Ranking passes a turn ran ahead, one engine step each.
    pub rank_passes: AtomicU64,
    /// Engine steps that decoded reply tokens, those tokens, and the steps
    /// among them that also carried prompt chunks: how many replies stream
    /// together, and how often they share a step with prefill.
    pub reply_steps: AtomicU64,
    pub reply_rows: AtomicU64,
    pub reply_steps_with_prompt: AtomicU64,
    /// Nanoseconds of engine time per [`EngineWork`].
    engine_ns: [AtomicU64; 4],
}

impl Metrics {
    pub fn new(n_slots: usize) -> Metrics {
        Metrics {
            slots: Mutex::new(vec![(0, 0); n_slots]),
            recall: Mutex::new(vec![0; n_slots]),
            ..Metrics::default()
        }
    }

    pub fn set_slot(&self, slot: usize, cells: u32, bytes: u64) {
        if let Ok(mut s) = self.slots.lock() {
            if let Some(e) = s.get_mut(slot) {
                *e = (cells, bytes);
            }
        }
    }

    pub fn set_recall_held(&self, slot: usize, bytes: u64) {
        if let Ok(mut s) = self.recall.lock() {
            if let Some(e) = s.get_mut(slot) {
                *e = bytes;
            }
        }
    }

    /// Adds the time since `since` to what the engine spent on `work`.
    pub fn engine_time(&self, work: EngineWork, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.engine_ns[work as usize].fetch_add(ns, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, waiting: usize) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "chunkkv_requests_total",
            "Requests started on a slot.",
            self.requests.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_tokens_generated_total",
            "Tokens generated.",
            self.tokens.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_compressions_total",
            "KV compressions that evicted cells.",
            self.compressions.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_recalled_tokens_total",
            "Evicted tokens (per layer) that recall brought back into a slot's cache.",
            self.recalled.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_rank_passes_total",
            "Passes ranking a turn's held rows, each in an engine step of its own between other slots' work.",
            self.rank_passes.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_replies_batched_total",
            "Replies that waited for other turns' compressions, to decode with them in one batch.",
            self.batched.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_reply_steps_total",
            "Engine steps that decoded reply tokens.",
            self.reply_steps.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_reply_tokens_decoded_total",
            "Reply tokens those steps decoded (over the steps: replies streaming together).",
            self.reply_rows.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_reply_steps_with_prompt_total",
            "Steps that decoded reply tokens beside prompt chunks (their streamed tokens waited for prefill).",
            self.reply_steps_with_prompt.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_requests_rejected_total",
            "Requests refused because the queue was full.",
            self.rejected.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP chunkkv_engine_seconds_total Engine thread time by work: batch (every slot's next token and prefill chunks), turn (a turn's scoring and compression), document (a long prompt's compressions), settle (compactions held back for replies).\n# TYPE chunkkv_engine_seconds_total counter"
        );
        for work in EngineWork::ALL {
            let s = self.engine_ns[work as usize].load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "chunkkv_engine_seconds_total{{work=\"{}\"}} {s:.6}",
                work.label()
            );
        }
        let _ = writeln!(
            out,
            "# HELP chunkkv_requests_waiting Requests admitted and not finished.\n# TYPE chunkkv_requests_waiting gauge\nchunkkv_requests_waiting {waiting}"
        );
        let slots = self.slots.lock().map(|s| s.clone()).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP chunkkv_kv_cells_used KV cells a slot holds.\n# TYPE chunkkv_kv_cells_used gauge"
        );
        for (i, (cells, _)) in slots.iter().enumerate() {
            let _ = writeln!(out, "chunkkv_kv_cells_used{{slot=\"{i}\"}} {cells}");
        }
        let _ = writeln!(
            out,
            "# HELP chunkkv_kv_bytes_live Bytes of K/V rows a slot holds.\n# TYPE chunkkv_kv_bytes_live gauge"
        );
        for (i, (_, bytes)) in slots.iter().enumerate() {
            let _ = writeln!(out, "chunkkv_kv_bytes_live{{slot=\"{i}\"}} {bytes}");
        }
        let recall = self.recall.lock().map(|s| s.clone()).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP chunkkv_recall_bytes_held Bytes of evicted K/V rows a slot keeps for recall.\n# TYPE chunkkv_recall_bytes_held gauge"
        );
        for (i, bytes) in recall.iter().enumerate() {
            let _ = writeln!(out, "chunkkv_recall_bytes_held{{slot=\"{i}\"}} {bytes}");
        }
        out
    }
}
