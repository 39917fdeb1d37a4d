//! The hook after prefill: score the cache, select, compact on the device.
//!
//! Prefill all but the last `w` prompt tokens, decode those `w` with
//! importance on for the leader layers, let the policy pick what to keep,
//! then move the kept K/V rows to the bottom of the cache so the attention
//! width and the live bytes really shrink. It can run again on a cache it
//! already compressed (a later chat turn).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::policy::{HeadCandidates, LayerCandidates, Policy};
use super::recall::{Evicted, RankMs, RecallError, RecallStore, RecallTurn, StoreMark};
use super::reconstruct::Reconstruction;
use super::reuse::ReuseGroups;
use super::sentences::SentenceEnds;
use super::slots::SlotTable;
use super::Chunking;
use super::Scorer;
use crate::llama::{
    CompactError, Context, DeadSlots, DecodeError, ImportanceAllocError, KvPart, LayerImportance,
    Pos, Sampler, SamplingParams, ScoreReduce, ScoreRows, SeqId, Token,
};

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("{0}")]
    Unsupported(String),
    #[error("invalid compression settings: {0}")]
    Config(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("KV compaction failed: {0}")]
    Compact(#[from] CompactError),
    #[error("llama.cpp computed no attention importance for layer {0}")]
    NoImportance(u32),
    #[error(transparent)]
    ImportanceMemory(#[from] ImportanceAllocError),
    #[error(transparent)]
    Recall(#[from] RecallError),
}

/// Milliseconds spent in each stage of one compression.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StageMs {
    /// The scored decode of the window (its normal compute included) and the
    /// read-back; or the whole reconstruction.
    pub importance: f64,
    /// Of `importance`: copying the leaders' scores out of llama.cpp (shown by
    /// `bench`; not in the JSON, whose keys are a stable interface).
    #[serde(skip)]
    pub readback: f64,
    pub select: f64,
    pub compact: f64,
}

/// What one prefill-and-compress did. The JSON keys are a stable interface.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompressionReport {
    pub method: String,
    pub budget: serde_json::Value,
    pub n_prompt: usize,
    pub n_keep: usize,
    pub cells_before: u32,
    pub cells_after: u32,
    pub bytes_live_before: u64,
    pub bytes_live_after: u64,
    pub attn_width_before: u32,
    pub attn_width_after: u32,
    pub ms: StageMs,
}

/// What a compression keeps whole besides its budget's pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Every fresh token from this position on (the window always).
    pub from: Pos,
    /// Every slot of earlier compactions: only newer tokens are candidates.
    pub history: bool,
    /// Compress even when the new tokens are no more than the window, as
    /// long as the cells not yet compacted (an earlier reply, say) are more.
    pub short: bool,
    /// A turn's end (its question), with recall on: evicted chunks come back
    /// to be ranked with everything else. Not for a document's segments.
    pub recall: bool,
}

/// Position recorded for a dead slot (a layer's surplus slot, masked out).
pub(crate) const DEAD: Pos = -1;

/// The kept cells of one compaction, per storage layer and KV head, in slot order.
struct Selection {
    /// `src[layer][head][slot]`: the cell moved into the slot.
    src: Vec<Vec<Vec<i32>>>,
    /// The position each slot then holds ([`DEAD`] past the layer's live count).
    kept_pos: Vec<Vec<Vec<Pos>>>,
    /// Live slots of each storage layer.
    live: Vec<usize>,
}

/// A pinned cell's score: above anything attention gives.
const PINNED: f32 = 1.0e6;

/// A sink's score ([`Policy::sinks`]): above pinned draft positions.
const SINK: f32 = 2.0 * PINNED;

/// Scores, selects and compacts one sequence's attention cache.
pub struct Compressor {
    policy: Box<dyn Policy>,
    window: usize,
    groups: ReuseGroups,
    /// Model-layer index of each compressed storage layer.
    layers: Vec<u32>,
    /// KV heads of each compressed storage layer.
    heads: Vec<usize>,
    slots: SlotTable,
    /// Prompts for query-agnostic scoring, when configured.
    reconstruction: Option<Reconstruction>,
    /// The policy for text scored by reconstruction, when it differs (chat
    /// documents chunk by sentences and rank by mean score).
    document_policy: Option<Box<dyn Policy>>,
    /// Sentence ends of the positions prefilled through this compressor.
    sentences: SentenceEnds,
    /// The sequence whose cache this compressor manages.
    seq: SeqId,
    /// Evicted rows kept off the device (`--kv-recall`).
    recall: Option<RecallStore>,
    /// The recall of the turn in progress (rows uploaded for its scoring).
    recalling: Option<Recalling>,
    /// Room for the reply of the next turn (recall on), whose compaction then
    /// waits until the reply is in (`defer_compaction`).
    reply_room: Option<usize>,
    /// A compaction waiting for `settle`.
    deferred: Option<Deferred>,
    /// What recall did in the last turn that used it.
    last_recall: Option<RecallTurn>,
    /// Why recall stopped (a broken recall file): reported once, the
    /// conversation goes on without it.
    recall_warning: Option<String>,
    /// Bytes uploaded by the ranking passes of the turn in progress.
    rank_bytes: u64,
    /// Where the ranking passes of the turn in progress spent their time.
    rank_ms: RankMs,
    /// The next turn's ranking, when it runs ahead pass by pass.
    ranking: Option<Ranking>,
    /// Tokens (per layer, summed over turns) recall brought back.
    recalled_total: u64,
    /// Most cells one turn writes back at once (`--kv-recall-cells`).
    recall_cells: usize,
    /// Reply tokens a recalling turn drafts to score its cache (`--kv-recall-probe`).
    recall_probe: usize,
    /// Draft-attended positions kept in every layer (`with_recall_pin`).
    recall_pin: usize,
    /// Recalling turns rank and keep by position across layer groups (`with_recall_unify`).
    recall_unify: bool,
}

/// Rows uploaded for one turn's scoring, until its compaction.
#[derive(Debug)]
struct Recalling {
    /// Positions written back, per storage layer (every head holds the same).
    positions: Vec<Vec<Pos>>,
    stats: RecallTurn,
}

/// The held rows of a turn about to recall, ranked ahead of it one pass at
/// a time ([`Compressor::rank_step`]): a server runs the other slots' steps
/// between passes, so ranking thousands of rows never holds them up for
/// longer than one pass.
#[derive(Debug)]
struct Ranking {
    /// The turn it ranks for: its scoring window, its token count, where
    /// the cache ended, and how many rows the store held then.
    window: Vec<Token>,
    incoming: usize,
    end: usize,
    held: usize,
    /// Held rows not on the device, per storage layer, sorted by position;
    /// the first `next` of each carry the window's scores.
    avail: Vec<Vec<(Pos, f32)>>,
    next: usize,
    /// Rows every layer holds (the shortest layer's count): the ranked ones.
    total: usize,
    /// Every row has its score (or none could be ranked).
    finished: bool,
    /// Milliseconds spent so far.
    ms: f64,
}

impl Ranking {
    fn new(
        window: &[Token],
        incoming: usize,
        end: usize,
        held: usize,
        mut avail: Vec<Vec<(Pos, f32)>>,
    ) -> Self {
        for a in avail.iter_mut() {
            a.sort_unstable_by_key(|&(p, _)| p);
        }
        let total = avail.iter().map(Vec::len).min().unwrap_or(0);
        Ranking {
            window: window.to_vec(),
            incoming,
            end,
            held,
            avail,
            next: 0,
            total,
            finished: false,
            ms: 0.0,
        }
    }

    fn is_for(&self, window: &[Token], incoming: usize, end: usize, held: usize) -> bool {
        self.window == window && self.incoming == incoming && self.end == end && self.held == held
    }
}

/// What a recalling turn could bring back ([`Compressor::held_rows`]).
struct Held {
    /// Each cell's position in the sequence's stream now.
    meta: Vec<Option<Pos>>,
    /// Cells up to the last one in use.
    end: usize,
    /// Held rows not on the device, per storage layer, with their scores.
    avail: Vec<Vec<(Pos, f32)>>,
    /// How many the free cells take.
    n: usize,
    /// Rows the store holds (of storage layer 0, KV head 0).
    count: usize,
}

/// A recalling turn's compaction, held back until its reply is in
/// ([`Compressor::defer_compaction`]): the turn's scores and what to keep.
struct Deferred {
    importance: Vec<LayerImportance>,
    keep: Keep,
    /// Cells to keep, the reply's not counted.
    n_keep: usize,
    /// The turn's last position: the reply's tokens come after it.
    last: Pos,
    recalling: Option<Recalling>,
    /// Set when the reply, not a draft, is to score the cache: `importance`
    /// is then the window's alone.
    reply_scores: Option<ReplyScores>,
}

/// The reply that scores a held-back compaction in place of a draft: it is
/// what the model said over everything the turn brought back, so it
/// attends to what the conversation relies on, and its tokens are known, so
/// one batched decode scores them where a draft takes one decode per token.
#[derive(Debug)]
struct ReplyScores {
    /// Where the turn's window starts: pins come from before it.
    window_start: Pos,
    /// The reply's tokens in the cache after the turn ([`Compressor::replied`]).
    reply: Vec<Token>,
}

/// A compressor's state to come back to: its slot table and recall store
/// (eval asks every question from the same compressed cache).
#[derive(Debug, Clone)]
pub struct CompressorMark {
    slots: SlotTable,
    store: Option<StoreMark>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("policy", &self.policy.name())
            .field("window", &self.window)
            .finish()
    }
}

/// Outcome of [`Compressor::prefill`].
#[derive(Debug, Clone)]
pub struct Prefilled {
    /// Wall time of the whole prefill, compression included.
    pub ms: f64,
    pub report: CompressionReport,
    /// False when the prompt fit the budget (or the window) and nothing was evicted.
    pub compressed: bool,
}

impl Compressor {
    /// A compressor for `ctx`'s full-attention cache (the sliding-window cache
    /// of iSWA models is left alone). `reuse` layers share one kept set.
    pub fn new(
        ctx: &Context<'_>,
        policy: Box<dyn Policy>,
        window: usize,
        reuse: usize,
    ) -> Result<Self, CompressError> {
        let model = ctx.model();
        let info = model.info();
        if info.is_recurrent {
            return Err(CompressError::Unsupported(format!(
                "{} is a recurrent model: it has no attention KV cache to compress",
                info.architecture
            )));
        }
        if model
            .meta(&format!("{}.attention.kv_lora_rank", info.architecture))
            .is_some()
        {
            return Err(CompressError::Unsupported(format!(
                "{} uses multi-head latent attention (MLA), whose cache chunkkv cannot compress",
                info.architecture
            )));
        }
        if model.split_mode() == crate::llama::SplitMode::Tensor {
            return Err(CompressError::Unsupported(
                "-sm tensor splits the KV cache itself across devices, which chunkkv cannot \
                 compact: use -sm layer"
                    .into(),
            ));
        }
        let layers = ctx.kv_layers(KvPart::Base);
        if layers.is_empty() {
            return Err(CompressError::Unsupported(format!(
                "{}: this model's KV cache kind is not supported (no plain attention cache)",
                info.architecture
            )));
        }
        // Layers that read another layer's K/V (Gemma 3n) get no dead-slot mask of their own.
        let stored = layers.len() + ctx.kv_layers(KvPart::Swa).len();
        if !policy.uniform_counts() && stored < model.n_layer() as usize {
            return Err(CompressError::Unsupported(format!(
                "{}: {} of {} layers reuse another layer's KV cache, which {} cannot mask per layer",
                info.architecture,
                model.n_layer() as usize - stored,
                model.n_layer(),
                policy.name()
            )));
        }
        // ALiBi biases attention by the distance between cell positions, one
        // per slot: every layer and head must keep the same tokens there.
        let alibi = model
            .meta(&format!("{}.attention.max_alibi_bias", info.architecture))
            .and_then(|v| v.parse::<f32>().ok())
            .is_some_and(|b| b > 0.0);
        let mut reuse = reuse;
        if alibi {
            if policy.per_head() {
                return Err(CompressError::Unsupported(format!(
                    "{} uses ALiBi position biases: {} keeps different tokens per KV head, which \
                     would bias attention by the wrong distances; use chunkkv, streaming or random",
                    info.architecture,
                    policy.name()
                )));
            }
            if reuse < layers.len() {
                tracing::warn!(
                    "{} uses ALiBi: one kept set for all layers (--reuse-layers {})",
                    info.architecture,
                    layers.len()
                );
                reuse = layers.len();
            }
        }
        let heads = layers
            .iter()
            .map(|&il| model.layer_n_head_kv(il) as usize)
            .collect();
        Self::for_layers(policy, window, reuse, layers, heads)
    }

