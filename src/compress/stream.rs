//! Text longer than the free cells, prefilled in segments that each fill the
//! free cells and are then compressed, so a document many times the context
//! passes through it. Every segment but the last is compressed before the
//! rest of the text (and any question) exists: query-agnostic for them.
//! Chat turns, `generate --kv-stream` and `bench --kv-stream` share it.

use std::time::Instant;

use super::{Budget, CompressError, Compressor, Keep, Scorer};
use crate::llama::{Context, KvPart, Pos, Token};

/// Where a conversation's cache stands; the caller keeps it between calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Position of the next token.
    pub next_pos: Pos,
    /// Tokens that entered the cache since it was last cleared.
    pub prefilled: usize,
    /// Compressions that evicted something.
    pub compressions: usize,
}

/// Progress after each segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub done: usize,
    pub total: usize,
    pub cells_used: u32,
    pub bytes_live: u64,
    pub tok_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Even compressed, the text (or what must follow it) does not fit.
    #[error("{need} more cells are needed but only {free} of {n_ctx} are free")]
    Full {
        need: usize,
        free: usize,
        n_ctx: u32,
        /// The most recent text alone is too long, not the history.
        recent: bool,
    },
    #[error(transparent)]
    Compress(#[from] CompressError),
}

/// Prefills `tokens` at `cursor.next_pos` in segments, compressing after each
/// so live cells stay within `budget` of everything prefilled (the window of
/// each segment always whole), and leaves `reserve` cells free at the end.
/// Within the budget only new tokens are candidates (history stays as earlier
/// compressions kept it); when the budget cannot be met, history is re-ranked
/// too and the current text is kept whole if it fits. `scorer` ranks each
/// segment by its own window or by reconstruction. `ends_turn`: `tokens`
/// end the user's turn (its last segment may recall evicted chunks).
#[allow(clippy::too_many_arguments)]
pub fn feed(
    ctx: &mut Context<'_>,
    compressor: &mut Compressor,
    tokens: &[Token],
    cursor: &mut Cursor,
    budget: Budget,
    reserve: usize,
    scorer: Scorer,
    ends_turn: bool,
    on_segment: &mut dyn FnMut(Segment),
) -> Result<(), StreamError> {
    let seq = compressor.seq();
    let n_ctx = ctx.seq_capacity();
    let text_start = cursor.next_pos;
    let n = tokens.len();
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let free = n_ctx.saturating_sub(ctx.seq_used(seq));
        let rest = n - i;
        // Reconstruction scoring needs cells on top of the segment for a
        // moment: a quarter of the free cells for its chunks, at least 64.
        // A context too full for that scores this segment by its window.
        let seg_scorer = match scorer {
            Scorer::Reconstruct if free >= compressor.reconstruction_room(64) + 64 => {
                Scorer::Reconstruct
            }
            _ => Scorer::Window,
        };
        let scratch = match seg_scorer {
            Scorer::Reconstruct => compressor.reconstruction_room((free / 4).clamp(64, 256)),
            Scorer::Window => 0,
        };
        let fits = rest + reserve <= free && rest + scratch <= free;
        // A segment fills the free cells (one stays for the compression's room).
        let seg = if fits {
            rest
        } else {
            rest.min(free.saturating_sub(1 + scratch))
        };
        if seg == 0 {
            return Err(StreamError::Full {
                need: rest + reserve,
                free,
                n_ctx: n_ctx as u32,
                recent: false,
            });
        }
        // Room the rest of the text and what follows it need after this segment.
        let room = if i + seg == n {
            reserve
        } else {
            (n - i - seg + reserve).min(n_ctx / 2)
        };
        let (n_keep, keep) = segment_keep(SegmentAt {
            n_ctx,
            budget,
            window: compressor.window(),
            seg,
            total: cursor.prefilled + seg,
            room,
            text_start,
            text_in_cache: (cursor.next_pos - text_start) as usize + seg,
            // Only the last segment of a turn's text recalls (a server feeds a
            // long prompt a part per step); earlier ones are a document's middle.
            recall: ends_turn && i + seg == n,
        });
        let done = compressor.prefill_turn(
            ctx,
            &tokens[i..i + seg],
            cursor.next_pos,
            n_keep,
            keep,
            seg_scorer,
            budget.json(),
        )?;
        if done.compressed {
            cursor.compressions += 1;
        }
        cursor.next_pos += seg as Pos;
        cursor.prefilled += seg;
        i += seg;
        let kv = ctx.seq_kv_stats(KvPart::Base, seq).ok_or_else(|| {
            CompressError::Unsupported("the context has no attention KV cache".into())
        })?;
        on_segment(Segment {
            done: i,
            total: n,
            cells_used: kv.cells_used,
            bytes_live: kv.bytes_live,
            tok_s: i as f64 / t.elapsed().as_secs_f64().max(1e-9),
        });
        let free = n_ctx.saturating_sub(ctx.seq_used(seq));
        if free < room.min(reserve.max(1)) {
            return Err(StreamError::Full {
                need: room,
                free,
                n_ctx: n_ctx as u32,
                recent: true,
            });
        }
    }
    Ok(())
}

/// Where one segment's compression stands (see [`segment_keep`]).
#[derive(Debug, Clone, Copy)]
pub struct SegmentAt {
    /// Cells of the sequence's stream.
    pub n_ctx: usize,
    pub budget: Budget,
    pub window: usize,
    /// Tokens of this segment (decoded by the compression call).
    pub seg: usize,
    /// Tokens prefilled once the segment is in.
    pub total: usize,
    /// Cells to leave free afterwards: what follows the text (a reply), and
    /// while text remains, what it needs (callers cap that at half the cells).
    pub room: usize,
    /// Where the current text starts, and how much of it is in the cache with the segment.
    pub text_start: Pos,
    pub text_in_cache: usize,
    /// Whether this compression may recall evicted chunks (a turn's end).
    pub recall: bool,
}

/// How many cells one segment's compression keeps, and what: the budget of
/// everything prefilled (the segment's window whole), unless `room` must stay
/// free; then history is re-ranked too and the current text kept whole if it
/// fits.
pub fn segment_keep(at: SegmentAt) -> (usize, Keep) {
    let wanted = at
        .budget
        .cells_for(at.total)
        .max(at.seg.min(at.window))
        .max(1);
    let n_keep = wanted.min(at.n_ctx.saturating_sub(at.room)).max(1);
    let harder = n_keep < wanted;
    let keep = Keep {
        from: if harder && at.text_in_cache < n_keep {
            at.text_start
        } else {
            Pos::MAX
        },
        history: !harder,
        short: true,
        recall: at.recall,
    };
    (n_keep, keep)
}
