//! Recall: the rows a compaction evicts are kept off the device, in the
//! cache's own type (quantized blocks as they are), in host memory or a file,
//! so a later turn that needs an evicted chunk can bring it back instead of
//! the conversation forgetting it.
//!
//! The store is keyed by (storage layer, KV head, position): after ChunkKV
//! the layer groups keep different chunks, so each layer evicts its own.
//! Rows only ever enter it (a position's K and V never change), which makes
//! a mark-and-roll-back snapshot cheap: eval asks every question from the
//! same state.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::llama::{
    mib, Backend, Context, HostBuffer, KvLayerLayout, KvPart, Pos, RowsError, SeqId,
};

/// Most bytes of staging kept between transfers: a capture of a long chat's
/// whole cache is not worth holding on to.
const KEPT_STAGING: usize = 256 << 20;

/// Where captures read rows and uploads gather them: one buffer for the
/// process (compressions run one at a time), grown as needed, in the GPU's
/// pinned host memory when there is one.
static STAGING: Mutex<Staging> = Mutex::new(Staging {
    pinned: None,
    heap: Vec::new(),
    no_pinned: false,
});

/// Staging memory for recall's transfers: pinned when the GPU offers it,
/// else ordinary.
struct Staging {
    pinned: Option<HostBuffer>,
    heap: Vec<u8>,
    /// No pinned memory was to be had: do not ask again.
    no_pinned: bool,
}

impl Staging {
    /// `len` bytes to gather into (contents unspecified).
    fn take(&mut self, len: usize) -> &mut [u8] {
        if !self.no_pinned && self.pinned.as_ref().is_none_or(|b| b.len() < len) {
            // Grown by half again, so a slowly rising need does not reallocate
            // (pinning pages costs about as much as copying them).
            let want = len + len / 2;
            // The old buffer goes first: the two are never pinned at once.
            self.pinned = None;
            self.pinned = HostBuffer::for_gpu(Backend::init(), want);
            self.no_pinned = self.pinned.is_none();
            if let Some(b) = &self.pinned {
                tracing::debug!(
                    "recall staging: {:.1} MiB of pinned host memory",
                    mib(b.len() as u64)
                );
            }
        }
        match self.pinned.as_mut() {
            Some(b) => &mut b.as_mut_slice()[..len],
            None => {
                if self.heap.len() < len {
                    self.heap.resize(len, 0);
                }
                &mut self.heap[..len]
            }
        }
    }

    /// Frees a buffer grown past [`KEPT_STAGING`].
    fn trim(&mut self) {
        if self.pinned.as_ref().is_some_and(|b| b.len() > KEPT_STAGING) {
            self.pinned = None;
        }
        if self.heap.len() > KEPT_STAGING {
            self.heap = Vec::new();
        }
    }
}

/// Cuts `buf` into one (K, V) pair of slices per `(k_len, v_len)` of `sizes`,
/// back to back: each layer's rows as one transfer moves them.
fn split_layers(
    mut buf: &mut [u8],
    sizes: impl IntoIterator<Item = (usize, usize)>,
) -> Vec<(&mut [u8], &mut [u8])> {
    let mut parts = Vec::new();
    for (k_len, v_len) in sizes {
        let (k, tail) = std::mem::take(&mut buf).split_at_mut(k_len);
        let (v, tail) = tail.split_at_mut(v_len);
        parts.push((k, v));
        buf = tail;
    }
    parts
}

/// A row about to be evicted: its cell, position and importance.
pub type Evicted = (usize, Pos, f32);

/// `--kv-recall`: where evicted rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecallMode {
    /// Evicted rows are dropped.
    #[default]
    Off,
    /// Evicted rows are kept in host memory.
    Host,
    /// Evicted rows are kept in a file under `--kv-recall-dir` (histories larger than RAM).
    Disk,
}

#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    #[error("recall file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "recall file {path} is corrupt: the rows of position {pos} (storage layer {layer}, \
         KV head {head}) are not what was written"
    )]
    Corrupt {
        path: PathBuf,
        layer: usize,
        head: usize,
        pos: Pos,
    },
    #[error("recall cannot read or write the cache: {0}")]
    Rows(#[from] RowsError),
    #[error("recall is not supported here: {0}")]
    Unsupported(String),
}

