//! `chunkkv serve`: the OpenAI-compatible server (see [`crate::serve`]).

use std::net::{IpAddr, SocketAddr};

use clap::Args;

use super::{ChunkArgs, ContextArgs, ModelArgs, RecallArgs};
use crate::compress::{Budget, Method};
use crate::serve::engine::{ScoreChoice, Share};
use crate::serve::{EngineConfig, ServeConfig};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The context's cells, shared by the slots: each gets -c / -np (llama.cpp pads to 256).
    #[command(flatten)]
    pub context: ContextArgs,
    /// Slots: conversations served at once (-np).
    #[arg(long = "parallel", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    /// Address to listen on.
    #[arg(long = "host", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long = "port", default_value_t = 8080)]
    pub port: u16,
    /// Requests must carry `Authorization: Bearer KEY` (`/health` excepted).
    #[arg(long = "api-key", env = "CHUNKKV_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests that may wait for a free slot; more get 503.
    #[arg(long = "queue", default_value_t = 64)]
    pub queue: usize,
    /// `max_tokens` of requests that name none (-n).
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n_predict: usize,
    /// Compression of every slot unless a request's `chunkkv.kv_method` says
    /// otherwise: chunkkv, snapkv, streaming, random or none.
    #[arg(long = "kv-method", value_enum, default_value = "chunkkv")]
    pub method: Method,
    /// Live cells a conversation keeps, as a share of its tokens (0.25, 25%) or a count.
    #[arg(long = "kv-budget", default_value = "25%")]
    pub budget: Budget,
    #[command(flatten)]
    pub chunk: ChunkArgs,
    #[command(flatten)]
    pub recall: RecallArgs,
    /// Debug: after every compression, log (info) how many of the tokens at
    /// each occurrence of TEXT in a conversation (and the 12 after it) each
    /// layer keeps, to follow a fact through a conversation's compressions.
    #[arg(long = "kv-trace", value_name = "TEXT")]
    pub trace: Option<String>,
    /// A compressed turn's reply waits up to about MS milliseconds for the
    /// other short turns waiting for their compression, so the replies start
    /// together and decode in one batch (0: every reply starts at once). No
    /// reply waits when a compression takes longer than MS (a CPU).
    #[arg(long = "batch-replies", value_name = "MS", default_value_t = 1500)]
    pub batch_replies: u64,
    /// With --kv-recall: a turn's reply is decoded over everything the turn
    /// brought back, or over all of a prompt that fit its slot (a slot owns
    /// its cells anyway), and the compaction to
    /// the budget waits for the next turn, scored by the reply's first
    /// --kv-recall-probe tokens instead of a draft.
    #[arg(long = "kv-compact-after-reply", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub compact_after_reply: bool,
    /// While replies stream, how long the next compression waits after
    /// one: as long again (half), or as long again for each streaming reply
    /// (per-reply: every request gets an equal share of the engine), or
    /// until no reply streams, unless it has waited 500 ms and the per-reply
    /// payback is over (replies: first, the default).
    #[arg(long = "decode-share", value_enum, default_value_t = Share::Replies)]
    pub share: Share,
    /// While replies stream, a step carries at most TOKENS (prompt chunks and
    /// the replies' tokens together), so a streamed token waits for that much
    /// prefill instead of a whole -b; the -ub size caps it at one micro-batch
    /// [default: -b].
    #[arg(long = "stream-batch", value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub stream_batch: Option<u32>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if matches!(args.method, Method::Pyramidkv | Method::H2o | Method::Kvzip) {
        anyhow::bail!(
            "--kv-method {} is not served: {}",
            args.method.name(),
            if args.method == Method::Pyramidkv {
                "it needs a context-wide dead-slot mask, which slots cannot share"
            } else {
                "it scores during the whole prefill, which the server interleaves"
            }
        );
    }
    if args.n_predict == 0 {
        anyhow::bail!("-n must be at least 1");
    }
    let recall_probe = args.recall.probe();
    let shape = if args.recall.drafts() {
        args.chunk.for_recall().shape()?
    } else {
        args.chunk.shape()?
    };
    let path = crate::models::resolve(&args.model.model)?;
    let model_name = path.file_stem().map_or_else(
        || args.model.model.clone(),
        |s| s.to_string_lossy().into_owned(),
    );
    let n_slots = args.parallel as usize;
    let cfg = ServeConfig {
        addr: SocketAddr::new(args.host, args.port),
        engine: EngineConfig {
            n_slots,
            context: args.context.params(),
            method: args.method,
            budget: args.budget,
            shape,
            reuse: args.chunk.reuse_layers,
            seed: 1,
            score: args
                .chunk
                .score
                .map_or(ScoreChoice::Auto, ScoreChoice::Fixed),
            recall: args.recall.mode,
            recall_dir: args.recall.dir.clone(),
            recall_cells: args.recall.cells,
            recall_probe,
            recall_pin: args.recall.pin(),
            recall_unify: args.recall.unify,
            trace: args.trace.clone().filter(|t| !t.is_empty()),
            batch_replies: std::time::Duration::from_millis(args.batch_replies),
            compact_after_reply: args.compact_after_reply,
            share: args.share,
            stream_batch: args.stream_batch.map(|n| n as usize),
        },
        queue: args.queue,
        api_key: args.api_key.clone(),
        default_max_tokens: args.n_predict,
        model_name,
    };
    let model_args = args.model.clone();
    crate::serve::run(cfg, Box::new(move || model_args.load()))
}
