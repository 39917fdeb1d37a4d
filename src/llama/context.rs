//! An inference context on a model: the KV cache, decode, logits, memory
//! operations, sequence state and KV statistics.

use std::ptr::NonNull;
use std::str::FromStr;

use super::batch::Batch;
use super::error::{ContextError, DecodeError, StateError};
use super::kv::{
    CompactError, DeadSlots, ImportanceAllocError, KvLayerLayout, KvPart, KvStats, LayerImportance,
    RowsError, ScoreReduce, ScoreRows,
};
use super::model::{Model, Token};
use crate::sys;
use crate::threads::{ThreadTuner, Threads};

/// A sequence id inside a context.
pub type SeqId = i32;
/// A token position inside a sequence.
pub type Pos = i32;

/// KV-cache element types llama.cpp supports for `-ctk` / `-ctv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Iq4Nl,
}

impl CacheType {
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q4_0,
        CacheType::Q4_1,
        CacheType::Q5_0,
        CacheType::Q5_1,
        CacheType::Iq4Nl,
    ];

    /// llama.cpp's name for the type (as `-ctk` takes it).
    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q5_1 => "q5_1",
            CacheType::Iq4Nl => "iq4_nl",
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, CacheType::F32 | CacheType::F16 | CacheType::Bf16)
    }

    fn ggml(self) -> sys::ggml_type {
        match self {
            CacheType::F32 => sys::GGML_TYPE_F32,
            CacheType::F16 => sys::GGML_TYPE_F16,
            CacheType::Bf16 => sys::GGML_TYPE_BF16,
            CacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
            CacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
            CacheType::Q4_1 => sys::GGML_TYPE_Q4_1,
            CacheType::Q5_0 => sys::GGML_TYPE_Q5_0,
            CacheType::Q5_1 => sys::GGML_TYPE_Q5_1,
            CacheType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
        }
    }

    pub(crate) fn from_ggml(t: i32) -> Option<CacheType> {
        CacheType::ALL.into_iter().find(|c| c.ggml() as i32 == t)
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CacheType::ALL
            .into_iter()
            .find(|c| c.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<_> = CacheType::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown cache type `{s}` (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Flash attention: llama.cpp's `-fa on|off|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlashAttn {
    On,
    Off,
    #[default]
    Auto,
}

impl FromStr for FlashAttn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "on" | "1" | "true" | "enabled" => Ok(FlashAttn::On),
            "off" | "0" | "false" | "disabled" => Ok(FlashAttn::Off),
            "auto" | "-1" => Ok(FlashAttn::Auto),
            _ => Err(format!(
                "unknown flash-attention setting `{s}` (expected on, off or auto)"
            )),
        }
    }
}

impl std::fmt::Display for FlashAttn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
            FlashAttn::Auto => "auto",
        })
    }
}

/// How to create a context.
#[derive(Debug, Clone)]
pub struct ContextParams {
    n_ctx: u32,
    n_batch: u32,
    n_ubatch: u32,
    threads: Threads,
    flash_attn: FlashAttn,
    type_k: CacheType,
    type_v: CacheType,
    swa_full: bool,
    n_seq_max: u32,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 0,
            n_batch: 2048,
            n_ubatch: 512,
            threads: Threads::auto(),
            flash_attn: FlashAttn::Auto,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
            swa_full: false,
            n_seq_max: 1,
        }
    }
}