/// What recall did during one turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecallTurn {
    /// Evicted cells written back for scoring, per storage layer.
    pub uploaded: usize,
    /// Of those, the tokens the turn's compression kept (mean over layers).
    pub tokens: usize,
    /// The same in chunks (distinct chunks of layer-mean size).
    pub chunks: usize,
    /// Bytes written to the device for scoring.
    pub bytes_up: u64,
    /// Bytes read from the device into the store (newly evicted rows).
    pub bytes_down: u64,
    /// Milliseconds spent moving rows (both ways) and ranking them.
    pub ms: f64,
    /// Of `ms`: ranking held rows the free cells could not take at once
    /// (batches written back and scored by the turn's window).
    #[serde(default)]
    pub rank_ms: f64,
    /// Of `rank_ms`: where ranking's time went (the server's log shows it).
    #[serde(default)]
    pub rank: RankMs,
    /// Cells the sequence held at the turn's peak (before its compaction).
    pub transient_cells: u32,
}

/// Where one turn's ranking spent its time, over all its passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RankMs {
    /// Batches of held rows written back and scored.
    pub passes: usize,
    /// Gathering the batches' rows on the host and writing them to the device.
    pub upload: f64,
    /// Decoding the window over each batch.
    pub decode: f64,
    /// Reading the leaders' scores back.
    pub read: f64,
}

/// Entries of one (storage layer, KV head).
#[derive(Debug, Default)]
struct HeadRows {
    index: HashMap<Pos, u32>,
    /// Insertion order (for roll-back).
    pos: Vec<Pos>,
    /// The importance the row had when it was evicted (ranks uploads when
    /// the free cells cannot take them all).
    score: Vec<f32>,
    /// Host: the records, back to back.
    data: Vec<u8>,
    /// Disk: each record's offset in the file and checksum.
    at: Vec<u64>,
    sum: Vec<u64>,
}

impl HeadRows {
    /// Records that position `p` (evicted with `score`) is the next entry.
    fn enter(&mut self, p: Pos, score: f32) {
        self.index.insert(p, self.pos.len() as u32);
        self.pos.push(p);
        self.score.push(score);
    }
}

#[derive(Debug)]
struct LayerRows {
    layout: KvLayerLayout,
    heads: Vec<HeadRows>,
}

impl LayerRows {
    /// Bytes of one record: a KV head's K row, then its V row.
    fn record(&self) -> usize {
        self.layout.k_head_bytes + self.layout.v_head_bytes
    }

    /// Bytes of `n` cells' K rows and V rows on the device.
    fn device_bytes(&self, n: usize) -> (usize, usize) {
        let lay = self.layout;
        (
            n * lay.n_head_kv * lay.k_head_bytes,
            n * lay.n_head_kv * lay.v_head_bytes,
        )
    }

    /// Appends the records of `heads`' entries not held yet to host memory;
    /// returns the bytes added.
    fn keep_in_memory(&mut self, read: &LayerRead<'_>, heads: &[Vec<Evicted>]) -> u64 {
        let lay = self.layout;
        let size = self.record();
        let mut added = 0u64;
        for (h, (head, entries)) in self.heads.iter_mut().zip(heads).enumerate() {
            head.data.reserve(entries.len() * size);
            for &(c, p, score) in entries {
                if head.index.contains_key(&p) {
                    continue;
                }
                let at = head.data.len();
                head.data.resize(at + size, 0);
                read.record(&lay, c, h, &mut head.data[at..]);
                head.enter(p, score);
                added += size as u64;
            }
        }
        added
    }
}

/// Storage layer rows read from the device for one capture: K rows from
/// cell `lo` on, V rows from cell `v_lo` on (or the whole transposed V).
struct LayerRead<'a> {
    k: &'a [u8],
    lo: usize,
    v: &'a [u8],
    v_lo: usize,
}

