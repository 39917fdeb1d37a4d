//! `chunkkv eval`: answer quality under every compression method and budget.
//!
//! Each prompt is prefilled once (all but the observation window); every
//! method and budget restores that state, compresses and answers greedily,
//! so the grid costs one prefill per prompt plus the answers. H2O's scores
//! from every prompt query are collected during that prefill, and one
//! reconstruction scores every layer for the methods that use it.
//!
//! Two modes: the question inside the prompt (its window scores the cache),
//! or query-agnostic (`--query-agnostic`): the context is compressed before
//! any question exists, then each question is decoded on top of the same
//! compressed state, as in a chat about a loaded document.

pub mod report;
pub mod score;
pub mod tasks;

use crate::bench::ctx_size;
use crate::compare::{kl_divergence, log_softmax};
use crate::compress::{
    Budget, ChunkKv, CompressError, Compressor, Method, MethodSpec, RecallStore, RecallTurn,
    Reconstruction, Scorer, TurnState,
};
use crate::llama::{
    Batch, ChatMessage, Context, ContextError, ContextParams, DecodeError, KvPart, Model, Sampler,
    SamplingParams, StateError, Token, TokenizeError,
};
use crate::pipeline::{self, PipelineError, SEQ};
pub use score::Scoring;
pub use tasks::{Question, Sample};

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
    pub methods: Vec<MethodSpec>,
    pub budgets: Vec<Budget>,
    /// ChunkKV's shape; the baselines take its window.
    pub chunk: ChunkKv,
    /// ChunkKV's reuse group size (baselines score every layer).
    pub reuse: usize,
    pub seed: u64,
    /// Scorer of methods that name none (`--kv-score`).
    pub scorer: Scorer,
    /// Compress the context before the question is appended (`--query-agnostic`).
    pub query_agnostic: bool,
    /// Where `+recall` methods keep evicted rows: a directory, else host memory.
    pub recall_dir: Option<std::path::PathBuf>,
    /// `--kv-recall-cells`: most cells a question writes back at once.
    pub recall_cells: Option<usize>,
    /// `--kv-recall-probe`: reply tokens drafted to score each question's recall.
    pub recall_probe: usize,
    /// `--kv-recall-pin`: draft-attended positions kept in every layer.
    pub recall_pin: usize,
    /// `--kv-recall-unify`.
    pub recall_unify: bool,
    /// ChunkKV's shape for `+recall` methods (recall's defaults where the
    /// flags are silent).
    pub recall_chunk: ChunkKv,
}

impl EvalConfig {
    /// `(method, budget)` of every configuration, the full cache first.
    pub fn configs(&self) -> Vec<(MethodSpec, Option<Budget>)> {
        let full = MethodSpec {
            method: Method::None,
            scorer: None,
            recall: false,
        };
        let mut out = vec![(full, None)];
        for &m in self.methods.iter().filter(|m| m.method != Method::None) {
            for &b in &self.budgets {
                out.push((m, Some(b)));
            }
        }
        out
    }

    /// Results (sample × question) one sample yields.
    pub fn runs(&self, sample: &Sample) -> usize {
        self.configs().len() * sample.questions.len().max(1)
    }
}

/// One question of one sample under one configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SampleResult {
    pub task: String,
    /// The sample's id; `#j` marks question j of several.
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
    /// What recall did for this question (`+recall` methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recall: Option<RecallTurn>,
}

/// The task label of results: query-agnostic runs are a task of their own,
/// so both modes sit side by side in one report.
pub fn task_label(task: &str, query_agnostic: bool) -> String {
    if query_agnostic {
        format!("{task} (agnostic)")
    } else {
        task.to_string()
    }
}

/// The prompt of a sample with one question: the chat template over context
/// and question, or plain text (fidelity, or models without a template).
pub fn prompt_text(model: &Model, s: &Sample, q: &Question) -> String {
    if s.scoring == Scoring::Fidelity {
        return s.context.clone();
    }
    let user = format!("{}\n\n{}", s.context, q.text);
    model
        .apply_chat_template(&[ChatMessage::new("user", &user)], true)
        .unwrap_or_else(|_| format!("{user}\n"))
}

/// A prompt cut where the question begins: the context inside an open user
/// message, then what each question adds (`\n\n`, the question, the close of
/// the message and the assistant's opening).
pub fn split_prompt(model: &Model, s: &Sample) -> (String, Vec<String>) {
    const MARK: &str = "\u{1}chunkkv-question\u{1}";
    let marked = prompt_text(
        model,
        s,
        &Question {
            text: MARK.into(),
            answers: Vec::new(),
            max_answer: 0,
        },
    );
    let (context, after) = marked
        .split_once(MARK)
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or_else(|| (marked.clone(), String::new()));
    // `context` ends with the "\n\n" before the question: that goes with each question.
    let context = context.strip_suffix("\n\n").unwrap_or(&context).to_string();
    let questions = s
        .questions
        .iter()
        .map(|q| format!("\n\n{}{after}", q.text))
        .collect();
    (context, questions)
}

