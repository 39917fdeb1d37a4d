//! `chunkkv serve` as its users drive it: the official `openai` Python client
//! and curl over real HTTP, on real models, on 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{bin, essays, model_path};
use serde_json::Value;

/// A server on a free port, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    stderr: mpsc::Receiver<String>,
    /// The "listening on" line: slots, cells and the KV cache's bytes.
    banner: String,
}

impl Server {
    fn start(model: &str, args: &[&str]) -> Server {
        let model = model_path(model);
        let mut child = Command::new(bin())
            .args([
                "serve",
                "-m",
                model.to_str().unwrap(),
                "--port",
                "0",
                "-t",
                "2",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chunkkv serve");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the server did not start: {:?}", child.try_wait()));
            if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                let port = rest.split(' ').next().unwrap().parse().unwrap();
                return Server {
                    child,
                    port,
                    stderr: rx,
                    banner: line,
                };
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything the server wrote to stderr so far.
    fn log(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` with `args`; returns the HTTP status and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "300", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl (install it, or run .ci/setup)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn post(server: &Server, path: &str, body: &Value, extra: &[&str]) -> (u16, String) {
    let body = body.to_string();
    let url = server.url(path);
    let mut args = vec!["-H", "content-type: application/json", "-d", &body];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args)
}

/// `body` posted to `url` on a thread of its own (`-N`: a stream's events
/// as they come), for requests that must overlap.
fn post_in_background(url: &str, body: &Value) -> std::thread::JoinHandle<(u16, String)> {
    let (url, body) = (url.to_string(), body.to_string());
    std::thread::spawn(move || {
        curl(&[
            "-N",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &url,
        ])
    })
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Sums a Prometheus metric over its labels.
fn metric(server: &Server, name: &str) -> f64 {
    let (_, text) = curl(&[&server.url("/metrics")]);
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The text of a streamed chat completion: its chunks' `delta.content`, joined.
fn streamed_text(events: &str) -> String {
    events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            json(d)["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

fn chat_body(content: &str, max_tokens: usize) -> Value {
    serde_json::json!({
        "model": "whatever",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// The interpreter with the `openai` package that .ci/setup installs.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CHUNKKV_PYTHON") {
        return p.into();
    }
    chunkkv::models::cache_dir().join("venv/bin/python")
}

#[test]
fn the_openai_python_client_chats_streams_completes_and_recalls_under_compression() {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import openai: run .ci/setup", py.display());
    let server = Server::start("qwen2.5-0.5b", &["-c", "8192", "-np", "4"]);
    let doc = std::env::temp_dir().join(format!("chunkkv-serve-doc-{}.txt", std::process::id()));
    std::fs::write(&doc, essays(6000)).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/openai_client.py"
    );
    let out = Command::new(&py)
        .args([script, &server.url(""), doc.to_str().unwrap()])
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&doc);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client:\n{stdout}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert_eq!(stdout.matches("ok: ").count(), 7, "{stdout}");
}

#[test]
fn curl_gets_openai_shapes_and_clear_errors() {
    let server = Server::start(
        "smollm2-135m",
        &["-c", "2048", "-np", "2", "--api-key", "sesame"],
    );
    let auth = ["-H", "authorization: Bearer sesame"];
    // /health needs no key; the API does.
    assert_eq!(curl(&[&server.url("/health")]).0, 200);
    let (code, body) = post(&server, "/v1/chat/completions", &chat_body("Hi", 4), &[]);
    assert_eq!(code, 401, "{body}");
    assert_eq!(json(&body)["error"]["type"], "authentication_error");

    let (code, body) = post(
        &server,
        "/v1/chat/completions",
        &chat_body("Name a color.", 8),
        &auth,
    );
    assert_eq!(code, 200, "{body}");
    let r = json(&body);
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "whatever", "the model field is echoed");
    assert!(!r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    let usage = &r["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut streamed = chat_body("Count to three.", 12);
    streamed["stream"] = true.into();
    let (code, body) = post(
        &server,
        "/v1/chat/completions",
        &streamed,
        &[&["-N"][..], &auth].concat(),
    );
    assert_eq!(code, 200, "{body}");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let last = json(events[events.len() - 2]);
    assert!(last["choices"][0]["finish_reason"].is_string(), "{body}");
    assert!(
        last["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );

    let completion =
        serde_json::json!({"prompt": "Once upon a time", "max_tokens": 6, "stop": ["\n"]});
    let (code, body) = post(&server, "/v1/completions", &completion, &auth);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["object"], "text_completion");

    let (code, body) = curl(&[&auth[..], &[&server.url("/v1/models")]].concat());
    assert_eq!(code, 200);
    assert_eq!(json(&body)["data"][0]["object"], "model");

    // Bad requests: 400 in OpenAI's shape, naming the field where there is one.
    let bad: [(&str, Option<&str>); 6] = [
        ("{not json", None),
        (r#"{"messages": "hello"}"#, None),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#,
            None,
        ),
        (r#"{"messages": []}"#, Some("messages")),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "chunkkv": {"kv_method": "pyramidkv"}}"#,
            Some("chunkkv.kv_method"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "chunkkv": {"kv_budget": "150%"}}"#,
            Some("chunkkv.kv_budget"),
        ),
    ];
    for (body, param) in bad {
        let url = server.url("/v1/chat/completions");
        let (code, resp) = curl(&[&auth[..], &["-d", body, &url]].concat());
        assert_eq!(code, 400, "{body} -> {resp}");
        let e = json(&resp);
        assert_eq!(e["error"]["type"], "invalid_request_error", "{resp}");
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p, "{resp}");
        }
    }
    let (code, _) = curl(&[&auth[..], &[&server.url("/v1/nothing")]].concat());
    assert_eq!(code, 404);
    // The server is still fine after all that.
    let (code, _) = post(&server, "/v1/chat/completions", &chat_body("Hi", 2), &auth);
    assert_eq!(code, 200);
}

#[test]
fn a_request_that_cannot_fit_its_slot_is_context_length_exceeded() {
    // Two slots of 512 cells: SmolLM2-135M's 30 layers of 3 KV heads x 64
    // dims hold 2 x 192 x 2 bytes a layer per cell, 22.5 MiB for 1024 cells.
    let server = Server::start("smollm2-135m", &["-c", "1024", "-np", "2"]);
    assert!(
        server
            .banner
            .ends_with("(2 slots of 512 cells; KV cache 22.5 MiB, f16/f16)"),
        "{}",
        server.banner
    );
    let long = essays(3500);
    // Uncompressed, ~800 tokens cannot fit 512 cells.
    let mut body = chat_body(&long, 8);
    body["chunkkv"] = serde_json::json!({"kv_method": "none"});
    let (code, resp) = post(&server, "/v1/chat/completions", &body, &[]);
    assert_eq!(code, 400, "{resp}");
    assert_eq!(
        json(&resp)["error"]["code"],
        "context_length_exceeded",
        "{resp}"
    );
    // Compressed to 25% it fits, with room for a reply.
    let (code, resp) = post(&server, "/v1/chat/completions", &chat_body(&long, 8), &[]);
    assert_eq!(code, 200, "{resp}");
    // But not with a reply that needs nearly the whole slot.
    let (code, resp) = post(&server, "/v1/chat/completions", &chat_body(&long, 480), &[]);
    assert_eq!(code, 400, "{resp}");
    assert_eq!(
        json(&resp)["error"]["code"],
        "context_length_exceeded",
        "{resp}"
    );
}

#[test]
fn more_requests_than_slots_and_queue_get_503() {
    let server = Server::start("smollm2-135m", &["-c", "2048", "-np", "1", "--queue", "1"]);
    let url = server.url("/v1/chat/completions");
    // A prompt of a few hundred tokens keeps the one slot busy for a while.
    let body = chat_body(&essays(2000), 32).to_string();
    let clients: Vec<Child> = (0..4)
        .map(|_| {
            Command::new("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-H",
                    "content-type: application/json",
                ])
                .args(["-d", &body, &url])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut codes: Vec<String> = clients
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned())
        .collect();
    codes.sort();
    // One running, one queued, two refused.
    assert_eq!(codes, ["200", "200", "503", "503"]);
    assert_eq!(metric(&server, "chunkkv_requests_rejected_total"), 2.0);
}

/// A streamed request over a raw socket, read until `events` data lines
/// arrived, then dropped.
fn stream_then_hang_up(port: u16, body: &Value, events: usize) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < events {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(s);
}

#[test]
fn a_client_that_hangs_up_mid_stream_stops_its_generation_and_frees_the_slot() {
    let server = Server::start("smollm2-135m", &["-c", "2048", "-np", "1"]);
    let body = serde_json::json!({
        "prompt": "Here is a list of numbers: 1, 2, 3, 4, 5, 6, 7,",
        "max_tokens": 200,
        "temperature": 0,
    });
    // Left alone, this greedy request generates all 200 tokens.
    let (code, resp) = post(&server, "/v1/completions", &body, &[]);
    assert_eq!(code, 200, "{resp}");
    assert_eq!(
        json(&resp)["choices"][0]["finish_reason"],
        "length",
        "{resp}"
    );
    let before = metric(&server, "chunkkv_tokens_generated_total");

    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    stream_then_hang_up(server.port, &streamed, 4);
    // The one slot is free again: the next request is served...
    let (code, resp) = post(&server, "/v1/chat/completions", &chat_body("Hi", 4), &[]);
    assert_eq!(code, 200, "{resp}");
    // ...and the abandoned generation stopped well short of its 200 tokens.
    let generated = metric(&server, "chunkkv_tokens_generated_total") - before;
    assert!(
        generated < 100.0,
        "{generated} tokens generated after the hang-up"
    );
    assert_eq!(metric(&server, "chunkkv_requests_waiting"), 0.0);
}

#[test]
fn sigterm_lets_running_requests_end_cleanly_and_exits_0() {
    let mut server = Server::start("smollm2-135m", &["-c", "2048", "-np", "2"]);
    let mut body = chat_body("Write a long story about a lighthouse keeper.", 200);
    body["stream"] = true.into();
    let body = body.to_string();
    let url = server.url("/v1/chat/completions");
    let client = Command::new("curl")
        .args([
            "-sSN",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &url,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while metric(&server, "chunkkv_tokens_generated_total") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "no token generated");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "still running 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log()
    );
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    let Output { stdout, .. } = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(
        stdout.trim_end().ends_with("data: [DONE]"),
        "the stream ended cleanly: {stdout}"
    );
}

/// Recall brings the evicted fact back for the question. By default the
/// question's reply is decoded over everything the turn brought back (the
/// slot holds more cells after it than with `--kv-compact-after-reply
/// false`), and the compaction waits for the next turn, which reports what
/// recall kept.
#[test]
fn a_slot_with_recall_brings_an_evicted_fact_back_for_the_question() {
    let hay = essays(5000);
    let cut = hay[..hay.len() / 2].rfind(' ').unwrap();
    let opening = format!(
        "Here is a text. {} The secret code of the blue lighthouse is 7319. {}\n\
         In one short sentence, what is the text about?",
        &hay[..cut],
        &hay[cut..]
    );
    // Cells the slot holds after the question's reply.
    let mut cells = Vec::new();
    for after_reply in ["true", "false"] {
        let server = Server::start(
            "qwen2.5-0.5b",
            &[
                "-c",
                "4096",
                "-np",
                "1",
                "--kv-budget",
                "10%",
                "--kv-recall",
                "host",
                "--kv-compact-after-reply",
                after_reply,
                // Fewer cells per pass than the slot holds rows: the
                // question's ranking runs ahead in several engine steps.
                "--kv-recall-cells",
                "256",
            ],
        );
        // One request with the whole conversation; the reply's text.
        let ask = |messages: &Vec<Value>, max_tokens: usize| {
            let body = serde_json::json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0});
            let (status, body) = post(&server, "/v1/chat/completions", &body, &[]);
            assert_eq!(status, 200, "{body}");
            json(&body)["choices"][0]["message"]["content"].clone()
        };
        // The gauges follow the engine a moment after the reply.
        let used = || {
            std::thread::sleep(Duration::from_millis(600));
            metric(&server, "chunkkv_kv_cells_used")
        };
        let mut messages = vec![serde_json::json!({"role": "user", "content": opening})];
        let reply = ask(&messages, 16);
        messages.push(serde_json::json!({"role": "assistant", "content": reply}));
        messages.push(serde_json::json!({
            "role": "user",
            "content": "What is the secret code of the blue lighthouse? Answer with the code."
        }));
        let answer = ask(&messages, 16);
        let after_answer = used();
        assert!(
            answer.to_string().contains("7319"),
            "{answer} (--kv-compact-after-reply {after_reply})\n{}",
            server.log()
        );
        messages.push(serde_json::json!({"role": "assistant", "content": answer}));
        messages.push(serde_json::json!({"role": "user", "content": "Thank you."}));
        ask(&messages, 4);
        cells.push(after_answer);
        // The slot keeps its evicted rows and the question brought some back.
        for name in [
            "chunkkv_recall_bytes_held",
            "chunkkv_recalled_tokens_total",
            "chunkkv_rank_passes_total",
        ] {
            assert!(metric(&server, name) > 0.0, "{name}\n{}", server.log());
        }
    }
    let (deferred, at_once) = (cells[0], cells[1]);
    assert!(
        deferred > at_once + 100.0,
        "the reply should see the recalled rows: {deferred:?} vs {at_once:?} cells"
    );
}

/// A prompt several times its slot goes in chunks beside the other slot's
/// work and is compressed each time the slot fills: about one compression per
/// slot of text (the segment-per-step path compressed every half slot).
#[test]
fn a_prompt_longer_than_its_slot_is_compressed_as_it_fills_while_the_other_slot_answers() {
    let server = Server::start(
        "smollm2-135m",
        &[
            "-c",
            "2048",
            "-np",
            "2",
            "--kv-budget",
            "10%",
            "--kv-score",
            "window",
        ],
    );
    let long = chat_body(
        &format!("Here is a text. {}\nWhat is it about?", essays(20000)),
        8,
    )
    .to_string();
    let url = server.url("/v1/chat/completions");
    let started = Instant::now();
    let long_req = {
        let url = url.clone();
        std::thread::spawn(move || {
            let r = curl(&["-H", "content-type: application/json", "-d", &long, &url]);
            (r, started.elapsed())
        })
    };
    // The short request goes in once the long one holds its slot.
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &chat_body("Say hi.", 8),
        &[],
    );
    let short_done = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let ((status, body), long_done) = long_req.join().unwrap();
    assert_eq!(status, 200, "{body}\n{}", server.log());
    let prompt = json(&body)["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
    assert!(
        prompt > 4.0 * 1024.0,
        "the prompt should be 4 slots: {prompt}"
    );
    assert!(
        short_done < long_done,
        "the short request waited for the long one: {short_done:?} vs {long_done:?}"
    );
    let compressions = metric(&server, "chunkkv_compressions_total");
    assert!(
        compressions >= 3.0 && compressions < prompt / 512.0,
        "{compressions} compressions for {prompt} prompt tokens in a 1024-cell slot\n{}",
        server.log()
    );
    // The engine's time: batches and the document's compressions, and no
    // more of it than has passed (one thread).
    let (_, text) = curl(&[&server.url("/metrics")]);
    let engine = |work: &str| {
        let line = format!("chunkkv_engine_seconds_total{{work=\"{work}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str())?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {line}in\n{text}"))
    };
    let (batch, document) = (engine("batch"), engine("document"));
    let all = batch + document + engine("turn") + engine("settle");
    assert!(batch > 0.0 && document > 0.0, "{text}");
    assert!(
        all <= started.elapsed().as_secs_f64(),
        "{all} s of engine time in {:?}",
        started.elapsed()
    );
}

