//! The HTTP side: OpenAI's request and response shapes, as llama-server
//! serves them, over axum. Handlers parse and check a request, hand it to the
//! engine thread as a [`Job`] and turn its [`Event`]s into a response or an
//! SSE stream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::StreamExt as _;

use super::engine::{self, Event, Job, Prompt, ScoreChoice};
use super::metrics::Metrics;
use crate::compress::{Budget, Method, Scorer};
use crate::llama::{ChatMessage, SamplingParams};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: String, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// The request cannot fit its slot, even compressed (OpenAI's code).
    pub fn context_length(message: String) -> ApiError {
        ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad_request(message, Some("messages"))
        }
    }

    pub fn server(message: String) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    fn unavailable(message: &str) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "unavailable_error",
            ..ApiError::server(message.into())
        }
    }

    fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            ..ApiError::server("invalid API key".into())
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// What every handler shares.
pub struct AppState {
    /// To the engine thread.
    pub jobs: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    /// Requests handed to the engine and not finished (running or waiting).
    pub admitted: Arc<AtomicUsize>,
    /// Most admitted requests: the slots plus `--queue`.
    pub max_admitted: usize,
    /// The model's name (its file stem), reported by `/v1/models`.
    pub model_name: String,
    pub api_key: Option<String>,
    /// Reply length when a request names none.
    pub default_max_tokens: usize,
    /// Set on SIGTERM: new requests are refused.
    pub shutting_down: Arc<AtomicBool>,
    pub n_slots: usize,
    pub slot_cells: usize,
    next_id: AtomicU64,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        jobs: mpsc::Sender<Job>,
        metrics: Arc<Metrics>,
        max_admitted: usize,
        model_name: String,
        api_key: Option<String>,
        default_max_tokens: usize,
        n_slots: usize,
        slot_cells: usize,
    ) -> AppState {
        AppState {
            jobs,
            metrics,
            admitted: Arc::new(AtomicUsize::new(0)),
            max_admitted,
            model_name,
            api_key,
            default_max_tokens,
            shutting_down: Arc::new(AtomicBool::new(false)),
            n_slots,
            slot_cells,
            next_id: AtomicU64::new(1),
        }
    }
}

/// The routes. `/health` answers without the API key, as llama-server's does.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::bad_request("no such endpoint".into(), None)
            }
        })
        .with_state(state)
}

async fn require_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "chunkkv",
            "meta": {"n_slots": state.n_slots, "n_ctx_slot": state.slot_cells},
        }],
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(state.admitted.load(Ordering::Relaxed)),
    )
        .into_response()
}

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `chunkkv`: per-request compression settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkkvOptions {
    kv_method: Option<String>,
    /// A share (0.1), a percentage ("10%") or a token count (512).
    kv_budget: Option<Value>,
    /// `window`, `reconstruct` or `auto` (reconstruction for long prompts).
    kv_score: Option<String>,
}

/// What chat and text completions share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    chunkkv: Option<ChunkkvOptions>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request checked and ready for the engine.
struct Checked {
    model: String,
    stream: bool,
    job: Job,
    events: UnboundedReceiver<Event>,
}

