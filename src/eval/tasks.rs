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
    #[error("unknown task `{0}`: niah, passkey, ruler (or ruler-mk, ruler-mv, ruler-vt), gsm8k-icl or fidelity")]
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

/// A question about a sample's context and what answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub text: String,
    pub answers: Vec<String>,
    /// Tokens to generate for the answer.
    pub max_answer: usize,
}

impl Question {
    fn new(text: impl Into<String>, answers: Vec<String>, max_answer: usize) -> Question {
        Question {
            text: text.into(),
            answers,
            max_answer,
        }
    }
}

/// One context and the questions asked of it (one, or `--questions N`
/// planted facts, each asked separately).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub task: String,
    pub id: String,
    pub context: String,
    pub questions: Vec<Question>,
    pub scoring: Scoring,
    /// NIAH grid cell: (context length in tokens, needle depth in [0, 1]).
    pub cell: Option<(usize, f64)>,
    /// Fidelity: the natural continuation to teacher-force after the context.
    pub continuation: Option<String>,
}

/// The tasks `--tasks` names.
pub const TASKS: &[&str] = &["niah", "passkey", "ruler", "gsm8k-icl", "fidelity"];

/// Tasks `--tasks` also takes: one part of `ruler`.
pub const RULER_PARTS: &[&str] = &["ruler-mk", "ruler-mv", "ruler-vt"];

/// What the generators need.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// Target context length in tokens.
    pub length: usize,
    pub samples: usize,
    /// Facts planted per context, each asked separately (NIAH, passkey, RULER).
    pub questions: usize,
    pub seed: u64,
    pub data: PathBuf,
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed: neighbouring seeds start unrelated streams
        // (xor with a constant and `| 1` once made 12 and 13 the same).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // xorshift needs a non-zero state.
        Rng(if z == 0 { 1 } else { z })
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
        // One RULER task alone (the generator's draws stay those of the full set).
        "ruler-mk" | "ruler-mv" | "ruler-vt" => Ok(ruler(model, cfg)?
            .into_iter()
            .filter(|s| s.task == task)
            .collect()),
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
    // A byte offset inside a multi-byte character moves to that character's end.
    let target = (target..=hay.len())
        .find(|&i| hay.is_char_boundary(i))
        .unwrap_or(hay.len());
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
            .unwrap_or(target)
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

/// Facts hidden in NIAH haystacks: the standard needle first, then others
/// for `--questions N` (fact, question, key words of the answer).
const NEEDLES: &[(&str, &str, &[&str])] = &[
    (
        "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        "What is the best thing to do in San Francisco?",
        &["sandwich", "Dolores Park"],
    ),
    (
        "The secret ingredient in Aunt Maria's soup is smoked paprika.",
        "What is the secret ingredient in Aunt Maria's soup?",
        &["paprika"],
    ),
    (
        "The lighthouse keeper's dog is named Biscuit.",
        "What is the name of the lighthouse keeper's dog?",
        &["Biscuit"],
    ),
    (
        "The password to the old library vault is tangerine42.",
        "What is the password to the old library vault?",
        &["tangerine42"],
    ),
    (
        "Captain Ortega's ship is called the Silver Heron.",
        "What is Captain Ortega's ship called?",
        &["Silver Heron"],
    ),
    (
        "The chess club meets every Thursday in room 314.",
        "In which room does the chess club meet?",
        &["314"],
    ),
    (
        "The rarest exhibit in the harbor museum is a violin carved from black walnut.",
        "What is the violin in the harbor museum carved from?",
        &["walnut"],
    ),
    (
        "The kite festival in Windmere is held on the first Sunday of October.",
        "In which month is the kite festival in Windmere held?",
        &["October"],
    ),
];

/// A depth in [0, 1) in thousandths.
fn random_depth(rng: &mut Rng) -> f64 {
    rng.below(1000) as f64 / 1000.0
}