/// Two short turns that arrive together on a compressing server (while a
/// third slot takes in a document): the reply of the one compressed first
/// is parked until the other's turn is in (`--batch-replies`), so both
/// decode in one batch, and its text, held back meanwhile, still comes
/// whole, streamed or not.
#[test]
fn replies_to_turns_that_arrive_together_start_together() {
    let server = Server::start(
        "smollm2-135m",
        &["-c", "6144", "-np", "3", "--batch-replies", "60000"],
    );
    let url = server.url("/v1/chat/completions");
    let text = essays(12000);
    // Two conversations, each with a compressed document in its first turn.
    let mut convs: Vec<Vec<Value>> = Vec::new();
    for part in [&text[..4000], &text[4000..8000]] {
        let first = chat_body(&format!("Here is a text. {part}\nWhat is it about?"), 8);
        let (status, body) = post(&server, "/v1/chat/completions", &first, &[]);
        assert_eq!(status, 200, "{body}");
        let reply = json(&body)["choices"][0]["message"]["content"].clone();
        convs.push(vec![
            first["messages"][0].clone(),
            serde_json::json!({"role": "assistant", "content": reply}),
            serde_json::json!({"role": "user", "content":
                "Thank you. Now name one idea from the text in a few words, and say whether \
                 you agree with it, and why, keeping the whole answer to a single sentence."}),
        ]);
    }
    // A third conversation's document keeps the engine's steps long while
    // both second turns arrive.
    let doc = chat_body(
        &format!("Here is a text. {}\nWhat is it about?", &text[8000..]),
        8,
    );
    let background = post_in_background(&url, &doc);
    std::thread::sleep(Duration::from_millis(500));
    let requests: Vec<_> = convs
        .iter()
        .enumerate()
        .map(|(k, messages)| {
            let body = serde_json::json!({
                "messages": messages, "max_tokens": 8, "temperature": 0, "stream": k == 1,
            });
            post_in_background(&url, &body)
        })
        .collect();
    let replies: Vec<(u16, String)> = requests.into_iter().map(|h| h.join().unwrap()).collect();
    let (status, body) = background.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let log = server.log();
    let (status, body) = &replies[0];
    assert_eq!(*status, 200, "{body}\n{log}");
    let reply = json(body);
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.trim().is_empty(), "{body}");
    assert_eq!(reply["usage"]["completion_tokens"], 8, "{body}");
    let (status, events) = &replies[1];
    assert_eq!(*status, 200, "{events}\n{log}");
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");
    let streamed = streamed_text(events);
    assert!(!streamed.trim().is_empty(), "{events}");
    assert_eq!(
        metric(&server, "chunkkv_replies_batched_total"),
        1.0,
        "the first compressed of the two turns waits for the other\n{log}"
    );
    // Started together, the two replies share their steps.
    let (steps, rows) = (
        metric(&server, "chunkkv_reply_steps_total"),
        metric(&server, "chunkkv_reply_tokens_decoded_total"),
    );
    assert!(
        steps > 0.0 && rows > steps,
        "{rows} reply tokens in {steps} steps\n{log}"
    );
}

