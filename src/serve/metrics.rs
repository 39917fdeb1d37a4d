//! Counters `GET /metrics` reports in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
            "chunkkv_replies_batched_total",
            "Replies that waited for other turns' compressions, to decode with them in one batch.",
            self.batched.load(Ordering::Relaxed),
        );
        counter(
            "chunkkv_requests_rejected_total",
            "Requests refused because the queue was full.",
            self.rejected.load(Ordering::Relaxed),
        );
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