    /// A compressor for a cache of the given shape without a model: the
    /// model-layer index and KV heads of each storage layer. Only the host side
    /// ([`Compressor::plan`]) can run on it; benchmarks use it.
    pub fn for_layers(
        policy: Box<dyn Policy>,
        window: usize,
        reuse: usize,
        layers: Vec<u32>,
        heads: Vec<usize>,
    ) -> Result<Self, CompressError> {
        if window == 0 {
            return Err(CompressError::Config(
                "the observation window must be at least 1 token".into(),
            ));
        }
        if reuse == 0 {
            return Err(CompressError::Config(
                "--reuse-layers must be at least 1".into(),
            ));
        }
        if layers.len() != heads.len() || layers.is_empty() {
            return Err(CompressError::Config(
                "one KV-head count per storage layer".into(),
            ));
        }
        Ok(Compressor {
            groups: ReuseGroups::new(layers.len(), reuse),
            policy,
            window,
            layers,
            heads,
            slots: SlotTable::default(),
            reconstruction: None,
            document_policy: None,
            sentences: SentenceEnds::default(),
            seq: crate::pipeline::SEQ,
            recall: None,
            recalling: None,
            reply_room: None,
            deferred: None,
            last_recall: None,
            recall_warning: None,
            rank_bytes: 0,
            rank_ms: RankMs::default(),
            ranking: None,
            recalled_total: 0,
            recall_cells: usize::MAX,
            recall_probe: 0,
            recall_pin: 0,
            recall_unify: false,
        })
    }

    /// Keeps evicted rows in `store` so later turns can bring them back
    /// ([`Compressor::prefill_turn`], [`Compressor::recall_window`]). Only
    /// policies that keep one set per layer with the same count everywhere
    /// (ChunkKV) can recall.
    pub fn with_recall(mut self, store: RecallStore) -> Result<Self, CompressError> {
        if !self.can_recall() {
            return Err(CompressError::Unsupported(format!(
                "--kv-recall needs a policy that keeps whole chunks for all heads of a layer \
                 (chunkkv), not {}",
                self.policy.name()
            )));
        }
        self.recall = Some(store);
        Ok(self)
    }

    /// Caps the cells a turn writes back at once (the transient device
    /// memory of recall); more held rows are then ranked in batches.
    pub fn with_recall_cells(mut self, cells: usize) -> Self {
        self.recall_cells = cells.max(1);
        self
    }

    /// A recalling turn first drafts up to `n` reply tokens greedily over the
    /// whole history, scoring with them, and drops them before compaction:
    /// the reply is then decoded on the compacted cache. A question attends
    /// to a fact's key; the answer, copying the value, attends to the value.
    pub fn with_recall_probe(mut self, n: usize) -> Self {
        self.recall_probe = n;
        self
    }

    /// With a draft, the `n` positions the draft attends to most (in any
    /// scored layer and head) are kept, with their chunks, in every layer:
    /// the layers that carry a copied value otherwise keep only some of its
    /// tokens, and the reply comes back half copied.
    pub fn with_recall_pin(mut self, n: usize) -> Self {
        self.recall_pin = n;
        self
    }

    /// Recalling turns score each position by the most any layer group
    /// gave it, both when choosing the held rows to write back and when
    /// compacting, so every group brings back and keeps the same chunks: a
    /// fact that only some groups keep is half there for the model.
    pub fn with_recall_unify(mut self, on: bool) -> Self {
        self.recall_unify = on;
        self
    }

    /// Whether recall holds evicted rows that a turn could bring back.
    pub fn holds_evicted(&self) -> bool {
        self.recall.as_ref().is_some_and(|r| r.bytes() > 0)
    }

    fn can_recall(&self) -> bool {
        self.policy.uniform_counts()
            && !self.policy.per_head()
            && self.policy.score_rows().is_some()
    }

    /// What scores a document compressed before its questions: its
    /// reconstruction, unless recall is on (each question then re-ranks the
    /// evicted chunks, which served questions as well at a fraction of
    /// reconstruction's cost: docs/results/eval-recall.md).
    pub fn document_scorer(&self) -> Scorer {
        if self.recall_on() {
            Scorer::Window
        } else {
            Scorer::Reconstruct
        }
    }

    /// Whether recall is on (and the current policy can use it).
    pub fn recall_on(&self) -> bool {
        self.recall.is_some() && self.can_recall()
    }

    /// The store of evicted rows, when recall is on.
    pub fn recall_store(&self) -> Option<&RecallStore> {
        self.recall.as_ref()
    }

    /// What recall did in the last turn that used it.
    pub fn last_recall(&self) -> Option<RecallTurn> {
        self.last_recall
    }

    /// Tokens (per layer) recall brought back over every turn so far.
    pub fn recalled_total(&self) -> u64 {
        self.recalled_total
    }

    /// Why recall was turned off, once.
    pub fn take_recall_warning(&mut self) -> Option<String> {
        self.recall_warning.take()
    }

    /// Turns recall off after a store failure: the turn goes on without it.
    fn drop_recall(&mut self, e: &RecallError) {
        tracing::warn!("recall is off from now on: {e}");
        self.recall_warning = Some(format!("recall is off from now on: {e}"));
        self.recall = None;
        self.recalling = None;
    }

    /// The slot table and store as they are now.
    pub fn mark(&self) -> CompressorMark {
        CompressorMark {
            slots: self.slots.clone(),
            store: self.recall.as_ref().map(RecallStore::mark),
        }
    }

    /// Back to `mark` (the cache must be restored to the same point).
    pub fn rollback(&mut self, mark: &CompressorMark) -> Result<(), CompressError> {
        self.slots = mark.slots.clone();
        self.recalling = None;
        self.ranking = None;
        if let (Some(store), Some(m)) = (self.recall.as_mut(), mark.store.as_ref()) {
            store.rollback(m)?;
        }
        Ok(())
    }

    /// Each cell's position in the sequence's stream, and the cells up to
    /// the last one in use.
    fn cells_now(&self, ctx: &Context<'_>) -> (Vec<Option<Pos>>, usize) {
        let meta = ctx.kv_cell_positions(KvPart::Base, self.seq);
        let end = meta.iter().rposition(Option::is_some).map_or(0, |c| c + 1);
        (meta, end)
    }

    /// Rows the recall store holds (of storage layer 0, KV head 0).
    fn held_count(&self) -> usize {
        self.recall.as_ref().map_or(0, |s| s.entries(0, 0).count())
    }

    /// What a turn of `incoming` tokens could bring back now, or `None`
    /// when recall is off or nothing is held.
    fn held_rows(&self, ctx: &Context<'_>, incoming: usize) -> Option<Held> {
        if !self.recall_on() || self.slots.n_slots() == 0 || !ctx.dead_slots().is_empty() {
            return None;
        }
        let (meta, end) = self.cells_now(ctx);
        // The turn's tokens and its drafted reply need cells after the rows
        // (and its reply, when that comes before the compaction).
        let reply = self.reply_room.unwrap_or(0);
        let room = meta
            .len()
            .saturating_sub(end + incoming + self.recall_probe.max(reply) + 1)
            .min(self.recall_cells);
        let store = self.recall.as_ref()?;
        // Per layer (in parallel: a 32k-token document holds about 29k rows
        // per layer): held positions not in the cache now, with their scores.
        let avail: Vec<Vec<(Pos, f32)>> = (0..self.layers.len())
            .into_par_iter()
            .map(|l| {
                let mut on_device: Vec<bool> = Vec::new();
                for p in (0..end).filter_map(|c| self.slots.position(l, 0, c, &meta)) {
                    let i = p.max(0) as usize;
                    if i >= on_device.len() {
                        on_device.resize(i + 1, false);
                    }
                    on_device[i] = true;
                }
                store
                    .entries(l, 0)
                    .filter(|&(p, _)| !on_device.get(p.max(0) as usize).copied().unwrap_or(false))
                    .collect()
            })
            .collect();
        let n = avail.iter().map(Vec::len).min().unwrap_or(0).min(room);
        if n == 0 {
            return None;
        }
        let count = self.held_count();
        Some(Held {
            meta,
            end,
            avail,
            n,
            count,
        })
    }