/// With `--stream-batch`, a document's prompt goes in small chunks while
/// another reply streams, and both still come whole: the stream to its
/// `[DONE]`, the document's reply with its whole prompt counted.
#[test]
fn a_document_goes_in_small_chunks_while_a_reply_streams() {
    let server = Server::start(
        "smollm2-135m",
        &[
            "-c",
            "4096",
            "-np",
            "2",
            "--kv-method",
            "none",
            "--stream-batch",
            "64",
        ],
    );
    let url = server.url("/v1/chat/completions");
    let stream = serde_json::json!({
        "messages": [{"role": "user", "content": "Count from one to forty in words."}],
        "max_tokens": 48, "temperature": 0, "stream": true,
    });
    let streaming = post_in_background(&url, &stream);
    std::thread::sleep(Duration::from_millis(300));
    let doc = chat_body(
        &format!("Here is a text. {}\nWhat is it about?", essays(6000)),
        8,
    );
    let (status, body) = post(&server, "/v1/chat/completions", &doc, &[]);
    assert_eq!(status, 200, "{body}\n{}", server.log());
    let prompt = json(&body)["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 1000, "{body}");
    let (status, events) = streaming.join().unwrap();
    assert_eq!(status, 200, "{events}\n{}", server.log());
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");
    let words = streamed_text(&events);
    assert!(!words.trim().is_empty(), "{events}");
}
