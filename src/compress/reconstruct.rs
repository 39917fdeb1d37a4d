//! Query-agnostic importance by context reconstruction (KVzip, Kim et al.,
//! NeurIPS 2025).
//!
//! A window of the prompt's last tokens scores the cache for the question it
//! holds; a document loaded before its questions has no such window. KVzip asks
//! the model to repeat the context and teacher-forces the context as the
//! answer: a cached pair the model needs to reproduce the text gets attention
//! from some reconstruction query. Each cell's score is the largest attention
//! any reconstruction query pays it (max over the KV head's query group), from
//! patch 0005's max reduction in the importance graph. The reconstruction runs
//! in chunks on top of the cache and is removed after each, so it needs only
//! the chunk's cells for a moment.

use crate::llama::{
    ChatMessage, Context, LayerImportance, Model, Pos, ScoreReduce, ScoreRows, SeqId, Token,
    TokenizeError,
};

use super::CompressError;

/// Where the cached context stands when reconstruction starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnState {
    /// Inside an open user message (a prompt whose question comes later).
    Open,
    /// After a closed user message (a document loaded into a chat).
    Closed,
}

/// The teacher-forced reconstruction prompts of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconstruction {
    /// Before the first chunk: the request to repeat the context.
    first: Vec<Token>,
    /// Before later chunks: the request to go on from the previous chunk's
    /// last `overlap` tokens, which follow it.
    next: Vec<Token>,
    /// The assistant's opening, right before the chunk itself.
    opening: Vec<Token>,
    /// Context tokens per reconstruction chunk (kvpress and KVzip: 2048).
    pub chunk: usize,
    /// Tokens of the previous chunk quoted before the next one (KVzip: 8).
    pub overlap: usize,
}

const REPEAT: &str = "Repeat the previous context exactly.";
const REPEAT_PART: &str = "Repeat the part of the previous context exactly, starting with";

impl Reconstruction {
    /// The prompts for `model`, through its chat template when it has one.
    pub fn for_model(model: &Model, state: TurnState) -> Result<Reconstruction, TokenizeError> {
        let affixes = TemplateAffixes::of(model);
        let (lead, opening) = match (&affixes, state) {
            (Some(a), TurnState::Open) => ("\n\n".to_string(), a.close_and_open_assistant.clone()),
            (Some(a), TurnState::Closed) => {
                (a.open_user.clone(), a.close_and_open_assistant.clone())
            }
            (None, TurnState::Open) => ("\n\n".to_string(), "\n".to_string()),
            (None, TurnState::Closed) => ("\nUser: ".to_string(), "\nAssistant: ".to_string()),
        };
        let tok = |s: &str| model.tokenize(s, false, true);
        Ok(Reconstruction {
            first: tok(&format!("{lead}{REPEAT}"))?,
            next: tok(&format!("{lead}{REPEAT_PART}"))?,
            opening: tok(&opening)?,
            chunk: 2048,
            overlap: 8,
        })
    }

    /// Cells a reconstruction of `chunk` tokens needs on top of the context.
    pub fn cells_needed(&self, chunk: usize) -> usize {
        self.next.len().max(self.first.len()) + self.overlap + self.opening.len() + chunk
    }

    /// The input of chunk `i` of `tokens` split into chunks of `size`.
    fn input(&self, tokens: &[Token], size: usize, i: usize) -> Vec<Token> {
        let chunk = &tokens[i * size..((i + 1) * size).min(tokens.len())];
        let mut input = if i == 0 {
            self.first.clone()
        } else {
            let prev_end = i * size;
            let mut v = self.next.clone();
            v.extend_from_slice(&tokens[prev_end.saturating_sub(self.overlap)..prev_end]);
            v
        };
        input.extend_from_slice(&self.opening);
        input.extend_from_slice(chunk);
        input
    }

