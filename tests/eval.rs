//! `chunkkv eval`: generators are deterministic and correct by construction,
//! and a tiny grid on the default model writes all three outputs.

mod common;

use std::process::Command;

use chunkkv::eval::tasks::{self, TaskConfig};
use chunkkv::eval::{score, Scoring};
use common::{bin, data_dir, default_model, model_path};

fn cfg(length: usize, samples: usize, seed: u64) -> TaskConfig {
    TaskConfig {
        length,
        samples,
        questions: 1,
        seed,
        data: data_dir(),
    }
}

/// Every answer of every question is in its context: a perfect reader scores 1.
fn assert_answerable(model: &chunkkv::llama::Model, s: &tasks::Sample) {
    let n = model.tokenize(&s.context, false, false).unwrap().len();
    assert!(n > 150 && n < 1400, "{}: {n} tokens of context", s.id);
    for q in &s.questions {
        match s.scoring {
            Scoring::ContainsAll | Scoring::ContainsAny => {
                for ans in &q.answers {
                    assert!(s.context.contains(ans.as_str()), "{}: {ans}", s.id);
                }
                assert_eq!(
                    score::score(s.scoring, &q.answers.join(", "), &q.answers),
                    1.0
                );
            }
            Scoring::Number if s.task == "passkey" => {
                let key = &q.answers[0];
                assert_eq!(s.context.matches(key.as_str()).count(), 2, "{}", s.id);
            }
            Scoring::Number => {
                // GSM8K: the answer is the test row's final number.
                assert!(q.answers[0].parse::<f64>().is_ok(), "{:?}", q.answers);
                assert!(s.context.matches("####").count() >= 2, "several exemplars");
            }
            Scoring::Fidelity => {
                assert!(s.continuation.as_ref().is_some_and(|c| c.len() > 100))
            }
            Scoring::Exact => unreachable!(),
        }
    }
}

#[test]
fn generated_tasks_are_deterministic_and_hold_their_answers() {
    let model = default_model();
    for task in tasks::TASKS {
        let a = tasks::generate(model, task, &cfg(1024, 3, 7)).unwrap();
        let b = tasks::generate(model, task, &cfg(1024, 3, 7)).unwrap();
        assert_eq!(a, b, "{task} is deterministic");
        let c = tasks::generate(model, task, &cfg(1024, 3, 8)).unwrap();
        assert_ne!(a, c, "{task} depends on the seed");
        for s in &a {
            assert_eq!(s.questions.len(), 1, "{}", s.id);
            assert_answerable(model, s);
        }
    }
}

#[test]
fn several_facts_are_planted_and_each_is_asked_alone() {
    let model = default_model();
    for task in ["niah", "passkey", "ruler"] {
        let many = tasks::generate(
            model,
            task,
            &TaskConfig {
                questions: 4,
                ..cfg(1024, 2, 5)
            },
        )
        .unwrap();
        for s in &many {
            assert_eq!(s.questions.len(), 4, "{}", s.id);
            assert_answerable(model, s);
            // Four different questions with different answers.
            for (i, a) in s.questions.iter().enumerate() {
                for b in &s.questions[i + 1..] {
                    assert_ne!(a.text, b.text, "{}", s.id);
                    assert_ne!(a.answers, b.answers, "{}", s.id);
                }
            }
        }
    }
    // One question leaves the single-fact samples exactly as they were.
    let one = tasks::generate(model, "niah", &cfg(1024, 2, 5)).unwrap();
    assert_eq!(one[0].questions[0].answers, ["sandwich", "Dolores Park"]);
}

#[test]
fn niah_covers_lengths_by_depths_and_variable_chains_resolve() {
    let model = default_model();
    let niah = tasks::generate(model, "niah", &cfg(2048, 3, 1)).unwrap();
    let cells: Vec<(usize, f64)> = niah.iter().map(|s| s.cell.unwrap()).collect();
    assert_eq!(
        cells,
        [512, 1024, 2048]
            .iter()
            .flat_map(|&l| [0.0, 0.5, 1.0].map(|d| (l, d)))
            .collect::<Vec<_>>()
    );
    // The needle sits near its depth.
    let s = &niah[7];
    assert_eq!(s.cell, Some((2048, 0.5)));
    let at = s.context.find("Dolores Park").unwrap() as f64 / s.context.len() as f64;
    assert!((at - 0.5).abs() < 0.1, "{at}");

    let ruler = tasks::generate(model, "ruler", &cfg(1024, 1, 3)).unwrap();
    let vt = ruler.iter().find(|s| s.task == "ruler-vt").unwrap();
    // Follow the chain from the value: every assigned name is an answer.
    let value = vt.questions[0]
        .text
        .split_whitespace()
        .find_map(|w| w.parse::<u32>().ok())
        .unwrap();
    let mut names = vec![];
    let mut cur = format!("= {value}.");
    while let Some(i) = vt.context.find(&cur) {
        let name = vt.context[..i]
            .trim_end()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string();
        cur = format!("= VAR {name}.");
        names.push(name);
    }
    assert_eq!(names, vt.questions[0].answers);
}

#[test]
fn a_users_tasks_file_is_read_and_bad_lines_are_named() {
    let dir = std::env::temp_dir().join(format!("chunkkv-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        "{\"id\": \"a\", \"context\": \"Paris is in France.\", \"question\": \"Where is Paris?\", \"answers\": [\"France\"], \"match\": \"contains\"}\n\n",
    )
    .unwrap();
    let s = tasks::from_file(&good).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].scoring, Scoring::ContainsAny);
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"a\", \"context\": \"c\", \"question\": \"q\", \"answers\": [\"x\"], \"match\": \"fuzzy\"}\n").unwrap();
    let e = tasks::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:1") && e.contains("fuzzy"), "{e}");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert!(tasks::from_file(&empty)
        .unwrap_err()
        .to_string()
        .contains("holds no task"));
}