impl ContextParams {
    /// Context size in tokens; 0 takes the model's training context.
    pub fn with_n_ctx(mut self, n: u32) -> Self {
        self.n_ctx = n;
        self
    }
    /// Most tokens one `decode` call may take.
    pub fn with_n_batch(mut self, n: u32) -> Self {
        self.n_batch = n;
        self
    }
    /// Tokens per physical micro-batch.
    pub fn with_n_ubatch(mut self, n: u32) -> Self {
        self.n_ubatch = n;
        self
    }
    /// Exactly `n` threads for both prompt processing and generation.
    pub fn with_n_threads(mut self, n: i32) -> Self {
        self.threads = Threads::Fixed(n.max(0) as usize);
        self
    }
    /// Threads fixed or tuned at run time (the default: [`Threads::auto`]).
    pub fn with_threads(mut self, threads: Threads) -> Self {
        self.threads = threads;
        self
    }
    pub fn threads(&self) -> Threads {
        self.threads
    }
    pub fn with_flash_attn(mut self, fa: FlashAttn) -> Self {
        self.flash_attn = fa;
        self
    }
    pub fn with_type_k(mut self, t: CacheType) -> Self {
        self.type_k = t;
        self
    }
    pub fn with_type_v(mut self, t: CacheType) -> Self {
        self.type_v = t;
        self
    }
    /// Full-size sliding-window cache (llama.cpp's `--swa-full`); off bounds SWA memory.
    pub fn with_swa_full(mut self, on: bool) -> Self {
        self.swa_full = on;
        self
    }
    /// Independent sequences (a server's slots), each with its own stream of
    /// `n_ctx / n` cells: llama.cpp's `-np` with a non-unified cache.
    pub fn with_n_seq_max(mut self, n: u32) -> Self {
        self.n_seq_max = n.max(1);
        self
    }
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }
    pub fn flash_attn(&self) -> FlashAttn {
        self.flash_attn
    }
    pub fn type_k(&self) -> CacheType {
        self.type_k
    }
    pub fn type_v(&self) -> CacheType {
        self.type_v
    }
}

/// A saved sequence ([`Context::save_seq`]): llama.cpp's state bytes, and
/// the dead-slot mask and compacted range that go with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqState {
    bytes: Vec<u8>,
    dead: Vec<DeadSlots>,
    compacted_until: Option<Pos>,
}

impl SeqState {
    /// llama.cpp's serialized cells (what [`Context::state_seq_get`] returns).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn dead_slots(&self) -> &[DeadSlots] {
        &self.dead
    }
}

/// A llama.cpp context bound to the model it was made from.
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m Model,
    n_ctx: u32,
    n_batch: u32,
    /// The per-layer dead slots llama.cpp currently masks (patch 0004).
    dead: Vec<DeadSlots>,
    /// Per sequence, the highest position held by a slot of its last
    /// compaction: slots up to it may hold different positions in different
    /// layers and heads. Each sequence has its own (a server's slots).
    compacted_until: std::collections::HashMap<SeqId, Pos>,
    /// Thread counts for single-token and batched decodes, when not fixed.
    tuners: Option<[ThreadTuner; 2]>,
    /// Thread counts llama.cpp was last told (generation, batch).
    n_threads: (usize, usize),
}