/// Tokens of a sample's prompt with question `j`, and of its continuation.
pub fn sample_tokens(
    model: &Model,
    s: &Sample,
    j: usize,
) -> Result<(Vec<Token>, Vec<Token>), EvalError> {
    let tokens = model.tokenize(&prompt_text(model, s, &s.questions[j]), true, true)?;
    let cont = match &s.continuation {
        Some(c) => model.tokenize(c, false, false)?,
        None => Vec::new(),
    };
    Ok((tokens, cont))
}

/// The context size that fits every sample, question and answer.
pub fn needed_ctx(model: &Model, samples: &[Sample]) -> Result<u32, EvalError> {
    let mut most = 0;
    for s in samples {
        for (j, q) in s.questions.iter().enumerate() {
            let (t, c) = sample_tokens(model, s, j)?;
            most = most.max(t.len() + q.max_answer.max(c.len()) + 1);
        }
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

/// Runs one sample through every configuration on `ctx` (sized by
/// [`needed_ctx`]): with the question in the prompt (each question its own
/// prompt), or, query-agnostic, with the context compressed once per
/// configuration and every question asked of that compressed state.
pub fn run_sample(
    ctx: &mut Context<'_>,
    sample: &Sample,
    cfg: &EvalConfig,
    mut on_result: impl FnMut(&SampleResult),
) -> Result<Vec<SampleResult>, EvalError> {
    let agnostic = cfg.query_agnostic && sample.scoring != Scoring::Fidelity;
    let mut out = Vec::new();
    if agnostic {
        let model = ctx.model();
        let (context, questions) = split_prompt(model, sample);
        let tokens = model.tokenize(&context, true, true)?;
        let asks: Vec<Vec<Token>> = questions
            .iter()
            .map(|q| model.tokenize(q, false, true))
            .collect::<Result<_, _>>()?;
        run_prompt(ctx, sample, cfg, &tokens, &asks, &[], &mut |r| {
            on_result(&r);
            out.push(r);
        })?;
    } else {
        for j in 0..sample.questions.len() {
            let (tokens, cont) = sample_tokens(ctx.model(), sample, j)?;
            run_prompt(ctx, sample, cfg, &tokens, &[], &cont, &mut |mut r| {
                if sample.questions.len() > 1 {
                    r.id = format!("{}#{j}", sample.id);
                }
                // With the question in the prompt, the one asked is `j`.
                r.score = if sample.scoring == Scoring::Fidelity {
                    r.score
                } else {
                    score::score(sample.scoring, &r.output, &sample.questions[j].answers)
                };
                on_result(&r);
                out.push(r);
            })?;
        }
    }
    ctx.memory_clear(true);
    Ok(out)
}

/// Scores a decoded answer to question `j` (query-agnostic: `asks[j]` was
/// decoded after compression; otherwise the question is in the prompt).
#[allow(clippy::too_many_arguments)]
fn run_prompt(
    ctx: &mut Context<'_>,
    sample: &Sample,
    cfg: &EvalConfig,
    tokens: &[Token],
    asks: &[Vec<Token>],
    cont: &[Token],
    emit: &mut dyn FnMut(SampleResult),
) -> Result<(), EvalError> {
    let n = tokens.len();
    let w = cfg.chunk.window;
    if n <= w + 1 {
        return Err(EvalError::TooShort {
            id: sample.id.clone(),
            n,
            w,
        });
    }
    let ask_len = asks.iter().map(Vec::len).max().unwrap_or(0);
    let answer = sample
        .questions
        .iter()
        .map(|q| q.max_answer)
        .max()
        .unwrap_or(0)
        .max(cont.len());
    if n + ask_len + answer + 1 > ctx.n_ctx() as usize {
        return Err(EvalError::TooLong {
            id: sample.id.clone(),
            n: n + ask_len,
            answer,
            n_ctx: ctx.n_ctx(),
        });
    }
    let (head, window) = tokens.split_at(n - w);
    ctx.memory_clear(true);
    // Shared by every configuration: one prefill of the head; H2O's scores
    // from every query of it; one reconstruction scoring every layer.
    let configs = cfg.configs();
    let head_scores = if configs.iter().any(|(m, _)| m.method == Method::H2o) {
        let scorer = Compressor::new(ctx, Method::H2o.policy(&cfg.chunk, cfg.seed)?, w, 1)?;
        scorer.prefill_head_scored(ctx, head)?
    } else {
        ctx.decode_tokens(head, 0, SEQ, false)?;
        Vec::new()
    };
    let rec_scores = if configs
        .iter()
        .any(|(m, b)| b.is_some() && m.scorer_or(cfg.scorer) == Scorer::Reconstruct)
    {
        let rec = Reconstruction::for_model(ctx.model(), TurnState::Open)?;
        let layers = ctx.kv_layers(KvPart::Base);
        let mut flags = vec![false; ctx.model().n_layer() as usize];
        for il in layers {
            flags[il as usize] = true;
        }
        rec.score(ctx, SEQ, head, &flags)?
    } else {
        Vec::new()
    };
    let head_state = ctx.save_seq(SEQ)?;

    let mut teacher: Option<Teacher> = None;
    for (spec, budget) in configs {
        ctx.memory_clear(true);
        ctx.restore_seq(SEQ, &head_state)?;
        // The compressor of a `+recall` method, kept for its questions.
        let mut recaller: Option<(Compressor, usize)> = None;
        match budget {
            None => ctx.decode_tokens(window, (n - w) as i32, SEQ, true)?,
            Some(b) => {
                let m = spec.method;
                let reuse = if m == Method::Chunkkv { cfg.reuse } else { 1 };
                let shape = if spec.recall {
                    &cfg.recall_chunk
                } else {
                    &cfg.chunk
                };
                let mut c = Compressor::new(ctx, m.policy(shape, cfg.seed)?, w, reuse)?;
                if spec.recall {
                    let store = RecallStore::new(ctx, SEQ, cfg.recall_dir.as_deref())
                        .map_err(CompressError::from)?;
                    c = c.with_recall(store)?;
                    c = c
                        .with_recall_probe(cfg.recall_probe)
                        .with_recall_pin(cfg.recall_pin)
                        .with_recall_unify(cfg.recall_unify);
                    if let Some(n) = cfg.recall_cells {
                        c = c.with_recall_cells(n);
                    }
                }
                c.observe(ctx.model(), head, 0);
                let n_keep = b.cells_for(n).max(1);
                let at = (n - w) as i32;
                if spec.scorer_or(cfg.scorer) == Scorer::Reconstruct && m.scores() {
                    c.compress_with_scores(ctx, &rec_scores, window, at, n_keep, b.json())?;
                } else if m == Method::H2o {
                    c.compress_window_with(ctx, window, at, n_keep, &head_scores, b.json())?;
                } else {
                    c.compress_window(ctx, window, at, n_keep, b.json())?;
                }
                if spec.recall {
                    recaller = Some((c, n_keep));
                }
            }
        }
        let base = SampleResult {
            task: task_label(&sample.task, !asks.is_empty()),
            id: sample.id.clone(),
            method: spec.label(cfg.scorer),
            recall: None,
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
            let lp = teacher_force(ctx, &first, n, cont)?;
            let nll: f64 = -lp
                .iter()
                .zip(cont)
                .map(|(l, t)| l[t.0 as usize])
                .sum::<f64>()
                / cont.len().max(1) as f64;
            let reference = teacher.get_or_insert_with(|| Teacher {
                logprobs: lp.clone(),
            });
            let k = reference.logprobs.len().min(lp.len()).max(1);
            emit(SampleResult {
                ppl: Some(nll.exp()),
                kl: Some(
                    (0..k)
                        .map(|i| kl_divergence(&reference.logprobs[i], &lp[i]))
                        .sum::<f64>()
                        / k as f64,
                ),
                // Score: top-1 agreement with the full cache's next-token choice.
                score: (0..k)
                    .filter(|&i| argmax(&reference.logprobs[i]) == argmax(&lp[i]))
                    .count() as f64
                    / k as f64,
                ..base
            });
        } else if asks.is_empty() {
            let mut greedy = Sampler::new(&SamplingParams::greedy());
            let q = &sample.questions[0];
            let (_, text, _, _) =
                pipeline::decode(ctx, &mut greedy, n as i32, q.max_answer, |_| {})?;
            // The caller scores against the question in the prompt.
            emit(SampleResult {
                output: text,
                ..base
            });
        } else {
            // Every question from the same compressed state (and recall store).
            let state = ctx.save_seq(SEQ)?;
            let mark = recaller.as_ref().map(|(c, _)| c.mark());
            for (j, (ask, q)) in asks.iter().zip(&sample.questions).enumerate() {
                if j > 0 {
                    ctx.memory_clear(true);
                    ctx.restore_seq(SEQ, &state)?;
                }
                let mut recall = None;
                match (recaller.as_mut(), mark.as_ref()) {
                    (Some((c, n_keep)), Some(mark)) => {
                        c.rollback(mark)?;
                        let json = budget.map_or(serde_json::Value::Null, Budget::json);
                        c.recall_window(ctx, ask, n as i32, *n_keep, json)?;
                        recall = c.last_recall();
                    }
                    _ => ctx.decode_tokens(ask, n as i32, SEQ, true)?,
                }
                let mut greedy = Sampler::new(&SamplingParams::greedy());
                let at = (n + ask.len()) as i32;
                let (_, text, _, _) = pipeline::decode(ctx, &mut greedy, at, q.max_answer, |_| {})?;
                let id = if asks.len() > 1 {
                    format!("{}#{j}", sample.id)
                } else {
                    sample.id.clone()
                };
                emit(SampleResult {
                    id,
                    score: score::score(sample.scoring, &text, &q.answers),
                    output: text,
                    recall,
                    ..base.clone()
                });
            }
        }
    }
    Ok(())
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
