//! `chunkkv chat`: a REPL over [`crate::chat::ChatSession`].
//!
//! On a terminal: line editing and history, streamed replies, Ctrl-C stops a
//! reply, Ctrl-D exits. With piped stdin every line is a turn (or a slash
//! command) and only the replies are printed, a blank line after each.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::{ChunkArgs, CompressArgs, ContextArgs, ModelArgs, RecallArgs, SamplingArgs};
use crate::chat::{ChatSession, ChatStats, FeedProgress};
use crate::compress::{Budget, ChunkScore, Chunking, Method, Scorer, TurnState};
use crate::llama::{mib, Context, Sampler};
use crate::pipeline::StopReason;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt (-sys).
    #[arg(long = "system-prompt")]
    pub system: Option<String>,
    /// A document to read before the first turn (prefilled in segments if longer than the context).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n_predict: usize,
    #[command(flatten)]
    pub context: ContextArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Compression method [default: chunkkv]; none keeps llama.cpp's full cache.
    #[arg(long = "kv-method", value_enum)]
    pub method: Option<Method>,
    /// Live cells kept, as a share of every token prefilled so far (0.25, 25%) or a count [default: 25%].
    #[arg(long = "kv-budget")]
    pub budget: Option<Budget>,
    #[command(flatten)]
    pub chunk: ChunkArgs,
    #[command(flatten)]
    pub recall: RecallArgs,
}

const HELP: &str = "\
/help            this list
/exit            leave (also Ctrl-D)
/clear           forget the conversation
/system TEXT     set the system prompt and start over
/load FILE       read a document into the conversation
/stats           cache cells and bytes live vs the full cache (and recall)
/budget B        budget for later turns (0.25, 25%, or a token count)
/method M        chunkkv, snapkv, pyramidkv, h2o, streaming, random, kvzip or none
Ctrl-C stops a reply.";

impl ChatArgs {
    fn compress_args(&self, method: Method) -> CompressArgs {
        CompressArgs {
            method,
            budget: self.budget.unwrap_or(Budget::Ratio(0.25)),
            chunk: self.chunk.clone(),
            kv_seed: 1,
        }
    }

    /// Documents are compressed before their questions: unless told
    /// otherwise, ChunkKV's chunks there follow sentences and rank by mean
    /// score (on reconstruction scores that kept 0.84 of the full cache's NIAH
    /// score at 20% against 0.65 for fixed chunks on the CPU runs of
    /// docs/results/eval-query-agnostic.md); turns keep the paper's shape.
    fn document_policy(&self, method: Method) -> Option<Box<dyn crate::compress::Policy>> {
        if method != Method::Chunkkv {
            return None;
        }
        let mut chunk = self.chunk.clone();
        chunk.chunk_by.get_or_insert(Chunking::Sentences);
        chunk.chunk_score.get_or_insert(ChunkScore::Mean);
        let shape = chunk.shape().ok()?;
        Some(Box::new(shape))
    }
}