// SAFETY: a llama_context may move between threads; it is not shared (no Sync).
unsafe impl Send for Context<'_> {}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the pointer.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("n_ctx", &self.n_ctx)
            .finish()
    }
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, params: &ContextParams) -> Result<Context<'m>, ContextError> {
        if params.flash_attn == FlashAttn::Off && params.type_v.is_quantized() {
            return Err(ContextError::QuantizedVNeedsFlashAttention(
                params.type_v.name(),
            ));
        }
        if params.n_batch == 0 || params.n_ubatch == 0 || params.threads == Threads::Fixed(0) {
            return Err(ContextError::Invalid(
                "batch sizes and threads must be positive".into(),
            ));
        }
        if params.n_ctx > 0 && params.n_ctx < 16 {
            return Err(ContextError::Invalid(format!(
                "context size {} is too small (minimum 16)",
                params.n_ctx
            )));
        }
        let n_threads = params.threads.initial();
        let n_ctx_req = if params.n_ctx == 0 {
            model.n_ctx_train()
        } else {
            params.n_ctx
        };
        // SAFETY: plain C struct from llama.cpp's defaults.
        let ptr = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = n_ctx_req;
            p.n_batch = params.n_batch.min(n_ctx_req.max(1));
            p.n_ubatch = params.n_ubatch.min(p.n_batch);
            p.n_seq_max = params.n_seq_max;
            p.kv_unified = false;
            p.n_threads = n_threads as i32;
            p.n_threads_batch = n_threads as i32;
            p.flash_attn_type = match params.flash_attn {
                FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
                FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            };
            p.type_k = params.type_k.ggml();
            p.type_v = params.type_v.ggml();
            p.swa_full = params.swa_full;
            p.no_perf = true;
            sys::llama_init_from_model(model.as_ptr(), p)
        };
        let ptr = NonNull::new(ptr).ok_or(ContextError::Rejected { n_ctx: n_ctx_req })?;
        // SAFETY: valid context.
        let (n_ctx, n_batch) = unsafe {
            (
                sys::llama_n_ctx(ptr.as_ptr()),
                sys::llama_n_batch(ptr.as_ptr()),
            )
        };
        let tuners = match params.threads {
            Threads::Fixed(_) => None,
            Threads::Auto { max } => {
                let now = std::time::Instant::now();
                let t = ThreadTuner::new(n_threads, max, now);
                Some([t.clone(), t])
            }
        };
        Ok(Context {
            ptr,
            model,
            n_ctx,
            n_batch,
            dead: Vec::new(),
            compacted_until: std::collections::HashMap::new(),
            tuners,
            n_threads: (n_threads, n_threads),
        })
    }

    /// Threads used for (single-token decode, batches) now.
    pub fn n_threads(&self) -> (usize, usize) {
        self.n_threads
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Cells of the context (the most tokens one sequence can hold).
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// Sequences this context holds at once.
    pub fn n_seq_max(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::llama_n_seq_max(self.ptr.as_ptr()) }
    }

    /// Cells one sequence can hold (its stream; all cells with one sequence).
    pub fn seq_capacity(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ctx_seq(self.ptr.as_ptr()) as usize }
    }

    /// Cells sequence `seq` holds in the full-attention cache.
    pub fn seq_used(&self, seq: SeqId) -> usize {
        if self.n_seq_max() <= 1 {
            return self
                .kv_stats(KvPart::Base)
                .map_or(0, |s| s.cells_used as usize);
        }
        self.kv_cell_positions(KvPart::Base, seq)
            .iter()
            .filter(|p| p.is_some())
            .count()
    }

    /// [`Context::kv_stats`] of one sequence's stream: the same as the whole
    /// cache's with one sequence.
    pub fn seq_kv_stats(&self, part: KvPart, seq: SeqId) -> Option<KvStats> {
        let all = self.kv_stats(part)?;
        if self.n_seq_max() <= 1 {
            return Some(all);
        }
        let pos = self.kv_cell_positions(part, seq);
        let size = pos.len() as u32;
        let used = pos.iter().filter(|p| p.is_some()).count() as u32;
        let last = pos.iter().rposition(Option::is_some).map_or(0, |i| i + 1) as u32;
        let per_cell = all.bytes_allocated / u64::from(all.size.max(1));
        Some(KvStats {
            size,
            cells_used: used,
            // llama.cpp's attention width: the used span padded to 256, within the stream.
            attn_width: (last.div_ceil(256) * 256).clamp(256.min(size), size),
            bytes_live: per_cell * u64::from(used),
            bytes_allocated: per_cell * u64::from(size),
            ..all
        })
    }

    /// Tokens per physical micro-batch.
    pub fn n_ubatch(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ubatch(self.ptr.as_ptr()) }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_context {
        self.ptr.as_ptr()
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: valid context; the memory lives as long as it.
        unsafe { sys::llama_get_memory(self.ptr.as_ptr()) }
    }

    /// Runs one batch through the model.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), DecodeError> {
        if batch.is_empty() {
            return Err(DecodeError::Empty);
        }
        let n_tokens = batch.len();
        // llama.cpp computes single-token micro-batches with n_threads, others with n_threads_batch.
        let kind = usize::from(n_tokens > 1);
        let t0 = std::time::Instant::now();
        let mut chosen = None;
        if let Some(tuners) = self.tuners.as_mut() {
            let n = tuners[kind].next(t0, crate::hardware::others_running());
            let mut want = self.n_threads;
            if kind == 0 {
                want.0 = n;
            } else {
                want.1 = n;
            }
            if want != self.n_threads {
                // SAFETY: valid context.
                unsafe {
                    sys::llama_set_n_threads(self.ptr.as_ptr(), want.0 as i32, want.1 as i32)
                };
                self.n_threads = want;
            }
            chosen = Some(n);
        }
        // SAFETY: the batch's arrays are valid for its n_tokens; decode copies them.
        let code = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw()) };
        if let (Some(n), Some(tuners)) = (chosen, self.tuners.as_mut()) {
            // Time the whole computation: decode may return before an accelerator is done.
            // SAFETY: valid context.
            unsafe { sys::llama_synchronize(self.ptr.as_ptr()) };
            let now = std::time::Instant::now();
            tuners[kind].record(n, n_tokens, now.duration_since(t0).as_secs_f64(), now);
        }
        DecodeError::from_code(code, self.n_ctx)
    }

    /// Waits until the device has finished the work queued so far (a decode
    /// may return before an accelerator is done).
    pub fn synchronize(&mut self) {
        // SAFETY: valid context.
        unsafe { sys::llama_synchronize(self.ptr.as_ptr()) };
    }

    /// Feeds `tokens` to sequence `seq` at positions `start..`, in batches of
    /// at most `n_batch`, and asks for logits of the last token only when
    /// `logits_last`. Refuses up front if the tokens cannot fit.
    pub fn decode_tokens(
        &mut self,
        tokens: &[Token],
        start: Pos,
        seq: SeqId,
        logits_last: bool,
    ) -> Result<(), DecodeError> {
        if tokens.is_empty() {
            return Err(DecodeError::Empty);
        }
        let used = self.seq_used(seq);
        let capacity = self.seq_capacity();
        if used + tokens.len() > capacity {
            return Err(DecodeError::ContextFull {
                needed: tokens.len(),
                used: used as u32,
                n_ctx: capacity as u32,
            });
        }
        let mut batch = Batch::new(self.n_batch as usize);
        let n = tokens.len();
        for (i, chunk) in tokens.chunks(self.n_batch as usize).enumerate() {
            batch.clear();
            let base = i * self.n_batch as usize;
            for (j, &t) in chunk.iter().enumerate() {
                let k = base + j;
                batch.push(t, start + k as Pos, seq, logits_last && k + 1 == n);
            }
            self.decode(&batch)?;
        }
        Ok(())
    }

    /// Logits of output row `i` of the last decode (-1: the last row), or
    /// `None` if that row produced none.
    pub fn logits_ith(&self, i: i32) -> Option<&[f32]> {
        // SAFETY: llama.cpp returns NULL for rows without logits; otherwise n_vocab floats
        // that stay valid until the next decode, which needs &mut self.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), i);
            (!p.is_null()).then(|| std::slice::from_raw_parts(p, self.model.n_vocab() as usize))
        }
    }

    /// Statistics of one attention cache of this context.
    pub fn kv_stats(&self, part: KvPart) -> Option<KvStats> {
        let mut raw = sys::llama_kv_stats::default();
        // SAFETY: valid context and out pointer.
        let ok = unsafe { sys::llama_kv_stats_get(self.ptr.as_ptr(), part.raw(), &mut raw) };
        ok.then(|| KvStats::from_raw(&raw))
    }

    /// Clears the whole memory (metadata and, with `data`, the buffers).
    pub fn memory_clear(&mut self, data: bool) {
        // SAFETY: valid memory.
        unsafe { sys::llama_memory_clear(self.memory(), data) }
        self.clear_dead_slots();
        self.compacted_until.clear();
    }

    /// Removes positions `[p0, p1)` of `seq` (negative bounds are open). Returns
    /// false, removing nothing, if llama.cpp cannot remove a partial range
    /// (recurrent memory) or the range reaches into compacted slots: a slot's
    /// cell position is one layer's; others may hold another token there.
    /// Removing tokens decoded after the compaction, or everything, is fine.
    /// The last compacted position of `seq` (any sequence's for `seq` < 0).
    fn compacted(&self, seq: SeqId) -> Option<Pos> {
        if seq < 0 {
            return self.compacted_until.values().copied().max();
        }
        self.compacted_until.get(&seq).copied()
    }

    pub fn seq_rm(&mut self, seq: SeqId, p0: Pos, p1: Pos) -> bool {
        let whole = p0 <= 0 && p1 < 0;
        if self.compacted(seq).is_some_and(|m| p0 <= m) && !whole {
            return false;
        }
        // SAFETY: valid memory.
        let ok = unsafe { sys::llama_memory_seq_rm(self.memory(), seq, p0, p1) };
        if ok && whole {
            self.clear_dead_slots();
            if seq < 0 {
                self.compacted_until.clear();
            } else {
                self.compacted_until.remove(&seq);
            }
        }
        ok
    }

    pub fn seq_cp(&mut self, src: SeqId, dst: SeqId, p0: Pos, p1: Pos) {
        // SAFETY: valid memory.
        unsafe { sys::llama_memory_seq_cp(self.memory(), src, dst, p0, p1) }
    }

    pub fn seq_keep(&mut self, seq: SeqId) {
        // SAFETY: valid memory.
        unsafe { sys::llama_memory_seq_keep(self.memory(), seq) }
    }

    /// Adds `delta` to the positions `[p0, p1)` of `seq`. Returns false,
    /// shifting nothing, when the range reaches into compacted slots (their
    /// positions differ between layers; one shift per cell would be wrong).
    pub fn seq_add(&mut self, seq: SeqId, p0: Pos, p1: Pos, delta: Pos) -> bool {
        if self.compacted(seq).is_some_and(|m| p0 <= m) {
            return false;
        }
        // SAFETY: valid memory.
        unsafe { sys::llama_memory_seq_add(self.memory(), seq, p0, p1, delta) };
        true
    }

    /// Smallest position of `seq`, `None` when empty.
    pub fn seq_pos_min(&self, seq: SeqId) -> Option<Pos> {
        // SAFETY: valid memory.
        let p = unsafe { sys::llama_memory_seq_pos_min(self.memory(), seq) };
        (p >= 0).then_some(p)
    }

    /// Largest position of `seq`, `None` when empty.
    pub fn seq_pos_max(&self, seq: SeqId) -> Option<Pos> {
        // SAFETY: valid memory.
        let p = unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq) };
        (p >= 0).then_some(p)
    }

    /// Serializes one sequence's KV cells (metadata and K/V bytes).
    pub fn state_seq_get(&self, seq: SeqId) -> Result<Vec<u8>, StateError> {
        // SAFETY: valid context; buf is writable for its length.
        unsafe {
            let size = sys::llama_state_seq_get_size(self.ptr.as_ptr(), seq);
            let mut buf = vec![0u8; size];
            let n =
                sys::llama_state_seq_get_data(self.ptr.as_ptr(), buf.as_mut_ptr(), buf.len(), seq);
            if n == 0 && size != 0 {
                return Err(StateError::Read);
            }
            buf.truncate(n);
            Ok(buf)
        }
    }

    /// Restores a sequence saved by [`Context::state_seq_get`] into `seq`
    /// (which should be empty). A context with fewer cells works if they
    /// suffice. The raw bytes carry no dead-slot mask: use
    /// [`Context::save_seq`] / [`Context::restore_seq`] for compacted caches.
    pub fn state_seq_set(&mut self, seq: SeqId, data: &[u8]) -> Result<(), StateError> {
        // SAFETY: data is readable for its length.
        // The restored cells are new: a mask of the old ones would hide the wrong slots.
        self.clear_dead_slots();
        self.compacted_until.remove(&seq);
        let n = unsafe {
            sys::llama_state_seq_set_data(self.ptr.as_ptr(), data.as_ptr(), data.len(), seq)
        };
        if n == 0 {
            Err(StateError::Rejected)
        } else {
            Ok(())
        }
    }

    /// One sequence's cells with what makes them whole after a compaction:
    /// the dead-slot mask and the compacted range.
    pub fn save_seq(&self, seq: SeqId) -> Result<SeqState, StateError> {
        Ok(SeqState {
            bytes: self.state_seq_get(seq)?,
            dead: self.dead.clone(),
            compacted_until: self.compacted(seq),
        })
    }

    /// Restores a [`SeqState`] into `seq` (which should be empty), mask included.
    pub fn restore_seq(&mut self, seq: SeqId, state: &SeqState) -> Result<(), StateError> {
        self.state_seq_set(seq, &state.bytes)?;
        if !state.dead.is_empty() {
            self.set_dead_slots(&state.dead)
                .map_err(|_| StateError::Rejected)?;
        }
        if let Some(m) = state.compacted_until {
            self.compacted_until.insert(seq, m);
        }
        Ok(())
    }

    /// Model-layer index of each storage layer of a cache part, in storage order.
    pub fn kv_layers(&self, part: KvPart) -> Vec<u32> {
        // SAFETY: valid context; out holds n entries.
        unsafe {
            let n = sys::llama_kv_layers(self.ptr.as_ptr(), part.raw(), std::ptr::null_mut(), 0);
            if n <= 0 {
                return Vec::new();
            }
            let mut out = vec![0i32; n as usize];
            sys::llama_kv_layers(self.ptr.as_ptr(), part.raw(), out.as_mut_ptr(), n);
            out.into_iter().map(|x| x as u32).collect()
        }
    }

    /// Stored position of every cell of `seq`'s stream (`None`: empty).
    pub fn kv_cell_positions(&self, part: KvPart, seq: SeqId) -> Vec<Option<Pos>> {
        // SAFETY: valid context; out holds n entries.
        unsafe {
            let n =
                sys::llama_kv_cell_pos(self.ptr.as_ptr(), part.raw(), seq, std::ptr::null_mut(), 0);
            if n <= 0 {
                return Vec::new();
            }
            let mut out = vec![-1i32; n as usize];
            sys::llama_kv_cell_pos(self.ptr.as_ptr(), part.raw(), seq, out.as_mut_ptr(), n);
            out.into_iter().map(|p| (p >= 0).then_some(p)).collect()
        }
    }

    /// Makes the following decodes also compute attention importance for
    /// the model layers flagged in `layers` (patches 0002, 0005), combined by
    /// `reduce`. Clears earlier scores. The sums are kept on the device of
    /// each layer's cache; the first call allocates them there (patch 0008).
    pub fn importance_begin(
        &mut self,
        layers: &[bool],
        rows: ScoreRows,
        reduce: ScoreReduce,
    ) -> Result<(), ImportanceAllocError> {
        let flags: Vec<u8> = layers.iter().map(|&b| b as u8).collect();
        let n_window = match rows {
            ScoreRows::Last(n) => n.max(1) as i32,
            ScoreRows::All => 0,
        };
        // SAFETY: flags outlives the call (llama.cpp copies it).
        let code = unsafe {
            sys::llama_kv_importance_clear(self.ptr.as_ptr());
            sys::llama_kv_importance_set_reduce(
                self.ptr.as_ptr(),
                match reduce {
                    ScoreReduce::Sum => 0,
                    ScoreReduce::Max => 1,
                },
            );
            sys::llama_kv_importance_set(
                self.ptr.as_ptr(),
                flags.as_ptr(),
                flags.len() as i32,
                n_window,
            )
        };
        if code == -2 {
            return Err(ImportanceAllocError);
        }
        Ok(())
    }

    /// Stops computing importance; the sums stay readable.
    pub fn importance_end(&mut self) {
        // SAFETY: NULL layers turns scoring off.
        unsafe {
            sys::llama_kv_importance_set(self.ptr.as_ptr(), std::ptr::null(), 0, -1);
        }
    }

    /// Importance since [`Context::importance_begin`] for model layer `il`,
    /// over the cells of one sequence's stream (every cell with one stream):
    /// scoring decodes hold one sequence, whose cells come first (patch
    /// 0009; with 20 slots a read moves 1/20 of the context's sums).
    pub fn importance(&self, il: u32) -> Option<LayerImportance> {
        let n_head_kv = self.model.layer_n_head_kv(il) as usize;
        let n_cells = self.seq_capacity().min(self.n_ctx as usize);
        let mut buf = vec![0f32; n_head_kv * n_cells];
        // SAFETY: buf holds n_head_kv * n_cells floats.
        let n = unsafe {
            sys::llama_kv_importance_get_cells(
                self.ptr.as_ptr(),
                il as i32,
                n_cells as i32,
                buf.as_mut_ptr(),
                buf.len() as i32,
            )
        };
        if n < 0 || n as usize != buf.len() {
            return None;
        }
        Some(LayerImportance::new(il, n_cells, buf))
    }

    /// Moves kept cells to slots `0..n_keep` on the device (patch 0003).
    /// `src[l][h]` lists, for storage layer `l` and KV head `h`, the `n_keep`
    /// cells to keep in slot order; slot `i` gets position `slot_pos[i]`.
    pub fn kv_compact(
        &mut self,
        part: KvPart,
        seq: SeqId,
        src: &[Vec<Vec<i32>>],
        slot_pos: &[Pos],
    ) -> Result<(), CompactError> {
        let n_keep = slot_pos.len();
        let mut flat = Vec::with_capacity(src.len() * n_keep * 4);
        for layer in src {
            for head in layer {
                if head.len() != n_keep {
                    return Err(CompactError::BadArguments);
                }
                flat.extend_from_slice(head);
            }
        }
        let layers = self.kv_layers(part);
        if layers.is_empty() {
            return Err(CompactError::NoCache);
        }
        let expected: usize = layers
            .iter()
            .map(|&il| self.model.layer_n_head_kv(il) as usize * n_keep)
            .sum();
        if src.len() != layers.len() || flat.len() != expected || n_keep == 0 {
            return Err(CompactError::BadArguments);
        }
        // SAFETY: flat and slot_pos hold exactly the entries llama_kv_compact reads (checked above).
        let rc = unsafe {
            sys::llama_kv_compact(
                self.ptr.as_ptr(),
                part.raw(),
                seq,
                flat.as_ptr(),
                slot_pos.as_ptr(),
                n_keep as u32,
            )
        };
        match rc {
            0 => {
                // Every slot was rewritten: the old mask no longer applies. A
                // refused compaction left the cache, and so its mask, as it was.
                self.clear_dead_slots();
                match slot_pos.iter().copied().max() {
                    Some(m) => self.compacted_until.insert(seq, m),
                    None => self.compacted_until.remove(&seq),
                };
                Ok(())
            }
            -1 => Err(CompactError::BadArguments),
            -2 => Err(CompactError::SharedStream),
            -3 => Err(CompactError::UnsupportedLayout),
            -4 => Err(CompactError::SharedCells),
            -5 => Err(CompactError::Compute),
            c => Err(CompactError::Other(c)),
        }
    }

    /// Byte layout of storage layer `idx` (in [`Context::kv_layers`] order)
    /// of `seq`'s stream (patch 0007).
    pub fn kv_layer_layout(&self, part: KvPart, seq: SeqId, idx: usize) -> Option<KvLayerLayout> {
        let mut raw = std::mem::MaybeUninit::<sys::llama_kv_layer_layout>::zeroed();
        // SAFETY: valid context; raw is a writable, zeroed (valid) struct.
        let rc = unsafe {
            sys::llama_kv_layer_layout_get(
                self.ptr.as_ptr(),
                part.raw(),
                seq,
                i32::try_from(idx).ok()?,
                raw.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return None;
        }
        // SAFETY: zero-initialized and then filled by llama.cpp.
        KvLayerLayout::from_raw(unsafe { &raw.assume_init() })
    }

    /// Copies bytes `offset..offset + out.len()` of storage layer `idx`'s K
    /// (`v` false) or V tensor of `seq`'s stream to the host.
    pub fn kv_read(
        &self,
        part: KvPart,
        seq: SeqId,
        idx: usize,
        v: bool,
        offset: usize,
        out: &mut [u8],
    ) -> Result<(), RowsError> {
        // SAFETY: out is writable for out.len() bytes.
        unsafe {
            self.kv_copy(
                part,
                seq,
                idx,
                v,
                false,
                offset,
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Writes `data` at byte `offset` of storage layer `idx`'s K (`v` false)
    /// or V tensor of `seq`'s stream.
    pub fn kv_write(
        &mut self,
        part: KvPart,
        seq: SeqId,
        idx: usize,
        v: bool,
        offset: usize,
        data: &[u8],
    ) -> Result<(), RowsError> {
        // SAFETY: data is readable for data.len() bytes and, with write set,
        // only read (the C signature's pointer is not const).
        unsafe {
            self.kv_copy(
                part,
                seq,
                idx,
                v,
                true,
                offset,
                data.as_ptr().cast_mut(),
                data.len(),
            )
        }
    }

    /// `llama_kv_layer_copy`: `len` bytes between `ptr` and the tensor, in the
    /// direction `write` says. llama.cpp checks the range.
    ///
    /// # Safety
    /// `ptr` must be valid for `len` bytes: writable when reading the tensor,
    /// readable when writing it.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kv_copy(
        &self,
        part: KvPart,
        seq: SeqId,
        idx: usize,
        v: bool,
        write: bool,
        offset: usize,
        ptr: *mut u8,
        len: usize,
    ) -> Result<(), RowsError> {
        let idx = i32::try_from(idx).map_err(|_| RowsError::NoCache)?;
        let rc = sys::llama_kv_layer_copy(
            self.ptr.as_ptr(),
            part.raw(),
            seq,
            idx,
            v,
            write,
            offset,
            ptr.cast(),
            len,
        );
        match rc {
            0 => Ok(()),
            // -1: a bad layer or sequence, or a range outside the tensor.
            _ => Err(RowsError::OutOfRange { offset, len }),
        }
    }

    /// Marks the free cells `c0..c0 + pos.len()` of `seq`'s stream as holding
    /// `seq` at `pos` (rows written there with [`Context::kv_write`]).
    pub fn kv_claim(
        &mut self,
        part: KvPart,
        seq: SeqId,
        c0: u32,
        pos: &[Pos],
    ) -> Result<(), RowsError> {
        let n = u32::try_from(pos.len()).map_err(|_| RowsError::NoCache)?;
        // SAFETY: pos holds n positions.
        let rc = unsafe {
            sys::llama_kv_cells_claim(self.ptr.as_ptr(), part.raw(), seq, c0, pos.as_ptr(), n)
        };
        match rc {
            0 => Ok(()),
            -2 => Err(RowsError::CellsTaken { c0, end: c0 + n }),
            _ => Err(RowsError::NoCache),
        }
    }

    /// Frees the cells `c0..c0 + n` of `seq`'s stream (rows written for
    /// scoring and not kept).
    pub fn kv_free(&mut self, part: KvPart, seq: SeqId, c0: u32, n: u32) -> Result<(), RowsError> {
        // SAFETY: valid context; llama.cpp checks the range.
        let rc = unsafe { sys::llama_kv_cells_free(self.ptr.as_ptr(), part.raw(), seq, c0, n) };
        match rc {
            0 => Ok(()),
            -2 => Err(RowsError::CellsTaken { c0, end: c0 + n }),
            _ => Err(RowsError::NoCache),
        }
    }

    /// Masks `dead` slots out of their layers' attention (patch 0004), for a
    /// cache compacted to a different kept count per layer. Replaces the
    /// previous mask; it is cleared by [`Context::memory_clear`],
    /// [`Context::state_seq_set`] and [`Context::kv_compact`].
    pub fn set_dead_slots(&mut self, dead: &[DeadSlots]) -> Result<(), CompactError> {
        if dead.is_empty() {
            self.clear_dead_slots();
            return Ok(());
        }
        let flat: Vec<i32> = dead
            .iter()
            .flat_map(|d| [d.layer as i32, d.begin as i32, d.end as i32])
            .collect();
        // SAFETY: flat holds dead.len() triples.
        let rc = unsafe {
            sys::llama_kv_layer_mask_set(self.ptr.as_ptr(), flat.as_ptr(), dead.len() as i32)
        };
        if rc != 0 {
            return Err(CompactError::BadMask);
        }
        self.dead = dead.to_vec();
        Ok(())
    }

    /// The dead slots currently masked.
    pub fn dead_slots(&self) -> &[DeadSlots] {
        &self.dead
    }

    fn clear_dead_slots(&mut self) {
        if !self.dead.is_empty() {
            // SAFETY: a null range list with count 0 clears the mask.
            unsafe { sys::llama_kv_layer_mask_set(self.ptr.as_ptr(), std::ptr::null(), 0) };
            self.dead.clear();
        }
    }
}
