//! The `chunkkv` command line: clap derive, llama.cpp's flag names.

mod bench;
mod chat;
mod compare;
mod eval;
mod generate;
mod info;
mod models;
mod rpc_server;
mod serve;
mod verify;

use clap::{Args, Parser, Subcommand};

use crate::compress::{
    Budget, ChunkKv, ChunkScore, Chunking, CompressError, Compressor, Method, RecallError,
    RecallMode, RecallStore, Reconstruction, Scorer, TurnState,
};
use crate::llama::{
    Backend, CacheType, Context, ContextParams, FlashAttn, Model, ModelParams, SamplingParams,
    ScoreReduce, SplitMode,
};

#[derive(Debug, Parser)]
#[command(
    name = "chunkkv",
    version,
    about = "ChunkKV KV-cache compression for llama.cpp models",
    propagate_version = true
)]
pub struct Cli {
    /// Show llama.cpp's log (-v info, -vv debug). Logs go to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Version, backends and devices; with -m, the model's shape.
    Info(info::InfoArgs),
    /// List or fetch the built-in models.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
    /// Chat with a model whose cache stays within a budget (REPL; piped stdin: one turn a line).
    Chat(chat::ChatArgs),
    /// One prompt under llama.cpp's caches and every method and budget, side by side.
    Compare(compare::CompareArgs),
    /// Answer quality under every method and budget: NIAH, passkey, RULER-style, GSM8K, fidelity.
    Eval(eval::EvalArgs),
    /// Decode speed and KV memory: full cache vs ChunkKV vs a fresh context at the budget.
    Bench(bench::BenchArgs),
    /// Check that compaction moves every kept K/V row exactly on this backend.
    Verify(verify::VerifyArgs),
    /// Serve this machine's CPU or GPU to other chunkkv (or llama.cpp) runs over ggml's RPC.
    RpcServer(rpc_server::RpcServerArgs),
    /// An OpenAI-compatible HTTP server whose slots keep conversations compressed.
    Serve(serve::ServeArgs),
}

/// llama.cpp's multi-letter single-dash flags and the long flags they mean.
/// clap's short flags are one letter, so these are rewritten before parsing.
const LLAMA_FLAGS: &[(&str, &str)] = &[
    ("-ngl", "--n-gpu-layers"),
    ("-sm", "--split-mode"),
    ("-ts", "--tensor-split"),
    ("-mg", "--main-gpu"),
    ("-fa", "--flash-attn"),
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-ub", "--ubatch-size"),
    ("-sys", "--system-prompt"),
    ("-np", "--parallel"),
];

fn rewrite_llama_flag(arg: std::ffi::OsString) -> std::ffi::OsString {
    let Some(s) = arg.to_str() else { return arg };
    for (short, long) in LLAMA_FLAGS {
        if s == *short {
            return (*long).into();
        }
        if let Some(value) = s
            .strip_prefix(short)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return format!("{long}={value}").into();
        }
    }
    arg
}

impl Cli {
    /// Parses the process arguments, accepting llama.cpp's `-ngl -fa -ctk -ctv -ub -sys`.
    /// Usage errors print as one `error:` line and exit 2 (help and version
    /// print as usual), so every failure reads alike.
    pub fn parse_args() -> Cli {
        match Cli::try_parse_from(Self::normalize(std::env::args_os())) {
            Ok(cli) => cli,
            Err(e) if !e.use_stderr() => e.exit(),
            Err(e) => {
                let text = e.to_string();
                let line = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid arguments");
                eprintln!("error: {}", line.trim_start_matches("error: "));
                std::process::exit(2);
            }
        }
    }

