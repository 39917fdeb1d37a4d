//! `chunkkv eval`: tasks × methods × budgets, with tables and plots.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::{ChunkArgs, ContextArgs, ModelArgs, RecallArgs};
use crate::compress::{Budget, MethodSpec, Scorer};
use crate::eval::{self, report, tasks, EvalConfig, SampleResult};

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tasks, comma-separated: niah, passkey, ruler (or one of ruler-mk, ruler-mv, ruler-vt), gsm8k-icl, fidelity.
    #[arg(
        long = "tasks",
        value_delimiter = ',',
        required_unless_present_any = ["tasks_file", "report"],
        conflicts_with = "tasks_file"
    )]
    pub tasks: Vec<String>,
    /// Your own tasks: JSON lines of {"id", "context", "question", "answers", "match": "contains"|"exact"}.
    #[arg(long = "tasks-file")]
    pub tasks_file: Option<PathBuf>,
    /// Methods, comma-separated (none: the full cache, always run as the
    /// reference): none, chunkkv, snapkv, pyramidkv, h2o, streaming, random,
    /// kvzip; `NAME:reconstruct` or `NAME:window` picks a method's scorer.
    #[arg(
        long = "methods",
        alias = "kv-method",
        value_delimiter = ',',
        default_value = "none,chunkkv,snapkv,pyramidkv,h2o,streaming,random"
    )]
    pub methods: Vec<MethodSpec>,
    /// Compress each context before its question is appended, then ask every
    /// question of that compressed state (a chat about a loaded document).
    #[arg(long = "query-agnostic")]
    pub query_agnostic: bool,
    /// Run both modes, question in the prompt and query-agnostic, side by side.
    #[arg(long = "both-modes", conflicts_with = "query_agnostic")]
    pub both_modes: bool,
    /// Facts planted per context (NIAH, passkey, RULER), each asked separately.
    #[arg(long = "questions", default_value_t = 1)]
    pub questions: usize,
    /// Budgets, comma-separated (0.1, 10% or a token count).
    #[arg(
        long = "budgets",
        alias = "kv-budget",
        value_delimiter = ',',
        default_value = "0.1,0.2,0.3"
    )]
    pub budgets: Vec<Budget>,
    /// Target context length of generated tasks in tokens [default: 4096, or -c minus the answer room].
    #[arg(long = "length")]
    pub length: Option<usize>,
    /// Samples per task (NIAH: needle depths per length).
    #[arg(long = "samples", default_value_t = 5)]
    pub samples: usize,
    /// Seed of the task generators and of the `random` method.
    #[arg(long = "seed", default_value_t = 1)]
    pub seed: u64,
    /// Data directory (paul-graham-essays/, gsm8k/) [default: $CHUNKKV_DATA, else ../shared/data].
    #[arg(long = "data", env = "CHUNKKV_DATA")]
    pub data: Option<PathBuf>,
    /// Where results.md, results.json and the plots go.
    #[arg(long = "out-dir", default_value = "chunkkv-eval")]
    pub out_dir: PathBuf,
    /// Rewrite results.md and the plots of an earlier run from DIR/results.json
    /// (no model is loaded, nothing is measured).
    #[arg(long = "report", value_name = "DIR", conflicts_with_all = ["tasks", "tasks_file"])]
    pub report: Option<PathBuf>,
    /// Print {"results": [{"task", "method", "budget", "score", "n"}, ...]} on stdout.
    #[arg(long)]
    pub json: bool,
    /// `--kv-recall host|disk` gives every chunkkv method recall (each question
    /// brings back what it needs); `chunkkv+recall` in --methods does it for one.
    #[command(flatten)]
    pub recall: RecallArgs,
    #[command(flatten)]
    pub context: ContextArgs,
    #[command(flatten)]
    pub chunk: ChunkArgs,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.report {
        return rewrite(dir, args.json);
    }
    if args.budgets.is_empty() {
        anyhow::bail!("--budgets parsed to no budget: give at least one, e.g. 0.1,0.2");
    }
    if args.methods.is_empty() {
        anyhow::bail!("--methods parsed to no method");
    }
    if !(1..=8).contains(&args.questions) {
        anyhow::bail!("--questions {} is out of range: use 1 to 8", args.questions);
    }
    if args.samples == 0 || args.samples > 1000 {
        anyhow::bail!("--samples {} is not sensible: use 1 to 1000", args.samples);
    }
    for t in &args.tasks {
        if !tasks::TASKS.contains(&t.as_str()) && !tasks::RULER_PARTS.contains(&t.as_str()) {
            anyhow::bail!("unknown task `{t}`: {}", tasks::TASKS.join(", "));
        }
    }
    let chunk = args.chunk.shape()?;
    // Recalling methods that draft take recall's shape defaults.
    let recall_probe = args.recall.probe();
    let recall_chunk = if recall_probe > 0 {
        args.chunk.for_recall().shape()?
    } else {
        chunk.clone()
    };
    let model = args.model.load()?;
    let train = model.n_ctx_train() as usize;
    let length = match (args.length, args.context.ctx_size) {
        (Some(l), _) => l,
        (None, 0) => 4096.min(train.saturating_sub(256)),
        (None, c) => (c as usize).saturating_sub(256),
    };
    if length < 128 {
        anyhow::bail!("--length {length} is too short: use at least 128 tokens");
    }
    let tcfg = tasks::TaskConfig {
        length,
        samples: args.samples,
        questions: args.questions,
        seed: args.seed,
        data: args
            .data
            .clone()
            .unwrap_or_else(|| PathBuf::from("../shared/data")),
    };
    let mut samples = Vec::new();
    match &args.tasks_file {
        Some(f) => samples = tasks::from_file(f)?,
        None => {
            for t in &args.tasks {
                samples.extend(tasks::generate(&model, t, &tcfg)?);
            }
        }
    }
    let mut need = eval::needed_ctx(&model, &samples)?;
    let scorer = args.chunk.score.unwrap_or(Scorer::Window);
    if args
        .methods
        .iter()
        .any(|m| m.method.scores() && m.scorer_or(scorer) == Scorer::Reconstruct)
    {
        // Room for reconstruction chunks on top of the context (KVzip's 2048).
        need += 2048 + 256;
    }
    let recall_all = args.recall.mode != crate::compress::RecallMode::Off;
    if recall_all || args.methods.iter().any(|m| m.recall) {
        // The drafted reply needs cells after the question, beside the answer's.
        need = need.saturating_add(u32::try_from(recall_probe).unwrap_or(u32::MAX));
    }
    let n_ctx = match args.context.ctx_size {
        0 => need,
        c if c >= need => c,
        c => anyhow::bail!(
            "-c {c} is too small: the longest sample and its answer need {need} (lower --length or raise -c)"
        ),
    };
    let methods = args
        .methods
        .iter()
        .map(|&m| MethodSpec {
            recall: m.recall || (recall_all && m.method == crate::compress::Method::Chunkkv),
            ..m
        })
        .collect();
    let cfg = EvalConfig {
        methods,
        recall_dir: args.recall.dir(),
        recall_cells: args.recall.cells,
        recall_probe,
        recall_pin: args.recall.pin(),
        recall_unify: args.recall.unify,
        recall_chunk,
        budgets: args.budgets.clone(),
        chunk,
        reuse: args.chunk.reuse_layers,
        seed: args.seed,
        scorer,
        query_agnostic: args.query_agnostic,
    };
    let modes: Vec<EvalConfig> = if args.both_modes {
        vec![
            cfg.clone(),
            EvalConfig {
                query_agnostic: true,
                ..cfg.clone()
            },
        ]
    } else {
        vec![cfg]
    };
    let n_runs: usize = samples
        .iter()
        .map(|s| modes.iter().map(|m| m.runs(s)).sum::<usize>())
        .sum();
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(n_runs as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs {msg} [{elapsed_precise} < {eta}]",
        )
        .expect("valid template"),
    );
    let info = report::RunInfo {
        model: model.path().display().to_string(),
        machine: crate::hardware::machine_description(),
        commit: crate::hardware::commit(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        n_ctx,
    };
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let mut ctx = eval::context(&model, &args.context.params(), n_ctx)?;
    if n_ctx as usize > train {
        tracing::warn!("context {n_ctx} exceeds the model's training context {train}");
    }
    let mut results: Vec<SampleResult> = Vec::new();
    for s in &samples {
        for cfg in &modes {
            bar.set_message(s.id.clone());
            let rs = eval::run_sample(&mut ctx, s, cfg, |_| bar.inc(1))
                .with_context(|| format!("sample {}", s.id))?;
            results.extend(rs);
            // Rewritten after every sample: a long run stopped early keeps what it measured.
            tables(&args.out_dir, &info, &results)?;
        }
    }
    bar.finish_and_clear();
    finish(&args.out_dir, &info, &results, args.json)
}

