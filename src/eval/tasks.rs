//! Evaluation samples, generated deterministically from a seed; every
//! answer is correct by construction.
//!
//! Lengths are in the model's tokens: haystacks are cut from a tokenized
//! corpus and turned back into text, so a sample of length `L` is `L` tokens
//! of context give or take the needle and a few boundary tokens.

use std::path::{Path, PathBuf};

use super::score::Scoring;
use crate::llama::{Model, Token};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("unknown task `{0}`: niah, passkey, ruler, gsm8k-icl or fidelity")]
    Unknown(String),
    #[error("task {task} needs {path}, which cannot be read ({source}); set --data or $CHUNKKV_DATA to the data directory")]
    MissingData {
        task: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    BadTaskFile {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("the tasks file {0} holds no task")]
    EmptyTaskFile(PathBuf),
    #[error(transparent)]
    Tokenize(#[from] crate::llama::TokenizeError),
}

/// One question over one context.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub task: String,
    pub id: String,
    pub context: String,
    pub question: String,
    pub answers: Vec<String>,
    pub scoring: Scoring,
    /// Tokens to generate for the answer.
    pub max_answer: usize,
    /// NIAH grid cell: (context length in tokens, needle depth in [0, 1]).
    pub cell: Option<(usize, f64)>,
    /// Fidelity: the natural continuation to teacher-force after the context.
    pub continuation: Option<String>,
}

/// The tasks `--tasks` names.
pub const TASKS: &[&str] = &["niah", "passkey", "ruler", "gsm8k-icl", "fidelity"];

/// What the generators need.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// Target context length in tokens.
    pub length: usize,
    pub samples: usize,
    pub seed: u64,
    pub data: PathBuf,
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x2545_F491_4F6C_DD1D | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Generates the samples of `task`.
pub fn generate(model: &Model, task: &str, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    match task {
        "niah" => niah(model, cfg),
        "passkey" => passkey(model, cfg),
        "ruler" => ruler(model, cfg),
        "gsm8k-icl" => gsm8k_icl(model, cfg),
        "fidelity" => fidelity(model, cfg),
        other => Err(TaskError::Unknown(other.to_string())),
    }
}

/// The essays as one tokenized corpus.
fn essays(model: &Model, data: &Path, task: &'static str) -> Result<Vec<Token>, TaskError> {
    let dir = data.join("paul-graham-essays");
    let missing = |source| TaskError::MissingData {
        task,
        path: dir.clone(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(missing)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt") && !p.ends_with("SOURCE-LICENSE.txt"))
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        text.push_str(
            &std::fs::read_to_string(&f).map_err(|source| TaskError::MissingData {
                task,
                path: f.clone(),
                source,
            })?,
        );
        text.push_str("\n\n");
    }
    Ok(model.tokenize(&text, false, false)?)
}

/// `n` tokens of corpus text starting at a seeded offset, as text.
fn haystack(model: &Model, corpus: &[Token], n: usize, rng: &mut Rng) -> String {
    let n = n.min(corpus.len());
    let start = rng.below(corpus.len() - n + 1);
    model.detokenize(&corpus[start..start + n], false)
}

/// Inserts `needle` at the sentence boundary nearest `depth` (0: start, 1: end).
pub fn insert_at_depth(hay: &str, needle: &str, depth: f64) -> String {
    let target = (hay.len() as f64 * depth.clamp(0.0, 1.0)) as usize;
    let cut = if target == 0 {
        0
    } else if target >= hay.len() {
        hay.len()
    } else {
        // The end of the sentence at or after the target, else the target's char boundary.
        hay[target..]
            .find(". ")
            .map(|i| target + i + 1)
            .filter(|&c| c < hay.len())
            .unwrap_or_else(|| {
                (target..=hay.len())
                    .find(|&i| hay.is_char_boundary(i))
                    .unwrap()
            })
    };
    [hay[..cut].trim_end(), needle, hay[cut..].trim_start()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Depths of an `n`-point grid over [0, 1].
fn depths(n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![0.5];
    }
    (0..n).map(|i| i as f64 / (n - 1) as f64).collect()
}

/// Needle in a haystack of essays: lengths L/4, L/2, L × `samples` depths.
fn niah(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let corpus = essays(model, &cfg.data, "niah")?;
    let mut rng = Rng::new(cfg.seed);
    let needle = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";
    let mut out = Vec::new();
    let mut lengths = vec![cfg.length / 4, cfg.length / 2, cfg.length];
    lengths.dedup();
    for &len in &lengths {
        for d in depths(cfg.samples.max(1)) {
            let hay = haystack(model, &corpus, len, &mut rng);
            out.push(Sample {
                task: "niah".into(),
                id: format!("niah-{len}-{:.0}", d * 100.0),
                context: insert_at_depth(&hay, needle, d),
                question: "What is the best thing to do in San Francisco? Answer in one sentence."
                    .into(),
                answers: vec!["sandwich".into(), "Dolores Park".into()],
                scoring: Scoring::ContainsAll,
                max_answer: 32,
                cell: Some((len, d)),
                continuation: None,
            });
        }
    }
    Ok(out)
}

/// Repetitive filler lines, as in the passkey retrieval test.
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

fn filler(model: &Model, n_tokens: usize) -> Result<String, TaskError> {
    let per = model.tokenize(FILLER, false, false)?.len().max(1) + 1;
    Ok(vec![FILLER; n_tokens / per + 1].join(" "))
}

/// A 5-digit pass key hidden in filler at spread depths.
fn passkey(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let mut rng = Rng::new(cfg.seed ^ 0x5055);
    let hay = filler(model, cfg.length)?;
    depths(cfg.samples.max(1))
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let key = 10_000 + rng.below(90_000);
            let needle = format!("The pass key is {key}. Remember it. {key} is the pass key.");
            Ok(Sample {
                task: "passkey".into(),
                id: format!("passkey-{i}"),
                context: format!(
                    "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n{}",
                    insert_at_depth(&hay, &needle, d)
                ),
                question: "What is the pass key? The pass key is".into(),
                answers: vec![key.to_string()],
                scoring: Scoring::Number,
                max_answer: 12,
                cell: None,
                continuation: None,
            })
        })
        .collect()
}

