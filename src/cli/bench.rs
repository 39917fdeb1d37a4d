//! `chunkkv bench`: decode speed and memory of compressed caches against the
//! full cache and the fresh-context bound, llama-bench style (md or json).

use clap::{Args, ValueEnum};

use super::{ChunkArgs, ContextArgs, ModelArgs};
use crate::bench::{self, BenchConfig, BenchRow};
use crate::compress::Budget;
use crate::llama::mib;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Md,
    Json,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt depths in tokens, comma-separated.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "2048,4096"
    )]
    pub depths: Vec<usize>,
    /// Tokens decoded per measurement (tg).
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    pub n_gen: usize,
    /// ChunkKV budgets, comma-separated.
    #[arg(long = "kv-budget", value_delimiter = ',', default_value = "0.1,0.2")]
    pub budgets: Vec<Budget>,
    /// Measure only llama.cpp's full cache (prefill and decode), no compression rows.
    #[arg(long = "full-only", conflicts_with = "stream")]
    pub full_only: bool,
    /// Stream each -p prompt (it may be far longer than the cache) through a
    /// cache of -c cells (default 131072), compressed segment by segment to
    /// the first --kv-budget: prefill+compression speed, peak memory, decode.
    #[arg(long = "kv-stream")]
    pub stream: bool,
    /// Skip the warm-up run (a small prefill, compression and decode first,
    /// so kernels load before anything is timed, as in llama-bench).
    #[arg(long = "no-warmup")]
    pub no_warmup: bool,
    /// Repetitions of each decode measurement.
    #[arg(short = 'r', long = "repetitions", default_value_t = 2)]
    pub reps: usize,
    #[command(flatten)]
    pub chunk: ChunkArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "md")]
    pub output: Output,
    /// Also write the JSON result to this file.
    #[arg(long = "json-out")]
    pub json_out: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub context: ContextArgs,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.depths.is_empty() || args.budgets.is_empty() {
        anyhow::bail!("-p and --kv-budget need at least one value each");
    }
    if !(1..=100).contains(&args.reps) {
        anyhow::bail!("-r must be between 1 and 100");
    }
    if args.n_gen == 0 {
        anyhow::bail!("-n must be at least 1");
    }
    let chunkkv = args.chunk.shape()?;
    let model = args.model.load()?;
    let info = model.info();
    let cfg = BenchConfig {
        depths: args.depths.clone(),
        n_gen: args.n_gen,
        budgets: if args.full_only {
            Vec::new()
        } else {
            args.budgets.clone()
        },
        reps: args.reps,
        chunkkv,
        reuse: args.chunk.reuse_layers,
        warmup: !args.no_warmup,
        stream_cells: args.stream.then_some(match args.context.ctx_size {
            0 => 131_072,
            c => c,
        }),
    };
    let params = args.context.fixed_params();
    let rows = bench::run(&model, &params, &cfg, |r| {
        eprintln!(
            "bench: d{} {} {:.0}%: {:.1} tok/s decode, {} cells",
            r.depth,
            r.method,
            r.budget * 100.0,
            r.decode_tok_s,
            r.cells
        )
    })?;
    let backend = crate::llama::version::BACKENDS;
    let header = serde_json::json!({
        "model": info.description,
        "model_path": model.path(),
        "machine": crate::hardware::machine_description(),
        "backend": backend,
        "n_gpu_layers": args.model.n_gpu_layers,
        "flash_attn": args.context.flash_attn.to_string(),
        "cache_type_k": args.context.cache_type_k,
        "cache_type_v": args.context.cache_type_v,
        "threads": params.threads().to_string(),
        "commit": crate::hardware::commit(),
    });
    let json =
        serde_json::to_string_pretty(&serde_json::json!({ "header": header, "rows": rows }))?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, &json)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    match args.output {
        Output::Json => println!("{json}"),
        Output::Md => print_md(&info.description, args.n_gen, &rows),
    }
    Ok(())
}

fn print_md(model: &str, n_gen: usize, rows: &[BenchRow]) {
    println!("| model | test | cache | budget | cells | KV live MiB | KV alloc MiB | attn width | prefill t/s | overhead ms (% of prefill) | decode t/s | vs bound |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let bound = rows
            .iter()
            .find(|b| {
                b.method == "bound" && b.depth == r.depth && (b.budget - r.budget).abs() < 1e-9
            })
            .map(|b| b.decode_tok_s);
        let vs = match (r.method.as_str(), bound) {
            ("bound", _) | (_, None) => String::new(),
            (_, Some(b)) => format!("{:.2}x", r.decode_tok_s / b),
        };
        let overhead = match (&r.stages, &r.stream) {
            (Some(s), _) => format!(
                "{:.1} ({:.2}%{}): scored window {:.1} (read back {:.1}), select {:.1}, compact {:.1}",
                r.overhead_ms,
                r.overhead_pct,
                r.overhead_first_ms
                    .map_or(String::new(), |f| format!("; first {f:.1}")),
                s.importance,
                s.readback,
                s.select,
                s.compact
            ),
            (_, Some(s)) => format!(
                "{} segments, {} compressions, peak {:.0} MiB",
                s.segments, s.compressions, s.peak_mib
            ),
            _ => String::new(),
        };
        let budget = if r.method == "full" {
            "100%".to_string()
        } else {
            format!("{:.0}%", r.budget * 100.0)
        };
        println!(
            "| {model} | tg{n_gen} @ d{} | {} | {budget} | {} | {:.2} | {:.2} | {} | {:.1} | {overhead} | {:.2} ± {:.2} | {vs} |",
            r.depth,
            r.method,
            r.cells,
            mib(r.bytes_live),
            mib(r.bytes_allocated),
            r.attn_width,
            r.prefill_tok_s,
            r.decode_tok_s,
            r.decode_tok_s_std,
        );
    }
}