    /// Scores every cell of `seq` for the model layers flagged in `layers` by
    /// reconstructing `tokens` (the context, as it was prefilled) on top of the
    /// cache; the cache is left as it was. Cells outside `tokens` are scored
    /// by the same queries (how much the reconstruction looks at them).
    pub fn score(
        &self,
        ctx: &mut Context<'_>,
        seq: SeqId,
        tokens: &[Token],
        layers: &[bool],
    ) -> Result<Vec<LayerImportance>, CompressError> {
        if tokens.is_empty() {
            return Err(CompressError::Config("nothing to reconstruct".into()));
        }
        let used = ctx.seq_used(seq);
        let free = ctx.seq_capacity().saturating_sub(used);
        let overhead = self.cells_needed(0);
        // At least a few dozen tokens per chunk, or the prompts outweigh the text.
        if free < overhead + 32 {
            return Err(CompressError::Config(format!(
                "reconstruction scoring needs {} free cells but the context has {free} \
                 (raise -c, or use --kv-score window)",
                overhead + 32
            )));
        }
        let size = self.chunk.min(free - overhead).min(tokens.len()).max(1);
        let at: Pos = ctx.seq_pos_max(seq).map_or(0, |p| p + 1);
        let rows = rows_per_call(ctx, used + overhead + size);
        ctx.importance_begin(layers, ScoreRows::All, ScoreReduce::Max)?;
        let result = (|| {
            for i in 0..tokens.len().div_ceil(size) {
                let input = self.input(tokens, size, i);
                let mut done = 0;
                for part in input.chunks(rows) {
                    let decoded = ctx.decode_tokens(part, at + done as Pos, seq, false);
                    if decoded.is_err() {
                        ctx.seq_rm(seq, at, -1);
                    }
                    decoded?;
                    done += part.len();
                }
                // The reconstruction leaves no trace: only its scores stay.
                ctx.seq_rm(seq, at, -1);
            }
            Ok::<(), CompressError>(())
        })();
        ctx.importance_end();
        result?;
        (0..layers.len() as u32)
            .filter(|&il| layers[il as usize])
            .map(|il| ctx.importance(il).ok_or(CompressError::NoImportance(il)))
            .collect()
    }
}

/// Query rows per decode call while every row scores: the importance graph
/// holds an F32 `[attention width, rows, query heads]` tensor per scored layer,
/// kept near 256 MiB (and within the 2^31 elements some kernels index by `int`).
fn rows_per_call(ctx: &Context<'_>, width: usize) -> usize {
    let model = ctx.model();
    let heads = model.info().n_head.max(1) as usize;
    let width = width.div_ceil(256) * 256;
    let budget = (256usize << 20) / 4;
    (budget / (width * heads).max(1)).clamp(16, ctx.n_ubatch() as usize)
}

/// The pieces of a chat template around one user message.
#[derive(Debug, Clone, PartialEq)]
struct TemplateAffixes {
    /// What opens a user message after an earlier message was closed.
    open_user: String,
    /// What closes a user message and opens the assistant's reply.
    close_and_open_assistant: String,
}

impl TemplateAffixes {
    fn of(model: &Model) -> Option<TemplateAffixes> {
        const A: &str = "\u{1}chunkkv-a\u{1}";
        const B: &str = "\u{1}chunkkv-b\u{1}";
        const C: &str = "\u{1}chunkkv-c\u{1}";
        let render = |msgs: &[(&str, &str)], open: bool| {
            let msgs: Vec<ChatMessage> = msgs.iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
            model.apply_chat_template(&msgs, open).ok()
        };
        let open = render(&[("user", A)], true)?;
        let closed = render(&[("user", A)], false)?;
        let three = render(&[("user", A), ("assistant", B), ("user", C)], true)?;
        let close_and_open_assistant = open.split_once(A)?.1.to_string();
        let close_user = closed.split_once(A)?.1.to_string();
        // Between a reply and the next user message: the reply's close, then the user's open.
        let between = three.split_once(B)?.1.split_once(C)?.0;
        let open_user = between
            .strip_prefix(close_user.as_str())
            .unwrap_or(between)
            .to_string();
        Some(TemplateAffixes {
            open_user,
            close_and_open_assistant,
        })
    }
}