    /// Rewrites llama.cpp-style flags; everything after `--` is left alone.
    pub fn normalize(
        args: impl IntoIterator<Item = std::ffi::OsString>,
    ) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        let mut verbatim = false;
        for a in args {
            if verbatim {
                out.push(a);
                continue;
            }
            verbatim = a == "--";
            out.push(rewrite_llama_flag(a));
        }
        out
    }

    pub fn run(self) -> anyhow::Result<()> {
        // A build for a richer CPU would die of SIGILL inside llama.cpp: say so first.
        if !matches!(self.command, Command::Info(_)) {
            crate::hardware::check_cpu().map_err(anyhow::Error::msg)?;
        }
        match self.command {
            Command::Info(a) => info::run(a),
            Command::Models(c) => models::run(c),
            Command::Generate(a) => generate::run(a),
            Command::Chat(a) => chat::run(a),
            Command::Bench(a) => bench::run(a),
            Command::Compare(a) => compare::run(a),
            Command::Eval(a) => eval::run(a),
            Command::Verify(a) => verify::run(a),
            Command::RpcServer(a) => rpc_server::run(a),
            Command::Serve(a) => serve::run(a),
        }
    }
}

/// Which model, and where its layers run.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a .gguf path or a built-in name (see `chunkkv models list`).
    #[arg(short = 'm', long = "model", default_value = crate::models::DEFAULT_MODEL)]
    pub model: String,
    /// Layers to offload to the GPU, -1 for all (-ngl).
    #[arg(long = "n-gpu-layers", alias = "gpu-layers", default_value_t = -1, allow_negative_numbers = true)]
    pub n_gpu_layers: i32,
    /// How offloaded layers are spread over devices: none, layer, row or tensor (-sm).
    #[arg(long = "split-mode", value_enum, default_value = "layer")]
    pub split_mode: SplitMode,
    /// Share of the offloaded layers per device, e.g. 3,1 (-ts).
    #[arg(long = "tensor-split", value_delimiter = ',')]
    pub tensor_split: Vec<f32>,
    /// The device that holds everything with -sm none (-mg).
    #[arg(long = "main-gpu", default_value_t = 0)]
    pub main_gpu: i32,
    /// ggml RPC servers whose devices hold offloaded layers, HOST:PORT[,HOST:PORT...]
    /// (start them with `chunkkv rpc-server`).
    #[arg(long = "rpc", value_delimiter = ',')]
    pub rpc: Vec<String>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Model> {
        let path = crate::models::resolve(&self.model)?;
        let backend = Backend::init();
        if self.tensor_split.iter().any(|x| !x.is_finite() || *x < 0.0) {
            anyhow::bail!("-ts takes non-negative shares, e.g. 3,1");
        }
        Ok(Model::load(
            backend,
            &path,
            &ModelParams::default()
                .with_n_gpu_layers(self.n_gpu_layers)
                .with_split_mode(self.split_mode)
                .with_tensor_split(self.tensor_split.clone())
                .with_main_gpu(self.main_gpu)
                .with_rpc_servers(self.rpc.clone()),
        )?)
    }
}

/// The context and its KV cache.
#[derive(Debug, Clone, Args)]
pub struct ContextArgs {
    /// Context size in tokens (0: the model's training context).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: u32,
    /// Logical batch size for prompt processing.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: u32,
    /// Physical batch size (-ub).
    #[arg(long = "ubatch-size", default_value_t = 512)]
    pub ubatch_size: u32,
    /// Threads (default: chosen at run time, up to the physical cores, from
    /// the cores other processes leave free and from decode timings).
    #[arg(short = 't', long = "threads", value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
    /// Flash attention: on, off or auto (-fa).
    #[arg(long = "flash-attn", default_value = "auto")]
    pub flash_attn: FlashAttn,
    /// K cache type: f16, bf16, q8_0, q4_0, ... (-ctk).
    #[arg(long = "cache-type-k", default_value = "f16")]
    pub cache_type_k: CacheType,
    /// V cache type; quantized types need flash attention (-ctv).
    #[arg(long = "cache-type-v", default_value = "f16")]
    pub cache_type_v: CacheType,
    /// Full-size sliding-window cache (more memory on iSWA models).
    #[arg(long = "swa-full")]
    pub swa_full: bool,
}