#[test]
fn a_tiny_eval_writes_markdown_json_and_plots() {
    let out = std::env::temp_dir().join(format!("chunkkv-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let model = model_path("smollm2-135m");
    let o = Command::new(bin())
        .args(["eval", "-m", model.to_str().unwrap(), "-t", "2"])
        .args([
            "--tasks",
            "passkey,niah",
            "--samples",
            "1",
            "--length",
            "512",
        ])
        .args(["--methods", "none,chunkkv,snapkv", "--budgets", "0.3"])
        .arg("--data")
        .arg(data_dir())
        .arg("--out-dir")
        .arg(&out)
        .arg("--json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let rows = v["results"].as_array().unwrap();
    // Two tasks × (full cache + two methods at one budget).
    assert_eq!(rows.len(), 6, "{v}");
    for r in rows {
        let s = r["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s), "{r}");
        assert_eq!(
            r["budget"].as_f64().unwrap(),
            if r["method"] == "none" { 1.0 } else { 0.3 }
        );
    }
    assert_eq!(
        rows.iter()
            .filter(|r| r["task"] == "niah")
            .map(|r| r["n"].as_u64().unwrap())
            .max(),
        Some(3)
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("## passkey") && md.contains("| chunkkv |"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["samples"].as_array().unwrap().len(), 3 + 3 * 3);
    for f in [
        "score-vs-budget-passkey.svg",
        "score-vs-budget-niah.svg",
        "niah-chunkkv-30_.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}");
    }
    // PNGs come with a system font (setup installs DejaVu).
    if std::path::Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists() {
        let png = std::fs::read(out.join("score-vs-budget-passkey.png")).unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
    }
    // The head-to-head names the one baseline and tallies every task the full cache can do.
    assert!(md.contains("## ChunkKV against each baseline"), "{md}");
    assert!(md.contains("| task | budget | snapkv |"), "{md}");

    // --report rebuilds the same tables and the plots from results.json alone.
    for f in [
        "results.md",
        "score-vs-budget-niah.svg",
        "niah-chunkkv-30_.svg",
    ] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    let o = Command::new(bin())
        .args(["eval", "--report"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(out.join("results.md")).unwrap(), md);
    assert!(out.join("score-vs-budget-niah.svg").exists());
    assert!(out.join("niah-chunkkv-30_.svg").exists());
}

#[test]
fn eval_refuses_bad_input_clearly() {
    let model = model_path("smollm2-135m");
    let run = |extra: &[&str]| {
        Command::new(bin())
            .args(["eval", "-m", model.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    for (args, code, needle) in [
        (vec!["--tasks", "jokes"], 1, "unknown task `jokes`"),
        (
            vec!["--tasks", "passkey", "--budgets", ","],
            2,
            "invalid KV budget",
        ),
        (vec!["--tasks", "passkey", "--methods", "magic"], 2, "magic"),
        (
            vec!["--tasks", "passkey", "--samples", "0"],
            1,
            "--samples 0",
        ),
        (
            vec!["--tasks", "niah", "--data", "/no/such/dir"],
            1,
            "--data",
        ),
        (
            vec!["--tasks", "passkey", "-c", "256", "--length", "2000"],
            1,
            "too small",
        ),
        (vec!["--report", "/no/such/dir"], 1, "cannot read"),
        (
            vec!["--report", "/tmp", "--tasks", "niah"],
            2,
            "cannot be used with",
        ),
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Both modes side by side: each context compressed before its questions
/// (reconstruction and window scorers, KVzip), two questions asked of one
/// compressed state, and the same questions inside the prompt.
#[test]
fn query_agnostic_and_aware_modes_run_side_by_side() {
    let out = std::env::temp_dir().join(format!("chunkkv-eval-qa-{}", std::process::id()));
    let model = model_path("smollm2-135m");
    let o = Command::new(bin())
        .args(["eval", "-m", model.to_str().unwrap(), "-t", "2"])
        .args(["--tasks", "niah", "--samples", "1", "--length", "512"])
        .args(["--questions", "2", "--both-modes"])
        .args([
            "--methods",
            "none,chunkkv:reconstruct,chunkkv,kvzip",
            "--budgets",
            "0.3",
        ])
        .arg("--data")
        .arg(data_dir())
        .arg("--out-dir")
        .arg(&out)
        .arg("--json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let rows = v["results"].as_array().unwrap();
    // Two modes × (full cache + three methods at one budget).
    assert_eq!(rows.len(), 8, "{v}");
    for task in ["niah", "niah (agnostic)"] {
        let methods: Vec<&str> = rows
            .iter()
            .filter(|r| r["task"] == task)
            .map(|r| r["method"].as_str().unwrap())
            .collect();
        assert_eq!(
            methods,
            ["none", "chunkkv:reconstruct", "chunkkv", "kvzip"],
            "{task}"
        );
        // Three contexts (lengths 128, 256, 512) × two questions each.
        for r in rows.iter().filter(|r| r["task"] == task) {
            assert_eq!(r["n"], 6, "{r}");
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let samples = json["samples"].as_array().unwrap();
    assert!(samples
        .iter()
        .any(|s| s["id"].as_str().unwrap().ends_with("#1")));
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("## niah\n") && md.contains("## niah (agnostic)"),
        "{md}"
    );
    assert!(
        md.contains("## ChunkKV (reconstruct) against each baseline"),
        "{md}"
    );
    assert!(out
        .join("niah_agnostic-chunkkv_reconstruct-30_.svg")
        .exists());
}