/// Needle in a haystack of essays: lengths L/4, L/2, L × `samples` depths;
/// with `questions` > 1 more needles at random depths, each asked alone.
fn niah(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let corpus = essays(model, &cfg.data, "niah")?;
    let mut rng = Rng::new(cfg.seed);
    let n_q = cfg.questions.clamp(1, NEEDLES.len());
    let mut out = Vec::new();
    let mut lengths = vec![cfg.length / 4, cfg.length / 2, cfg.length];
    lengths.dedup();
    for &len in &lengths {
        for d in depths(cfg.samples.max(1)) {
            let hay = haystack(model, &corpus, len, &mut rng);
            let mut context = insert_at_depth(&hay, NEEDLES[0].0, d);
            for (fact, _, _) in &NEEDLES[1..n_q] {
                context = insert_at_depth(&context, fact, random_depth(&mut rng));
            }
            out.push(Sample {
                task: "niah".into(),
                id: format!("niah-{len}-{:.0}", d * 100.0),
                context,
                questions: NEEDLES[..n_q]
                    .iter()
                    .map(|(_, q, a)| {
                        Question::new(
                            format!("{q} Answer in one sentence."),
                            a.iter().map(|s| s.to_string()).collect(),
                            32,
                        )
                    })
                    .collect(),
                scoring: Scoring::ContainsAll,
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

/// Doors whose pass keys `--questions N` plants.
const DOORS: &[&str] = &[
    "red", "blue", "green", "yellow", "silver", "golden", "black", "white",
];

/// A 5-digit pass key hidden in filler at spread depths (with `questions` > 1:
/// the keys of several doors, each asked alone).
fn passkey(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let mut rng = Rng::new(cfg.seed ^ 0x5055);
    let hay = filler(model, cfg.length)?;
    let n_q = cfg.questions.clamp(1, DOORS.len());
    depths(cfg.samples.max(1))
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let key = 10_000 + rng.below(90_000);
            let lead = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.";
            if n_q == 1 {
                let needle = format!("The pass key is {key}. Remember it. {key} is the pass key.");
                return Ok(Sample {
                    task: "passkey".into(),
                    id: format!("passkey-{i}"),
                    context: format!("{lead}\n{}", insert_at_depth(&hay, &needle, d)),
                    questions: vec![Question::new(
                        "What is the pass key? The pass key is",
                        vec![key.to_string()],
                        12,
                    )],
                    scoring: Scoring::Number,
                    cell: None,
                    continuation: None,
                });
            }
            let mut text = hay.clone();
            let mut questions = Vec::new();
            for (j, door) in DOORS[..n_q].iter().enumerate() {
                let key = if j == 0 { key } else { 10_000 + rng.below(90_000) };
                let needle = format!(
                    "The pass key of the {door} door is {key}. Remember it. {key} is the pass key of the {door} door."
                );
                let depth = if j == 0 { d } else { random_depth(&mut rng) };
                text = insert_at_depth(&text, &needle, depth);
                questions.push(Question::new(
                    format!("What is the pass key of the {door} door? The pass key of the {door} door is"),
                    vec![key.to_string()],
                    12,
                ));
            }
            Ok(Sample {
                task: "passkey".into(),
                id: format!("passkey-{i}"),
                context: format!("{lead}\n{text}"),
                questions,
                scoring: Scoring::Number,
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

/// `n` distinct key words.
fn key_words(rng: &mut Rng, n: usize) -> Vec<&'static str> {
    let mut keys: Vec<&str> = Vec::new();
    while keys.len() < n.min(KEY_WORDS.len()) {
        let k = KEY_WORDS[rng.below(KEY_WORDS.len())];
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys
}

/// RULER-style: multi-key NIAH, multi-value NIAH and variable tracking
/// (`questions` keys, key-value sets or chains asked, each alone).
fn ruler(model: &Model, cfg: &TaskConfig) -> Result<Vec<Sample>, TaskError> {
    let corpus = essays(model, &cfg.data, "ruler")?;
    let mut rng = Rng::new(cfg.seed ^ 0x52554C);
    let n_q = cfg.questions.clamp(1, 8);
    let mut out = Vec::new();
    let mk_question = |k: &str| {
        format!("What is the special magic number for {k}? The special magic number for {k} is")
    };
    for i in 0..cfg.samples.max(1) {
        // Multi-key: four keys (or as many as asked), one (or `questions`) asked.
        let mut hay = haystack(model, &corpus, cfg.length, &mut rng);
        let keys = key_words(&mut rng, n_q.max(4));
        let values: Vec<String> = keys.iter().map(|_| magic(&mut rng)).collect();
        for (k, v) in keys.iter().zip(&values) {
            hay = insert_at_depth(
                &hay,
                &format!("One of the special magic numbers for {k} is: {v}."),
                random_depth(&mut rng),
            );
        }
        let ask = rng.below(keys.len());
        let asked: Vec<usize> = (0..n_q).map(|j| (ask + j) % keys.len()).collect();
        out.push(Sample {
            task: "ruler-mk".into(),
            id: format!("ruler-mk-{i}"),
            context: hay,
            questions: asked
                .iter()
                .map(|&a| Question::new(mk_question(keys[a]), vec![values[a].clone()], 16))
                .collect(),
            scoring: Scoring::ContainsAll,
            cell: None,
            continuation: None,
        });

        // Multi-value: one key (or `questions` keys), four values each.
        let mut hay = haystack(model, &corpus, cfg.length, &mut rng);
        let mv_keys: Vec<&str> = if n_q == 1 {
            vec![KEY_WORDS[rng.below(KEY_WORDS.len())]]
        } else {
            key_words(&mut rng, n_q)
        };
        let mut questions = Vec::new();
        for key in &mv_keys {
            let values: Vec<String> = (0..4).map(|_| magic(&mut rng)).collect();
            for v in &values {
                hay = insert_at_depth(
                    &hay,
                    &format!("One of the special magic numbers for {key} is: {v}."),
                    random_depth(&mut rng),
                );
            }
            questions.push(Question::new(
                format!("What are all the special magic numbers for {key}? List them all."),
                values,
                48,
            ));
        }
        out.push(Sample {
            task: "ruler-mv".into(),
            id: format!("ruler-mv-{i}"),
            context: hay,
            questions,
            scoring: Scoring::ContainsAll,
            cell: None,
            continuation: None,
        });

        // Variable tracking: a chain of five assignments (or `questions` chains).
        let mut hay = filler(model, cfg.length)?;
        let mut chains = Vec::new();
        for _ in 0..n_q {
            let value = 10_000 + rng.below(90_000);
            let names: Vec<String> = (0..5)
                .map(|_| {
                    (0..5)
                        .map(|_| (b'A' + rng.below(26) as u8) as char)
                        .collect::<String>()
                })
                .collect();
            chains.push((value, names));
        }
        let n_chains = chains.len();
        for (c, (value, names)) in chains.iter().enumerate() {
            let mut lines = vec![format!("VAR {} = {value}.", names[0])];
            for w in names.windows(2) {
                lines.push(format!("VAR {} = VAR {}.", w[1], w[0]));
            }
            for (j, line) in lines.iter().enumerate() {
                // In order, spread through the text; chains interleave.
                let d = (j as f64 + (c as f64 + 0.5) / n_chains as f64) / lines.len() as f64;
                hay = insert_at_depth(&hay, line, d);
            }
        }
        out.push(Sample {
            task: "ruler-vt".into(),
            id: format!("ruler-vt-{i}"),
            context: hay,
            questions: chains
                .into_iter()
                .map(|(value, names)| {
                    Question::new(
                        format!(
                            "Find all variables that are assigned the value {value} in the text above, directly or through other variables. Answer: the variables are"
                        ),
                        names,
                        40,
                    )
                })
                .collect(),
            scoring: Scoring::ContainsAll,
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
            questions: vec![Question::new(
                format!(
                    "Question: {}\nAnswer step by step as above, ending with #### and the number.",
                    q.question
                ),
                vec![gsm8k_final(&q.answer).unwrap_or_default()],
                160,
            )],
            scoring: Scoring::Number,
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
                questions: vec![Question::new("", Vec::new(), 0)],
                scoring: Scoring::Fidelity,
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
            questions: vec![Question::new(t.question, t.answers, 48)],
            scoring,
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
    fn neighbouring_seeds_start_different_streams() {
        let first: Vec<u64> = (0..64).map(|s| Rng::new(s).next_u64()).collect();
        for (i, a) in first.iter().enumerate() {
            assert!(
                !first[i + 1..].contains(a),
                "seed {i} repeats another seed's stream"
            );
        }
    }

    #[test]
    fn needles_land_at_sentence_boundaries_near_their_depth() {
        let hay = "One two. Three four. Five six. Seven eight.";
        assert!(insert_at_depth(hay, "N.", 0.0).starts_with("N. One two."));
        assert!(insert_at_depth(hay, "N.", 1.0).ends_with("eight. N."));
        let mid = insert_at_depth(hay, "N.", 0.5);
        assert!(mid.contains("six. N. Seven"), "{mid}");
        assert_eq!(mid.matches("N.").count(), 1);
    }

    /// A depth that lands inside a multi-byte character (an em dash in the
    /// essays) once panicked on the slice.
    #[test]
    fn a_depth_inside_a_multibyte_character_still_inserts() {
        let hay = "ab\u{2014}\u{2014}\u{2014}cd";
        for k in 0..=20 {
            let out = insert_at_depth(hay, "N.", k as f64 / 20.0);
            assert_eq!(out.matches("N.").count(), 1, "{out}");
            assert_eq!(out.replace("N.", "").replace(' ', ""), hay, "depth {k}/20");
        }
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