const KEY_WORDS: &[&str] = &[
    "apple", "river", "violet", "copper", "falcon", "marble", "orchid", "tundra", "saffron",
    "harbor", "meadow", "quartz", "lantern", "glacier", "cobalt", "juniper",
];

fn magic(rng: &mut Rng) -> String {
    (1_000_000 + rng.below(9_000_000)).to_string()
}

/// RULER-style: multi-key NIAH, multi-value NIAH and variable tracking.
fn ruler(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let corpus = essays(model, &cfg.data, "ruler")?;
    let mut rng = Rng::new(cfg.seed ^ 0x52554C);
    let mut out = Vec::new();
    for i in 0..cfg.samples.max(1) {
        // Multi-key: four keys, one asked.
        let mut hay = haystack(model, &corpus, cfg.length, &mut rng);
        let mut keys: Vec<&str> = Vec::new();
        while keys.len() < 4 {
            let k = KEY_WORDS[rng.below(KEY_WORDS.len())];
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let values: Vec<String> = keys.iter().map(|_| magic(&mut rng)).collect();
        for (k, v) in keys.iter().zip(&values) {
            let d = rng.below(1000) as f64 / 1000.0;
            hay = insert_at_depth(
                &hay,
                &format!("One of the special magic numbers for {k} is: {v}."),
                d,
            );
        }
        let ask = rng.below(keys.len());
        out.push(Sample {
            task: "ruler-mk".into(),
            id: format!("ruler-mk-{i}"),
            context: hay,
            question: format!(
                "What is the special magic number for {}? The special magic number for {} is",
                keys[ask], keys[ask]
            ),
            answers: vec![values[ask].clone()],
            scoring: Scoring::ContainsAll,
            max_answer: 16,
            cell: None,
            continuation: None,
        });

        // Multi-value: one key, four values.
        let mut hay = haystack(model, &corpus, cfg.length, &mut rng);
        let key = KEY_WORDS[rng.below(KEY_WORDS.len())];
        let values: Vec<String> = (0..4).map(|_| magic(&mut rng)).collect();
        for v in &values {
            let d = rng.below(1000) as f64 / 1000.0;
            hay = insert_at_depth(
                &hay,
                &format!("One of the special magic numbers for {key} is: {v}."),
                d,
            );
        }
        out.push(Sample {
            task: "ruler-mv".into(),
            id: format!("ruler-mv-{i}"),
            context: hay,
            question: format!("What are all the special magic numbers for {key}? List them all."),
            answers: values,
            scoring: Scoring::ContainsAll,
            max_answer: 48,
            cell: None,
            continuation: None,
        });

        // Variable tracking: a chain of five assignments.
        let mut hay = filler(model, cfg.length)?;
        let value = 10_000 + rng.below(90_000);
        let names: Vec<String> = (0..5)
            .map(|_| {
                (0..5)
                    .map(|_| (b'A' + rng.below(26) as u8) as char)
                    .collect::<String>()
            })
            .collect();
        let mut lines = vec![format!("VAR {} = {value}.", names[0])];
        for w in names.windows(2) {
            lines.push(format!("VAR {} = VAR {}.", w[1], w[0]));
        }
        for (j, line) in lines.iter().enumerate() {
            // In order, spread through the text.
            let d = (j as f64 + 0.5) / lines.len() as f64;
            hay = insert_at_depth(&hay, line, d);
        }
        out.push(Sample {
            task: "ruler-vt".into(),
            id: format!("ruler-vt-{i}"),
            context: hay,
            question: format!(
                "Find all variables that are assigned the value {value} in the text above, directly or through other variables. Answer: the variables are"
            ),
            answers: names,
            scoring: Scoring::ContainsAll,
            max_answer: 40,
            cell: None,
            continuation: None,
        });
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct Gsm8kRow {
    question: String,
    answer: String,
}

fn gsm8k_rows(data: &Path, file: &str) -> Result<Vec<Gsm8kRow>, TaskError> {
    let path = data.join("gsm8k").join(file);
    let text = std::fs::read_to_string(&path).map_err(|source| TaskError::MissingData {
        task: "gsm8k-icl",
        path: path.clone(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TaskError::BadTaskFile {
                path: path.clone(),
                line: i + 1,
                msg: e.to_string(),
            })
        })
        .collect()
}

/// The number after `####` in a GSM8K answer.
pub fn gsm8k_final(answer: &str) -> Option<String> {
    let i = answer.rfind("####")?;
    Some(answer[i + 4..].trim().replace(',', "")).filter(|s| !s.is_empty())
}

/// Many-shot GSM8K: as many train exemplars as fill the length, then a test question.
fn gsm8k_icl(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let train = gsm8k_rows(&cfg.data, "train.jsonl")?;
    let test = gsm8k_rows(&cfg.data, "test.jsonl")?;
    let mut rng = Rng::new(cfg.seed ^ 0x6753);
    let mut out = Vec::new();
    for i in 0..cfg.samples.max(1) {
        let mut shots = String::new();
        let mut used = 0;
        loop {
            let ex = &train[rng.below(train.len())];
            let shot = format!(
                "Question: {}\nAnswer: {}\n\n",
                ex.question,
                ex.answer.replace("<<", "").replace(">>", " ")
            );
            let n = model.tokenize(&shot, false, false)?.len();
            if used + n > cfg.length.saturating_sub(256) && used > 0 {
                break;
            }
            used += n;
            shots.push_str(&shot);
        }
        let q = &test[rng.below(test.len())];
        out.push(Sample {
            task: "gsm8k-icl".into(),
            id: format!("gsm8k-{i}"),
            context: shots,
            question: format!(
                "Question: {}\nAnswer step by step as above, ending with #### and the number.",
                q.question
            ),
            answers: vec![gsm8k_final(&q.answer).unwrap_or_default()],
            scoring: Scoring::Number,
            max_answer: 160,
            cell: None,
            continuation: None,
        });
    }
    Ok(out)
}

/// Natural text of the target length and its next 64 tokens.
fn fidelity(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let corpus = essays(model, &cfg.data, "fidelity")?;
    let mut rng = Rng::new(cfg.seed ^ 0x666964);
    (0..cfg.samples.max(1))
        .map(|i| {
            let n = (cfg.length + 64).min(corpus.len());
            let start = rng.below(corpus.len() - n + 1);
            let split = start + n - 64;
            Ok(Sample {
                task: "fidelity".into(),
                id: format!("fidelity-{i}"),
                context: model.detokenize(&corpus[start..split], false),
                question: String::new(),
                answers: Vec::new(),
                scoring: Scoring::Fidelity,
                max_answer: 0,
                cell: None,
                continuation: Some(model.detokenize(&corpus[split..start + n], false)),
            })
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct UserTask {
    id: String,
    context: String,
    question: String,
    answers: Vec<String>,
    #[serde(rename = "match")]
    match_: String,
}

/// The user's tasks: one JSON object a line.
pub fn from_file(path: &Path) -> Result<Vec<Sample>, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::MissingData {
        task: "tasks-file",
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |line: usize, msg: String| TaskError::BadTaskFile {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let t: UserTask = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        let scoring = match t.match_.as_str() {
            "contains" => Scoring::ContainsAny,
            "exact" => Scoring::Exact,
            m => {
                return Err(bad(
                    i + 1,
                    format!("match must be \"contains\" or \"exact\", not {m:?}"),
                ))
            }
        };
        if t.answers.is_empty() {
            return Err(bad(i + 1, "answers is empty".into()));
        }
        out.push(Sample {
            task: "tasks-file".into(),
            id: t.id,
            context: t.context,
            question: t.question,
            answers: t.answers,
            scoring,
            max_answer: 48,
            cell: None,
            continuation: None,
        });
    }
    if out.is_empty() {
        return Err(TaskError::EmptyTaskFile(path.to_path_buf()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needles_land_at_sentence_boundaries_near_their_depth() {
        let hay = "One two. Three four. Five six. Seven eight.";
        assert!(insert_at_depth(hay, "N.", 0.0).starts_with("N. One two."));
        assert!(insert_at_depth(hay, "N.", 1.0).ends_with("eight. N."));
        let mid = insert_at_depth(hay, "N.", 0.5);
        assert!(mid.contains("six. N. Seven"), "{mid}");
        assert_eq!(mid.matches("N.").count(), 1);
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let a: Vec<usize> = {
            let mut r = Rng::new(3);
            (0..20).map(|_| r.below(7)).collect()
        };
        let mut r = Rng::new(3);
        assert_eq!(a, (0..20).map(|_| r.below(7)).collect::<Vec<_>>());
        assert!(a.iter().all(|&x| x < 7));
        assert!(a.iter().any(|&x| x != a[0]));
    }

    #[test]
    fn gsm8k_final_answer_is_the_number_after_the_marker() {
        assert_eq!(gsm8k_final("so 3+4 = 7\n#### 7").as_deref(), Some("7"));
        assert_eq!(gsm8k_final("#### 1,200").as_deref(), Some("1200"));
        assert_eq!(gsm8k_final("no marker 5"), None);
    }
}
