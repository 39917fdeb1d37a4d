//! A multi-turn conversation whose cache stays small.
//!
//! Every turn is prefilled on top of the cache the conversation already has;
//! then the cache is compressed so live cells stay within the budget of all
//! tokens prefilled so far (older turns are not shrunk again by the ratio).
//! Text longer than the free context goes in segments, each compressed to
//! make room for the next. When a turn and its reply would not fit, the
//! history is compressed harder, keeping the new turn whole where it can.
//! The terminal side (REPL, slash commands) lives in `cli::chat`.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::compress::stream::{self, Cursor, StreamError};
use crate::compress::{Budget, CompressError, Compressor, Policy, Scorer};
use crate::llama::{
    ChatMessage, Context, KvPart, KvStats, Model, Pos, Sampler, Token, TokenizeError,
};
use crate::pipeline::{self, PipelineError, StopReason};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "the conversation does not fit: {need} more cells are needed but only {free} of {n_ctx} are free \
         ({hint})"
    )]
    ContextFull {
        need: usize,
        free: usize,
        n_ctx: u32,
        hint: &'static str,
    },
    #[error("the budget must keep at least one token")]
    EmptyBudget,
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Compress(#[from] CompressError),
    #[error("the context has no attention KV cache")]
    NoCache,
}

impl From<crate::llama::DecodeError> for ChatError {
    fn from(e: crate::llama::DecodeError) -> Self {
        ChatError::Pipeline(e.into())
    }
}

/// Progress of a segmented prefill, after each segment.
pub use crate::compress::stream::Segment as FeedProgress;

/// One reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub text: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub stop: StopReason,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// What `/stats` shows.
#[derive(Debug, Clone, Copy)]
pub struct ChatStats {
    pub kv: KvStats,
    /// Tokens that entered the cache since the last clear (prompts and replies).
    pub prefilled: usize,
    /// Bytes the uncompressed cache would hold for them.
    pub bytes_full: u64,
    pub compressions: usize,
    pub budget: Option<Budget>,
    pub method: &'static str,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Bytes of evicted rows held off the device (`None`: recall off).
    pub recall_bytes: Option<u64>,
    /// What recall did in the last turn that used it.
    pub recall_last: Option<crate::compress::RecallTurn>,
}

/// A conversation on one context.
pub struct ChatSession<'m> {
    ctx: Context<'m>,
    sampler: Sampler,
    /// `None` when the model's cache cannot be compressed.
    compressor: Option<Compressor>,
    /// Whether turns are compressed (`/method none` turns it off).
    active: bool,
    budget: Budget,
    /// Largest reply, in tokens; also the room kept free for it.
    pub n_predict: usize,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    /// The rendered conversation text whose tokens are in the cache.
    cached_text: String,
    next_pos: Pos,
    prefilled: usize,
    compressions: usize,
    last_prefill_tok_s: f64,
    last_decode_tok_s: f64,
}

impl std::fmt::Debug for ChatSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatSession")
            .field("messages", &self.messages.len())
            .field("next_pos", &self.next_pos)
            .finish()
    }
}

impl<'m> ChatSession<'m> {
    /// A new conversation; with `active` false (or no compressor) it keeps
    /// llama.cpp's full cache until [`ChatSession::set_policy`] turns compression on.
    pub fn new(
        ctx: Context<'m>,
        sampler: Sampler,
        compressor: Option<Compressor>,
        active: bool,
        budget: Budget,
        n_predict: usize,
        system: Option<String>,
    ) -> Result<Self, ChatError> {
        if budget.cells_for(1000) == 0 {
            return Err(ChatError::EmptyBudget);
        }
        Ok(ChatSession {
            ctx,
            sampler,
            active: active && compressor.is_some(),
            compressor,
            budget,
            n_predict,
            system,
            messages: Vec::new(),
            cached_text: String::new(),
            next_pos: 0,
            prefilled: 0,
            compressions: 0,
            last_prefill_tok_s: 0.0,
            last_decode_tok_s: 0.0,
        })
    }

