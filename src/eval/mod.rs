//! `chunkkv eval`: answer quality under every compression method and budget.
//!
//! Each sample is prefilled once (all but the observation window); every
//! method and budget restores that state, compresses with the window and
//! answers greedily, so the grid costs one prefill per sample plus the
//! answers. H2O's scores from every prompt query are collected during that
//! prefill when H2O is in the grid.

pub mod report;
pub mod score;
pub mod tasks;

use crate::bench::ctx_size;
use crate::compare::{kl_divergence, log_softmax};
use crate::compress::{Budget, ChunkKv, CompressError, Compressor, Method};
use crate::llama::{
    Batch, ChatMessage, Context, ContextError, ContextParams, DecodeError, Model, Sampler,
    SamplingParams, StateError, Token, TokenizeError,
};
use crate::pipeline::{self, PipelineError, SEQ};
pub use score::Scoring;
pub use tasks::Sample;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Task(#[from] tasks::TaskError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Compress(#[from] CompressError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("sample {id}: {n} prompt tokens plus {answer} answer tokens do not fit the context ({n_ctx}); raise -c")]
    TooLong {
        id: String,
        n: usize,
        answer: usize,
        n_ctx: u32,
    },
    #[error("sample {id}: the prompt ({n} tokens) must be longer than the window ({w})")]
    TooShort { id: String, n: usize, w: usize },
}

/// The grid every sample runs through.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Compressing methods (the full cache always runs first).
    pub methods: Vec<Method>,
    pub budgets: Vec<Budget>,
    /// ChunkKV's shape; the baselines take its window.
    pub chunk: ChunkKv,
    /// ChunkKV's reuse group size (baselines score every layer).
    pub reuse: usize,
    pub seed: u64,
}

impl EvalConfig {
    /// `(method, budget)` of every configuration, the full cache first.
    pub fn configs(&self) -> Vec<(Method, Option<Budget>)> {
        let mut out = vec![(Method::None, None)];
        for &m in self.methods.iter().filter(|&&m| m != Method::None) {
            for &b in &self.budgets {
                out.push((m, Some(b)));
            }
        }
        out
    }
}

/// One sample under one configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SampleResult {
    pub task: String,
    pub id: String,
    pub method: String,
    /// The budget as given (`none`: 1.0).
    pub budget: serde_json::Value,
    pub score: f64,
    pub output: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell: Option<(usize, f64)>,
    /// Fidelity: mean KL divergence from the full cache, and perplexity of the continuation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    pub n_prompt: usize,
}

/// The prompt of a sample: the chat template over context and question, or
/// plain text (fidelity, or models without a template).
pub fn prompt_text(model: &Model, s: &Sample) -> String {
    if s.scoring == Scoring::Fidelity {
        return s.context.clone();
    }
    let user = format!("{}\n\n{}", s.context, s.question);
    model
        .apply_chat_template(&[ChatMessage::new("user", &user)], true)
        .unwrap_or_else(|_| format!("{user}\n"))
}

/// Tokens of a sample's prompt and how many tokens its answer needs.
pub fn sample_tokens(model: &Model, s: &Sample) -> Result<(Vec<Token>, Vec<Token>), EvalError> {
    let tokens = model.tokenize(&prompt_text(model, s), true, true)?;
    let cont = match &s.continuation {
        Some(c) => model.tokenize(c, false, false)?,
        None => Vec::new(),
    };
    Ok((tokens, cont))
}

/// The context size that fits every sample and its answer.
pub fn needed_ctx(model: &Model, samples: &[Sample]) -> Result<u32, EvalError> {
    let mut most = 0;
    for s in samples {
        let (t, c) = sample_tokens(model, s)?;
        most = most.max(t.len() + s.max_answer.max(c.len()) + 1);
    }
    Ok(ctx_size(most))
}

/// Reference distributions of the full cache on a continuation.
struct Teacher {
    logprobs: Vec<Vec<f64>>,
}

/// Teacher-forces `cont` after a prefill whose last logits are `first`:
/// the log-probabilities before each continuation token. One batch with
/// logits on every row (the continuation is short), not a token at a time.
fn teacher_force(
    ctx: &mut Context<'_>,
    first: &[f32],
    at: usize,
    cont: &[Token],
) -> Result<Vec<Vec<f64>>, EvalError> {
    let mut out = vec![log_softmax(first)];
    let fed = &cont[..cont.len().saturating_sub(1)];
    if fed.is_empty() {
        return Ok(out);
    }
    let step = ctx.n_batch() as usize;
    let mut batch = Batch::new(step);
    for (c, chunk) in fed.chunks(step).enumerate() {
        batch.clear();
        for (i, &t) in chunk.iter().enumerate() {
            batch.push(t, (at + c * step + i) as i32, SEQ, true);
        }
        ctx.decode(&batch)?;
        for i in 0..chunk.len() {
            out.push(log_softmax(
                ctx.logits_ith(i as i32).ok_or(DecodeError::Fatal(-100))?,
            ));
        }
    }
    Ok(out)
}

fn argmax(x: &[f64]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}