impl ContextArgs {
    pub fn params(&self) -> ContextParams {
        let mut p = ContextParams::default()
            .with_n_ctx(self.ctx_size)
            .with_n_batch(self.batch_size)
            .with_n_ubatch(self.ubatch_size)
            .with_flash_attn(self.flash_attn)
            .with_type_k(self.cache_type_k)
            .with_type_v(self.cache_type_v)
            .with_swa_full(self.swa_full);
        if let Some(t) = self.threads {
            p = p.with_n_threads(t);
        }
        p
    }

    /// [`ContextArgs::params`] with a fixed thread count (`-t`, else the
    /// usable physical cores), for benchmarks whose rows must be comparable.
    pub fn fixed_params(&self) -> ContextParams {
        let n = self
            .threads
            .unwrap_or(crate::hardware::usable_cores() as i32);
        self.params().with_n_threads(n)
    }
}

/// Token sampling.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Temperature; 0 samples greedily.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: i32,
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// RNG seed (default: random).
    #[arg(short = 's', long = "seed")]
    pub seed: Option<u32>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed.unwrap_or(0xFFFF_FFFF),
        }
    }
}

/// ChunkKV's shape: shared by every command that compresses.
#[derive(Debug, Clone, Args)]
pub struct ChunkArgs {
    /// ChunkKV chunk size in tokens.
    #[arg(long = "chunk-size", default_value_t = 10)]
    pub chunk_size: usize,
    /// Observation window: the last prompt tokens, which score the cache and are always kept.
    #[arg(long = "kv-window", default_value_t = 32)]
    pub window: usize,
    /// Layers per reuse group sharing one kept set (1: no reuse).
    #[arg(long = "reuse-layers", default_value_t = 2)]
    pub reuse_layers: usize,
    /// How a chunk's score is formed from its tokens' scores [default: sum;
    /// chat documents: mean].
    #[arg(long = "chunk-score", value_enum)]
    pub chunk_score: Option<ChunkScore>,
    /// Average-pool token scores with this kernel before chunking (0: off).
    #[arg(long = "kv-pool", default_value_t = 0)]
    pub pool: usize,
    /// Carry each token's score to the next N positions before chunking, so
    /// a fact's value stays with the key a question attends to (0: off)
    /// [default: 0; 16 when recall drafts replies: docs/results/eval-recall.md].
    #[arg(long = "kv-trail", value_name = "N")]
    pub trail: Option<usize>,
    /// How the observation window's queries (and each KV head's query
    /// group) combine their attention: sum (the paper) or max (KVzip's rule)
    /// [default: sum; max when recall drafts replies].
    #[arg(long = "kv-reduce", value_enum)]
    pub reduce: Option<ScoreReduce>,
    /// Where chunks begin: every --chunk-size tokens, or after each sentence
    /// end (split at twice --chunk-size) [default: tokens; chat documents: sentences].
    #[arg(long = "chunk-by", value_enum)]
    pub chunk_by: Option<Chunking>,
    /// What scores the cache: the observation window (the prompt's end, its
    /// question if it has one) or context reconstruction (KVzip: query-agnostic,
    /// a pass over the context that scores every query: 2.6–3× the prefill on a
    /// 2-core CPU). `kvzip` always reconstructs.
    /// Default: window; chat documents: reconstruct.
    #[arg(long = "kv-score", value_enum)]
    pub score: Option<Scorer>,
    /// Keep the sequence's first N tokens (attention sinks) in every layer,
    /// whatever they score (ChunkKV) [default: 0; 4 when recall drafts replies].
    #[arg(long = "kv-sinks", value_name = "N")]
    pub sinks: Option<usize>,
}

impl ChunkArgs {
    /// These flags with recall's defaults where they are silent: with a
    /// drafted reply the H200 grid kept the most with `--kv-trail 16
    /// --kv-reduce max` (and `--kv-recall-pin 32`).
    pub fn for_recall(&self) -> ChunkArgs {
        ChunkArgs {
            trail: Some(self.trail.unwrap_or(RECALL_TRAIL)),
            reduce: Some(self.reduce.unwrap_or(ScoreReduce::Max)),
            sinks: Some(self.sinks.unwrap_or(RECALL_SINKS)),
            ..self.clone()
        }
    }