    pub fn context(&self) -> &Context<'m> {
        &self.ctx
    }

    pub fn method(&self) -> &'static str {
        match &self.compressor {
            Some(c) if self.active => c.policy_name(),
            _ => "none",
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn set_budget(&mut self, budget: Budget) -> Result<(), ChatError> {
        if budget.cells_for(1000) == 0 {
            return Err(ChatError::EmptyBudget);
        }
        self.budget = budget;
        Ok(())
    }

    /// Switches the method for later turns (`None`: stop compressing), with
    /// its reuse group size (ChunkKV's; the baselines score every layer). The
    /// cache compressed so far stays as it is.
    pub fn set_policy(
        &mut self,
        policy: Option<Box<dyn Policy>>,
        reuse: usize,
    ) -> Result<(), ChatError> {
        match (policy, self.compressor.as_mut()) {
            (None, _) => self.active = false,
            (Some(p), Some(c)) => {
                c.set_policy(p, reuse);
                self.active = true;
            }
            (Some(_), None) => {
                return Err(ChatError::Compress(CompressError::Unsupported(
                    "this model's cache cannot be compressed".into(),
                )))
            }
        }
        Ok(())
    }

    /// Forgets the conversation (the system prompt stays).
    pub fn clear(&mut self) {
        self.ctx.memory_clear(true);
        if let Some(c) = self.compressor.as_mut() {
            c.reset();
        }
        self.messages.clear();
        self.cached_text.clear();
        self.next_pos = 0;
        self.prefilled = 0;
        self.compressions = 0;
    }

    /// Replaces the system prompt and starts over.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
        self.clear();
    }

    pub fn stats(&self) -> Result<ChatStats, ChatError> {
        let kv = self.ctx.kv_stats(KvPart::Base).ok_or(ChatError::NoCache)?;
        let per_cell = kv.bytes_allocated / u64::from(kv.size.max(1));
        Ok(ChatStats {
            kv,
            prefilled: self.prefilled,
            bytes_full: per_cell * self.prefilled as u64,
            compressions: self.compressions,
            budget: (self.method() != "none").then_some(self.budget),
            method: self.method(),
            prefill_tok_s: self.last_prefill_tok_s,
            decode_tok_s: self.last_decode_tok_s,
            recall_bytes: self
                .compressor
                .as_ref()
                .and_then(|c| c.recall_store())
                .map(|s| s.bytes()),
            recall_last: self.compressor.as_ref().and_then(|c| c.last_recall()),
        })
    }

    /// A problem the conversation went on despite (recall turned off by a
    /// broken recall file), once.
    pub fn take_warning(&mut self) -> Option<String> {
        self.compressor
            .as_mut()
            .and_then(|c| c.take_recall_warning())
    }

    /// The conversation rendered for the model, with the assistant's opening when `open`.
    fn render(&self, messages: &[ChatMessage], open: bool) -> String {
        let mut all = Vec::with_capacity(messages.len() + 1);
        if let Some(s) = &self.system {
            all.push(ChatMessage::new("system", s));
        }
        all.extend_from_slice(messages);
        render(self.ctx.model(), &all, open)
    }

    /// Text to append to the cache so it holds `rendered`.
    fn delta(&self, rendered: &str) -> String {
        match rendered.strip_prefix(self.cached_text.as_str()) {
            Some(rest) => rest.to_string(),
            // The template rewrote history (e.g. trimmed a reply): append the new message's part.
            None => {
                let prev = self.render(&self.messages[..self.messages.len() - 1], false);
                rendered.get(prev.len()..).unwrap_or(rendered).to_string()
            }
        }
    }

    /// Adds a user message without a reply (a loaded document), in segments
    /// if it is longer than the free context.
    pub fn add_document(
        &mut self,
        text: &str,
        progress: &mut dyn FnMut(FeedProgress),
    ) -> Result<usize, ChatError> {
        self.messages.push(ChatMessage::new("user", text));
        let rendered = self.render(&self.messages, false);
        let delta = self.delta(&rendered);
        // Compressed now, before any question: scored by reconstruction when the
        // compressor can (window scoring would rank by the document's own end),
        // or by its window when each question recalls evicted chunks.
        let scorer = self
            .compressor
            .as_ref()
            .map_or(Scorer::Reconstruct, Compressor::document_scorer);
        let n = self.feed_text(&delta, 0, scorer, progress);
        match n {
            Ok(n) => {
                self.cached_text = rendered;
                Ok(n)
            }
            Err(e) => {
                self.messages.pop();
                Err(e)
            }
        }
    }

    /// One user turn and the streamed reply. `stop` ends the reply early.
    pub fn turn(
        &mut self,
        text: &str,
        stop: &AtomicBool,
        progress: &mut dyn FnMut(FeedProgress),
        on_text: impl FnMut(&str),
    ) -> Result<Reply, ChatError> {
        self.messages.push(ChatMessage::new("user", text));
        let rendered = self.render(&self.messages, true);
        let delta = self.delta(&rendered);
        let reserve = self.reserve();
        let t = Instant::now();
        let n_prompt = match self.feed_text(&delta, reserve, Scorer::Window, progress) {
            Ok(n) => n,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        self.cached_text = rendered;

        let n_predict = self.n_predict.min(self.free());
        let (tokens, reply, why, decode_ms) = pipeline::decode_until(
            &mut self.ctx,
            &mut self.sampler,
            self.next_pos,
            n_predict,
            stop,
            on_text,
        )?;
        // Every sampled token was decoded into the cache except the last one
        // of a reply cut by its length or by a full context.
        let in_cache = match why {
            StopReason::EndOfGeneration | StopReason::Interrupted => tokens.len(),
            StopReason::Length | StopReason::ContextFull => tokens.len().saturating_sub(1),
        };
        self.next_pos += in_cache as Pos;
        self.prefilled += in_cache;
        self.cached_text
            .push_str(&self.ctx.model().detokenize(&tokens[..in_cache], false));
        self.messages.push(ChatMessage::new("assistant", &reply));
        self.last_prefill_tok_s = n_prompt as f64 * 1e3 / prefill_ms.max(1e-9);
        self.last_decode_tok_s = tokens.len().saturating_sub(1) as f64 * 1e3 / decode_ms.max(1e-9);
        Ok(Reply {
            text: reply,
            n_prompt,
            n_gen: tokens.len(),
            stop: why,
            prefill_tok_s: self.last_prefill_tok_s,
            decode_tok_s: self.last_decode_tok_s,
        })
    }

    /// Cells kept free for a reply.
    fn reserve(&self) -> usize {
        self.n_predict.min(self.ctx.n_ctx() as usize / 4).max(1)
    }

    fn used(&self) -> usize {
        self.ctx
            .kv_stats(KvPart::Base)
            .map_or(0, |s| s.cells_used as usize)
    }

    fn free(&self) -> usize {
        (self.ctx.n_ctx() as usize).saturating_sub(self.used())
    }

    /// Tokenizes and prefills `text` in as many segments as the free context
    /// needs, compressing after each, then leaves `reserve` cells free.
    fn feed_text(
        &mut self,
        text: &str,
        reserve: usize,
        scorer: Scorer,
        progress: &mut dyn FnMut(FeedProgress),
    ) -> Result<usize, ChatError> {
        let bos = self.next_pos == 0;
        let tokens = self.ctx.model().tokenize(text, bos, true)?;
        self.feed(&tokens, reserve, scorer, progress)?;
        Ok(tokens.len())
    }

    fn feed(
        &mut self,
        tokens: &[Token],
        reserve: usize,
        scorer: Scorer,
        progress: &mut dyn FnMut(FeedProgress),
    ) -> Result<(), ChatError> {
        let n_ctx = self.ctx.n_ctx();
        let Some(compressor) = self.compressor.as_mut().filter(|_| self.active) else {
            let (free, n) = (self.free(), tokens.len());
            if n + reserve > free {
                return Err(ChatError::ContextFull {
                    need: n + reserve,
                    free,
                    n_ctx,
                    hint: "/clear, raise -c, or turn compression on with /method chunkkv",
                });
            }
            self.ctx
                .decode_tokens(tokens, self.next_pos, pipeline::SEQ, true)?;
            self.next_pos += n as Pos;
            self.prefilled += n;
            return Ok(());
        };
        let mut cursor = Cursor {
            next_pos: self.next_pos,
            prefilled: self.prefilled,
            compressions: self.compressions,
        };
        let fed = stream::feed(
            &mut self.ctx,
            compressor,
            tokens,
            &mut cursor,
            self.budget,
            reserve,
            scorer,
            true,
            progress,
        );
        (self.next_pos, self.prefilled, self.compressions) =
            (cursor.next_pos, cursor.prefilled, cursor.compressions);
        fed.map_err(|e| match e {
            StreamError::Full {
                need,
                free,
                n_ctx,
                recent,
            } => ChatError::ContextFull {
                need,
                free,
                n_ctx,
                hint: if recent {
                    "even the most recent text alone is too long: /clear or raise -c"
                } else {
                    "/clear or raise -c"
                },
            },
            StreamError::Compress(e) => ChatError::Compress(e),
        })
    }
}

/// `messages` in the model's chat template, or a plain transcript when it has
/// none; `open` adds the assistant's opening. Shared with `serve`.
pub fn render(model: &Model, messages: &[ChatMessage], open: bool) -> String {
    match model.apply_chat_template(messages, open) {
        Ok(text) => text,
        Err(_) => {
            let mut text: String = messages
                .iter()
                .map(|m| {
                    let mut role = m.role.clone();
                    if let Some(first) = role.get_mut(..1) {
                        first.make_ascii_uppercase();
                    }
                    format!("{role}: {}\n", m.content)
                })
                .collect();
            if open {
                text.push_str("Assistant:");
            }
            text
        }
    }
}
