//! `chunkkv serve`: an OpenAI-compatible server whose slots keep their
//! conversations compressed, so a context of `-c` cells serves more of them.
//!
//! - [`engine`]: one thread owns the model and the context; every slot is a
//!   sequence with its own KV stream, compressed after each prompt.
//! - [`api`]: axum handlers in OpenAI's shapes; they only talk to the engine
//!   through channels.
//! - [`metrics`]: the counters `/metrics` reports.

pub mod api;
pub mod engine;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::Context as _;

pub use engine::EngineConfig;

use crate::llama::Model;

/// How long in-flight requests may run on after SIGTERM before the engine
/// cuts them (each then ends with `finish_reason: "stop"`).
const GRACE: Duration = Duration::from_secs(6);

/// After a cut: how long the engine may take to end the requests (it notices
/// between steps, which a loaded machine makes slow), then how long their
/// streams get to flush. With `GRACE`, 10 s in all.
const CUT: Duration = Duration::from_millis(2500);
const FLUSH: Duration = Duration::from_millis(1500);

/// What `serve` needs beside the engine's settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub engine: EngineConfig,
    /// Requests that may wait for a slot before new ones get 503.
    pub queue: usize,
    pub api_key: Option<String>,
    /// `max_tokens` when a request names none.
    pub default_max_tokens: usize,
    /// Reported by `/v1/models`.
    pub model_name: String,
}

/// Loads the model on the engine thread (`load`), binds, serves until SIGTERM
/// or Ctrl-C, then drains: new requests get 503, running ones have
/// [`GRACE`] to finish, then they are cut and the engine stops.
pub fn run(
    cfg: ServeConfig,
    load: Box<dyn FnOnce() -> anyhow::Result<Model> + Send>,
) -> anyhow::Result<()> {
    let n_slots = cfg.engine.n_slots;
    let metrics = Arc::new(metrics::Metrics::new(n_slots));
    let stop = Arc::new(AtomicBool::new(false));
    let (job_tx, job_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let engine = {
        let (metrics, stop, ecfg) = (metrics.clone(), stop.clone(), cfg.engine.clone());
        std::thread::Builder::new()
            .name("chunkkv-engine".into())
            .spawn(move || {
                let model = match load() {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                engine::run(&model, &ecfg, job_rx, metrics, stop, ready_tx);
            })
            .context("cannot start the engine thread")?
    };
    let capacity = match ready_rx.recv() {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => anyhow::bail!(e),
        Err(_) => anyhow::bail!("the engine stopped while loading the model"),
    };
    let state = Arc::new(api::AppState::new(
        job_tx,
        metrics,
        n_slots + cfg.queue,
        cfg.model_name.clone(),
        cfg.api_key.clone(),
        cfg.default_max_tokens,
        n_slots,
        capacity.slot_cells,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = rt.block_on(serve(cfg.addr, state.clone(), stop.clone(), capacity));
    stop.store(true, Ordering::Relaxed);
    drop(state);
    rt.shutdown_timeout(Duration::from_secs(1));
    let _ = engine.join();
    served
}

async fn serve(
    addr: SocketAddr,
    state: Arc<api::AppState>,
    stop: Arc<AtomicBool>,
    capacity: engine::Capacity,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().unwrap_or(addr);
    if !local.ip().is_loopback() && state.api_key.is_none() {
        eprintln!("warning: listening on {local} without --api-key: anyone who can reach it can use the model");
    }
    // Scripts wait for this line (and read the port from it with --port 0).
    eprintln!("chunkkv serve: listening on http://{local} ({capacity})");
    let shutting = state.shutting_down.clone();
    let signalled = Arc::new(tokio::sync::Notify::new());
    let app = api::router(state.clone());
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let signalled = signalled.clone();
        async move { signalled.notified().await }
    });
    let mut server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    tokio::select! {
        r = &mut server => return r.context("the server failed"),
        _ = shutdown_signal() => {}
    }
    eprintln!("chunkkv serve: shutting down");
    shutting.store(true, Ordering::Relaxed);
    signalled.notify_one();
    // Running requests finish within the grace period or are cut by the engine;
    // either way the engine has ended them (their last events are sent)
    // before the server gets its time to flush the streams.
    let drained = || async {
        while state.admitted.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(GRACE, drained()).await.is_err() {
        eprintln!("chunkkv serve: cutting the requests still running");
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(CUT, drained()).await;
    }
    match tokio::time::timeout(FLUSH, &mut server).await {
        Ok(r) => r.context("the server failed"),
        Err(_) => Ok(()),
    }
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
