//! Proof that compaction moves bytes exactly: compare every kept K/V row,
//! per storage layer and KV head, against the row of the same position in an
//! uncompressed twin of the context. Runs on whatever backend holds the cache.

use super::{Budget, ChunkKv, CompressError, Compressor};
use crate::llama::{Context, ContextParams, KvDump, KvPart, Model, StateError, Token};
use crate::pipeline::SEQ;

/// What [`verify_compaction`] compared.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub n_prompt: usize,
    pub n_keep: usize,
    pub storage_layers: usize,
    pub kv_heads: usize,
    pub v_transposed: bool,
    /// (layer, head, slot) rows compared, K and V each.
    pub rows_compared: usize,
    /// Human-readable descriptions of the first mismatches (empty: all exact).
    pub mismatches: Vec<String>,
    pub attn_width_before: u32,
    pub attn_width_after: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Context(#[from] crate::llama::ContextError),
    #[error(transparent)]
    Compress(#[from] CompressError),
    #[error(transparent)]
    Decode(#[from] crate::llama::DecodeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Dump(#[from] crate::llama::DumpError),
    #[error("the prompt ({0} tokens) is too short to compress: it needs more than the window plus the budget")]
    TooShort(usize),
}

/// Prefills `tokens` twice (plainly, and with ChunkKV at `budget`) and compares rows.
pub fn verify_compaction(
    model: &Model,
    params: &ContextParams,
    tokens: &[Token],
    budget: Budget,
    reuse: usize,
) -> Result<VerifyReport, VerifyError> {
    let policy = ChunkKv::default();
    let w = policy.window;
    let n = tokens.len();
    let n_keep = budget.cells_for(n);
    if n <= w || n_keep >= n {
        return Err(VerifyError::TooShort(n));
    }
    // The twin prefills exactly as the hook does (head, then the window),
    // so both compute every row alike.
    let before = {
        let mut twin = Context::new(model, params)?;
        twin.decode_tokens(&tokens[..n - w], 0, SEQ, false)?;
        twin.decode_tokens(&tokens[n - w..], (n - w) as i32, SEQ, true)?;
        KvDump::parse(&twin.state_seq_get(SEQ)?)?
    };
    let mut ctx = Context::new(model, params)?;
    let mut c = Compressor::new(&ctx, Box::new(policy), w, reuse)?;
    let done = c.prefill(&mut ctx, tokens, 0, n_keep, budget.json())?;
    let after = KvDump::parse(&ctx.state_seq_get(SEQ)?)?;

    let layers = ctx.kv_layers(KvPart::Base);
    let table = c.slot_table();
    let mut report = VerifyReport {
        n_prompt: n,
        n_keep,
        storage_layers: layers.len(),
        kv_heads: model.layer_n_head_kv(layers[0]) as usize,
        v_transposed: after.v_trans,
        rows_compared: 0,
        mismatches: Vec::new(),
        attn_width_before: done.report.attn_width_before,
        attn_width_after: done.report.attn_width_after,
    };
    for (l, &il) in layers.iter().enumerate() {
        let heads = model.layer_n_head_kv(il) as usize;
        for h in 0..heads {
            for slot in 0..n_keep {
                let Some(p) = table.position(l, h, slot, &[]) else {
                    continue;
                };
                let p = p as usize;
                report.rows_compared += 1;
                if after.k_head(l, slot, h, heads) != before.k_head(l, p, h, heads) {
                    report
                        .mismatches
                        .push(format!("K: layer {il} head {h} slot {slot} (position {p})"));
                }
                if after.v_head(l, slot, h, heads) != before.v_head(l, p, h, heads) {
                    report
                        .mismatches
                        .push(format!("V: layer {il} head {h} slot {slot} (position {p})"));
                }
            }
        }
    }
    report.mismatches.truncate(20);
    Ok(report)
}
