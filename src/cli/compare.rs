//! `chunkkv compare`: one prompt (or several lengths) under llama.cpp's
//! default, q8_0 and q4_0 caches and every compression method and budget,
//! side by side.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::{ChunkArgs, ContextArgs, ModelArgs};
use crate::compare::{self, CompareConfig, CompareRow, RowSpec};
use crate::compress::{Budget, Method};
use crate::llama::{mib, CacheType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Md,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths in tokens (built-in synthetic prose), comma-separated.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "2048",
        conflicts_with = "file"
    )]
    pub lengths: Vec<usize>,
    /// Use this file's text as the prompt instead.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Tokens generated per row.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each decode measurement.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub reps: usize,
    /// Compression methods, comma-separated (default: chunkkv).
    #[arg(
        long = "kv-method",
        value_enum,
        value_delimiter = ',',
        default_value = "chunkkv"
    )]
    pub methods: Vec<Method>,
    /// Budgets, comma-separated.
    #[arg(long = "kv-budget", value_delimiter = ',', default_value = "0.1,0.2")]
    pub budgets: Vec<Budget>,
    /// Leave out llama.cpp's q8_0/q4_0 cache rows and ChunkKV on q8_0 (a pair
    /// given with -ctk/-ctv, e.g. q8_0 K and q4_0 V, still gets its rows).
    #[arg(long = "no-quantized")]
    pub no_quantized: bool,
    #[command(flatten)]
    pub chunk: ChunkArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "md")]
    pub output: Output,
    #[command(flatten)]
    pub context: ContextArgs,
}

fn rows(args: &CompareArgs) -> Vec<RowSpec> {
    let plain = |t: CacheType| RowSpec {
        method: Method::None,
        budget: None,
        cache_type_k: t,
        cache_type_v: t,
    };
    let mut rows = vec![plain(CacheType::F16)];
    for &m in args.methods.iter().filter(|&&m| m != Method::None) {
        for &b in &args.budgets {
            rows.push(RowSpec {
                method: m,
                budget: Some(b),
                cache_type_k: CacheType::F16,
                cache_type_v: CacheType::F16,
            });
        }
    }
    let chunkkv_on = |rows: &mut Vec<RowSpec>, k: CacheType, v: CacheType| {
        for &b in &args.budgets {
            rows.push(RowSpec {
                method: Method::Chunkkv,
                budget: Some(b),
                cache_type_k: k,
                cache_type_v: v,
            });
        }
    };
    if !args.no_quantized {
        rows.push(plain(CacheType::Q8_0));
        rows.push(plain(CacheType::Q4_0));
        chunkkv_on(&mut rows, CacheType::Q8_0, CacheType::Q8_0);
    }
    // A pair asked for with -ctk/-ctv (e.g. q8_0 K with q4_0 V) gets its own
    // rows unless the fixed ones already hold it.
    let (k, v) = (args.context.cache_type_k, args.context.cache_type_v);
    if !rows
        .iter()
        .any(|r| r.cache_type_k == k && r.cache_type_v == v)
    {
        rows.push(RowSpec {
            cache_type_k: k,
            ..plain(v)
        });
        chunkkv_on(&mut rows, k, v);
    }
    rows
}

pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    if args.budgets.is_empty() {
        anyhow::bail!("--kv-budget parsed to no budget: give at least one, e.g. 0.1,0.2");
    }
    if args.methods.is_empty() {
        anyhow::bail!("--kv-method parsed to no method");
    }
    if !(1..=20).contains(&args.reps) {
        anyhow::bail!("-r {} is not sensible: use 1 to 20 repetitions", args.reps);
    }
    if args.n_gen == 0 || args.n_gen > 4096 {
        anyhow::bail!("-n must be between 1 and 4096");
    }
    let text = match &args.file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read prompt file {}", f.display()))?;
            if t.trim().is_empty() {
                anyhow::bail!("prompt file {} is empty", f.display());
            }
            Some(t)
        }
        None => None,
    };
    if text.is_none() && args.lengths.is_empty() {
        anyhow::bail!("-p parsed to no prompt length");
    }
    let chunk = args.chunk.shape()?;
    let model = args.model.load()?;
    let info = model.info();
    let prompts: Vec<Vec<crate::llama::Token>> = match &text {
        Some(t) => vec![model.tokenize(t, true, false)?],
        None => args
            .lengths
            .iter()
            .map(|&n| crate::workload::prompt_tokens(&model, n, n as u64))
            .collect::<Result<_, _>>()?,
    };
    let cfg = CompareConfig {
        rows: rows(&args),
        n_gen: args.n_gen,
        reps: args.reps,
        chunk,
        reuse: args.chunk.reuse_layers,
        scorer: args.chunk.score.unwrap_or(crate::compress::Scorer::Window),
    };
    let params = args.context.fixed_params();
    // Kernels load on first use: not a cost of the first row (llama-bench's warm-up).
    crate::bench::warm_up(&model, &params, &cfg.chunk, cfg.reuse)?;
    let mut all = Vec::new();
    for prompt in &prompts {
        if prompt.len() + args.n_gen > info.n_ctx_train as usize {
            eprintln!(
                "compare: note: {} + {} tokens exceed the model's training context ({})",
                prompt.len(),
                args.n_gen,
                info.n_ctx_train
            );
        }
        let rows = compare::run_prompt(&model, &params, prompt, &cfg, |r| {
            eprintln!(
                "compare: {} tokens, {} {:.0}% ({}/{}): {:.1} tok/s, agreement {:.2}",
                r.n_prompt,
                r.method,
                r.budget * 100.0,
                r.cache_type_k,
                r.cache_type_v,
                r.decode_tok_s,
                r.agreement
            )
        })?;
        all.extend(rows);
    }
    let header = serde_json::json!({
        "model": info.description,
        "model_path": model.path(),
        "machine": crate::hardware::machine_description(),
        "backend": crate::llama::version::BACKENDS,
        "commit": crate::hardware::commit(),
        "n_gen": args.n_gen,
        "repetitions": args.reps,
    });
    match args.output {
        Output::Json => {
            let rows: Vec<serde_json::Value> = all.iter().map(json_row).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "header": header, "rows": rows })
                )?
            );
        }
        Output::Csv => print_csv(&all),
        Output::Md => print_md(&info.description, &all),
    }
    Ok(())
}