fn check(state: &AppState, common: Common, prompt: Prompt) -> Result<Checked, ApiError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "only n = 1 is supported".into(),
            Some("n"),
        ));
    }
    let max_tokens = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(state.default_max_tokens as u64);
    if max_tokens == 0 || max_tokens > state.slot_cells as u64 {
        return Err(ApiError::bad_request(
            format!(
                "max_tokens must be between 1 and {} (a slot's cells)",
                state.slot_cells
            ),
            Some("max_tokens"),
        ));
    }
    let temperature = common.temperature.unwrap_or(0.8);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "temperature must be in [0, 2]".into(),
            Some("temperature"),
        ));
    }
    let top_p = common.top_p.unwrap_or(0.95);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(
            "top_p must be in (0, 1]".into(),
            Some("top_p"),
        ));
    }
    let stop = common.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "stop takes up to 4 non-empty strings".into(),
            Some("stop"),
        ));
    }
    let opts = common.chunkkv.unwrap_or_default();
    let method = match opts.kv_method.as_deref() {
        None => None,
        Some(m) => Some(parse_method(m)?),
    };
    let budget = match &opts.kv_budget {
        None => None,
        Some(Value::String(s)) => Some(parse_budget(s)?),
        Some(Value::Number(n)) => Some(parse_budget(&n.to_string())?),
        Some(_) => {
            return Err(ApiError::bad_request(
                "kv_budget is a number (0.1 or 512) or a string (\"10%\")".into(),
                Some("chunkkv.kv_budget"),
            ))
        }
    };
    let score = match opts.kv_score.as_deref() {
        None => None,
        Some("auto") => Some(ScoreChoice::Auto),
        Some("window") => Some(ScoreChoice::Fixed(Scorer::Window)),
        Some("reconstruct") => Some(ScoreChoice::Fixed(Scorer::Reconstruct)),
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("unknown kv_score `{other}`: window, reconstruct or auto"),
                Some("chunkkv.kv_score"),
            ))
        }
    };
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    // Admission: slots plus the queue, or 503 now rather than a long wait.
    let admitted = state.admitted.fetch_add(1, Ordering::AcqRel);
    if admitted >= state.max_admitted {
        state.admitted.fetch_sub(1, Ordering::AcqRel);
        state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::unavailable(
            "the server is busy: every slot is taken and the queue is full",
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let seed = common.seed.map_or(0xFFFF_FFFF, |s| s as u32);
    let job = Job {
        prompt,
        max_tokens: max_tokens as usize,
        sampling: SamplingParams {
            temperature,
            top_k: 40,
            top_p,
            min_p: 0.05,
            seed,
        },
        stop,
        method,
        budget,
        score,
        events: tx,
        admitted: state.admitted.clone(),
    };
    Ok(Checked {
        model: common.model.unwrap_or_else(|| state.model_name.clone()),
        stream: common.stream.unwrap_or(false),
        job,
        events: rx,
    })
}

fn parse_method(m: &str) -> Result<Method, ApiError> {
    use clap::ValueEnum;
    let method = Method::from_str(m, true).map_err(|_| {
        ApiError::bad_request(
            format!("unknown kv_method `{m}`: none, chunkkv, snapkv, streaming or random"),
            Some("chunkkv.kv_method"),
        )
    })?;
    match method {
        Method::Pyramidkv => Err(engine::pyramid_refused()),
        // Both score every prompt token (H2O's queries, KVzip's reconstruction),
        // which the server's interleaved prefill does not do.
        Method::H2o | Method::Kvzip => Err(ApiError::bad_request(
            format!(
                "kv_method `{}` is not served: it scores during the whole prefill; use chunkkv, snapkv, streaming, random or none",
                method.name()
            ),
            Some("chunkkv.kv_method"),
        )),
        m => Ok(m),
    }
}

fn parse_budget(s: &str) -> Result<Budget, ApiError> {
    s.parse::<Budget>()
        .map_err(|e| ApiError::bad_request(e, Some("chunkkv.kv_budget")))
}

/// The engine's events, gathered for a non-streaming response.
async fn collect(
    mut events: UnboundedReceiver<Event>,
) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, usage } => return Ok((text, finish, usage)),
            Event::Error(e) => return Err(e),
        }
    }
    Err(ApiError::unavailable("the server stopped before answering"))
}