    /// One ranking pass for the turn that `tokens` will be (as
    /// [`Compressor::prefill_turn`] takes them), ahead of it; returns whether
    /// it ran one. A server calls it once per step until it returns false,
    /// then the turn: the turn's own ranking starts where these left off,
    /// so other slots run between passes instead of waiting for them all.
    pub fn rank_step(
        &mut self,
        ctx: &mut Context<'_>,
        tokens: &[Token],
    ) -> Result<bool, CompressError> {
        let w = self.window.min(tokens.len());
        let window = &tokens[tokens.len() - w..];
        // A ranking under way for this turn goes on without listing the
        // held rows again (each listing walks every layer's rows).
        let resumed = self.ranking.take().and_then(|r| {
            let (meta, end) = self.cells_now(ctx);
            r.is_for(window, tokens.len(), end, self.held_count())
                .then_some((r, meta))
        });
        let (mut r, meta) = match resumed {
            Some(going) => going,
            None => {
                let held = match self.held_rows(ctx, tokens.len()) {
                    Some(h) if !window.is_empty() && !self.policy.needs_reconstruction() => h,
                    _ => return Ok(false),
                };
                if !held.avail.iter().any(|a| a.len() > held.n) {
                    return Ok(false);
                }
                self.rank_bytes = 0;
                self.rank_ms = RankMs::default();
                let r = Ranking::new(window, tokens.len(), held.end, held.count, held.avail);
                (r, held.meta)
            }
        };
        match self.recall_rank(ctx, &mut r, &meta, 1) {
            Ok(passes) => {
                self.ranking = Some(r);
                Ok(passes > 0)
            }
            Err(CompressError::Recall(e)) => {
                self.drop_recall(&e);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes evicted rows back into free cells after everything `seq`
    /// holds, leaving `incoming` cells for the turn's tokens: all of them
    /// when they fit, else the best by their score at eviction. They take
    /// part in the turn's attention like any cell and compete with the kept
    /// ones in its compression. Returns whether anything was uploaded.
    fn recall_upload(
        &mut self,
        ctx: &mut Context<'_>,
        incoming: usize,
        window: &[Token],
    ) -> Result<bool, CompressError> {
        self.recalling = None;
        let t = Instant::now();
        let Some(Held {
            meta,
            end,
            mut avail,
            n,
            count,
        }) = self.held_rows(ctx, incoming)
        else {
            self.ranking = None;
            return Ok(false);
        };
        // A ranking that ran ahead for this turn is taken up where it is.
        let ahead = self
            .ranking
            .take()
            .filter(|r| r.is_for(window, incoming, end, count));
        if ahead.is_none() {
            self.rank_bytes = 0;
            self.rank_ms = RankMs::default();
        }
        let t_rank = Instant::now();
        let mut ranked_before = 0.0;
        // More held than the free cells take: the window ranks them first.
        let ranked = avail.iter().any(|a| a.len() > n) && !window.is_empty();
        if ranked {
            let mut r = match ahead {
                Some(r) => r,
                None => Ranking::new(window, incoming, end, count, avail),
            };
            ranked_before = r.ms;
            if let Err(e) = self.recall_rank(ctx, &mut r, &meta, usize::MAX) {
                return match e {
                    CompressError::Recall(e) => {
                        self.drop_recall(&e);
                        Ok(false)
                    }
                    e => Err(e),
                };
            }
            avail = r.avail;
        }
        let rank_ms = ranked_before + t_rank.elapsed().as_secs_f64() * 1e3;
        let t_pick = Instant::now();
        if self.recall_unify {
            let best = BestByPosition::new(avail.iter().flatten().copied());
            for e in avail.iter_mut().flatten() {
                e.1 = best.get(e.0);
            }
        }
        let chunk = self.policy.chunk_size().max(1) as Pos;
        let trail = self.policy.trail();
        let picks: Vec<Vec<Pos>> = avail
            .into_par_iter()
            .map(|a| {
                let mut p: Vec<Pos> = if a.len() > n {
                    top_chunks(a, n, chunk, trail)
                } else {
                    a.into_iter().map(|(p, _)| p).collect()
                };
                p.sort_unstable();
                p
            })
            .collect();
        // Every head of a layer holds what head 0 holds (ChunkKV); the
        // upload fails, and recall turns off, if one does not.
        let per_head: Vec<Vec<Vec<Pos>>> = picks
            .iter()
            .enumerate()
            .map(|(l, p)| vec![p.clone(); self.heads[l]])
            .collect();
        let t_up = Instant::now();
        let uploaded = match self.recall.as_mut() {
            Some(store) => store.upload(ctx, self.seq, end, &per_head),
            None => return Ok(false),
        };
        let bytes_up = match uploaded {
            Ok(b) => b,
            Err(e) => {
                self.drop_recall(&e);
                return Ok(false);
            }
        };
        let t_claim = Instant::now();
        // One position per cell for llama.cpp's mask: any held one is older
        // than the turn; the slot table keeps each layer's own.
        if let Err(e) = ctx.kv_claim(KvPart::Base, self.seq, end as u32, &picks[0]) {
            self.drop_recall(&RecallError::Rows(e));
            return Ok(false);
        }
        let mut table: Vec<Vec<Vec<Pos>>> = Vec::with_capacity(picks.len());
        for (l, p) in picks.iter().enumerate() {
            let mut heads = Vec::with_capacity(self.heads[l]);
            for h in 0..self.heads[l] {
                let mut row: Vec<Pos> = (0..end)
                    .map(|c| self.slots.position(l, h, c, &meta).unwrap_or(DEAD))
                    .collect();
                row.extend_from_slice(p);
                heads.push(row);
            }
            table.push(heads);
        }
        self.slots.replace(table);
        tracing::debug!(
            "recall upload (seq {}): listing {:.1} ms, ranking {:.1}, picking {:.1}, \
             gather and write {:.1}, claim and table {:.1}",
            self.seq,
            ms(t, t_rank),
            ms(t_rank, t_pick),
            ms(t_pick, t_up),
            ms(t_up, t_claim),
            t_claim.elapsed().as_secs_f64() * 1e3
        );
        self.recalling = Some(Recalling {
            positions: picks,
            stats: RecallTurn {
                uploaded: n,
                bytes_up: bytes_up + self.rank_bytes,
                ms: ranked_before + t.elapsed().as_secs_f64() * 1e3,
                rank_ms,
                rank: self.rank_ms,
                ..RecallTurn::default()
            },
        });
        self.rank_bytes = 0;
        self.rank_ms = RankMs::default();
        Ok(true)
    }

    /// Rescores held rows that the free cells cannot all take: batch by
    /// batch they are written after the cache, the ranking's window is
    /// decoded over them with importance on, then both are removed again.
    /// Each row's score becomes the window's attention to it (summed over
    /// KV heads; every pass shares the kept cells, which anchors the
    /// scales). Runs at most `max_passes` passes from where `r` stands and
    /// returns how many ran.
    fn recall_rank(
        &mut self,
        ctx: &mut Context<'_>,
        r: &mut Ranking,
        meta: &[Option<Pos>],
        max_passes: usize,
    ) -> Result<usize, CompressError> {
        if r.finished {
            return Ok(0);
        }
        let t0 = Instant::now();
        let (w, end) = (r.window.len(), r.end);
        let batch = meta
            .len()
            .saturating_sub(end + w + 1)
            .min(self.recall_cells);
        if batch == 0 || w > ctx.n_ubatch() as usize {
            // Nothing can be ranked: the scores at eviction stand.
            r.finished = true;
            return Ok(0);
        }
        let at = ctx.seq_pos_max(self.seq).map_or(0, |p| p + 1);
        let table = self.slots.clone();
        let mut group_of = vec![0; self.layers.len()];
        for (g, group) in self.groups.groups().iter().enumerate() {
            for &l in group {
                group_of[l] = g;
            }
        }
        let mut passes = 0;
        while r.next < r.total && passes < max_passes {
            let i = r.next;
            let b = batch.min(r.total - i);
            let part: Vec<Vec<Vec<Pos>>> = r
                .avail
                .iter()
                .enumerate()
                .map(|(l, a)| vec![a[i..i + b].iter().map(|&(p, _)| p).collect(); self.heads[l]])
                .collect();
            let store = self.recall.as_mut().ok_or_else(|| {
                RecallError::Unsupported("recall was turned off during ranking".into())
            })?;
            let t_up = Instant::now();
            self.rank_bytes += store.upload(ctx, self.seq, end, &part)?;
            self.rank_ms.upload += t_up.elapsed().as_secs_f64() * 1e3;
            self.rank_ms.passes += 1;
            let t_claim = Instant::now();
            ctx.kv_claim(KvPart::Base, self.seq, end as u32, &part[0][0])
                .map_err(RecallError::Rows)?;
            let mut t = Vec::with_capacity(part.len());
            for (l, heads) in part.iter().enumerate() {
                t.push(
                    heads
                        .iter()
                        .enumerate()
                        .map(|(h, p)| {
                            let mut row: Vec<Pos> = (0..end)
                                .map(|c| table.position(l, h, c, meta).unwrap_or(DEAD))
                                .collect();
                            row.extend_from_slice(p);
                            row
                        })
                        .collect(),
                );
            }
            self.slots.replace(t);
            let leaders = self.leader_flags(ctx);
            let reduce = self.policy.score_reduce();
            ctx.importance_begin(&leaders, ScoreRows::Last(w as u32), reduce)?;
            // Only the window ranks: a drafted reply per batch would cost its
            // length in decodes per batch (the turn's own scoring drafts once).
            let t_dec = Instant::now();
            let decoded = ctx.decode_tokens(&r.window, at, self.seq, false);
            ctx.importance_end();
            let t_rm = Instant::now();
            self.rank_ms.decode += (t_rm - t_dec).as_secs_f64() * 1e3;
            // The window and the batch leave again whatever happened.
            let removed = ctx.seq_rm(self.seq, at, -1);
            let freed = ctx.kv_free(KvPart::Base, self.seq, end as u32, b as u32);
            self.slots = table.clone();
            decoded?;
            if !removed {
                return Err(CompressError::Unsupported(
                    "the scoring window could not be removed".into(),
                ));
            }
            freed.map_err(RecallError::Rows)?;
            let t_read = Instant::now();
            let scores = self.read_importance(ctx)?;
            let t_score = Instant::now();
            self.rank_ms.read += (t_score - t_read).as_secs_f64() * 1e3;
            // Every pass shares the kept cells: a batch row's attention over
            // the attention the kept cells got in the same pass does not
            // depend on what else the batch held (the softmax's normalizer
            // cancels), so rows of different passes compare.
            for (l, a) in r.avail.iter_mut().enumerate() {
                let imp = &scores[group_of[l]];
                let kept: Vec<f32> = imp
                    .heads()
                    .map(|s| s[..end].iter().sum::<f32>().max(f32::MIN_POSITIVE))
                    .collect();
                for (k, entry) in a[i..i + b].iter_mut().enumerate() {
                    entry.1 = imp.heads().zip(&kept).map(|(s, m)| s[end + k] / m).sum();
                }
            }
            tracing::debug!(
                "rank pass (seq {}, {b} rows): upload {:.1} ms, claim and table {:.1}, \
                 decode {:.1}, remove {:.1}, read {:.1}, score {:.1}",
                self.seq,
                ms(t_up, t_claim),
                ms(t_claim, t_dec),
                ms(t_dec, t_rm),
                ms(t_rm, t_read),
                ms(t_read, t_score),
                ms(t_score, Instant::now())
            );
            r.next += b;
            passes += 1;
        }
        if r.next >= r.total {
            // A layer holding more rows than the shortest has its last ones
            // unranked: their scores at eviction are on another scale, so they
            // come back only behind every ranked row.
            for a in r.avail.iter_mut() {
                for entry in a.iter_mut().skip(r.total) {
                    entry.1 = 0.0;
                }
            }
            r.finished = true;
        }
        r.ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok(passes)
    }

    /// Closes the turn's recall after its compaction: what came back.
    fn recall_finish(&mut self, transient_cells: u32, bytes_down: u64, capture_ms: f64) {
        let Some(r) = self.recalling.take() else {
            return;
        };
        let chunk = self.policy.chunk_size().max(1) as Pos;
        let (mut tokens, mut chunks) = (0usize, 0usize);
        for (l, up) in r.positions.iter().enumerate() {
            let kept: std::collections::HashSet<Pos> =
                self.slots.positions(l, 0).iter().copied().collect();
            let back: Vec<Pos> = up.iter().copied().filter(|p| kept.contains(p)).collect();
            tokens += back.len();
            let mut ids: Vec<Pos> = back.iter().map(|p| p / chunk).collect();
            ids.dedup();
            chunks += ids.len();
        }
        let n_layers = r.positions.len().max(1);
        self.recalled_total += (tokens / n_layers) as u64;
        let turn = RecallTurn {
            tokens: tokens / n_layers,
            chunks: chunks / n_layers,
            bytes_down: r.stats.bytes_down + bytes_down,
            ms: r.stats.ms + capture_ms,
            transient_cells,
            ..r.stats
        };
        let msg = format!(
            "recall (seq {}): {} cells written back, {} tokens per layer kept ({} chunks), \
             {:.1} MiB up, {:.1} MiB down, {:.1} ms ({:.1} ranking: {} passes, upload {:.1}, \
             decode {:.1}, read {:.1}), peak {} cells",
            self.seq,
            turn.uploaded,
            turn.tokens,
            turn.chunks,
            crate::llama::mib(turn.bytes_up),
            crate::llama::mib(turn.bytes_down),
            turn.ms,
            turn.rank_ms,
            turn.rank.passes,
            turn.rank.upload,
            turn.rank.decode,
            turn.rank.read,
            turn.transient_cells
        );
        // A compaction that recalled nothing (a document's) only stored rows.
        if turn.uploaded > 0 {
            tracing::info!("{msg}");
        } else {
            tracing::debug!("{msg}");
        }
        self.last_recall = Some(turn);
    }

    /// A question (or any short turn) decoded on top of a compressed cache,
    /// with recall: evicted rows come back for the turn's scoring, the
    /// window scores them with the rest, and the cache is compacted to
    /// `n_keep` again (the window kept whole). Without recall (or nothing
    /// held) the window is simply decoded, as llama.cpp would.
    pub fn recall_window(
        &mut self,
        ctx: &mut Context<'_>,
        window: &[Token],
        start: Pos,
        n_keep: usize,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        let t_all = Instant::now();
        if !self.recall_upload(ctx, window.len(), window)? {
            return self.decode_plain(ctx, window, start, t_all, window.len(), budget);
        }
        let keep = Keep {
            from: start,
            history: false,
            short: true,
            recall: false,
        };
        let (ms, full) = self.score_and_compact(ctx, window, start, n_keep, keep, None)?;
        tracing::debug!(
            "recalling turn (seq {}): {:.1} ms, scoring decode and draft {:.1}, select {:.1}, compact {:.1}",
            self.seq,
            t_all.elapsed().as_secs_f64() * 1e3,
            ms.importance,
            ms.select,
            ms.compact
        );
        self.finish(ctx, t_all, true, window.len(), budget, full, ms)
    }

    /// The next turn's reply comes before its compaction: it is decoded over
    /// everything the turn brought back (or, for a prompt that fit its slot
    /// whole, over all of it), not only over what the budget keeps, and
    /// [`Compressor::settle`] compacts once it is in. A server's slot owns
    /// its cells whatever it keeps, so the reply loses no memory to it;
    /// recall leaves `reply` cells for it. Only with recall on (the evicted
    /// rows are captured at `settle`); a turn whose reply would not fit
    /// compacts at once. For [`Compressor::prefill_turn`] only.
    pub fn defer_compaction(&mut self, reply: usize) {
        self.reply_room = Some(reply);
    }

    /// Whether a compaction waits for [`Compressor::settle`].
    pub fn unsettled(&self) -> bool {
        self.deferred.is_some()
    }

    /// The compaction a turn held back for its reply: with the turn's
    /// scores, keeping the window and the reply whole. Returns whether
    /// there was one.
    pub fn settle(&mut self, ctx: &mut Context<'_>) -> Result<bool, CompressError> {
        self.reply_room = None;
        let Some(d) = self.deferred.take() else {
            return Ok(false);
        };
        let t = Instant::now();
        let reply = ctx.seq_pos_max(self.seq).map_or(0, |p| (p - d.last).max(0)) as usize;
        self.recalling = d.recalling;
        let scores = self.reply_scored(ctx, d.importance, d.reply_scores, d.last);
        let t_compact = Instant::now();
        let done =
            scores.and_then(|imp| self.select_and_compact(ctx, &imp, d.keep, d.n_keep + reply));
        self.recalling = None;
        let (select, compact) = done.as_ref().map_or((0.0, 0.0), |&(s, c)| (s, c));
        tracing::debug!(
            "seq {}: held-back compaction after a reply of {reply} tokens, {:.1} ms: scoring {:.1}, \
             select {select:.1}, capture {:.1}, compact {compact:.1}",
            self.seq,
            t.elapsed().as_secs_f64() * 1e3,
            (t_compact - t).as_secs_f64() * 1e3,
            (t_compact.elapsed().as_secs_f64() * 1e3 - select - compact).max(0.0)
        );
        done.map(|_| true)
    }

    /// A held-back compaction's scores: the window's (`importance`), with
    /// the reply's merged in when it is to score them.
    fn reply_scored(
        &self,
        ctx: &mut Context<'_>,
        mut importance: Vec<LayerImportance>,
        scores: Option<ReplyScores>,
        last: Pos,
    ) -> Result<Vec<LayerImportance>, CompressError> {
        let Some(r) = scores else {
            return Ok(importance);
        };
        let t = Instant::now();
        let draft = self.score_reply(ctx, &r.reply, last + 1)?;
        let t_merge = Instant::now();
        if let Some(draft) = draft {
            importance = self.with_draft(ctx, importance, draft, r.window_start);
        }
        let t_unify = Instant::now();
        self.unify(ctx, &mut importance);
        tracing::debug!(
            "seq {}: the reply scored: decode {:.1} ms, merge and pins {:.1}, unify {:.1}",
            self.seq,
            ms(t, t_merge),
            ms(t_merge, t_unify),
            ms(t_unify, Instant::now())
        );
        Ok(importance)
    }

    /// The tokens of the reply to the turn whose compaction waits for
    /// [`Compressor::settle`] (those in the cache: a final token that was
    /// sampled but never decoded is not).
    pub fn replied(&mut self, tokens: &[Token]) {
        if let Some(r) = self.deferred.as_mut().and_then(|d| d.reply_scores.as_mut()) {
            r.reply = tokens.to_vec();
        }
    }

    /// Records where sentences end among `tokens` at positions `start..`, for
    /// `--chunk-by sentences`. The prefill methods do it themselves; callers
    /// that prefill a head elsewhere (eval, compare) tell it here.
    pub fn observe(&mut self, model: &crate::llama::Model, tokens: &[Token], start: Pos) {
        if self.policy.chunking() == Chunking::Sentences {
            self.sentences.observe(model, tokens, start);
        }
    }

    /// Scores by context reconstruction ([`Scorer::Reconstruct`]) by default,
    /// with these prompts. Policies without scores ignore it.
    pub fn with_reconstruction(mut self, rec: Reconstruction) -> Self {
        self.reconstruction = Some(rec);
        self
    }

    /// Manages sequence `seq` of a context that holds several (a server's
    /// slot) instead of sequence 0.
    pub fn with_seq(mut self, seq: SeqId) -> Self {
        self.seq = seq;
        self
    }

    /// The sequence this compressor manages.
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// Ranks text scored by reconstruction with `policy` instead (same kind of
    /// selection, another shape: chat documents chunk by sentences).
    pub fn with_document_policy(mut self, policy: Box<dyn Policy>) -> Self {
        self.document_policy = Some(policy);
        self
    }

    /// How [`Compressor::prefill`] scores: by reconstruction when configured
    /// (and required by `kvzip`), else by the observation window.
    pub fn scorer(&self) -> Scorer {
        if self.reconstruction.is_some() && self.policy.score_rows().is_some() {
            Scorer::Reconstruct
        } else {
            Scorer::Window
        }
    }

    /// The observation window in tokens.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Whether the policy always scores by reconstruction (`kvzip`).
    pub fn needs_reconstruction(&self) -> bool {
        self.policy.needs_reconstruction()
    }

    /// Whether the policy ranks by attention scores (StreamingLLM and random do not).
    pub fn has_scores(&self) -> bool {
        self.policy.score_rows().is_some()
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Model layers whose importance is computed (one per reuse group).
    pub fn leader_layers(&self) -> Vec<u32> {
        self.groups.leaders().map(|l| self.layers[l]).collect()
    }

    /// Positions each compressed storage layer and head currently keeps in its
    /// compacted slots (empty before the first compaction).
    pub fn slot_table(&self) -> &SlotTable {
        &self.slots
    }

    /// Switches the selection policy and its reuse group size for later
    /// compressions, keeping the slot table of the cache compressed so far.
    pub fn set_policy(&mut self, policy: Box<dyn Policy>, reuse: usize) {
        self.policy = policy;
        self.document_policy = None;
        self.groups = ReuseGroups::new(self.layers.len(), reuse.max(1));
    }

    /// Forget the slot table (call after clearing the cache).
    pub fn reset(&mut self) {
        self.slots.clear();
        self.sentences.clear();
        self.recalling = None;
        self.reply_room = None;
        self.deferred = None;
        self.last_recall = None;
        if let Some(Err(e)) = self.recall.as_mut().map(RecallStore::clear) {
            self.drop_recall(&e);
        }
    }

    /// Prefills `tokens` at positions `start..` (logits for the last one) and
    /// compresses the sequence to `n_keep` cells. Nothing is evicted when
    /// everything fits in `n_keep` or the tokens are no more than the window.
    pub fn prefill(
        &mut self,
        ctx: &mut Context<'_>,
        tokens: &[Token],
        start: Pos,
        n_keep: usize,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        let keep = Keep {
            from: Pos::MAX,
            history: false,
            short: false,
            recall: false,
        };
        let scorer = self.scorer();
        self.prefill_inner(ctx, tokens, start, n_keep, keep, scorer, budget)
    }

    /// [`Compressor::prefill`] for one turn of a conversation whose cache
    /// must stay within `n_keep` cells. It compresses even when `tokens` are
    /// fewer than the window (they then form the window); `keep` says what
    /// else is kept whole. `scorer` chooses between the turn's own window
    /// (its question scores the rest) and reconstruction (a document whose
    /// questions come later); `kvzip` always reconstructs.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_turn(
        &mut self,
        ctx: &mut Context<'_>,
        tokens: &[Token],
        start: Pos,
        n_keep: usize,
        keep: Keep,
        scorer: Scorer,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        let scorer = match scorer {
            Scorer::Reconstruct if self.scorer() == Scorer::Reconstruct => Scorer::Reconstruct,
            _ if self.policy.needs_reconstruction() => Scorer::Reconstruct,
            _ => Scorer::Window,
        };
        // With recall, a turn's own window re-ranks the whole history,
        // evicted chunks included.
        let w = self.window.min(tokens.len());
        let recalled = keep.recall
            && scorer == Scorer::Window
            && self.recall_upload(ctx, tokens.len(), &tokens[tokens.len() - w..])?;
        let done = self.prefill_inner(
            ctx,
            tokens,
            start,
            n_keep,
            Keep {
                short: true,
                history: keep.history && !recalled,
                ..keep
            },
            scorer,
            budget,
        );
        // The room asked for was this turn's; a squeeze later must compact.
        self.reply_room = None;
        self.recalling = None;
        done
    }

    /// A turn whose `head` (at `start`) is already in the cache, as a server
    /// prefills it in chunks between other sequences' work: scores the cache
    /// by reconstructing the head (a document whose questions come later),
    /// compacts to `n_keep - window.len()`, then decodes `window` on top.
    /// Without anything to evict it only decodes the window.
    #[allow(clippy::too_many_arguments)]
    pub fn reconstruct_prefilled(
        &mut self,
        ctx: &mut Context<'_>,
        head: &[Token],
        start: Pos,
        window: &[Token],
        n_keep: usize,
        keep: Keep,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        self.with_document_shape(|this| {
            let model = ctx.model();
            this.observe(model, head, start);
            this.observe(model, window, start + head.len() as Pos);
            let t_all = Instant::now();
            let w = window.len();
            let n = head.len() + w;
            let total = stats(ctx, this.seq)?.cells_used as usize + w;
            let wstart = start + head.len() as Pos;
            if head.is_empty()
                || n_keep >= total
                || n_keep <= w
                || this.policy.score_rows().is_none()
            {
                return this.decode_plain(ctx, window, wstart, t_all, n, budget);
            }
            let (ms, full) =
                this.reconstruct_and_compact(ctx, head, start, window, n_keep, keep)?;
            this.finish(ctx, t_all, true, n, budget, full, ms)
        })
    }

    /// Runs `f` with the document policy (if any) in place of the policy.
    fn with_document_shape<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let swap = self.document_policy.is_some();
        if swap {
            if let Some(doc) = self.document_policy.as_mut() {
                std::mem::swap(&mut self.policy, doc);
            }
        }
        let r = f(self);
        if swap {
            if let Some(doc) = self.document_policy.as_mut() {
                std::mem::swap(&mut self.policy, doc);
            }
        }
        r
    }

    /// Reconstruction scores for `head` (in the cache at `start`), the
    /// compaction, then `window` decoded on top.
    fn reconstruct_and_compact(
        &mut self,
        ctx: &mut Context<'_>,
        head: &[Token],
        start: Pos,
        window: &[Token],
        n_keep: usize,
        keep: Keep,
    ) -> Result<(StageMs, crate::llama::KvStats), CompressError> {
        let w = window.len();
        let mut ms = StageMs::default();
        let t_imp = Instant::now();
        let importance = self.reconstruct_scores(ctx, head)?;
        ms.importance = t_imp.elapsed().as_secs_f64() * 1e3;
        let full = with_window(stats(ctx, self.seq)?, w);
        let keep = keep_last(keep, start + head.len() as Pos - 1);
        (ms.select, ms.compact) = self.select_and_compact(ctx, &importance, keep, n_keep - w)?;
        ctx.decode_tokens(window, start + head.len() as Pos, self.seq, true)?;
        Ok((ms, full))
    }

    /// Cells a reconstruction of `chunk` tokens needs on top of the cache
    /// (0 when this compressor does not reconstruct).
    pub fn reconstruction_room(&self, chunk: usize) -> usize {
        self.reconstruction
            .as_ref()
            .map_or(0, |r| r.cells_needed(chunk.min(r.chunk)))
    }

    #[allow(clippy::too_many_arguments)]
    fn prefill_inner(
        &mut self,
        ctx: &mut Context<'_>,
        tokens: &[Token],
        start: Pos,
        n_keep: usize,
        keep: Keep,
        scorer: Scorer,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        // Documents may rank with a shape of their own: swap it in for this call.
        if scorer == Scorer::Reconstruct {
            return self.with_document_shape(|this| {
                this.prefill_scored(ctx, tokens, start, n_keep, keep, scorer, budget)
            });
        }
        self.prefill_scored(ctx, tokens, start, n_keep, keep, scorer, budget)
    }

    #[allow(clippy::too_many_arguments)]
    fn prefill_scored(
        &mut self,
        ctx: &mut Context<'_>,
        tokens: &[Token],
        start: Pos,
        n_keep: usize,
        keep: Keep,
        scorer: Scorer,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        if self.policy.needs_reconstruction() && scorer != Scorer::Reconstruct {
            return Err(self.no_reconstruction());
        }
        self.observe(ctx.model(), tokens, start);
        let t_all = Instant::now();
        let before = stats(ctx, self.seq)?;
        let n = tokens.len();
        let total = before.cells_used as usize + n;
        let w = self.window.min(n);
        let rows = self.policy.score_rows();
        let fresh = total.saturating_sub(self.slots.n_slots());
        // Rows recalled for this turn go back out unless the budget holds them.
        let compress = n_keep < total
            && (n > self.window
                || (keep.short && n > 0 && (fresh > self.window || self.recalling.is_some())));

        let mut ms = StageMs::default();
        let full;
        // Reconstruction scores what is already in the cache: the head is
        // prefilled, scored and compacted, then the window goes on top.
        let reconstruct = scorer == Scorer::Reconstruct && n > w && n_keep > w;
        if !compress {
            ctx.decode_tokens(tokens, start, self.seq, true)?;
            full = stats(ctx, self.seq)?;
        } else if reconstruct {
            let (head, tail) = tokens.split_at(n - w);
            ctx.decode_tokens(head, start, self.seq, false)?;
            (ms, full) = self.reconstruct_and_compact(ctx, head, start, tail, n_keep, keep)?;
        } else {
            let (head, tail) = tokens.split_at(n - w);
            if rows == Some(ScoreRows::All) {
                let leaders = self.leader_flags(ctx);
                ctx.importance_begin(&leaders, ScoreRows::All, ScoreReduce::Sum)?;
            }
            let decoded = if head.is_empty() {
                Ok(())
            } else {
                ctx.decode_tokens(head, start, self.seq, false)
            };
            if decoded.is_err() && rows.is_some() {
                ctx.importance_end();
            }
            decoded?;
            (ms, full) =
                self.score_and_compact(ctx, tail, start + head.len() as Pos, n_keep, keep, None)?;
        }
        self.finish(ctx, t_all, compress, n, budget, full, ms)
    }

    /// Decodes the observation `window` at `start` on top of what the cache
    /// already holds, scoring with it, and compresses to `n_keep` cells. For
    /// window-scored policies (ChunkKV); `prefill` calls it after the head.
    pub fn compress_window(
        &mut self,
        ctx: &mut Context<'_>,
        window: &[Token],
        start: Pos,
        n_keep: usize,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        if self.policy.needs_reconstruction() {
            return Err(self.no_reconstruction());
        }
        if self.policy.score_rows() == Some(ScoreRows::All) {
            return Err(CompressError::Config(format!(
                "{} scores with every prompt query: use prefill",
                self.policy.name()
            )));
        }
        self.window_inner(ctx, window, start, n_keep, None, budget)
    }

    /// Prefills `head` from position 0 while every query scores the leader
    /// layers (the H2O head share), and returns those scores. A run that
    /// saves this state can compress later with [`Compressor::compress_window_with`]
    /// instead of prefilling again.
    pub fn prefill_head_scored(
        &self,
        ctx: &mut Context<'_>,
        head: &[Token],
    ) -> Result<Vec<LayerImportance>, CompressError> {
        let leaders = self.leader_flags(ctx);
        ctx.importance_begin(&leaders, ScoreRows::All, ScoreReduce::Sum)?;
        let decoded = ctx.decode_tokens(head, 0, self.seq, false);
        ctx.importance_end();
        decoded?;
        self.leader_layers()
            .into_iter()
            .map(|il| ctx.importance(il).ok_or(CompressError::NoImportance(il)))
            .collect()
    }

    /// [`Compressor::compress_window`] for a policy scored by every prompt
    /// query (H2O) on a restored head: `head` holds the head's scores from
    /// [`Compressor::prefill_head_scored`] (cells as restored), the window adds its own.
    pub fn compress_window_with(
        &mut self,
        ctx: &mut Context<'_>,
        window: &[Token],
        start: Pos,
        n_keep: usize,
        head: &[LayerImportance],
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        self.window_inner(ctx, window, start, n_keep, Some(head), budget)
    }

    /// Compresses with `scores` computed beforehand on this same cache (by
    /// [`Reconstruction::score`] for at least the leader layers; eval shares
    /// one reconstruction among every method and budget), then decodes the
    /// observation `window` on top.
    pub fn compress_with_scores(
        &mut self,
        ctx: &mut Context<'_>,
        scores: &[LayerImportance],
        window: &[Token],
        start: Pos,
        n_keep: usize,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        let t_all = Instant::now();
        let w = window.len();
        let total = stats(ctx, self.seq)?.cells_used as usize + w;
        if n_keep >= total || n_keep <= w || self.policy.score_rows().is_none() {
            return self.window_inner(ctx, window, start, n_keep, None, budget);
        }
        let leaders = self.group_scores(scores)?;
        let full = with_window(stats(ctx, self.seq)?, w);
        let keep = Keep {
            from: start - 1,
            history: false,
            short: false,
            recall: false,
        };
        let mut ms = StageMs::default();
        (ms.select, ms.compact) = self.select_and_compact(ctx, &leaders, keep, n_keep - w)?;
        ctx.decode_tokens(window, start, self.seq, true)?;
        self.finish(ctx, t_all, true, w, budget, full, ms)
    }

    /// The window on top of the cache, then compression unless everything fits.
    fn window_inner(
        &mut self,
        ctx: &mut Context<'_>,
        window: &[Token],
        start: Pos,
        n_keep: usize,
        prior: Option<&[LayerImportance]>,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        let t_all = Instant::now();
        let total = stats(ctx, self.seq)?.cells_used as usize + window.len();
        if n_keep >= total {
            return self.decode_plain(ctx, window, start, t_all, window.len(), budget);
        }
        let keep = Keep {
            from: Pos::MAX,
            history: false,
            short: false,
            recall: false,
        };
        let (ms, full) = self.score_and_compact(ctx, window, start, n_keep, keep, prior)?;
        self.finish(ctx, t_all, true, window.len(), budget, full, ms)
    }

    /// `window` decoded at `start` as llama.cpp would, nothing evicted: the
    /// report of a prefill of `n_prompt` tokens that fit the budget.
    fn decode_plain(
        &self,
        ctx: &mut Context<'_>,
        window: &[Token],
        start: Pos,
        t_all: Instant,
        n_prompt: usize,
        budget: serde_json::Value,
    ) -> Result<Prefilled, CompressError> {
        ctx.decode_tokens(window, start, self.seq, true)?;
        let full = stats(ctx, self.seq)?;
        self.finish(
            ctx,
            t_all,
            false,
            n_prompt,
            budget,
            full,
            StageMs::default(),
        )
    }

    /// The report of one prefill: `full` is the cache before compaction.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        ctx: &Context<'_>,
        t_all: Instant,
        compressed: bool,
        n_prompt: usize,
        budget: serde_json::Value,
        full: crate::llama::KvStats,
        ms: StageMs,
    ) -> Result<Prefilled, CompressError> {
        let after = stats(ctx, self.seq)?;
        Ok(Prefilled {
            ms: t_all.elapsed().as_secs_f64() * 1e3,
            compressed,
            report: CompressionReport {
                method: self.policy.name().to_string(),
                budget,
                n_prompt,
                // Tokens kept per layer on average: dead slots hold none.
                n_keep: after.cells_used as usize - self.slots.mean_dead().round() as usize,
                cells_before: full.cells_used,
                cells_after: after.cells_used,
                bytes_live_before: full.bytes_live,
                bytes_live_after: after.bytes_live,
                attn_width_before: full.attn_width,
                attn_width_after: after.attn_width,
                ms,
            },
        })
    }

    /// The scored decode of the window, then selection and compaction.
    fn score_and_compact(
        &mut self,
        ctx: &mut Context<'_>,
        tail: &[Token],
        tail_start: Pos,
        n_keep: usize,
        keep: Keep,
        prior: Option<&[LayerImportance]>,
    ) -> Result<(StageMs, crate::llama::KvStats), CompressError> {
        let rows = self.policy.score_rows();
        let w = tail.len();
        if let Some(ScoreRows::Last(_)) = rows {
            if w > ctx.n_ubatch() as usize {
                return Err(CompressError::Config(format!(
                    "the observation window ({w}) must fit one micro-batch (-ub {})",
                    ctx.n_ubatch()
                )));
            }
        }
        let mut ms = StageMs::default();
        let t_imp = Instant::now();
        match rows {
            Some(ScoreRows::Last(_)) => {
                let leaders = self.leader_flags(ctx);
                let reduce = self.policy.score_reduce();
                ctx.importance_begin(&leaders, ScoreRows::Last(w as u32), reduce)?;
            }
            // Every query scores: the head's share comes from `prior`.
            Some(ScoreRows::All) if prior.is_some() => {
                let leaders = self.leader_flags(ctx);
                ctx.importance_begin(&leaders, ScoreRows::All, ScoreReduce::Sum)?;
            }
            _ => {}
        }
        // A turn whose compaction waits for its reply (`defer_compaction`):
        // the reply scores the cache at `settle`, so no draft here. With
        // recall on, a turn that brought nothing back waits too: a prompt
        // that fit its slot whole is read whole by its reply, as a longer
        // one reads everything its question brought back.
        let recalling = self.recalling.is_some();
        let defer = self.reply_room.take().filter(|&r| {
            self.recall.is_some() && ctx.seq_used(self.seq) + w + r < ctx.seq_capacity()
        });
        let scores_reply = self.recall_probe > 0 && w > 0 && rows.is_some();
        let reply_scores = scores_reply && defer.is_some() && prior.is_none();
        let probing = scores_reply && recalling && !reply_scores;
        let mut decoded = ctx.decode_tokens(tail, tail_start, self.seq, true);
        // The draft's attention apart from the window's (for its pins).
        let mut window_scores = None;
        if probing && decoded.is_ok() {
            let leaders = self.leader_flags(ctx);
            let reduce = self.policy.score_reduce();
            let restarted = self.read_importance(ctx).and_then(|s| {
                ctx.importance_begin(&leaders, ScoreRows::Last(1), reduce)?;
                Ok(s)
            });
            match restarted {
                Ok(s) => window_scores = Some(s),
                Err(e) => {
                    ctx.importance_end();
                    return Err(e);
                }
            }
        }
        if probing && decoded.is_ok() {
            decoded = self.draft_probe(ctx, tail_start + w as Pos);
        }
        if rows.is_some() {
            ctx.importance_end();
        }
        // The drafted tokens leave whatever happened, and so does the window's
        // last token: decoded again after compaction, it gives the reply's
        // first logits from the compacted cache, as without a draft.
        let last = tail_start + w as Pos - 1;
        if probing && !ctx.seq_rm(self.seq, last, -1) {
            return Err(CompressError::Unsupported(
                "the drafted reply could not be removed".into(),
            ));
        }
        decoded?;
        let t_read = Instant::now();
        let mut importance = match rows {
            Some(_) => self.read_importance(ctx)?,
            None => Vec::new(),
        };
        ms.readback = t_read.elapsed().as_secs_f64() * 1e3;
        if let Some(window) = window_scores {
            importance = self.with_draft(ctx, window, importance, tail_start);
        }
        if !reply_scores {
            self.unify(ctx, &mut importance);
        }
        for (imp, prior) in importance.iter_mut().zip(prior.unwrap_or_default()) {
            imp.add(prior);
        }
        ms.importance = t_imp.elapsed().as_secs_f64() * 1e3;
        let full = stats(ctx, self.seq)?;
        let keep = Keep {
            from: tail_start.min(keep.from),
            ..keep
        };
        // The reply first, then the compaction: it fits beside what the
        // turn brought back (recall left it the room).
        if let Some(room) = defer {
            tracing::debug!(
                "seq {}: compaction after a reply of up to {room} tokens",
                self.seq
            );
            if probing {
                ctx.decode_tokens(&tail[w - 1..], last, self.seq, true)?;
            }
            self.deferred = Some(Deferred {
                importance,
                keep,
                n_keep,
                last,
                recalling: self.recalling.take(),
                reply_scores: reply_scores.then_some(ReplyScores {
                    window_start: tail_start,
                    reply: Vec::new(),
                }),
            });
            return Ok((ms, full));
        }
        // With a draft, the window's last token comes back after compaction.
        let n_keep = if probing {
            n_keep.saturating_sub(1).max(1)
        } else {
            n_keep
        };
        (ms.select, ms.compact) = self.select_and_compact(ctx, &importance, keep, n_keep)?;
        if probing {
            ctx.decode_tokens(&tail[w - 1..], last, self.seq, true)?;
        }
        Ok((ms, full))
    }

    /// The draft's scores (of `draft`) merged with the window's, the
    /// positions it attended to most before the window pinned.
    fn with_draft(
        &self,
        ctx: &Context<'_>,
        window: Vec<LayerImportance>,
        mut draft: Vec<LayerImportance>,
        window_start: Pos,
    ) -> Vec<LayerImportance> {
        let meta = ctx.kv_cell_positions(KvPart::Base, self.seq);
        let pins = match self.recall_pin {
            0 => Vec::new(),
            _ => self.draft_pins(&meta, &draft, window_start),
        };
        let reduce = self.policy.score_reduce();
        for (imp, win) in draft.iter_mut().zip(&window) {
            imp.merge(win, reduce);
        }
        self.pin_positions(&meta, &mut draft, &pins);
        draft
    }

    /// Recalling turns score by position across layer groups ([`Compressor::with_recall_unify`]).
    fn unify(&self, ctx: &Context<'_>, importance: &mut [LayerImportance]) {
        if self.recall_unify && self.recalling.is_some() {
            let meta = ctx.kv_cell_positions(KvPart::Base, self.seq);
            self.unify_groups(&meta, importance);
        }
    }

    /// The first `recall_probe` tokens of the reply at `at` (in the cache)
    /// scored as a draft of them would be: the reply leaves the cache and
    /// comes back, its first tokens in one decode with importance on.
    /// `None` when there is no reply to score, or the cache does not hold
    /// exactly these tokens after `at`.
    fn score_reply(
        &self,
        ctx: &mut Context<'_>,
        reply: &[Token],
        at: Pos,
    ) -> Result<Option<Vec<LayerImportance>>, CompressError> {
        let in_cache = ctx.seq_pos_max(self.seq).map_or(0, |p| (p - at + 1).max(0)) as usize;
        let k = reply
            .len()
            .min(self.recall_probe)
            .min(ctx.n_ubatch() as usize);
        if in_cache != reply.len() {
            tracing::debug!(
                "seq {}: the cache holds {in_cache} reply tokens, not {}: scored without them",
                self.seq,
                reply.len()
            );
            return Ok(None);
        }
        if k == 0 {
            return Ok(None);
        }
        // llama.cpp takes a sequence's positions only in order: the whole
        // reply goes, its first tokens come back scored, then the rest.
        if !ctx.seq_rm(self.seq, at, -1) {
            return Err(CompressError::Unsupported(
                "the reply could not be scored again".into(),
            ));
        }
        let leaders = self.leader_flags(ctx);
        ctx.importance_begin(
            &leaders,
            ScoreRows::Last(k as u32),
            self.policy.score_reduce(),
        )?;
        let decoded = ctx.decode_tokens(&reply[..k], at, self.seq, false);
        ctx.importance_end();
        decoded?;
        if k < reply.len() {
            ctx.decode_tokens(&reply[k..], at + k as Pos, self.seq, false)?;
        }
        self.read_importance(ctx).map(Some)
    }

    /// Importance of every leader layer since the last `importance_begin`.
    fn read_importance(&self, ctx: &Context<'_>) -> Result<Vec<LayerImportance>, CompressError> {
        self.leader_layers()
            .into_iter()
            .map(|il| ctx.importance(il).ok_or(CompressError::NoImportance(il)))
            .collect()
    }

    /// The `recall_pin` positions before `before` (the window) that the
    /// draft attended to most in any leader layer and KV head. Scores of one
    /// layer are comparable with another's: each draft query spreads one unit
    /// of attention (sum) or pays at most one (max).
    fn draft_pins(&self, meta: &[Option<Pos>], draft: &[LayerImportance], before: Pos) -> Vec<Pos> {
        // Per leader layer on all cores (every cell of every KV head), then
        // the best of them.
        let groups = self.groups.groups();
        let best = draft
            .par_iter()
            .enumerate()
            .filter_map(|(g, imp)| {
                let leader = *groups.get(g)?.first()?;
                let scored = (0..self.heads[leader]).flat_map(|h| {
                    let scores = imp.head(h.min(imp.n_heads().saturating_sub(1)));
                    scores
                        .iter()
                        .take(meta.len())
                        .enumerate()
                        .filter_map(move |(c, &s)| {
                            let p = self.slots.position(leader, h, c, meta)?;
                            (p < before).then_some((p, s))
                        })
                });
                Some(BestByPosition::new(scored))
            })
            .reduce_with(BestByPosition::max);
        // A draft that ended at once attended to nothing: nothing to pin.
        let mut ranked: Vec<(Pos, f32)> = best
            .iter()
            .flat_map(BestByPosition::iter)
            .filter(|&(_, s)| s > 0.0)
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked.truncate(self.recall_pin);
        ranked.into_iter().map(|(p, _)| p).collect()
    }

    /// Raises the cells holding `pins` above every unpinned score in each
    /// leader layer, so every reuse group keeps their chunks.
    fn pin_positions(
        &self,
        meta: &[Option<Pos>],
        importance: &mut [LayerImportance],
        pins: &[Pos],
    ) {
        let Some(&last) = pins.iter().max() else {
            return;
        };
        let mut pinned = vec![false; last.max(0) as usize + 1];
        for &p in pins.iter().filter(|&&p| p >= 0) {
            pinned[p as usize] = true;
        }
        let is_pinned = |p: Pos| usize::try_from(p).is_ok_and(|i| pinned.get(i) == Some(&true));
        let groups = self.groups.groups();
        importance.par_iter_mut().enumerate().for_each(|(g, imp)| {
            let Some(&leader) = groups.get(g).and_then(|group| group.first()) else {
                return;
            };
            for h in 0..imp.n_heads() {
                let hh = h.min(self.heads[leader].saturating_sub(1));
                for c in 0..meta.len().min(imp.n_cells()) {
                    if self
                        .slots
                        .position(leader, hh, c, meta)
                        .is_some_and(is_pinned)
                    {
                        imp.raise(h, c, PINNED);
                    }
                }
            }
        });
    }

    /// Raises every cell's score in each leader layer to the most any
    /// leader layer gave its position ([`Compressor::with_recall_unify`]).
    /// Layers in parallel: every cell of every leader layer and KV head.
    fn unify_groups(&self, meta: &[Option<Pos>], importance: &mut [LayerImportance]) {
        let cells = |g: usize, imp: &LayerImportance| {
            let leader = self.groups.groups()[g][0];
            let n = meta.len().min(imp.n_cells());
            (0..imp.n_heads()).flat_map(move |h| {
                let hh = h.min(self.heads[leader].saturating_sub(1));
                (0..n).filter_map(move |c| {
                    self.slots.position(leader, hh, c, meta).map(|p| (h, c, p))
                })
            })
        };
        let Some(best) = importance
            .par_iter()
            .enumerate()
            .map(|(g, imp)| BestByPosition::new(cells(g, imp).map(|(h, c, p)| (p, imp.head(h)[c]))))
            .reduce_with(BestByPosition::max)
        else {
            return;
        };
        importance.par_iter_mut().enumerate().for_each(|(g, imp)| {
            let raises: Vec<(usize, usize, f32)> = cells(g, imp)
                .map(|(h, c, p)| (h, c, best.get(p) - imp.head(h)[c]))
                .filter(|&(_, _, d)| d > 0.0)
                .collect();
            for (h, c, d) in raises {
                imp.raise(h, c, d);
            }
        });
    }

    /// Greedy reply tokens from `at` on, one decode each, while importance
    /// is on (each adds its row's attention), until `recall_probe` tokens,
    /// the end of the reply or of the free cells.
    fn draft_probe(&self, ctx: &mut Context<'_>, at: Pos) -> Result<(), DecodeError> {
        let free = ctx.seq_capacity().saturating_sub(ctx.seq_used(self.seq));
        let mut greedy = Sampler::new(&SamplingParams::greedy());
        for k in 0..self.recall_probe.min(free) {
            let tok = greedy.sample(ctx, -1);
            if ctx.model().is_eog(tok) {
                break;
            }
            ctx.decode_tokens(&[tok], at + k as Pos, self.seq, true)?;
        }
        Ok(())
    }

    /// Reconstruction scores of the leader layers, `head` being the fresh
    /// tokens just prefilled.
    fn reconstruct_scores(
        &self,
        ctx: &mut Context<'_>,
        head: &[Token],
    ) -> Result<Vec<LayerImportance>, CompressError> {
        let rec = self
            .reconstruction
            .as_ref()
            .ok_or_else(|| self.no_reconstruction())?;
        let mut every = vec![false; ctx.model().n_layer() as usize];
        for &il in &self.layers {
            every[il as usize] = true;
        }
        let all = rec.score(ctx, self.seq, head, &every)?;
        self.group_scores(&all)
    }

    /// One score per reuse group from reconstruction scores of every layer:
    /// the sum over the group's layers, filed under the leader. Reconstruction
    /// costs the same for every layer, and the first layers attend by
    /// position more than by content, so a leader alone would choose for its
    /// group from its own narrow view.
    fn group_scores(&self, all: &[LayerImportance]) -> Result<Vec<LayerImportance>, CompressError> {
        let of = |il: u32| {
            all.iter()
                .find(|s| s.layer == il)
                .ok_or(CompressError::NoImportance(il))
        };
        self.groups
            .groups()
            .iter()
            .map(|group| {
                let leader = self.layers[group[0]];
                let mut sum = of(leader)?.clone();
                for &l in &group[1..] {
                    sum.add(of(self.layers[l])?);
                }
                Ok(sum)
            })
            .collect()
    }

    /// The host side of one compression, on cells whose positions are `meta`
    /// (`None`: empty) and scores `importance` (one per reuse group's leader,
    /// by cell), the last window of positions kept whole: the positions each
    /// storage layer and KV head would keep, in slot order (`-1`: a dead
    /// slot). Nothing is moved.
    pub fn plan(
        &self,
        meta: &[Option<Pos>],
        importance: &[LayerImportance],
        n_keep: usize,
    ) -> Result<Vec<Vec<Vec<Pos>>>, CompressError> {
        let keep = Keep {
            from: meta.iter().flatten().max().map_or(Pos::MAX, |&p| p + 1) - self.window as Pos,
            history: false,
            short: false,
            recall: false,
        };
        Ok(self.select(meta, importance, keep, n_keep)?.kept_pos)
    }

    fn no_reconstruction(&self) -> CompressError {
        CompressError::Config(format!(
            "{} scores by context reconstruction, which this compressor was not given \
             (Compressor::with_reconstruction)",
            self.policy.name()
        ))
    }

    /// Selects with `importance` (one entry per leader layer, by cell) and
    /// compacts; returns the milliseconds of each.
    fn select_and_compact(
        &mut self,
        ctx: &mut Context<'_>,
        importance: &[LayerImportance],
        keep: Keep,
        n_keep: usize,
    ) -> Result<(f64, f64), CompressError> {
        let t_sel = Instant::now();
        let meta = ctx.kv_cell_positions(KvPart::Base, self.seq);
        let sel = self.select(&meta, importance, keep, n_keep)?;
        let select_ms = t_sel.elapsed().as_secs_f64() * 1e3;

        // Recall keeps what this compaction is about to free.
        let t_capture = Instant::now();
        let mut bytes_down = 0;
        if self.recall_on() {
            let evicted = self.evicted(&meta, &sel, importance);
            let captured = match self.recall.as_mut() {
                Some(store) => store.capture(ctx, self.seq, &evicted),
                None => Ok(0),
            };
            match captured {
                Ok(b) => bytes_down = b,
                Err(e) => self.drop_recall(&e),
            }
        }
        let capture_ms = t_capture.elapsed().as_secs_f64() * 1e3;

        let t_compact = Instant::now();
        // Slot metadata (one position per slot, for the causal mask) comes
        // from a layer that fills every slot.
        let widest = (0..sel.live.len())
            .max_by_key(|&l| (sel.live[l], std::cmp::Reverse(l)))
            .unwrap_or(0);
        let n_slots = sel.live[widest];
        let slot_pos: Vec<Pos> = sel.kept_pos[widest][0].clone();
        ctx.kv_compact(KvPart::Base, self.seq, &sel.src, &slot_pos)?;
        let dead: Vec<DeadSlots> = (0..sel.live.len())
            .filter(|&l| sel.live[l] < n_slots)
            .map(|l| DeadSlots {
                layer: self.layers[l],
                begin: sel.live[l] as u32,
                end: n_slots as u32,
            })
            .collect();
        ctx.set_dead_slots(&dead)?;
        self.slots.replace(sel.kept_pos);
        if self.recall.is_some() {
            if self.recalling.is_none() {
                // A compaction without rows brought back (a document's): still report its capture.
                self.recalling = Some(Recalling {
                    positions: Vec::new(),
                    stats: RecallTurn::default(),
                });
            }
            let transient = meta.iter().filter(|m| m.is_some()).count() as u32;
            self.recall_finish(transient, bytes_down, capture_ms);
        }
        Ok((select_ms, t_compact.elapsed().as_secs_f64() * 1e3))
    }

    /// Per storage layer and KV head: the (cell, position, score) of every
    /// token the selection drops that the store does not hold yet.
    fn evicted(
        &self,
        meta: &[Option<Pos>],
        sel: &Selection,
        importance: &[LayerImportance],
    ) -> Vec<Vec<Vec<Evicted>>> {
        let Some(store) = self.recall.as_ref() else {
            return Vec::new();
        };
        let mut group_of = vec![0; self.layers.len()];
        for (g, group) in self.groups.groups().iter().enumerate() {
            for &l in group {
                group_of[l] = g;
            }
        }
        // Layers are independent: one per core (a walk over every cell of
        // every layer and head, with two set lookups each).
        let layers: Vec<usize> = (0..self.layers.len()).collect();
        par_map(&layers, |_, &l| {
            (0..self.heads[l])
                .map(|h| {
                    let kept: std::collections::HashSet<Pos> =
                        sel.kept_pos[l][h].iter().copied().collect();
                    let score = |c: usize| {
                        importance
                            .get(group_of[l])
                            .and_then(|imp| imp.get(h, c))
                            .unwrap_or(0.0)
                    };
                    (0..meta.len())
                        .filter_map(|c| {
                            let p = self.slots.position(l, h, c, meta)?;
                            (!kept.contains(&p) && !store.contains(l, h, p))
                                .then(|| (c, p, score(c)))
                        })
                        .collect()
                })
                .collect()
        })
    }

    fn leader_flags(&self, ctx: &Context<'_>) -> Vec<bool> {
        let mut flags = vec![false; ctx.model().n_layer() as usize];
        for il in self.leader_layers() {
            flags[il as usize] = true;
        }
        flags
    }

    /// Chooses the kept cells of every storage layer and head.
    fn select(
        &self,
        meta: &[Option<Pos>],
        importance: &[LayerImportance],
        keep: Keep,
        n_keep: usize,
    ) -> Result<Selection, CompressError> {
        let used: Vec<usize> = (0..meta.len()).filter(|&c| meta[c].is_some()).collect();
        // The window is the freshest tokens: the same cells in every layer.
        let in_window = |c: usize| !self.slots.is_compacted(c) && meta[c] >= Some(keep.from);
        let (mut window, candidates): (Vec<usize>, Vec<usize>) =
            used.iter().partition(|&&c| in_window(c));
        // Kept history: the slots of earlier compactions stay as they are.
        let (locked, candidates): (Vec<usize>, Vec<usize>) = candidates
            .iter()
            .partition(|&&c| keep.history && self.slots.is_compacted(c));
        window.sort_by_key(|&c| meta[c]);
        // A budget smaller than the window keeps its most recent part.
        let w_keep = window.len().min(n_keep);
        let window = &window[window.len() - w_keep..];
        let n_select = n_keep
            .saturating_sub(w_keep + locked.len())
            .min(candidates.len());

        let groups = self.groups.groups();
        // Reuse groups are independent: their candidates and picks are built on
        // all cores (16 leaders × 8 heads × 128k tokens on the H200 host).
        let cands: Vec<LayerCandidates> = par_map(groups, |g, group| {
            self.candidates(group[0], &candidates, meta, importance.get(g))
        });
        // Layers of an earlier per-layer compaction may hold fewer live candidates.
        let n_cand = cands
            .iter()
            .map(|c| c.heads.iter().map(HeadCandidates::len).min().unwrap_or(0))
            .min()
            .unwrap_or(0);
        let counts = self.policy.layer_counts(groups.len(), n_select, n_cand);

        let chosen = par_map(groups, |g, group| {
            let cands = &cands[g];
            let leader = group[0];
            let picks = self.policy.select(cands, counts[g].min(n_cand));
            let mut out = Vec::with_capacity(group.len());
            for &l in group {
                let mut layer_src: Vec<Vec<i32>> = Vec::with_capacity(self.heads[l]);
                let mut layer_pos: Vec<Vec<Pos>> = Vec::with_capacity(self.heads[l]);
                for h in 0..self.heads[l] {
                    // A head holding what head 0 holds, given what head 0 was
                    // given, keeps what head 0 keeps (every head, for ChunkKV).
                    let hp = h.min(picks.len() - 1);
                    let hc = h.min(cands.heads.len() - 1);
                    if h > 0
                        && self.slots.heads_agree(l, 0, h)
                        && picks[hp] == picks[0]
                        && Arc::ptr_eq(&cands.heads[hc].cell, &cands.heads[0].cell)
                    {
                        layer_src.push(layer_src[0].clone());
                        layer_pos.push(layer_pos[0].clone());
                        continue;
                    }
                    let head = &cands.heads[hc];
                    let pick = &picks[hp];
                    let mut cells: Vec<usize> = if self.slots.same_positions(l, leader, h) {
                        pick.iter().map(|&i| head.cell[i]).collect()
                    } else {
                        let want: Vec<Pos> = pick.iter().map(|&i| head.pos[i]).collect();
                        self.cells_holding(l, h, &want, &candidates, meta)
                    };
                    cells.extend(
                        locked
                            .iter()
                            .copied()
                            .filter(|&c| self.slots.position(l, h, c, meta).is_some()),
                    );
                    cells.extend(window.iter().copied());
                    let mut pairs: Vec<(Pos, usize)> = cells
                        .iter()
                        .map(|&c| (self.slots.position(l, h, c, meta).unwrap_or(Pos::MAX), c))
                        .collect();
                    pairs.sort_unstable();
                    layer_src.push(pairs.iter().map(|&(_, c)| c as i32).collect());
                    layer_pos.push(pairs.iter().map(|&(p, _)| p).collect());
                }
                out.push((l, layer_src, layer_pos));
            }
            out
        });
        let mut src = vec![Vec::new(); self.layers.len()];
        let mut kept_pos: Vec<Vec<Vec<Pos>>> = vec![Vec::new(); self.layers.len()];
        let mut live = vec![0; self.layers.len()];
        for (l, layer_src, layer_pos) in chosen.into_iter().flatten() {
            live[l] = layer_src[0].len();
            src[l] = layer_src;
            kept_pos[l] = layer_pos;
        }
        // Every layer gets the same slot count: the short ones pad with a
        // copy of a kept cell at position -1, masked out of their attention.
        let n_slots = live.iter().copied().max().unwrap_or(0);
        for l in 0..self.layers.len() {
            for (s, p) in src[l].iter_mut().zip(kept_pos[l].iter_mut()) {
                let fill = s[0];
                s.resize(n_slots, fill);
                p.resize(n_slots, DEAD);
            }
        }
        Ok(Selection {
            src,
            kept_pos,
            live,
        })
    }

    /// The leader's candidates per head, in position order, with chunk ids:
    /// slots of an earlier compaction chunk by slot index, fresh tokens by position.
    fn candidates(
        &self,
        leader: usize,
        cells: &[usize],
        meta: &[Option<Pos>],
        imp: Option<&LayerImportance>,
    ) -> LayerCandidates {
        let chunk_size = self.policy.chunk_size().max(1);
        let sentences = self.policy.chunking() == Chunking::Sentences;
        let sinks = Pos::try_from(self.policy.sinks()).unwrap_or(Pos::MAX);
        // With recall, kept and recalled rows interleave by position: chunks
        // follow positions everywhere, as they did when first selected.
        let by_position = self.recall_on();
        let mut heads: Vec<HeadCandidates> = Vec::with_capacity(self.heads[leader]);
        for h in 0..self.heads[leader] {
            // Heads holding the same positions (always, for ChunkKV) share one ordering.
            if h > 0 && self.slots.heads_agree(leader, 0, h) {
                let first = &heads[0];
                let s = imp.map(|imp| imp.head(h));
                let score = first
                    .cell
                    .iter()
                    .map(|&c| s.map_or(0.0, |s| s[c]))
                    .collect();
                heads.push(HeadCandidates {
                    score,
                    ..first.clone()
                });
                continue;
            }
            let s = imp.map(|imp| imp.head(h));
            heads.push({
                let mut items: Vec<(Pos, usize)> = cells
                    .iter()
                    .filter_map(|&c| self.slots.position(leader, h, c, meta).map(|p| (p, c)))
                    .collect();
                items.sort_unstable();
                let (mut pos, mut cell, mut chunk, mut score) = (
                    Vec::with_capacity(items.len()),
                    Vec::with_capacity(items.len()),
                    Vec::with_capacity(items.len()),
                    Vec::with_capacity(items.len()),
                );
                let mut last: Option<(Pos, usize)> = None;
                let mut run = 0;
                let mut id = 0u32;
                for &(p, c) in &items {
                    let compacted = self.slots.is_compacted(c) && !by_position;
                    let new_chunk = last.is_some_and(|(lp, lc)| {
                        if compacted != (self.slots.is_compacted(lc) && !by_position) {
                            return true;
                        }
                        // Slots of an earlier compaction: by slot index.
                        if compacted {
                            return c / chunk_size != lc / chunk_size;
                        }
                        if sentences && self.sentences.known(p) {
                            return lp + 1 != p || self.sentences.ends(lp) || run >= 2 * chunk_size;
                        }
                        p as usize / chunk_size != lp as usize / chunk_size
                    });
                    if new_chunk {
                        id += 1;
                        run = 0;
                    }
                    run += 1;
                    last = Some((p, c));
                    pos.push(p);
                    cell.push(c);
                    chunk.push(id);
                    score.push(if p < sinks {
                        SINK
                    } else {
                        s.map_or(0.0, |s| s[c])
                    });
                }
                HeadCandidates {
                    pos: pos.into(),
                    score,
                    chunk: chunk.into(),
                    cell: cell.into(),
                }
            });
        }
        LayerCandidates {
            layer: self.layers[leader],
            heads,
        }
    }

    /// Cells of storage layer `l`, head `h` holding the positions `want`.
    /// A follower that no longer holds some of them (its history was
    /// compacted under other reuse groups, after `/method` switched) takes
    /// the nearest positions it does hold instead, so it keeps as many.
    fn cells_holding(
        &self,
        l: usize,
        h: usize,
        want: &[Pos],
        candidates: &[usize],
        meta: &[Option<Pos>],
    ) -> Vec<usize> {
        let held: BTreeMap<Pos, usize> = candidates
            .iter()
            .filter_map(|&c| self.slots.position(l, h, c, meta).map(|p| (p, c)))
            .collect();
        let mut free = held.clone();
        let mut out: Vec<usize> = want.iter().filter_map(|p| free.remove(p)).collect();
        for p in want.iter().filter(|p| !held.contains_key(p)) {
            let below = free.range(..*p).next_back().map(|(&q, _)| q);
            let above = free.range(*p..).next().map(|(&q, _)| q);
            let nearest = match (below, above) {
                (Some(b), Some(a)) => Some(if p - b <= a - p { b } else { a }),
                (b, a) => b.or(a),
            };
            if let Some(q) = nearest {
                out.extend(free.remove(&q));
            }
        }
        out
    }
}

/// `keep` that also keeps the token at `last` (and any fresh one after it):
/// llama.cpp accepts new tokens only right after the highest position a
/// sequence holds, so the token before a window decoded after compaction stays.
fn keep_last(keep: Keep, last: Pos) -> Keep {
    Keep {
        from: keep.from.min(last),
        ..keep
    }
}

/// Statistics of a cache as they would be with `w` more cells in use (the
/// window that reconstruction scoring decodes after compaction).
fn with_window(s: crate::llama::KvStats, w: usize) -> crate::llama::KvStats {
    let per_cell = s.bytes_allocated / u64::from(s.size.max(1));
    let cells = s.cells_used + w as u32;
    crate::llama::KvStats {
        cells_used: cells,
        bytes_live: s.bytes_live + per_cell * w as u64,
        // llama.cpp's attention width: used cells padded to 256, within the cache.
        attn_width: (cells.div_ceil(256) * 256).clamp(256.min(s.size), s.size),
        ..s
    }
}

/// `f` over `items` on rayon's pool, results in order. The pool's threads
/// (one per core) outlive the call: spawning a dozen scoped threads cost
/// about 0.4 ms per call, twice per compression.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(usize, &T) -> R + Sync + Send) -> Vec<R> {
    items.par_iter().enumerate().map(|(i, t)| f(i, t)).collect()
}