    /// ChunkKV's shape from these flags, refused when a size is 0.
    pub fn shape(&self) -> Result<ChunkKv, CompressError> {
        if self.reuse_layers == 0 {
            return Err(CompressError::Config(
                "--reuse-layers must be at least 1".into(),
            ));
        }
        let shape = ChunkKv {
            chunk_size: self.chunk_size,
            window: self.window,
            chunk_score: self.chunk_score.unwrap_or_default(),
            pool: (self.pool > 1).then_some(self.pool),
            chunking: self.chunk_by.unwrap_or_default(),
            trail: self.trail.unwrap_or(0),
            reduce: self.reduce.unwrap_or_default(),
            sinks: self.sinks.unwrap_or(0),
        };
        shape.check()?;
        Ok(shape)
    }
}

/// Where evicted chunks go, so later turns can bring them back.
#[derive(Debug, Clone, Args)]
pub struct RecallArgs {
    /// Keep evicted chunks off the device so a later turn (a question about
    /// a compressed document) can bring the ones it needs back: off, host
    /// (RAM), disk (a file under --kv-recall-dir). ChunkKV only.
    #[arg(long = "kv-recall", value_enum, default_value_t = RecallMode::Off)]
    pub mode: RecallMode,
    /// Directory of the recall file of `--kv-recall disk` [default: the system temp dir].
    #[arg(long = "kv-recall-dir", value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
    /// Most cells a turn writes back at once (bounds recall's transient
    /// device memory); more held rows are ranked in batches [default: all free cells].
    #[arg(long = "kv-recall-cells", value_name = "N")]
    pub cells: Option<usize>,
    /// Reply tokens a recalling turn drafts greedily over the whole history
    /// to score it (then drops) before its compaction: the answer attends to
    /// the value it copies, the question only to the key (0: off); when the
    /// compaction waits for the reply (serve), the reply's first N tokens
    /// score instead [default: 32].
    #[arg(long = "kv-recall-probe", value_name = "N")]
    pub probe: Option<usize>,
    /// With a draft: the N positions it attends to most (in any layer) are
    /// kept with their chunks in every layer, so a copied value survives
    /// whole where the layers that carry the copy would each keep part (0: off)
    /// [default: 32].
    #[arg(long = "kv-recall-pin", value_name = "N")]
    pub pin: Option<usize>,
    /// Recalling turns write back and keep the same chunks in every layer
    /// group, each position scored by the most any group gave it (false:
    /// each group ranks and keeps its own). On the H200 it took serve's
    /// recall at -np 20 from 12/20 to 17/20 (uncompressed: 19/20).
    #[arg(long = "kv-recall-unify", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub unify: bool,
}

/// Reply tokens a recalling turn drafts unless told otherwise: on the H200
/// recall grid (Qwen2.5-0.5B, 10%) they lifted multi-key RULER from 71% to
/// 99% of the full cache's score, NIAH from 88.5% to 89.5% (91% with
/// `--kv-reduce max`).
pub const RECALL_PROBE: usize = 32;

/// Draft-attended positions kept in every layer unless told otherwise: with
/// the draft, `--kv-trail 16` and `--kv-reduce max` they lifted NIAH from 93%
/// to 99% of the full cache on the H200 grid (multi-key RULER 100%).
pub const RECALL_PIN: usize = 32;

/// `--kv-trail` when recall drafts replies and the flag is not given.
pub const RECALL_TRAIL: usize = 16;

/// `--kv-sinks` when recall drafts replies and the flag is not given: with
/// rows ranked in 300-cell batches (query-agnostic NIAH, Qwen2.5-0.5B, 10%,
/// CPU) they took recall from 0.889 to 0.944, the full cache's score; on the
/// H100 serve load from 20 to 22 of 40 facts.
pub const RECALL_SINKS: usize = 4;

