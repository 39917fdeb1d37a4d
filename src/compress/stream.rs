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
        let mut seg = if fits {
            rest
        } else {
            rest.min(free.saturating_sub(1 + scratch))
        };
        // A turn's last part over held rows: its window recalls on its own
        // when the part would leave it too little room.
        let w = compressor.window();
        if ends_turn
            && seg == rest
            && seg > w
            && compressor.holds_evicted()
            && settles(Settle {
                budget,
                capacity: n_ctx,
                free,
                prefilled: cursor.prefilled,
                left: rest,
                window: w,
                reserve,
            })
        {
            seg -= w;
        }
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

/// A turn's text about to go in on top of held rows (see [`settles`]).
#[derive(Debug, Clone, Copy)]
pub struct Settle {
    pub budget: Budget,
    /// Cells of the sequence's stream, and how many are free now.
    pub capacity: usize,
    pub free: usize,
    /// Tokens prefilled so far, and those of the turn still to go in.
    pub prefilled: usize,
    pub left: usize,
    pub window: usize,
    /// Cells to leave free after the text (the reply).
    pub reserve: usize,
}

/// Whether the text before a turn's window should be compressed once more
/// (by its own last window, query-agnostic) before the window goes in. With
/// recall the window ranks the held rows in the cells left free, batch by
/// batch, and writes back only as many as fit, so a cache still full of the
/// text's uncompressed tail leaves it a fraction of the room; that
/// compression moves the tail into the store, where the window ranks it with
/// everything else. Only when the room would be under half of what it is
/// after compressing to the budget (a long text's last part, not a chat turn).
pub fn settles(at: Settle) -> bool {
    let room_now = at.free.saturating_sub(at.left + at.reserve);
    let kept = at.budget.cells_for(at.prefilled + at.left).max(at.window);
    let room_settled = at.capacity.saturating_sub(kept + at.window + at.reserve);
    room_now * 2 < room_settled
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(free: usize, prefilled: usize, left: usize) -> Settle {
        Settle {
            budget: Budget::Ratio(0.1),
            capacity: 6912,
            free,
            prefilled,
            left,
            window: 32,
            reserve: 25,
        }
    }

    #[test]
    fn a_documents_uncompressed_tail_settles_before_its_question() {
        // A 32k-token document in a 6,912-cell slot: 2.8k kept, 3.3k of its
        // tail fresh, 64 tokens to go. The question would get ~700 cells;
        // compressed first, ~3.6k.
        assert!(settles(at(6912 - 6100, 31_000, 64)));
    }

    #[test]
    fn a_chat_turn_on_a_compressed_cache_does_not() {
        // The third turn of that conversation: 3.2k kept, the reply and a
        // 50-token question on top.
        assert!(!settles(at(6912 - 3300, 32_100, 50)));
        // Nothing held back and all the room there is: nothing to gain.
        assert!(!settles(at(6912, 0, 2000)));
    }
}
