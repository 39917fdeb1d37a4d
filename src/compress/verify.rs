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

/// What [`verify_dead_slots`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadSlotReport {
    /// Cells masked in every layer (and removed in the twin).
    pub masked: (u32, u32),
    /// KL(removed ‖ full): how much the masked tokens matter.
    pub kl_removed_vs_full: f64,
    /// KL(removed ‖ masked): should be noise.
    pub kl_masked_vs_removed: f64,
    pub same_argmax: bool,
    pub ok: bool,
}

/// Masks a middle range of cells in every layer (patch 0004) and compares
/// the next-token distribution with llama.cpp removing those cells.
pub fn verify_dead_slots(
    model: &Model,
    params: &ContextParams,
    tokens: &[Token],
) -> Result<DeadSlotReport, VerifyError> {
    let n = tokens.len();
    if n < 64 {
        return Err(VerifyError::TooShort(n));
    }
    let (b, e) = ((n / 3) as u32, (n / 2) as u32);
    let (head, last) = tokens.split_at(n - 1);
    let next = |mode: u8| -> Result<Vec<f64>, VerifyError> {
        let mut ctx = Context::new(model, params)?;
        ctx.decode_tokens(head, 0, SEQ, false)?;
        if mode == 1 {
            ctx.seq_rm(SEQ, b as i32, e as i32);
        } else if mode == 2 {
            let all: Vec<crate::llama::DeadSlots> = ctx
                .kv_layers(KvPart::Base)
                .into_iter()
                .map(|layer| crate::llama::DeadSlots {
                    layer,
                    begin: b,
                    end: e,
                })
                .collect();
            ctx.set_dead_slots(&all).map_err(CompressError::from)?;
        }
        ctx.decode_tokens(last, (n - 1) as i32, SEQ, true)?;
        let logits = ctx
            .logits_ith(-1)
            .ok_or(crate::llama::DecodeError::Fatal(-100))?;
        Ok(crate::compare::log_softmax(logits))
    };
    let (full, removed, masked) = (next(0)?, next(1)?, next(2)?);
    let kl = crate::compare::kl_divergence;
    let argmax = |x: &[f64]| (0..x.len()).fold(0, |m, i| if x[i] > x[m] { i } else { m });
    let gone = kl(&removed, &full);
    let same = kl(&removed, &masked);
    let same_argmax = argmax(&removed) == argmax(&masked);
    Ok(DeadSlotReport {
        masked: (b, e),
        kl_removed_vs_full: gone,
        kl_masked_vs_removed: same,
        same_argmax,
        ok: same < 0.02_f64.max(0.1 * gone) && same_argmax,
    })
}