impl RecallArgs {
    /// Pinned draft positions: `--kv-recall-pin` or [`RECALL_PIN`].
    pub fn pin(&self) -> usize {
        self.pin.unwrap_or(RECALL_PIN)
    }

    /// Drafted reply tokens: `--kv-recall-probe` or [`RECALL_PROBE`].
    pub fn probe(&self) -> usize {
        self.probe.unwrap_or(RECALL_PROBE)
    }

    /// Whether recall is on and drafts replies: then ChunkKV's shape takes
    /// recall's defaults ([`ChunkArgs::for_recall`]).
    pub fn drafts(&self) -> bool {
        self.mode != RecallMode::Off && self.probe() > 0
    }

    /// The file directory of disk mode (`None`: host memory).
    pub fn dir(&self) -> Option<std::path::PathBuf> {
        (self.mode == RecallMode::Disk).then(|| self.dir.clone().unwrap_or_else(std::env::temp_dir))
    }

    /// A store for `seq` of `ctx`, or `None` when recall is off.
    pub fn store(
        &self,
        ctx: &Context<'_>,
        seq: crate::llama::SeqId,
    ) -> Result<Option<RecallStore>, RecallError> {
        if self.mode == RecallMode::Off {
            return Ok(None);
        }
        RecallStore::new(ctx, seq, self.dir().as_deref()).map(Some)
    }
}

/// KV-cache compression after prefill.
#[derive(Debug, Clone, Args)]
pub struct CompressArgs {
    /// Compression method (none: llama.cpp's default cache).
    #[arg(long = "kv-method", value_enum, default_value = "none")]
    pub method: Method,
    /// Cells to keep: a share (0.1), a percentage (10%) or a token count (512).
    #[arg(long = "kv-budget", default_value = "0.1")]
    pub budget: Budget,
    #[command(flatten)]
    pub chunk: ChunkArgs,
    /// Seed of the `random` method.
    #[arg(long = "kv-seed", default_value_t = 1)]
    pub kv_seed: u64,
}

impl CompressArgs {
    /// The compressor these flags ask for, or `None` for `--kv-method none`.
    /// `turn` says where reconstruction prompts start (an open prompt, or
    /// after a chat's closed message); `default_score` applies without `--kv-score`.
    pub fn compressor(
        &self,
        ctx: &Context<'_>,
        turn: TurnState,
        default_score: Scorer,
    ) -> Result<Option<Compressor>, CompressError> {
        let Some(policy) = self.policy()? else {
            return Ok(None);
        };
        // Layer reuse is ChunkKV's; the baselines score every layer.
        let reuse = if self.method == Method::Chunkkv {
            self.chunk.reuse_layers
        } else {
            1
        };
        let score = self.chunk.score.unwrap_or(default_score);
        let c = Compressor::new(ctx, policy, self.chunk.window, reuse)?;
        if score == Scorer::Reconstruct || self.method == Method::Kvzip {
            let rec = Reconstruction::for_model(ctx.model(), turn)
                .map_err(|e| CompressError::Config(format!("reconstruction prompts: {e}")))?;
            return Ok(Some(c.with_reconstruction(rec)));
        }
        Ok(Some(c))
    }