impl LayerRead<'_> {
    /// Cell `c`, KV head `h`'s record (K row, then V row) into `out`.
    fn record(&self, lay: &KvLayerLayout, c: usize, h: usize, out: &mut [u8]) {
        let ko = ((c - self.lo) * lay.n_head_kv + h) * lay.k_head_bytes;
        out[..lay.k_head_bytes].copy_from_slice(&self.k[ko..ko + lay.k_head_bytes]);
        fill_v(lay, self.v, self.v_lo, c, h, &mut out[lay.k_head_bytes..]);
    }
}

/// Where one layer's capture reads: K bytes from `k_at` (cell `lo` on), V
/// bytes from `v_at` (cell `v_lo` on).
#[derive(Debug, Clone, Copy)]
struct ReadSpan {
    lo: usize,
    k_at: usize,
    k_len: usize,
    v_lo: usize,
    v_at: usize,
    v_len: usize,
}

#[derive(Debug)]
struct DiskFile {
    path: PathBuf,
    file: File,
    /// Length including `pending`.
    len: u64,
    /// Records not yet written (one write per capture, not per record).
    pending: Vec<u8>,
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A snapshot to roll the store back to ([`RecallStore::rollback`]).
#[derive(Debug, Clone)]
pub struct StoreMark {
    lens: Vec<Vec<usize>>,
    file_len: u64,
}

/// Evicted rows of one sequence's cache, off the device.
#[derive(Debug)]
pub struct RecallStore {
    layers: Vec<LayerRows>,
    disk: Option<DiskFile>,
    bytes: u64,
}

impl RecallStore {
    /// An empty store for `seq`'s cache in `ctx`; `dir` makes it file-backed.
    pub fn new(
        ctx: &Context<'_>,
        seq: SeqId,
        dir: Option<&Path>,
    ) -> Result<RecallStore, RecallError> {
        let n_layers = ctx.kv_layers(KvPart::Base).len();
        let mut layers = Vec::with_capacity(n_layers);
        for idx in 0..n_layers {
            let layout = ctx.kv_layer_layout(KvPart::Base, seq, idx).ok_or_else(|| {
                RecallError::Unsupported(format!("no layout for storage layer {idx}"))
            })?;
            if layout.v_trans && layout.v_head_bytes % layout.head_dim_v.max(1) != 0 {
                return Err(RecallError::Unsupported(
                    "a transposed V whose elements are not whole bytes".into(),
                ));
            }
            let heads = (0..layout.n_head_kv).map(|_| HeadRows::default()).collect();
            layers.push(LayerRows { layout, heads });
        }
        if layers.is_empty() {
            return Err(RecallError::Unsupported(
                "the context has no attention KV cache".into(),
            ));
        }
        let disk = match dir {
            None => None,
            Some(dir) => Some(DiskFile::create(dir, seq)?),
        };
        Ok(RecallStore {
            layers,
            disk,
            bytes: 0,
        })
    }

    /// The file backing the store, if any.
    pub fn path(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.path.as_path())
    }

    /// Bytes of rows held (in memory or in the file).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether storage layer `l`, head `h` holds position `p`.
    pub fn contains(&self, l: usize, h: usize, p: Pos) -> bool {
        self.layers[l].heads[h].index.contains_key(&p)
    }