/// `--report DIR`: the tables and plots again, from a run's results.json.
fn rewrite(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    #[derive(serde::Deserialize)]
    struct Saved {
        header: report::RunInfo,
        samples: Vec<SampleResult>,
    }
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a chunkkv eval results file", path.display()))?;
    finish(dir, &saved.header, &saved.samples, json)
}

/// Writes results.md and results.json; returns the aggregates and the markdown.
fn tables(
    dir: &std::path::Path,
    info: &report::RunInfo,
    results: &[SampleResult],
) -> anyhow::Result<(Vec<eval::Aggregate>, String)> {
    let aggs = eval::aggregate(results);
    let md = report::markdown(info, &aggs) + &report::recall_cost(results);
    std::fs::write(dir.join("results.md"), &md)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&report::json(info, &aggs, results))?,
    )?;
    Ok((aggs, md))
}

/// Writes results.md, results.json and the plots, then prints the table (or the JSON summary).
fn finish(
    dir: &std::path::Path,
    info: &report::RunInfo,
    results: &[SampleResult],
    json: bool,
) -> anyhow::Result<()> {
    let (aggs, md) = tables(dir, info, results)?;
    let plots = report::plots(dir, &aggs, results)?;
    let mut stdout = std::io::stdout().lock();
    if json {
        let rows: Vec<serde_json::Value> = aggs
            .iter()
            .map(|a| {
                serde_json::json!({
                    "task": a.task, "method": a.method, "budget": a.budget,
                    "score": a.score, "n": a.n,
                })
            })
            .collect();
        writeln!(stdout, "{}", serde_json::json!({ "results": rows }))?;
    } else {
        write!(stdout, "{md}")?;
        eprintln!(
            "wrote results.md, results.json and {} plots to {}",
            plots.len(),
            dir.display()
        );
    }
    Ok(())
}