/// The stable JSON row (scripts depend on these keys).
fn json_row(r: &CompareRow) -> serde_json::Value {
    serde_json::json!({
        "n_prompt": r.n_prompt,
        "method": r.method,
        "budget": r.budget,
        "cache_type_k": r.cache_type_k,
        "cache_type_v": r.cache_type_v,
        "flash_attn": r.flash_attn,
        "bytes_live": r.bytes_live,
        "bytes_allocated": r.bytes_allocated,
        "prefill_tok_s": r.prefill_tok_s,
        "ttft_ms": r.ttft_ms,
        "decode_tok_s": r.decode_tok_s,
        "decode_tok_s_std": r.decode_tok_s_std,
        "overhead_ms": r.overhead_ms,
        "overhead_pct": r.overhead_pct,
        "agreement": r.agreement,
        "kl": r.kl,
    })
}

fn print_csv(rows: &[CompareRow]) {
    println!("n_prompt,method,budget,cache_type_k,cache_type_v,bytes_live,bytes_allocated,prefill_tok_s,ttft_ms,decode_tok_s,decode_tok_s_std,overhead_ms,overhead_pct,agreement,kl");
    for r in rows {
        println!(
            "{},{},{},{},{},{},{},{:.2},{:.1},{:.2},{:.2},{:.1},{:.2},{:.4},{:.5}",
            r.n_prompt,
            r.method,
            r.budget,
            r.cache_type_k,
            r.cache_type_v,
            r.bytes_live,
            r.bytes_allocated,
            r.prefill_tok_s,
            r.ttft_ms,
            r.decode_tok_s,
            r.decode_tok_s_std,
            r.overhead_ms,
            r.overhead_pct,
            r.agreement,
            r.kl
        );
    }
}

fn print_md(model: &str, rows: &[CompareRow]) {
    println!("| model | prompt | method | budget | cache K/V | KV live MiB | KV alloc MiB | prefill t/s | TTFT ms | decode t/s | overhead ms (%) | agreement | KL |");
    println!("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let overhead = if r.method == "none" {
            String::new()
        } else {
            format!("{:.1} ({:.2}%)", r.overhead_ms, r.overhead_pct)
        };
        println!(
            "| {model} | {} | {} | {:.0}% | {}/{} | {:.2} | {:.2} | {:.1} | {:.0} | {:.2} ± {:.2} | {overhead} | {:.3} | {:.4} |",
            r.n_prompt,
            r.method,
            r.budget * 100.0,
            r.cache_type_k,
            r.cache_type_v,
            mib(r.bytes_live),
            mib(r.bytes_allocated),
            r.prefill_tok_s,
            r.ttft_ms,
            r.decode_tok_s,
            r.decode_tok_s_std,
            r.agreement,
            r.kl
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn rows_for(extra: &[&str]) -> Vec<(Method, CacheType, CacheType)> {
        let argv = ["chunkkv", "compare", "--kv-budget", "0.1"]
            .iter()
            .chain(extra)
            .map(|a| a.into());
        let Command::Compare(a) = Cli::try_parse_from(Cli::normalize(argv)).unwrap().command else {
            unreachable!()
        };
        rows(&a)
            .into_iter()
            .map(|r| (r.method, r.cache_type_k, r.cache_type_v))
            .collect()
    }

    /// `-ctk/-ctv` add rows for their pair (uncompressed and ChunkKV), once.
    #[test]
    fn a_cache_pair_asked_for_gets_its_rows() {
        use CacheType::{Q4_0, Q8_0};
        let fixed = rows_for(&[]);
        assert_eq!(fixed.len(), 5, "{fixed:?}");
        let mixed = rows_for(&["-fa", "on", "-ctk", "q8_0", "-ctv", "q4_0"]);
        assert_eq!(mixed[..5], fixed[..]);
        assert_eq!(
            mixed[5..],
            [(Method::None, Q8_0, Q4_0), (Method::Chunkkv, Q8_0, Q4_0)]
        );
        // A pair the fixed rows hold adds nothing.
        assert_eq!(
            rows_for(&["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]),
            fixed
        );
        // Only the pair's own rows without the fixed quantized ones.
        let alone = rows_for(&[
            "--no-quantized",
            "-fa",
            "on",
            "-ctk",
            "q8_0",
            "-ctv",
            "q4_0",
        ]);
        assert_eq!(alone.len(), 4, "{alone:?}");
    }
}
