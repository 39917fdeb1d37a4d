//! ggml's RPC backend on one machine: two `chunkkv rpc-server` processes on
//! 127.0.0.1 (CPU backend) hold part of the model, the local CPU the rest.
//! Compression must give the same tokens as without RPC, compaction must move
//! every row exactly there, and lost servers must end runs cleanly.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, model_path};

/// A server process, killed when dropped.
struct Server {
    child: Child,
    endpoint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn server() -> Server {
    let port = free_port();
    let child = Command::new(bin())
        .args([
            "rpc-server",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "-t",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rpc-server");
    let endpoint = format!("127.0.0.1:{port}");
    let t = Instant::now();
    while TcpStream::connect(&endpoint).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "rpc-server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, endpoint }
}

fn generate(extra: &[&str]) -> Output {
    let m = model_path("smollm2-135m");
    Command::new(bin())
        .args([
            "generate",
            "-m",
            m.to_str().unwrap(),
            "-t",
            "2",
            "-c",
            "2048",
        ])
        .args([
            "-f",
            prompt().to_str().unwrap(),
            "-n",
            "24",
            "--temp",
            "0",
            "--json",
        ])
        .args(["--kv-method", "chunkkv", "--kv-budget", "20%", "-fa", "off"])
        .args(extra)
        .output()
        .unwrap()
}

fn prompt() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("chunkkv-rpc-prompt-{}.txt", std::process::id()));
    if !p.exists() {
        std::fs::write(&p, common::essays(3000)).unwrap();
    }
    p
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

#[test]
fn compression_across_rpc_servers_gives_the_same_tokens_and_exact_rows() {
    let (a, b) = (server(), server());
    let rpc = format!("{},{}", a.endpoint, b.endpoint);
    // 20 of SmolLM2's 30 layers on the two servers (10 each), 10 on the local CPU.
    let split = ["--rpc", rpc.as_str(), "-ngl", "20", "-ts", "1,1"];
    let local = json(&generate(&[]));
    let remote = json(&generate(&split));
    assert_eq!(remote["text"], local["text"]);
    assert_eq!(
        remote["compression"]["cells_after"],
        local["compression"]["cells_after"]
    );
    assert!(
        remote["compression"]["cells_after"].as_u64().unwrap()
            < remote["n_prompt"].as_u64().unwrap() / 4
    );

    // verify: every kept row byte-identical, with the layers on three devices.
    let m = model_path("smollm2-135m");
    let o = Command::new(bin())
        .args([
            "verify",
            "-m",
            m.to_str().unwrap(),
            "-t",
            "2",
            "-p",
            "1024",
            "--json",
        ])
        .args(split)
        .output()
        .unwrap();
    let v = json(&o);
    assert!(v["rows_compared"].as_u64().unwrap() > 10_000, "{v}");
    assert_eq!(v["mismatches"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["dead_slots"]["ok"], true, "{v}");
}

#[test]
fn an_unreachable_server_is_a_clear_error_within_a_minute() {
    let port = free_port();
    let t = Instant::now();
    let o = generate(&["--rpc", &format!("127.0.0.1:{port}"), "-ngl", "10"]);
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("cannot reach RPC server"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{err}"
    );
    let o = generate(&["--rpc", "no-port-here", "-ngl", "10"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not HOST:PORT"));
}

#[test]
fn a_server_that_dies_mid_run_ends_the_run_with_an_error() {
    let mut s = server();
    let m = model_path("smollm2-135m");
    // A prefill of ~7000 tokens through the server takes far longer than 4 s.
    let long = std::env::temp_dir().join(format!("chunkkv-rpc-long-{}.txt", std::process::id()));
    std::fs::write(&long, common::essays(28_000)).unwrap();
    let mut run = Command::new(bin())
        .args([
            "generate",
            "-m",
            m.to_str().unwrap(),
            "-t",
            "2",
            "-c",
            "8192",
        ])
        .args(["-f", long.to_str().unwrap(), "-n", "16", "--temp", "0"])
        .args(["--rpc", &s.endpoint, "-ngl", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let _ = s.child.kill();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = run.kill();
            panic!("the run hung after its RPC server died");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut err = String::new();
    use std::io::Read;
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("error: "), "{err}");
}
