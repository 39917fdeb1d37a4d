//! `chunkkv generate`: one prompt, one continuation, llama.cpp style.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::{CompressArgs, ContextArgs, ModelArgs, SamplingArgs};
use crate::compress::{Scorer, TurnState};
use crate::llama::{ChatMessage, Context, Sampler};
use crate::pipeline::{self, KvReport};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text.
    #[arg(
        short = 'p',
        long = "prompt",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object on stdout (logs stay on stderr).
    #[arg(long)]
    pub json: bool,
    /// Prefill in segments that each fill the free cells and are compressed to
    /// the budget, so a prompt longer than -c passes through (every segment
    /// but the last is compressed before the rest exists).
    #[arg(long = "kv-stream")]
    pub stream: bool,
    #[command(flatten)]
    pub context: ContextArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let text = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read prompt file {}", f.display()))?,
        (None, None) => unreachable!("clap requires -p or -f"),
    };
    let model = args.model.load()?;
    let prompt_text = if args.chat {
        model.apply_chat_template(&[ChatMessage::new("user", &text)], true)?
    } else {
        text
    };
    let tokens = model.tokenize(&prompt_text, true, true)?;
    let mut ctx = Context::new(&model, &args.context.params())?;
    if args.stream && args.compress.method == crate::compress::Method::None {
        anyhow::bail!("--kv-stream compresses each segment: choose a --kv-method");
    }
    if !args.stream {
        pipeline::check_prompt(&ctx, tokens.len())?;
    }
    let mut sampler = Sampler::new(&args.sampling.params());
    let mut compressor = args
        .compress
        .compressor(&ctx, TurnState::Open, Scorer::Window)?;
    let hook = compressor.as_mut().map(|compressor| pipeline::Hook {
        compressor,
        budget: args.compress.budget,
        stream: args.stream,
    });

    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let generation = pipeline::generate(
        &mut ctx,
        &mut sampler,
        &tokens,
        args.n_predict,
        hook,
        |piece| {
            if stream {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    let kv = KvReport::of(&ctx);
    let t = &generation.timings;
    if args.json {
        let out = serde_json::json!({
            "model": model.path(),
            "text": generation.text,
            "n_prompt": generation.n_prompt,
            "n_gen": generation.n_gen,
            "stop": generation.stop,
            "timings": t,
            "kv": kv,
        });
        let mut out = out;
        if let Some(c) = &generation.compression {
            out["compression"] = serde_json::to_value(c)?;
        }
        if let Some(s) = &generation.stream {
            out["stream"] = serde_json::to_value(s)?;
        }
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "\nprompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | ttft {:.0} ms",
            generation.n_prompt, t.prefill_tok_s, generation.n_gen, t.decode_tok_s, t.ttft_ms
        );
        if let Some(c) = &generation.compression {
            eprintln!(
                "{}: kept {} of {} cells ({:.2} -> {:.2} MiB live, attention width {} -> {}) in {:.1} ms",
                c.method,
                c.cells_after,
                c.cells_before,
                c.bytes_live_before as f64 / (1u64 << 20) as f64,
                c.bytes_live_after as f64 / (1u64 << 20) as f64,
                c.attn_width_before,
                c.attn_width_after,
                c.ms.importance + c.ms.select + c.ms.compact
            );
        }
        if let Some(s) = &generation.stream {
            eprintln!(
                "streamed in {} segments, {} compressions: {} cells, {:.2} MiB live",
                s.segments,
                s.compressions,
                s.cells_after,
                s.bytes_live_after as f64 / (1u64 << 20) as f64
            );
        }
        if let Some(kv) = kv {
            eprintln!(
                "kv: {} cells used of {}, {:.2} MiB live of {:.2} MiB allocated",
                kv.cells_used,
                kv.size,
                kv.bytes_live as f64 / (1u64 << 20) as f64,
                kv.bytes_allocated as f64 / (1u64 << 20) as f64
            );
        }
    }
    Ok(())
}
