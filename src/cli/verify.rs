//! `chunkkv verify`: check on this backend that compaction moves every kept
//! K/V row byte for byte, and that per-layer dead slots act like removed cells.

use clap::Args;

use super::{ContextArgs, ModelArgs};
use crate::compress::verify::{verify_compaction, verify_dead_slots};
use crate::compress::Budget;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens (synthetic prose).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 1024)]
    pub n_prompt: usize,
    #[arg(long = "kv-budget", default_value = "0.2")]
    pub budget: Budget,
    #[arg(long = "reuse-layers", default_value_t = 2)]
    pub reuse_layers: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub context: ContextArgs,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let tokens = crate::workload::prompt_tokens(&model, args.n_prompt, 1)?;
    let n_ctx = if args.context.ctx_size == 0 {
        (args.n_prompt as u32).div_ceil(256) * 256 + 256
    } else {
        args.context.ctx_size
    };
    let params = args.context.params().with_n_ctx(n_ctx);
    let report = verify_compaction(&model, &params, &tokens, args.budget, args.reuse_layers)?;
    let dead = verify_dead_slots(&model, &params, &tokens)?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["dead_slots"] = serde_json::to_value(&dead)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "dead slots {}..{} in every layer vs the same cells removed: KL {:.5} (removing them: KL {:.5}), same top token: {} -> {}",
            dead.masked.0,
            dead.masked.1,
            dead.kl_masked_vs_removed,
            dead.kl_removed_vs_full,
            dead.same_argmax,
            if dead.ok { "ok" } else { "MISMATCH" }
        );
        println!(
            "compared {} kept (layer, head, slot) rows of K and V: {} storage layers x {} KV heads x {} slots (V {}), attention width {} -> {}",
            report.rows_compared,
            report.storage_layers,
            report.kv_heads,
            report.n_keep,
            if report.v_transposed { "transposed" } else { "row-major" },
            report.attn_width_before,
            report.attn_width_after
        );
        for m in &report.mismatches {
            println!("mismatch: {m}");
        }
    }
    if !dead.ok {
        anyhow::bail!(
            "masked dead slots differ from removed cells (KL {:.5})",
            dead.kl_masked_vs_removed
        );
    }
    if report.mismatches.is_empty() {
        if !args.json {
            println!("all rows identical");
        }
        Ok(())
    } else {
        anyhow::bail!("{} rows differ after compaction", report.mismatches.len())
    }
}
