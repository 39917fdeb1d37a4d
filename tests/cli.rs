//! The `chunkkv` binary end to end: JSON output and clear errors for bad input.

mod common;

use std::process::{Command, Output};

use common::{bin, model_path};

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run chunkkv")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command exited non-zero with exactly one error line mentioning `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "not a clean error exit: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in: {err}");
}

#[test]
fn generate_json_reports_text_timings_and_kv() {
    let model = model_path("smollm2-135m");
    let o = run(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "Hello",
        "-n",
        "16",
        "--temp",
        "0",
        "-c",
        "512",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is pure JSON");
    assert!(v["text"].is_string());
    let n_prompt = v["n_prompt"].as_u64().unwrap();
    let n_gen = v["n_gen"].as_u64().unwrap();
    assert!(n_prompt >= 1);
    assert!((1..=16).contains(&n_gen));
    assert!(v["timings"]["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["timings"]["decode_tok_s"].as_f64().unwrap() >= 0.0);
    // Every prompt token and every generated token but the last is in the cache.
    assert_eq!(
        v["kv"]["cells_used"].as_u64().unwrap(),
        n_prompt + n_gen - 1
    );
    assert!(v["kv"]["bytes_live"].as_u64().unwrap() > 0);
    assert!(v["kv"]["bytes_allocated"].as_u64().unwrap() > v["kv"]["bytes_live"].as_u64().unwrap());
}

#[test]
fn info_describes_build_and_model() {
    let model = model_path("smollm2-135m");
    let o = run(&["info", "-m", model.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ggml"], "0.26.0");
    assert!(v["backends"].as_array().unwrap().iter().any(|b| b == "cpu"));
    assert!(!v["devices"].as_array().unwrap().is_empty());
    assert_eq!(v["model"]["n_layer"], 30);
    assert_eq!(v["model"]["n_head_kv"], 3);
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let o = run(&["generate", "-m", "/nonexistent/model.gguf", "-p", "hi"]);
    assert_one_line_error(&o, "model file not found");
}

#[test]
fn unknown_model_name_is_a_clear_error() {
    let o = run(&["generate", "-m", "no-such-model", "-p", "hi"]);
    assert_one_line_error(&o, "unknown model `no-such-model`");
}

#[test]
fn non_gguf_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("chunkkv-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("not-a-model.gguf");
    std::fs::write(&path, "this is plain text, not weights\n").unwrap();
    let o = run(&["generate", "-m", path.to_str().unwrap(), "-p", "hi"]);
    assert_one_line_error(&o, "is not a GGUF file");
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let bytes = std::fs::read(model_path("smollm2-135m")).unwrap();
    let dir = std::env::temp_dir().join(format!("chunkkv-test-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("truncated.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let o = run(&["generate", "-m", path.to_str().unwrap(), "-p", "hi"]);
    assert_one_line_error(&o, "could not load");
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let model = model_path("smollm2-135m");
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let o = run(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-c",
        "64",
        "-p",
        &long,
    ]);
    assert_one_line_error(&o, "tokens but the context holds");
}

#[test]
fn bad_cache_type_is_rejected() {
    let o = run(&["generate", "-p", "hi", "-ctk", "q9_9"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown cache type `q9_9`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn quantized_v_without_flash_attention_is_a_clear_error() {
    let model = model_path("smollm2-135m");
    let o = run(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "hi",
        "-ctv",
        "q8_0",
        "-fa",
        "off",
        "-c",
        "256",
    ]);
    assert_one_line_error(&o, "needs flash attention");
}

#[test]
fn generate_json_reports_compression_with_the_documented_keys() {
    let model = model_path("smollm2-135m");
    let prompt = "The history of the printing press is long. ".repeat(60);
    let o = run(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        &prompt,
        "-n",
        "8",
        "--temp",
        "0",
        "-c",
        "1024",
        "-fa",
        "off",
        "--kv-method",
        "chunkkv",
        "--kv-budget",
        "25%",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = v["compression"].as_object().expect("compression object");
    let mut keys: Vec<&str> = c.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attn_width_after",
            "attn_width_before",
            "budget",
            "bytes_live_after",
            "bytes_live_before",
            "cells_after",
            "cells_before",
            "method",
            "ms",
            "n_keep",
            "n_prompt"
        ]
    );
    let mut ms: Vec<&str> = c["ms"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    ms.sort_unstable();
    assert_eq!(ms, ["compact", "importance", "select"]);
    let n_prompt = v["n_prompt"].as_u64().unwrap();
    assert_eq!(c["method"], "chunkkv");
    assert_eq!(c["budget"], 0.25);
    assert_eq!(
        c["n_keep"].as_u64().unwrap(),
        (n_prompt as f64 * 0.25).round() as u64
    );
    assert_eq!(c["cells_before"].as_u64().unwrap(), n_prompt);
    assert!(c["bytes_live_after"].as_u64().unwrap() * 3 < c["bytes_live_before"].as_u64().unwrap());
    assert!(c["attn_width_after"].as_u64().unwrap() < c["attn_width_before"].as_u64().unwrap());
}

#[test]
fn bad_compression_arguments_are_clear_errors() {
    let model = model_path("smollm2-135m");
    let m = model.to_str().unwrap();
    for (flags, needle) in [
        (&["--kv-budget", "0"][..], "out of range"),
        (&["--kv-budget", "150%"][..], "out of range"),
        (&["--kv-budget", "1.5"][..], "out of range"),
    ] {
        let mut args = vec!["generate", "-m", m, "-p", "hi", "--kv-method", "chunkkv"];
        args.extend_from_slice(flags);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{flags:?}: {}", stderr(&o));
    }
    for (flags, needle) in [
        (
            &["--chunk-size", "0"][..],
            "--chunk-size must be at least 1",
        ),
        (&["--kv-window", "0"][..], "--kv-window must be at least 1"),
        (
            &["--reuse-layers", "0"][..],
            "--reuse-layers must be at least 1",
        ),
    ] {
        let mut args = vec![
            "generate",
            "-m",
            m,
            "-p",
            "hi",
            "-c",
            "256",
            "--kv-method",
            "chunkkv",
        ];
        args.extend_from_slice(flags);
        assert_one_line_error(&run(&args), needle);
    }
}

#[test]
fn compare_prints_one_row_per_configuration_as_json() {
    let model = model_path("smollm2-135m");
    let o = run(&[
        "compare",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "300",
        "-n",
        "8",
        "-r",
        "1",
        "-fa",
        "off",
        "--kv-method",
        "chunkkv,streaming",
        "--kv-budget",
        "0.3",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("pure JSON");
    for k in ["model", "machine", "backend", "commit"] {
        assert!(v["header"][k].is_string(), "header.{k}");
    }
    let rows = v["rows"].as_array().unwrap();
    let got: Vec<(String, String, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["cache_type_k"].as_str().unwrap().to_string(),
                r["budget"].as_f64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("none", "f16", 1.0),
        ("chunkkv", "f16", 0.3),
        ("streaming", "f16", 0.3),
        ("none", "q8_0", 1.0),
        ("chunkkv", "q8_0", 0.3),
        ("none", "q4_0", 1.0),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for ((m, t, b), (wm, wt, wb)) in got.iter().zip(want) {
        assert_eq!((m.as_str(), t.as_str()), (wm, wt));
        assert!((b - wb).abs() < 1e-9);
    }
    let keys = [
        "method",
        "budget",
        "cache_type_k",
        "cache_type_v",
        "bytes_live",
        "bytes_allocated",
        "prefill_tok_s",
        "ttft_ms",
        "decode_tok_s",
        "overhead_ms",
        "agreement",
        "kl",
    ];
    for r in rows {
        for k in keys {
            assert!(!r[k].is_null(), "row lacks {k}: {r}");
        }
    }
    // The default cache is the reference; compressed rows hold less and free memory.
    assert_eq!(rows[0]["agreement"], 1.0);
    assert_eq!(rows[0]["kl"], 0.0);
    assert!(rows[1]["bytes_live"].as_u64() < rows[0]["bytes_live"].as_u64());
    assert!(rows[1]["bytes_allocated"].as_u64() < rows[0]["bytes_allocated"].as_u64());
    assert!(rows[1]["kl"].as_f64().unwrap() >= 0.0);
    assert!(
        rows[3]["bytes_live"].as_u64() < rows[0]["bytes_live"].as_u64(),
        "q8_0 is smaller than f16"
    );
    assert!(
        rows[5]["bytes_live"].as_u64() < rows[3]["bytes_live"].as_u64(),
        "q4_0 is smaller than q8_0"
    );
}

#[test]
fn compare_bad_input_is_a_clear_error() {
    let model = model_path("smollm2-135m");
    let m = model.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("chunkkv-test-cmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    assert_one_line_error(
        &run(&["compare", "-m", m, "-f", empty.to_str().unwrap()]),
        "is empty",
    );
    assert_one_line_error(&run(&["compare", "-m", m, "-r", "1000"]), "is not sensible");
    let o = run(&["compare", "-m", m, "--kv-method", "nosuch"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));
    let o = run(&["compare", "-m", m, "--kv-budget", ","]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid KV budget"), "{}", stderr(&o));
}

#[test]
fn verify_reports_exact_rows_and_dead_slots_like_removed_cells() {
    let model = model_path("smollm2-135m");
    let o = run(&[
        "verify",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "512",
        "-t",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["rows_compared"].as_u64().unwrap() > 1000, "{v}");
    assert_eq!(v["mismatches"].as_array().unwrap().len(), 0, "{v}");
    let d = &v["dead_slots"];
    assert_eq!(d["ok"], true, "{v}");
    assert!(d["kl_masked_vs_removed"].as_f64().unwrap() < 0.02, "{v}");
}