    /// Positions held for storage layer `l`, head `h` with their eviction scores.
    pub fn entries(&self, l: usize, h: usize) -> impl Iterator<Item = (Pos, f32)> + '_ {
        let head = &self.layers[l].heads[h];
        head.pos.iter().copied().zip(head.score.iter().copied())
    }

    /// Bytes of one cell's rows over all KV heads of storage layer `l`.
    pub fn cell_bytes(&self, l: usize) -> u64 {
        (self.layers[l].record() * self.layers[l].layout.n_head_kv) as u64
    }

    pub fn mark(&self) -> StoreMark {
        StoreMark {
            lens: self
                .layers
                .iter()
                .map(|l| l.heads.iter().map(|h| h.pos.len()).collect())
                .collect(),
            file_len: self.disk.as_ref().map_or(0, |d| d.len),
        }
    }

    /// Forgets every row added since `mark`.
    pub fn rollback(&mut self, mark: &StoreMark) -> Result<(), RecallError> {
        for (layer, lens) in self.layers.iter_mut().zip(&mark.lens) {
            let rec = layer.record();
            for (head, &n) in layer.heads.iter_mut().zip(lens) {
                for p in head.pos.drain(n.min(head.pos.len())..) {
                    head.index.remove(&p);
                    self.bytes -= rec as u64;
                }
                head.score.truncate(n);
                head.at.truncate(n);
                head.sum.truncate(n);
                head.data.truncate(n * rec);
            }
        }
        if let Some(d) = self.disk.as_mut() {
            d.flush()?;
            d.file.set_len(mark.file_len).map_err(|e| d.io(e))?;
            d.len = mark.file_len;
        }
        Ok(())
    }

    /// Forgets everything (the cache was cleared).
    pub fn clear(&mut self) -> Result<(), RecallError> {
        let empty = StoreMark {
            lens: self.layers.iter().map(|l| vec![0; l.heads.len()]).collect(),
            file_len: 0,
        };
        self.rollback(&empty)
    }

    /// Copies the rows of `evicted[l][h]` — (cell, position, score) of
    /// storage layer `l`, head `h`, not yet held — out of `seq`'s stream
    /// before a compaction frees them. Returns the bytes read from the device.
    pub fn capture(
        &mut self,
        ctx: &Context<'_>,
        seq: SeqId,
        evicted: &[Vec<Vec<Evicted>>],
    ) -> Result<u64, RecallError> {
        // The device reads go one after another (one context), into the
        // staging buffer (pinned on a GPU: twice the rate of pageable
        // memory); the records are then built layer by layer on all cores
        // when they stay in memory.
        let spans: Vec<Option<ReadSpan>> = evicted
            .iter()
            .enumerate()
            .map(|(l, heads)| self.read_span(l, heads))
            .collect();
        let total: usize = spans.iter().flatten().map(|s| s.k_len + s.v_len).sum();
        let mut staging = STAGING.lock().unwrap_or_else(|e| e.into_inner());
        let sizes = spans.iter().flatten().map(|s| (s.k_len, s.v_len));
        let mut parts = split_layers(staging.take(total), sizes).into_iter();
        let mut reads: Vec<Option<LayerRead<'_>>> = Vec::with_capacity(spans.len());
        for (l, span) in spans.iter().enumerate() {
            let Some(s) = *span else {
                reads.push(None);
                continue;
            };
            let (k, v) = parts.next().expect("split_layers cuts one part per span");
            ctx.kv_read(KvPart::Base, seq, l, false, s.k_at, k)?;
            if !v.is_empty() {
                ctx.kv_read(KvPart::Base, seq, l, true, s.v_at, v)?;
            }
            reads.push(Some(LayerRead {
                k,
                lo: s.lo,
                v,
                v_lo: s.v_lo,
            }));
        }
        let kept = self.keep(&reads, evicted);
        drop(reads);
        staging.trim();
        kept.map(|()| total as u64)
    }

    /// The records of `evicted`'s entries not held yet, from `reads` (`None`:
    /// nothing was read for that layer): in memory, layer by layer on all
    /// cores; on disk, appended in order.
    fn keep(
        &mut self,
        reads: &[Option<LayerRead<'_>>],
        evicted: &[Vec<Vec<Evicted>>],
    ) -> Result<(), RecallError> {
        if self.disk.is_none() {
            use rayon::prelude::*;
            let added: u64 = self
                .layers
                .par_iter_mut()
                .zip(reads.par_iter())
                .zip(evicted.par_iter())
                .map(|((layer, read), heads)| {
                    read.as_ref()
                        .map_or(0, |read| layer.keep_in_memory(read, heads))
                })
                .sum();
            self.bytes += added;
            return Ok(());
        }
        for (l, (r, heads)) in reads.iter().zip(evicted).enumerate() {
            let Some(r) = r else { continue };
            let lay = self.layers[l].layout;
            let mut record = vec![0u8; self.layers[l].record()];
            for (h, entries) in heads.iter().enumerate() {
                for &(c, p, score) in entries {
                    if self.contains(l, h, p) {
                        continue;
                    }
                    r.record(&lay, c, h, &mut record);
                    self.append_to_file(l, h, p, score, &record);
                }
            }
        }
        if let Some(d) = self.disk.as_mut() {
            d.flush()?;
        }
        Ok(())
    }

    /// Where storage layer `l`'s K rows (and V rows, or the whole
    /// transposed V) spanning the cells of `heads`' entries lie; `None` when
    /// there are none.
    fn read_span(&self, l: usize, heads: &[Vec<Evicted>]) -> Option<ReadSpan> {
        let (lo, hi) = heads.iter().flatten().map(|&(c, _, _)| c).fold(
            None,
            |acc: Option<(usize, usize)>, c| {
                Some(acc.map_or((c, c), |(a, b)| (a.min(c), b.max(c))))
            },
        )?;
        let lay = self.layers[l].layout;
        let k_row = lay.k_head_bytes * lay.n_head_kv;
        let v_row = lay.v_head_bytes * lay.n_head_kv;
        let (v_lo, v_at, v_len) = if lay.v_head_bytes == 0 {
            (0, 0, 0)
        } else if lay.v_trans {
            (0, 0, lay.v_bytes)
        } else {
            (lo, lo * v_row, (hi + 1 - lo) * v_row)
        };
        Some(ReadSpan {
            lo,
            k_at: lo * k_row,
            k_len: (hi + 1 - lo) * k_row,
            v_lo,
            v_at,
            v_len,
        })
    }

    /// Appends one record to the file (host memory takes whole layers in
    /// `LayerRows::keep_in_memory`).
    fn append_to_file(&mut self, l: usize, h: usize, p: Pos, score: f32, record: &[u8]) {
        let Some(d) = self.disk.as_mut() else { return };
        let head = &mut self.layers[l].heads[h];
        head.at.push(d.len);
        head.sum.push(fnv1a(record));
        d.append(record);
        head.enter(p, score);
        self.bytes += record.len() as u64;
    }

    /// Writes the held rows of `picks[l][h]` (the same count for every layer
    /// and head) into cells `c0..` of `seq`'s stream, in order. The cells are
    /// not claimed: the caller does that once every layer is written.
    /// Returns the bytes written.
    pub fn upload(
        &mut self,
        ctx: &mut Context<'_>,
        seq: SeqId,
        c0: usize,
        picks: &[Vec<Vec<Pos>>],
    ) -> Result<u64, RecallError> {
        let mut moved = 0u64;
        // Host rows are gathered on all cores, a group of layers at a time
        // (bounded memory); a file is read layer by layer.
        let group = if self.disk.is_some() {
            1
        } else {
            rayon::current_num_threads()
        };
        let rows = |l: usize| picks[l].first().map_or(0, Vec::len);
        let layers: Vec<usize> = (0..picks.len()).filter(|&l| rows(l) > 0).collect();
        let mut staging = STAGING.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in layers.chunks(group) {
            let sizes: Vec<(usize, usize)> = chunk
                .iter()
                .map(|&l| self.layers[l].device_bytes(rows(l)))
                .collect();
            let total = sizes.iter().map(|(k, v)| k + v).sum();
            // Each layer's K and V rows, laid out as the device holds them.
            let mut parts: Vec<(usize, &mut [u8], &mut [u8])> = chunk
                .iter()
                .zip(split_layers(staging.take(total), sizes))
                .map(|(&l, (k, v))| (l, k, v))
                .collect();
            if self.disk.is_some() {
                for (l, k, v) in parts.iter_mut() {
                    let records = self.head_records(*l, &picks[*l])?;
                    let rec = self.layers[*l].record();
                    self.gather(*l, rows(*l), |h, i| &records[h][i * rec..], k, v);
                }
            } else {
                use rayon::prelude::*;
                parts
                    .par_iter_mut()
                    .map(|(l, k, v)| self.gather_host(*l, &picks[*l], k, v))
                    .collect::<Result<Vec<()>, RecallError>>()?;
            }
            for (l, k, v) in parts {
                let lay = self.layers[l].layout;
                let n = rows(l);
                let k_row = lay.k_head_bytes * lay.n_head_kv;
                ctx.kv_write(KvPart::Base, seq, l, false, c0 * k_row, k)?;
                moved += k.len() as u64;
                if v.is_empty() {
                    continue;
                }
                if lay.v_trans {
                    // One run of n elements per V dimension.
                    let e = lay.v_elem_bytes();
                    for (j, run) in v.chunks(n * e).enumerate() {
                        ctx.kv_write(KvPart::Base, seq, l, true, (j * lay.n_cells + c0) * e, run)?;
                    }
                } else {
                    let v_row = lay.v_head_bytes * lay.n_head_kv;
                    ctx.kv_write(KvPart::Base, seq, l, true, c0 * v_row, v)?;
                }
                moved += v.len() as u64;
            }
        }
        staging.trim();
        Ok(moved)
    }

    /// The records of `heads[h]` for every KV head of layer `l` (read from the file).
    fn head_records(&mut self, l: usize, heads: &[Vec<Pos>]) -> Result<Vec<Vec<u8>>, RecallError> {
        let n_head = self.layers[l].layout.n_head_kv;
        (0..n_head)
            .map(|h| self.records(l, h, &heads[h.min(heads.len() - 1)]))
            .collect()
    }

    /// Layer `l`'s K rows and V (rows, or one run per dimension when
    /// transposed) for `heads[h]`'s positions, straight from host memory.
    fn gather_host(
        &self,
        l: usize,
        heads: &[Vec<Pos>],
        k: &mut [u8],
        v: &mut [u8],
    ) -> Result<(), RecallError> {
        let n = heads.first().map_or(0, Vec::len);
        let rec = self.layers[l].record();
        let ids: Vec<Vec<usize>> = (0..self.layers[l].layout.n_head_kv)
            .map(|h| {
                let head = &self.layers[l].heads[h];
                heads[h.min(heads.len() - 1)]
                    .iter()
                    .map(|p| {
                        head.index.get(p).map(|&i| i as usize).ok_or_else(|| {
                            RecallError::Unsupported(format!(
                                "position {p} of storage layer {l}, KV head {h} is not held"
                            ))
                        })
                    })
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        self.gather(
            l,
            n,
            |h, i| &self.layers[l].heads[h].data[ids[h][i] * rec..],
            k,
            v,
        );
        Ok(())
    }

    /// Lays `n` records per KV head (`record(h, i)`: head `h`'s `i`-th, K
    /// then V) out into `k` and `v` ([`LayerRows::device_bytes`] long) as
    /// the device holds them: K rows by cell, V rows by cell or, transposed,
    /// `n` elements per V dimension.
    fn gather<'a>(
        &self,
        l: usize,
        n: usize,
        record: impl Fn(usize, usize) -> &'a [u8],
        k: &mut [u8],
        v: &mut [u8],
    ) {
        let lay = self.layers[l].layout;
        let (kb, vb, nh) = (lay.k_head_bytes, lay.v_head_bytes, lay.n_head_kv);
        let e = lay.v_elem_bytes().max(1);
        for h in 0..nh {
            for i in 0..n {
                let r = record(h, i);
                let dst = (i * nh + h) * kb;
                k[dst..dst + kb].copy_from_slice(&r[..kb]);
                if vb == 0 {
                    continue;
                }
                if lay.v_trans {
                    for d in 0..lay.head_dim_v {
                        let j = h * lay.head_dim_v + d;
                        let src = kb + d * e;
                        v[(j * n + i) * e..(j * n + i + 1) * e].copy_from_slice(&r[src..src + e]);
                    }
                } else {
                    let dst = (i * nh + h) * vb;
                    v[dst..dst + vb].copy_from_slice(&r[kb..kb + vb]);
                }
            }
        }
    }

    /// The records of `pos` (all held) for layer `l`, head `h`, back to back.
    fn records(&mut self, l: usize, h: usize, pos: &[Pos]) -> Result<Vec<u8>, RecallError> {
        let rec = self.layers[l].record();
        let head = &self.layers[l].heads[h];
        let ids: Vec<usize> = pos
            .iter()
            .map(|p| {
                head.index.get(p).map(|&i| i as usize).ok_or_else(|| {
                    RecallError::Unsupported(format!(
                        "position {p} of storage layer {l}, KV head {h} is not held"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let mut out = vec![0u8; ids.len() * rec];
        match self.disk.as_mut() {
            None => {
                for (i, &id) in ids.iter().enumerate() {
                    out[i * rec..(i + 1) * rec]
                        .copy_from_slice(&head.data[id * rec..(id + 1) * rec]);
                }
            }
            Some(d) => {
                // Records written one after another are read in one go.
                let mut i = 0;
                while i < ids.len() {
                    let mut j = i + 1;
                    while j < ids.len() && head.at[ids[j]] == head.at[ids[j - 1]] + rec as u64 {
                        j += 1;
                    }
                    d.read_at(head.at[ids[i]], &mut out[i * rec..j * rec])?;
                    for k in i..j {
                        if fnv1a(&out[k * rec..(k + 1) * rec]) != head.sum[ids[k]] {
                            return Err(RecallError::Corrupt {
                                path: d.path.clone(),
                                layer: l,
                                head: h,
                                pos: pos[k],
                            });
                        }
                    }
                    i = j;
                }
            }
        }
        Ok(out)
    }
}

/// Cell `c`, head `h`'s V row from `v` (rows from cell `v_lo` on, or the
/// whole transposed tensor) into `out`.
fn fill_v(lay: &KvLayerLayout, v: &[u8], v_lo: usize, c: usize, h: usize, out: &mut [u8]) {
    let vb = lay.v_head_bytes;
    if vb == 0 {
        return;
    }
    if lay.v_trans {
        let e = lay.v_elem_bytes();
        for d in 0..lay.head_dim_v {
            let j = h * lay.head_dim_v + d;
            let src = (j * lay.n_cells + c) * e;
            out[d * e..(d + 1) * e].copy_from_slice(&v[src..src + e]);
        }
    } else {
        let src = ((c - v_lo) * lay.n_head_kv + h) * vb;
        out[..vb].copy_from_slice(&v[src..src + vb]);
    }
}

impl DiskFile {
    fn create(dir: &Path, seq: SeqId) -> Result<DiskFile, RecallError> {
        let io = |source| RecallError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(
            "chunkkv-recall-{}-{seq}-{n}.kv",
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| RecallError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(DiskFile {
            path,
            file,
            len: 0,
            pending: Vec::new(),
        })
    }

    fn io(&self, source: std::io::Error) -> RecallError {
        RecallError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn append(&mut self, record: &[u8]) {
        self.pending.extend_from_slice(record);
        self.len += record.len() as u64;
    }

    fn flush(&mut self) -> Result<(), RecallError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let at = self.len - self.pending.len() as u64;
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.write_all(&self.pending))
            .and_then(|_| self.file.flush())
            .map_err(|e| self.io(e))?;
        self.pending.clear();
        Ok(())
    }

    fn read_at(&mut self, at: u64, out: &mut [u8]) -> Result<(), RecallError> {
        self.flush()?;
        // The file must still be the one this store wrote.
        if !self.path.exists() {
            return Err(self.io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the file was removed",
            )));
        }
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(out, at).map_err(|e| self.io(e))
    }
}

/// FNV-1a, 64-bit: a cheap check that a record reads back as written.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staging buffer (ordinary memory here, pinned on a GPU) gives the
    /// length asked for, keeps what it grew to for the next transfer, and
    /// frees only what grew past `KEPT_STAGING`.
    #[test]
    fn staging_grows_is_reused_and_trims_only_what_is_too_big() {
        let mut s = Staging {
            pinned: None,
            heap: Vec::new(),
            no_pinned: true,
        };
        assert_eq!(s.take(1000).len(), 1000);
        s.take(1000)[999] = 7;
        assert_eq!(s.take(10).len(), 10);
        assert_eq!(s.heap.len(), 1000, "a smaller transfer reuses the buffer");
        s.trim();
        assert_eq!(s.heap.len(), 1000, "a small buffer is kept");
        assert_eq!(s.take(KEPT_STAGING + 1).len(), KEPT_STAGING + 1);
        s.trim();
        assert!(s.heap.is_empty(), "a buffer past KEPT_STAGING is freed");
    }
}