/// Runs one sample through every configuration on `ctx` (sized by [`needed_ctx`]).
pub fn run_sample(
    ctx: &mut Context<'_>,
    sample: &Sample,
    cfg: &EvalConfig,
    mut on_config: impl FnMut(&SampleResult),
) -> Result<Vec<SampleResult>, EvalError> {
    let model = ctx.model();
    let (tokens, cont) = sample_tokens(model, sample)?;
    let n = tokens.len();
    let w = cfg.chunk.window;
    if n <= w + 1 {
        return Err(EvalError::TooShort {
            id: sample.id.clone(),
            n,
            w,
        });
    }
    let answer = sample.max_answer.max(cont.len());
    if n + answer + 1 > ctx.n_ctx() as usize {
        return Err(EvalError::TooLong {
            id: sample.id.clone(),
            n,
            answer,
            n_ctx: ctx.n_ctx(),
        });
    }
    let (head, window) = tokens.split_at(n - w);
    ctx.memory_clear(true);
    // H2O's head scores (every prompt query) come from this one prefill too.
    let head_scores = if cfg.methods.contains(&Method::H2o) {
        let scorer = Compressor::new(ctx, Method::H2o.policy(&cfg.chunk, cfg.seed)?, w, 1)?;
        scorer.prefill_head_scored(ctx, head)?
    } else {
        ctx.decode_tokens(head, 0, SEQ, false)?;
        Vec::new()
    };
    let head_state = ctx.state_seq_get(SEQ)?;

    let mut teacher: Option<Teacher> = None;
    let mut out = Vec::new();
    for (method, budget) in cfg.configs() {
        ctx.memory_clear(true);
        match (method, budget) {
            (Method::None, _) | (_, None) => {
                ctx.state_seq_set(SEQ, &head_state)?;
                ctx.decode_tokens(window, (n - w) as i32, SEQ, true)?;
            }
            (m, Some(b)) => {
                let reuse = if m == Method::Chunkkv { cfg.reuse } else { 1 };
                let policy = m.policy(&cfg.chunk, cfg.seed)?;
                let mut c = Compressor::new(ctx, policy, w, reuse)?;
                let n_keep = b.cells_for(n).max(1);
                ctx.state_seq_set(SEQ, &head_state)?;
                if m == Method::H2o {
                    c.compress_window_with(
                        ctx,
                        window,
                        (n - w) as i32,
                        n_keep,
                        &head_scores,
                        b.json(),
                    )?;
                } else {
                    c.compress_window(ctx, window, (n - w) as i32, n_keep, b.json())?;
                }
            }
        }
        let mut r = SampleResult {
            task: sample.task.clone(),
            id: sample.id.clone(),
            method: method.name().to_string(),
            budget: budget.map_or(serde_json::json!(1.0), Budget::json),
            score: 0.0,
            output: String::new(),
            cell: sample.cell,
            kl: None,
            ppl: None,
            n_prompt: n,
        };
        if sample.scoring == Scoring::Fidelity {
            let first = ctx.logits_ith(-1).ok_or(DecodeError::Fatal(-100))?.to_vec();
            let lp = teacher_force(ctx, &first, n, &cont)?;
            let nll: f64 = -lp
                .iter()
                .zip(&cont)
                .map(|(l, t)| l[t.0 as usize])
                .sum::<f64>()
                / cont.len().max(1) as f64;
            r.ppl = Some(nll.exp());
            let reference = teacher.get_or_insert_with(|| Teacher {
                logprobs: lp.clone(),
            });
            let k = reference.logprobs.len().min(lp.len()).max(1);
            r.kl = Some(
                (0..k)
                    .map(|i| kl_divergence(&reference.logprobs[i], &lp[i]))
                    .sum::<f64>()
                    / k as f64,
            );
            // Score: top-1 agreement with the full cache's next-token choice.
            r.score = (0..k)
                .filter(|&i| argmax(&reference.logprobs[i]) == argmax(&lp[i]))
                .count() as f64
                / k as f64;
        } else {
            let mut greedy = Sampler::new(&SamplingParams::greedy());
            let (_, text, _, _) =
                pipeline::decode(ctx, &mut greedy, n as i32, sample.max_answer, |_| {})?;
            r.score = score::score(sample.scoring, &text, &sample.answers);
            r.output = text;
        }
        on_config(&r);
        out.push(r);
    }
    ctx.memory_clear(true);
    Ok(out)
}

/// A context for a sample grid: `n_ctx` cells, flash attention as asked.
pub fn context<'m>(
    model: &'m Model,
    params: &ContextParams,
    n_ctx: u32,
) -> Result<Context<'m>, EvalError> {
    Ok(Context::new(model, &params.clone().with_n_ctx(n_ctx))?)
}

/// Mean score per (task, method, budget), in configuration order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Aggregate {
    pub task: String,
    pub method: String,
    pub budget: serde_json::Value,
    pub score: f64,
    pub n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
}

pub fn aggregate(results: &[SampleResult]) -> Vec<Aggregate> {
    let mut out: Vec<Aggregate> = Vec::new();
    let mut sums: Vec<(f64, f64, f64)> = Vec::new();
    for r in results {
        let i = match out
            .iter()
            .position(|a| a.task == r.task && a.method == r.method && a.budget == r.budget)
        {
            Some(i) => i,
            None => {
                out.push(Aggregate {
                    task: r.task.clone(),
                    method: r.method.clone(),
                    budget: r.budget.clone(),
                    score: 0.0,
                    n: 0,
                    kl: None,
                    ppl: None,
                });
                sums.push((0.0, 0.0, 0.0));
                out.len() - 1
            }
        };
        out[i].n += 1;
        out[i].score += r.score;
        sums[i].0 += r.kl.unwrap_or(0.0);
        sums[i].1 += r.ppl.unwrap_or(0.0);
        sums[i].2 += f64::from(u8::from(r.kl.is_some()));
    }
    for (a, (kl, ppl, k)) in out.iter_mut().zip(sums) {
        a.score /= a.n as f64;
        if k > 0.0 {
            a.kl = Some(kl / k);
            a.ppl = Some(ppl / k);
        }
    }
    out
}
