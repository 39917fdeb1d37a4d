//! `chunkkv chat` driven through piped stdin: real models, real compression.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{bin, essays, model_path};

/// Runs `chunkkv chat ARGS` with `stdin` piped in.
fn chat(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(bin())
        .arg("chat")
        .args(["-t", "2", "--temp", "0"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chunkkv chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One line of essay text (newlines would split it into several turns).
fn one_line(n_chars: usize) -> String {
    essays(n_chars)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `(live cells, cells the full cache would hold)` from `/stats` output.
fn parse_stats(out: &str) -> Vec<(usize, usize)> {
    out.lines()
        .filter(|l| l.starts_with("cache: "))
        .map(|l| {
            let num_before = |marker: &str| -> usize {
                let head = &l[..l.find(marker).unwrap()];
                head.rsplit(' ')
                    .find(|w| !w.is_empty())
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            (num_before(" cells live"), num_before(" cells, "))
        })
        .collect()
}

#[test]
fn a_fact_from_a_long_first_turn_is_recalled_in_turn_three() {
    let qwen = model_path("qwen2.5-0.5b");
    let hay = one_line(6000);
    let cut = hay[..hay.len() / 2].rfind(' ').unwrap();
    let fact = "The secret code of the archive is PELICAN-7431.";
    let turns = format!(
        "Here is a text. {} {fact} {} Remember the secret code of the archive.\n\
         In one short sentence, what is the text about?\n\
         What is the secret code of the archive?\n\
         /stats\n",
        &hay[..cut],
        &hay[cut..]
    );
    let o = chat(
        &["-m", qwen.to_str().unwrap(), "-c", "4096", "-n", "24"],
        &turns,
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    let replies: Vec<&str> = out.split("\n\n").filter(|r| !r.trim().is_empty()).collect();
    assert!(replies.len() >= 4, "three replies and the stats: {out}");
    assert!(
        replies[2].contains("7431"),
        "turn 3 recalls the code: {out}"
    );
    // Compression really ran: the cache holds about a quarter of what went in.
    let stats = parse_stats(&out);
    let (live, full) = stats[0];
    assert!(full > 1200, "{out}");
    // A quarter of every token, plus the last reply and a short turn's window.
    assert!(live <= full / 4 + 24 + 32, "cache {live} of {full}: {out}");
}

#[test]
fn a_conversation_longer_than_the_context_completes_within_budget() {
    let model = model_path("smollm2-135m");
    let para = one_line(700);
    let mut script = String::new();
    for i in 0..8 {
        script.push_str(&format!("Note {i}: {para} What is note {i} about?\n"));
    }
    script.push_str("/stats\n");
    let o = chat(
        &["-m", model.to_str().unwrap(), "-c", "512", "-n", "16"],
        &script,
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("error"), "{}", text(&o.stderr));
    let (live, full) = parse_stats(&out)[0];
    assert!(full > 1000, "more went in than -c 512 holds: {out}");
    assert!(live <= 512, "{out}");
    // Within the budget: a quarter of everything prefilled, plus at most the last reply.
    assert!(live <= full / 4 + 16 + 1, "cache {live} of {full}: {out}");
}

#[test]
fn no_compression_reports_the_full_cache_and_fails_cleanly_when_full() {
    let model = model_path("smollm2-135m");
    let para = one_line(700);
    let script = format!("{para}\n{para}\n{para}\n{para}\n/stats\n");
    let o = chat(
        &[
            "-m",
            model.to_str().unwrap(),
            "-c",
            "512",
            "-n",
            "8",
            "--kv-method",
            "none",
        ],
        &script,
    );
    let err = text(&o.stderr);
    assert!(o.status.success(), "the chat goes on: {err}");
    assert!(err.contains("does not fit"), "{err}");
    let (live, full) = parse_stats(&text(&o.stdout))[0];
    assert_eq!(live, full, "nothing compressed");
}

#[test]
fn bad_commands_and_a_missing_file_are_reported_and_the_chat_goes_on() {
    let model = model_path("smollm2-135m");
    let o = chat(
        &["-m", model.to_str().unwrap(), "-c", "1024", "-n", "8"],
        "/frobnicate\n/load /no/such/file.txt\n/budget 7.5\n/method magic\nHello!\n/method snapkv\n/budget 50%\nAnd again?\n/stats\n",
    );
    let err = text(&o.stderr);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("unknown command /frobnicate"), "{err}");
    assert!(err.contains("cannot read /no/such/file.txt"), "{err}");
    assert!(
        err.contains("/budget 7.5") && err.contains("out of range"),
        "{err}"
    );
    assert!(err.contains("unknown method `magic`"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error: ")).count(),
        4,
        "{err}"
    );
    assert!(out.contains("method snapkv, budget 50%"), "{out}");
    let replies: Vec<&str> = out.split("\n\n").filter(|r| !r.trim().is_empty()).collect();
    assert_eq!(replies.len(), 3, "two replies and the stats: {out}");
}

#[test]
fn a_document_longer_than_the_context_is_loaded_in_segments() {
    let model = model_path("smollm2-135m");
    let doc = std::env::temp_dir().join(format!("chunkkv-doc-{}.txt", std::process::id()));
    std::fs::write(&doc, essays(7000)).unwrap();
    let o = chat(
        &["-m", model.to_str().unwrap(), "-c", "512", "-n", "8"],
        &format!("/load {}\nWhat is the text about?\n/stats\n", doc.display()),
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("error"), "{}", text(&o.stderr));
    let (live, full) = parse_stats(&out)[0];
    assert!(
        full > 1400,
        "the document is about three contexts long: {out}"
    );
    assert!(live <= 512, "{out}");
    let replies: Vec<&str> = out.split("\n\n").filter(|r| !r.trim().is_empty()).collect();
    assert_eq!(replies.len(), 2, "a reply and the stats: {out}");
}