/// Milliseconds from `a` to `b`, for the phase logs.
fn ms(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64() * 1e3
}

fn stats(ctx: &Context<'_>, seq: SeqId) -> Result<crate::llama::KvStats, CompressError> {
    ctx.seq_kv_stats(KvPart::Base, seq)
        .ok_or_else(|| CompressError::Unsupported("the context has no attention KV cache".into()))
}

/// The highest score each position got among `scores` (layer groups rank
/// the same positions differently), indexed by position: positions are a
/// conversation's token indices, dense from 0, and a flat array looks them
/// up far faster than a hash map over a long document's rows.
struct BestByPosition(Vec<f32>);

impl BestByPosition {
    fn new(scores: impl Iterator<Item = (Pos, f32)>) -> Self {
        let mut best: Vec<f32> = Vec::new();
        for (p, s) in scores {
            let i = p.max(0) as usize;
            if i >= best.len() {
                best.resize(i + 1, f32::NEG_INFINITY);
            }
            best[i] = best[i].max(s);
        }
        Self(best)
    }

    /// Each position's best of both.
    fn max(self, other: Self) -> Self {
        let (mut long, short) = if self.0.len() >= other.0.len() {
            (self, other)
        } else {
            (other, self)
        };
        for (a, b) in long.0.iter_mut().zip(short.0) {
            *a = a.max(b);
        }
        long
    }