    /// The selection policy these flags ask for, or `None` for `--kv-method none`.
    pub fn policy(&self) -> Result<Option<Box<dyn crate::compress::Policy>>, CompressError> {
        let shape = self.chunk.shape()?;
        if self.method == Method::None {
            return Ok(None);
        }
        self.method.policy(&shape, self.kv_seed).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// clap's own consistency check: duplicate ids, conflicting flags, bad defaults.
    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command that compresses takes the same ChunkKV shape flags.
    #[test]
    fn chunkkv_shape_flags_reach_every_compressing_command() {
        use super::Command;
        use crate::compress::ChunkScore;
        use clap::Parser;
        let flags = [
            "--chunk-size",
            "4",
            "--chunk-score",
            "mean",
            "--kv-pool",
            "5",
            "--kv-trail",
            "3",
            "--kv-reduce",
            "max",
        ];
        for cmd in [
            &["eval", "--tasks", "niah"][..],
            &["compare"],
            &["bench"],
            &["chat"],
        ] {
            let argv = ["chunkkv"].iter().chain(cmd).chain(&flags);
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            let chunk = match cli.command {
                Command::Eval(a) => a.chunk,
                Command::Compare(a) => a.chunk,
                Command::Bench(a) => a.chunk,
                Command::Chat(a) => a.chunk,
                _ => unreachable!(),
            };
            let shape = chunk.shape().unwrap();
            assert_eq!(
                (
                    shape.chunk_size,
                    shape.chunk_score,
                    shape.pool,
                    shape.trail,
                    shape.reduce
                ),
                (
                    4,
                    ChunkScore::Mean,
                    Some(5),
                    3,
                    crate::llama::ScoreReduce::Max
                ),
                "{cmd:?}"
            );
        }
        let bad = Cli::try_parse_from(["chunkkv", "eval", "--tasks", "niah", "--chunk-size", "0"]);
        let Command::Eval(a) = bad.unwrap().command else {
            unreachable!()
        };
        assert!(a
            .chunk
            .shape()
            .unwrap_err()
            .to_string()
            .contains("--chunk-size"));
    }

    /// Recall's shape defaults fill only what the flags leave silent.
    #[test]
    fn recall_defaults_fill_only_silent_flags() {
        use clap::Parser;
        let chunk_of = |extra: &[&str]| {
            let argv = ["chunkkv", "chat"].iter().chain(extra);
            match Cli::try_parse_from(argv).unwrap().command {
                super::Command::Chat(a) => a.chunk,
                _ => unreachable!(),
            }
        };
        let silent = chunk_of(&[]);
        let plain = silent.shape().unwrap();
        assert_eq!(
            (plain.trail, plain.reduce, plain.sinks),
            (0, crate::llama::ScoreReduce::Sum, 0)
        );
        let recall = silent.for_recall().shape().unwrap();
        assert_eq!(
            (recall.trail, recall.reduce, recall.sinks),
            (
                super::RECALL_TRAIL,
                crate::llama::ScoreReduce::Max,
                super::RECALL_SINKS
            )
        );
        let told = chunk_of(&["--kv-trail", "0", "--kv-reduce", "sum", "--kv-sinks", "0"]);
        let recall = told.for_recall().shape().unwrap();
        assert_eq!(
            (recall.trail, recall.reduce, recall.sinks),
            (0, crate::llama::ScoreReduce::Sum, 0)
        );
    }

    /// `serve` schedules replies first and batches them for 1500 ms unless
    /// told otherwise (docs/serve.md, "Shares"); the old behaviour stays a
    /// flag away.
    #[test]
    fn serve_schedules_replies_first_by_default() {
        use crate::serve::engine::Share;
        use clap::Parser;
        let serve = |extra: &[&str]| {
            let argv = ["chunkkv", "serve"].iter().chain(extra);
            match Cli::try_parse_from(argv).unwrap().command {
                super::Command::Serve(a) => (a.share, a.batch_replies),
                _ => unreachable!(),
            }
        };
        assert_eq!(serve(&[]), (Share::Replies, 1500));
        assert_eq!(
            serve(&["--decode-share", "per-reply", "--batch-replies", "0"]),
            (Share::PerReply, 0)
        );
    }

    #[test]
    fn llama_style_flags_are_rewritten() {
        let args = Cli::normalize(
            [
                "chunkkv", "generate", "-ngl", "99", "-fa=on", "-ctk", "q8_0", "--", "-ctv",
            ]
            .map(Into::into),
        );
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args,
            [
                "chunkkv",
                "generate",
                "--n-gpu-layers",
                "99",
                "--flash-attn=on",
                "--cache-type-k",
                "q8_0",
                "--",
                "-ctv"
            ]
        );
    }
}