fn submit(state: &AppState, job: Job) -> Result<(), ApiError> {
    state.jobs.send(job).map_err(|e| {
        e.0.admitted.fetch_sub(1, Ordering::AcqRel);
        ApiError::unavailable("the engine has stopped")
    })
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let state = &state;
    let req: ChatRequest = parse(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty".into(),
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role `{}` is not a chat role", m.role),
                Some("messages"),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(s)) => t.push_str(&s),
                        (kind, _) => {
                            return Err(ApiError::bad_request(
                                format!(
                                "messages[{i}]: content part `{kind}` is not supported (text only)"
                            ),
                                Some("messages"),
                            ))
                        }
                    }
                }
                t
            }
        };
        let role = if m.role == "developer" {
            "system".into()
        } else {
            m.role
        };
        messages.push(ChatMessage { role, content });
    }
    let checked = check(state, req.common, Prompt::Chat(messages))?;
    let id = format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let created = now();
    let model = checked.model;
    submit(state, checked.job)?;
    if !checked.stream {
        let (text, finish, usage) = collect(checked.events).await?;
        return Ok(Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }],
            "usage": usage,
        }))
        .into_response());
    }
    let chunk = move |delta: Value, finish: Option<FinishReason>, usage: Option<Usage>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            c["usage"] = json!(u);
        }
        c
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None, None);
    Ok(sse(checked.events, first, move |ev| match ev {
        Event::Text(t) => chunk(json!({"content": t}), None, None),
        Event::Done { finish, usage } => chunk(json!({}), Some(finish), Some(usage)),
        Event::Error(e) => e.body(),
    }))
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let state = &state;
    let req: CompletionRequest = parse(&body)?;
    let mut prompts = req.prompt.into_vec();
    if prompts.len() != 1 || prompts[0].is_empty() {
        return Err(ApiError::bad_request(
            "prompt must be one non-empty string".into(),
            Some("prompt"),
        ));
    }
    let prompt = prompts.remove(0);
    let checked = check(state, req.common, Prompt::Text(prompt))?;
    let id = format!("cmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let created = now();
    let model = checked.model;
    submit(state, checked.job)?;
    let body = move |text: String, finish: Option<FinishReason>, usage: Option<Usage>| {
        let mut c = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            c["usage"] = json!(u);
        }
        c
    };
    if !checked.stream {
        let (text, finish, usage) = collect(checked.events).await?;
        return Ok(Json(body(text, Some(finish), Some(usage))).into_response());
    }
    let first = body(String::new(), None, None);
    Ok(sse(checked.events, first, move |ev| match ev {
        Event::Text(t) => body(t, None, None),
        Event::Done { finish, usage } => body(String::new(), Some(finish), Some(usage)),
        Event::Error(e) => e.body(),
    }))
}

/// Server-sent events: `first`, one event per engine event, then `[DONE]`.
/// Dropping the stream (the client went away) drops the receiver, which
/// tells the engine to stop that generation and free its slot.
fn sse(
    events: UnboundedReceiver<Event>,
    first: Value,
    to_json: impl Fn(Event) -> Value + Send + 'static,
) -> Response {
    let head = tokio_stream::once(first.to_string());
    let body = tokio_stream::wrappers::UnboundedReceiverStream::new(events).map(move |ev| {
        let end = !matches!(ev, Event::Text(_));
        (to_json(ev).to_string(), end)
    });
    // Stop after the last event; an engine that went away ends with an error.
    let body = StopAfter::new(body);
    let stream = head
        .chain(body)
        .chain(tokio_stream::once("[DONE]".to_string()))
        .map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Yields the data of each `(data, last)` item up to and including the first
/// marked last; if the source ends first, yields an error event instead.
struct StopAfter<S> {
    inner: S,
    done: bool,
}

impl<S> StopAfter<S> {
    fn new(inner: S) -> Self {
        StopAfter { inner, done: false }
    }
}

impl<S: tokio_stream::Stream<Item = (String, bool)> + Unpin> tokio_stream::Stream for StopAfter<S> {
    type Item = String;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<String>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some((data, last))) => {
                self.done = last;
                Poll::Ready(Some(data))
            }
            Poll::Ready(None) => {
                self.done = true;
                let e = ApiError::unavailable("the server stopped before answering");
                Poll::Ready(Some(e.body().to_string()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