    /// The best score of a position that was among the scores.
    fn get(&self, p: Pos) -> f32 {
        self.0[p.max(0) as usize]
    }

    /// Every position that was among the scores, with its best, in order.
    fn iter(&self) -> impl Iterator<Item = (Pos, f32)> + '_ {
        (0..)
            .zip(self.0.iter().copied())
            .filter(|&(_, s)| s > f32::NEG_INFINITY)
    }
}

/// The `n` positions of the best chunks (`chunk` positions each, ranked by
/// their summed scores after `trail`; ties go to the earlier chunk), the
/// last chunk cut to fit (its earliest positions kept). One sort and flat
/// runs: a 32k-token document holds about 29k rows per layer.
fn top_chunks(mut rows: Vec<(Pos, f32)>, n: usize, chunk: Pos, trail: usize) -> Vec<Pos> {
    rows.sort_unstable_by_key(|&(p, _)| p);
    if trail > 0 {
        let (pos, score): (Vec<Pos>, Vec<f32>) = rows.iter().copied().unzip();
        let carried = super::chunkkv::trail_max(&score, &pos, trail);
        for (r, c) in rows.iter_mut().zip(carried) {
            r.1 = c;
        }
    }
    // (summed score, first row, end row) of each chunk, in position order.
    let mut runs: Vec<(f32, usize, usize)> = Vec::new();
    for (i, &(p, s)) in rows.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if rows[run.1].0 / chunk == p / chunk => {
                run.0 += s;
                run.2 = i + 1;
            }
            _ => runs.push((s, i, i + 1)),
        }
    }
    // Stable: equal sums keep position order.
    runs.sort_by(|a, b| b.0.total_cmp(&a.0));
    runs.iter()
        .flat_map(|&(_, a, b)| rows[a..b].iter().map(|r| r.0))
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks rank by their summed scores whatever order the rows come in;
    /// equal sums go to the earlier chunk; the last chunk is cut to fit.
    #[test]
    fn top_chunks_ranks_whole_chunks_by_summed_score() {
        // Chunks of 4: 0..4 sums 4, 4..8 sums 8, 8..12 sums 4, 12..14 (two rows) sums 10.
        let mut rows: Vec<(Pos, f32)> = (0..12)
            .map(|p| (p, if (4..8).contains(&p) { 2.0 } else { 1.0 }))
            .collect();
        rows.extend([(12, 5.0), (13, 5.0)]);
        rows.reverse();
        assert_eq!(top_chunks(rows.clone(), 6, 4, 0), vec![12, 13, 4, 5, 6, 7]);
        // The tie between chunks 0 and 2 goes to chunk 0, cut to two rows.
        assert_eq!(top_chunks(rows, 8, 4, 0), vec![12, 13, 4, 5, 6, 7, 0, 1]);
    }

    /// With `trail`, a row scores at least the best of the rows up to
    /// `trail` positions before it, so a peak lifts the chunk after it.
    #[test]
    fn top_chunks_carries_peaks_forward_by_trail() {
        let mut rows: Vec<(Pos, f32)> = (0..8).map(|p| (p, 0.0)).collect();
        rows[3].1 = 10.0;
        rows[6].1 = 3.0;
        // Without trail chunk 0 (10) beats chunk 1 (3); with a trail of 2,
        // positions 4 and 5 carry the 10, 6 and 7 the 3: chunk 1 sums 26 against 10.
        assert_eq!(top_chunks(rows.clone(), 4, 4, 0), vec![0, 1, 2, 3]);
        assert_eq!(top_chunks(rows, 4, 4, 2), vec![4, 5, 6, 7]);
    }

    #[test]
    fn best_by_position_keeps_each_positions_maximum() {
        let best =
            BestByPosition::new([(3, 1.0), (0, -2.0), (3, 4.0), (1, 0.5), (3, 2.0)].into_iter());
        assert_eq!(best.get(3), 4.0);
        assert_eq!(best.get(0), -2.0);
        assert_eq!(best.get(1), 0.5);
        assert_eq!(
            best.iter().collect::<Vec<_>>(),
            vec![(0, -2.0), (1, 0.5), (3, 4.0)]
        );
    }

    #[test]
    fn best_by_position_merges_layers_by_each_positions_maximum() {
        let a = || BestByPosition::new([(0, -2.0), (1, 0.5), (3, 4.0)].into_iter());
        let b = || BestByPosition::new([(1, 3.0), (0, -5.0), (5, 1.0)].into_iter());
        // Either order, either length first: the same merge.
        for merged in [a().max(b()), b().max(a())] {
            assert_eq!(
                merged.iter().collect::<Vec<_>>(),
                vec![(0, -2.0), (1, 3.0), (3, 4.0), (5, 1.0)]
            );
        }
    }
}
