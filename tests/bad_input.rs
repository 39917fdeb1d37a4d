//! Bad input for every subcommand: one `error:` line and a non-zero exit,
//! never a panic, an abort or a hang. The table in docs/bad-input.md lists
//! what each row gets.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{bin, model_path};

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("chunkkv-bad-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run chunkkv")
}

/// One non-empty stderr line, `error: ...` with `needle`, exit 1 (runtime) or 2 (usage).
fn assert_clean_error(args: &[&str], needle: &str) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        matches!(o.status.code(), Some(1 | 2)),
        "{args:?}: exit {:?}, stderr: {err}",
        o.status.code()
    );
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {needle:?} not in {err}"
    );
}

/// A real GGUF whose architecture llama.cpp does not know: the tiny random
/// model with `general.architecture` renamed.
fn unknown_architecture(d: &Path) -> PathBuf {
    let tiny = d.join("tiny.gguf");
    let o = run(&["models", "synth", "tiny", "-o", tiny.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut bytes = std::fs::read(&tiny).unwrap();
    let key = b"general.architecture";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("architecture key");
    // key, then the value's type (u32) and length (u64), then the name.
    let value = at + key.len() + 4 + 8;
    assert_eq!(&bytes[value..value + 5], b"llama");
    bytes[value..value + 5].copy_from_slice(b"lxama");
    let path = d.join("lxama.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Every command that loads a model, with the arguments it needs besides -m.
fn model_commands() -> Vec<Vec<&'static str>> {
    vec![
        vec!["info"],
        vec!["generate", "-p", "hi"],
        vec!["chat"],
        vec!["compare", "-p", "256"],
        vec![
            "eval",
            "--tasks",
            "passkey",
            "--length",
            "256",
            "--samples",
            "1",
        ],
        vec!["bench", "-p", "256"],
        vec!["verify", "-p", "256"],
    ]
}

#[test]
fn a_model_that_cannot_be_loaded_is_one_error_line_everywhere() {
    let d = dir();
    let text = d.join("notes.gguf");
    std::fs::write(&text, "not a model at all").unwrap();
    let truncated = d.join("truncated.gguf");
    let real = std::fs::read(model_path("smollm2-135m")).unwrap();
    std::fs::write(&truncated, &real[..4096]).unwrap();
    let lxama = unknown_architecture(&d);
    let rows: Vec<(String, &str)> = vec![
        ("/no/such/model.gguf".into(), "model file not found"),
        ("no-such-model".into(), "unknown model `no-such-model`"),
        (text.display().to_string(), "is not a GGUF file"),
        (truncated.display().to_string(), "could not load"),
        (d.display().to_string(), "is a directory"),
        (lxama.display().to_string(), "could not load"),
    ];
    for cmd in model_commands() {
        for (model, needle) in &rows {
            let mut args = cmd.clone();
            args.extend(["-m", model.as_str()]);
            assert_clean_error(&args, needle);
        }
    }
}

#[test]
fn budgets_out_of_range_are_one_error_line_everywhere() {
    let compressing: Vec<Vec<&str>> = vec![
        vec![
            "generate",
            "-p",
            "hi",
            "--kv-method",
            "chunkkv",
            "--kv-budget",
        ],
        vec!["chat", "--kv-budget"],
        vec!["compare", "--kv-budget"],
        vec!["eval", "--tasks", "passkey", "--budgets"],
        vec!["bench", "--kv-budget"],
        vec!["verify", "--kv-budget"],
    ];
    // `--flag=value`: a value like -3 would otherwise read as a flag.
    for cmd in compressing {
        for (budget, needle) in [
            ("0", "out of range"),
            ("150%", "out of range"),
            ("1.5", "out of range"),
            ("NaN", "KV budget"),
            ("-3", "KV budget"),
            ("lots", "invalid KV budget"),
        ] {
            let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
            let flag = args.pop().unwrap();
            args.push(format!("{flag}={budget}"));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            assert_clean_error(&args, needle);
        }
    }
}

#[test]
fn contexts_too_small_or_too_large_are_one_error_line() {
    let m = model_path("smollm2-135m");
    let m = m.to_str().unwrap();
    // llama.cpp pads a context to 256 cells: this prompt is well past that.
    let long = "word ".repeat(600);
    for (args, needle) in [
        (
            vec!["generate", "-m", m, "-p", long.as_str(), "-c", "64"],
            "tokens but the context holds",
        ),
        (vec!["chat", "-m", m, "-c", "8"], "too small"),
        (
            vec![
                "eval", "-m", m, "--tasks", "passkey", "-c", "256", "--length", "2000",
            ],
            "too small",
        ),
        (
            vec!["verify", "-m", m, "-p", "4096", "-c", "512"],
            "context",
        ),
        (
            vec!["generate", "-m", m, "-p", "hi", "-c", "100000000"],
            "could not create the context",
        ),
        (
            vec!["chat", "-m", m, "-c", "100000000"],
            "could not create the context",
        ),
        (
            vec![
                "eval",
                "-m",
                m,
                "--tasks",
                "passkey",
                "--length",
                "256",
                "-c",
                "100000000",
            ],
            "could not create the context",
        ),
        (
            vec![
                "bench",
                "-m",
                m,
                "--kv-stream",
                "-c",
                "100000000",
                "-p",
                "512",
            ],
            "could not create the context",
        ),
    ] {
        assert_clean_error(&args, needle);
    }
}

#[test]
fn windows_that_cover_the_prompt_are_refused_where_they_must_be() {
    let m = model_path("smollm2-135m");
    let m = m.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["compare", "-m", m, "-p", "256", "--kv-window", "300"],
            "longer than the window",
        ),
        (
            vec!["bench", "-m", m, "-p", "256", "--kv-window", "300"],
            "must exceed the window",
        ),
        (
            vec![
                "eval",
                "-m",
                m,
                "--tasks",
                "passkey",
                "--length",
                "256",
                "--kv-window",
                "400",
                "-ub",
                "512",
            ],
            "longer than the window",
        ),
        (
            vec![
                "generate",
                "-m",
                m,
                "-p",
                "hi",
                "--kv-method",
                "chunkkv",
                "--kv-window",
                "0",
            ],
            "--kv-window",
        ),
        (
            vec![
                "generate",
                "-m",
                m,
                "-p",
                "hi",
                "--kv-method",
                "chunkkv",
                "--chunk-size",
                "0",
            ],
            "--chunk-size",
        ),
        (
            vec!["chat", "-m", m, "--reuse-layers", "0"],
            "--reuse-layers",
        ),
    ] {
        assert_clean_error(&args, needle);
    }
}

#[test]
fn unreadable_inputs_are_one_error_line() {
    let d = dir();
    let dir_arg = d.display().to_string();
    for (args, needle) in [
        (vec!["generate", "-f", "/no/such/prompt.txt"], "cannot read"),
        (vec!["generate", "-f", dir_arg.as_str()], "cannot read"),
        (vec!["chat", "-f", "/no/such/doc.txt"], "cannot read"),
        (vec!["compare", "-f", "/no/such/prompt.txt"], "cannot read"),
        (
            vec!["eval", "--tasks-file", "/no/such/tasks.jsonl"],
            "cannot be read",
        ),
        (
            vec!["eval", "--tasks", "niah", "--data", "/no/such/data"],
            "--data",
        ),
        (vec!["eval", "--report", "/no/such/run"], "cannot read"),
    ] {
        assert_clean_error(&args, needle);
    }
}