pub fn run(mut args: ChatArgs) -> anyhow::Result<()> {
    // Recall that drafts replies takes recall's shape defaults.
    if args.recall.drafts() {
        args.chunk = args.chunk.for_recall();
    }
    if args.n_predict == 0 {
        anyhow::bail!("-n must be at least 1");
    }
    // --kv-budget alone means ChunkKV; so does nothing at all.
    let method = args.method.unwrap_or(Method::Chunkkv);
    let budget = args.budget.unwrap_or(Budget::Ratio(0.25));
    if let Budget::Ratio(r) = budget {
        if !(r > 0.0 && r <= 1.0) {
            anyhow::bail!("--kv-budget {r} is out of range: use a share in (0, 1]");
        }
    }
    let document = match &args.file {
        Some(f) => Some(read_document(f)?),
        None => None,
    };
    let model = args.model.load()?;
    let ctx = Context::new(&model, &args.context.params())?;
    // The compressor is built even for `none`, so `/method` can turn it on later.
    let builder = if method == Method::None {
        Method::Chunkkv
    } else {
        method
    };
    let compressor =
        match args
            .compress_args(builder)
            .compressor(&ctx, TurnState::Closed, Scorer::Reconstruct)
        {
            Ok(c) => c.map(|c| match args.document_policy(builder) {
                Some(p) => c.with_document_policy(p),
                None => c,
            }),
            Err(e) if method == Method::None => {
                tracing::debug!("no compression available: {e}");
                None
            }
            Err(e) => return Err(e.into()),
        };
    let compressor = match (compressor, args.recall.store(&ctx, crate::pipeline::SEQ)?) {
        (c, None) => c,
        (Some(c), Some(store)) if method == Method::Chunkkv => Some(
            c.with_recall(store)?
                .with_recall_cells(args.recall.cells.unwrap_or(usize::MAX))
                .with_recall_probe(args.recall.probe())
                .with_recall_pin(args.recall.pin())
                .with_recall_unify(args.recall.unify),
        ),
        _ => {
            anyhow::bail!("--kv-recall brings back ChunkKV's chunks: it needs --kv-method chunkkv")
        }
    };
    let n_ctx = ctx.n_ctx();
    let mut session = ChatSession::new(
        ctx,
        Sampler::new(&args.sampling.params()),
        compressor,
        method != Method::None,
        budget,
        args.n_predict,
        args.system.clone(),
    )?;

    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chunkkv chat: {} | context {} | {} | /help for commands, Ctrl-D to leave",
            model.path().display(),
            n_ctx,
            describe(&session)
        );
    }
    if let Some(doc) = document {
        load(&mut session, &doc, interactive)?;
    }
    if interactive {
        repl(&mut session, &args)
    } else {
        piped(&mut session, &args)
    }
}

fn describe(session: &ChatSession<'_>) -> String {
    match session.method() {
        "none" => "full cache (no compression)".into(),
        m => format!("{m} at {}", session.budget()),
    }
}

fn read_document(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.trim().is_empty() {
        anyhow::bail!("{} is empty", path.display());
    }
    Ok(text)
}

fn load(session: &mut ChatSession<'_>, text: &str, interactive: bool) -> anyhow::Result<()> {
    let bar = if interactive && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} tokens, {msg} [{elapsed_precise} < {eta}]",
        )
        .expect("valid template"),
    );
    let n = session.add_document(text, &mut |p: FeedProgress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!(
            "{:.0} tok/s, cache {} cells ({:.1} MiB live)",
            p.tok_s,
            p.cells_used,
            mib(p.bytes_live)
        ));
    })?;
    bar.finish_and_clear();
    let s = session.stats()?;
    if interactive {
        eprintln!(
            "loaded {n} tokens; cache {} cells, {:.1} MiB live ({:.1} MiB uncompressed)",
            s.kv.cells_used,
            mib(s.kv.bytes_live),
            mib(s.bytes_full)
        );
    }
    Ok(())
}

fn stats_text(s: &ChatStats) -> String {
    let budget = s
        .budget
        .map_or("no budget".to_string(), |b| format!("budget {b}"));
    let recall = match (s.recall_bytes, s.recall_last) {
        (None, _) => String::new(),
        (Some(held), None) => format!(
            "\nrecall: {:.2} MiB of evicted rows held; nothing recalled yet",
            mib(held)
        ),
        (Some(held), Some(r)) => format!(
            "\nrecall: {:.2} MiB of evicted rows held; last turn {} chunks ({} tokens per layer) \
             came back of {} uploaded, {:.2} MiB up and {:.2} MiB down in {:.1} ms, peak {} cells",
            mib(held),
            r.chunks,
            r.tokens,
            r.uploaded,
            mib(r.bytes_up),
            mib(r.bytes_down),
            r.ms,
            r.transient_cells
        ),
    };
    format!(
        "cache: {} cells live, {:.2} MiB live of {:.2} MiB allocated; the full cache would hold {} cells, {:.2} MiB\n\
         method {}, {budget}; {} compressions; last turn {:.0} tok/s prefill, {:.1} tok/s decode{recall}",
        s.kv.cells_used,
        mib(s.kv.bytes_live),
        mib(s.kv.bytes_allocated),
        s.prefilled,
        mib(s.bytes_full),
        s.method,
        s.compressions,
        s.prefill_tok_s,
        s.decode_tok_s
    )
}

/// What a line asked for.
enum Action {
    Continue,
    Exit,
}

/// Runs a slash command; its output goes to `out`.
fn command(
    session: &mut ChatSession<'_>,
    args: &ChatArgs,
    line: &str,
    interactive: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Action> {
    let (cmd, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    match cmd {
        "/help" => writeln!(out, "{HELP}")?,
        "/exit" | "/quit" => return Ok(Action::Exit),
        "/clear" => {
            session.clear();
            if interactive {
                eprintln!("conversation cleared");
            }
        }
        "/system" => {
            session.set_system((!rest.is_empty()).then(|| rest.to_string()));
            if interactive {
                eprintln!("system prompt set; conversation cleared");
            }
        }
        "/load" => {
            if rest.is_empty() {
                anyhow::bail!("/load needs a file: /load FILE");
            }
            let text = read_document(Path::new(rest))?;
            load(session, &text, interactive)?;
        }
        "/stats" => writeln!(out, "{}", stats_text(&session.stats()?))?,
        "/budget" => {
            let b: Budget = rest
                .parse()
                .map_err(|e| anyhow::anyhow!("/budget {rest}: {e}"))?;
            if let Budget::Ratio(r) = b {
                if !(r > 0.0 && r <= 1.0) {
                    anyhow::bail!("/budget {r} is out of range: use a share in (0, 1]");
                }
            }
            session.set_budget(b)?;
            if interactive {
                eprintln!("budget {b} for later turns");
            }
        }
        "/method" => {
            let m = Method::from_str(rest, true).map_err(|_| {
                anyhow::anyhow!(
                    "unknown method `{rest}`: chunkkv, snapkv, pyramidkv, h2o, streaming, random, kvzip or none"
                )
            })?;
            let reuse = if m == Method::Chunkkv {
                args.chunk.reuse_layers
            } else {
                1
            };
            session.set_policy(args.compress_args(m).policy()?, reuse)?;
            if interactive {
                eprintln!("{} for later turns", describe(session));
            }
        }
        _ => anyhow::bail!("unknown command {cmd}: /help lists them"),
    }
    Ok(Action::Continue)
}

/// One user turn, the reply streamed to stdout.
fn turn(
    session: &mut ChatSession<'_>,
    text: &str,
    stop: &AtomicBool,
    interactive: bool,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let reply = session.turn(text, stop, &mut |_| {}, |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    writeln!(stdout)?;
    if let Some(w) = session.take_warning() {
        eprintln!("warning: {w}");
    }
    if interactive {
        let s = session.stats()?;
        let why = match reply.stop {
            StopReason::Interrupted => " (stopped)",
            StopReason::ContextFull => " (context full)",
            StopReason::Length => " (length limit)",
            StopReason::EndOfGeneration => "",
        };
        eprintln!(
            "[{} tokens{why}, {:.1} tok/s | cache {} cells, {:.1} MiB live, {:.1} MiB uncompressed]",
            reply.n_gen,
            reply.decode_tok_s,
            s.kv.cells_used,
            mib(s.kv.bytes_live),
            mib(s.bytes_full)
        );
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

fn repl(session: &mut ChatSession<'_>, args: &ChatArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("cannot install the Ctrl-C handler")?;
    }
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = crate::models::cache_dir().join("chat_history.txt");
    let _ = editor.load_history(&history);
    loop {
        let line = match editor.readline("> ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        stop.store(false, Ordering::Relaxed);
        let result = if line.starts_with('/') {
            command(session, args, line, true, &mut std::io::stdout())
        } else {
            turn(session, line, &stop, true).map(|()| Action::Continue)
        };
        match result {
            Ok(Action::Exit) => break,
            Ok(Action::Continue) => {}
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    if let Some(dir) = history.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = editor.save_history(&history);
    Ok(())
}

fn piped(session: &mut ChatSession<'_>, args: &ChatArgs) -> anyhow::Result<()> {
    let never = AtomicBool::new(false);
    for line in std::io::stdin().lock().lines() {
        let line = line.context("cannot read stdin")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let result = if line.starts_with('/') {
            let mut stdout = std::io::stdout().lock();
            command(session, args, line, false, &mut stdout).and_then(|a| {
                // Command output is a reply too: a blank line after it.
                if line.starts_with("/stats") || line.starts_with("/help") {
                    writeln!(stdout)?;
                }
                Ok(a)
            })
        } else {
            turn(session, line, &never, false).map(|()| Action::Continue)
        };
        match result {
            Ok(Action::Exit) => break,
            Ok(Action::Continue) => {}
            // A failed line is reported and the chat goes on.
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    Ok(())
}
