//! The HTTP endpoints: OpenAI's completions, chat completions, embeddings and model list,
//! llama-server's tokenizer endpoints, `/health` and `/metrics`.

use crate::api::{
    cache_scope, chat_bytes, check_model, check_prompt_bytes, prepare, ApiError, ChatRequest,
    CompletionRequest, Endpoint, Fields, Limits, Prepared, PromptInput,
};
use crate::engine::{Engine, Event, Job, SubmitError, Summary};
use crate::guard::{self, Access};
use crate::metrics::{add, Metrics};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dynexec_core::tokenizer::TextTokenizer;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Semaphore;

/// Prompts tokenized at once, on blocking threads; more wait their turn without holding up
/// the async workers (and `/health`).
const TOKENIZING_AT_ONCE: usize = 2;

/// Prompts that may wait to be tokenized; more are refused with 503.
const TOKENIZING_QUEUE: usize = 64;

/// A step running longer than this counts as a stalled engine for `/health`.
const STALLED_AFTER: Duration = Duration::from_secs(60);

/// Seconds a client refused with 503 is asked to wait (`Retry-After`).
const RETRY_AFTER_SECS: &str = "2";

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Set on shutdown: new requests are refused while in-flight ones finish.
    pub shutting_down: AtomicBool,
    pub started: u64,
    next_id: AtomicU64,
    tokenizing: Arc<Semaphore>,
    /// Prompts waiting for or in tokenization.
    tokenize_waiting: AtomicU64,
    /// The sentence encoder behind `/v1/embeddings`, if the server has one.
    pub embedder: Option<Arc<crate::embeddings::Embedder>>,
    /// How long a stream may go without an event before a keep-alive comment; `None`: never.
    pub keep_alive: Option<Duration>,
}

impl AppState {
    pub fn new(engine: Engine, metrics: Arc<Metrics>, limits: Limits) -> Self {
        Self {
            engine,
            metrics,
            limits,
            shutting_down: AtomicBool::new(false),
            started: unix_now(),
            next_id: AtomicU64::new(1),
            tokenizing: Arc::new(Semaphore::new(TOKENIZING_AT_ONCE)),
            tokenize_waiting: AtomicU64::new(0),
            embedder: None,
            keep_alive: None,
        }
    }

    /// Runs `work` with the tokenizer on a blocking thread, a few at a time. The permit
    /// goes with the work, so a client that hangs up does not free a slot while its prompt
    /// is still being tokenized.
    async fn tokenize<T: Send + 'static>(
        &self,
        field: &'static str,
        work: impl FnOnce(&TextTokenizer) -> dynexec_core::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let waiting = self.tokenize_waiting.fetch_add(1, Ordering::Relaxed);
        let result = if waiting >= TOKENIZING_QUEUE as u64 {
            Err(ApiError::server(
                503,
                "server_error",
                "too many prompts are waiting to be tokenized: retry later",
            )
            .with_code(503, "server_overloaded"))
        } else {
            self.tokenize_now(field, work).await
        };
        self.tokenize_waiting.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn tokenize_now<T: Send + 'static>(
        &self,
        field: &'static str,
        work: impl FnOnce(&TextTokenizer) -> dynexec_core::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.tokenizing.clone().acquire_owned().await.map_err(|_| {
            ApiError::server(503, "server_error", "the server is shutting down")
                .with_code(503, "shutting_down")
        })?;
        let tokenizer = self.engine.info().tokenizer.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&tokenizer)
        })
        .await
        .map_err(|_| ApiError::server(500, "server_error", "tokenizing the prompt failed"))?
        .map_err(|e| ApiError::invalid(Some(field), e.to_string()))
    }
}

pub fn router(state: Arc<AppState>, access: Arc<Access>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // The guard reads and limits bodies itself (in OpenAI's error shape).
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(access, guard::check))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut response = json_response(status, &self.body());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        let request = ChatRequest::parse(&body)?;
        drop(body);
        let info = state.engine.info();
        check_model(request.model.as_deref(), info)?;
        check_prompt_bytes(chat_bytes(&request.messages), info, Endpoint::Chat)?;
        let messages = request.messages;
        let prompt = state
            .tokenize("messages", move |tokenizer| {
                tokenizer
                    .chat_messages(&messages)
                    .and_then(|text| tokenizer.encode(&text))
            })
            .await?;
        let scope = cache_scope(&headers, request.params.cache_salt.as_deref());
        prepare(&request.params, prompt, info, state.limits).map(|mut prepared| {
            prepared.dynamic.cache_scope = scope;
            prepared
        })
    }
    .await;
    generate(state, prepared, Endpoint::Chat, received).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        let request = CompletionRequest::parse(&body)?;
        drop(body);
        let info = state.engine.info();
        check_model(request.model.as_deref(), info)?;
        let prompt = match request.prompt {
            PromptInput::Ids(ids) => ids,
            PromptInput::Text(text) => {
                check_prompt_bytes(text.len(), info, Endpoint::Completion)?;
                state
                    .tokenize("prompt", move |tokenizer| tokenizer.encode(&text))
                    .await?
            }
        };
        let scope = cache_scope(&headers, request.params.cache_salt.as_deref());
        prepare(&request.params, prompt, info, state.limits).map(|mut prepared| {
            prepared.dynamic.cache_scope = scope;
            prepared
        })
    }
    .await;
    generate(state, prepared, Endpoint::Completion, received).await
}

/// Queues a checked request and answers it, whole or as a server-sent event stream.
async fn generate(
    state: Arc<AppState>,
    prepared: Result<Prepared, ApiError>,
    endpoint: Endpoint,
    received: Instant,
) -> Response {
    let mut prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            let counter = match e.status {
                503 => &state.metrics.requests_rejected_busy,
                500.. => &state.metrics.requests_failed,
                _ => &state.metrics.requests_client_error,
            };
            add(counter, 1);
            return e.into_response();
        }
    };
    if state.shutting_down.load(Ordering::Relaxed) {
        add(&state.metrics.requests_rejected_busy, 1);
        return ApiError::server(503, "server_error", "the server is shutting down")
            .with_code(503, "shutting_down")
            .into_response();
    }
    // Unique across restarts and servers too (start time and process id are in it), so a
    // trace folder reused by a later server never has a trace overwritten.
    let id = format!(
        "{}-{}-{}-{}",
        if endpoint == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        state.started,
        std::process::id(),
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    // A trace is named by the response it belongs to.
    if let Some(trace) = &mut prepared.dynamic.trace {
        trace.name = id.clone();
    }
    let (events, mut rx) = unbounded_channel();
    let job = Job {
        prompt_ids: prepared.prompt_ids,
        options: prepared.options,
        stop: prepared.stop,
        dynamic: prepared.dynamic,
        received,
        events,
    };
    if let Err(e) = state.engine.submit(job) {
        add(&state.metrics.requests_rejected_busy, 1);
        let (message, code) = match e {
            SubmitError::Busy => (
                "the server's queue is full: retry later, or give the server a longer queue",
                "server_overloaded",
            ),
            SubmitError::Closed => ("the server is shutting down", "shutting_down"),
        };
        return ApiError::server(503, "server_error", message)
            .with_code(503, code)
            .into_response();
    }
    let chunks = ChunkWriter {
        id,
        created: unix_now(),
        model: state.engine.info().name.clone(),
        endpoint,
        include_usage: prepared.include_usage,
        sent_role: false,
    };
    // The first event comes after the prefill: an error there is still an HTTP error. A
    // stream whose first event is slow in coming (a long queue, a long prefill) starts
    // anyway, with keep-alive comments, so clients and proxies do not time it out.
    let keep_alive = state.keep_alive.filter(|_| prepared.stream);
    let first = match keep_alive {
        Some(wait) => match tokio::time::timeout(wait, rx.recv()).await {
            Ok(first) => first,
            Err(_) => return stream_response(chunks, None, rx, keep_alive),
        },
        None => rx.recv().await,
    };
    let first = match first {
        Some(Event::Failed(e)) => return engine_error(e).into_response(),
        Some(Event::Ended(why)) => return ended(why).into_response(),
        None => return engine_gone().into_response(),
        Some(event) => event,
    };
    if prepared.stream {
        return stream_response(chunks, Some(first), rx, keep_alive);
    }
    let mut text = String::new();
    let mut next = Some(first);
    loop {
        match next.take() {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Finished(summary)) => {
                return json_response(StatusCode::OK, &chunks.whole(&text, &summary))
            }
            Some(Event::Failed(e)) => return engine_error(e).into_response(),
            Some(Event::Ended(why)) => return ended(why).into_response(),
            None => return engine_gone().into_response(),
        }
        next = rx.recv().await;
    }
}

fn engine_error(e: dynexec_core::Error) -> ApiError {
    match e.root() {
        dynexec_core::Error::InvalidArgument(_)
        | dynexec_core::Error::ContextOverflow { .. }
        | dynexec_core::Error::InvalidSetting { .. }
        | dynexec_core::Error::BadSpec { .. } => crate::api::setting_error(e),
        e => ApiError::server(500, "server_error", format!("generation failed: {e}")),
    }
}

fn ended(why: String) -> ApiError {
    ApiError::server(503, "server_error", why).with_code(503, "shutting_down")
}

fn engine_gone() -> ApiError {
    ApiError::server(
        503,
        "server_error",
        "the server stopped before finishing this request",
    )
}

/// An SSE comment line: clients skip it, and it keeps idle-timeouts at bay.
const KEEP_ALIVE_COMMENT: &str = ": keep-alive\n\n";

/// The event stream of one request: `first` (if it came already), then the rest; with
/// `keep_alive`, a comment whenever that long passes without an event.
fn stream_response(
    chunks: ChunkWriter,
    first: Option<Event>,
    rx: UnboundedReceiver<Event>,
    keep_alive: Option<Duration>,
) -> Response {
    // A stream that starts before its first event says so at once, then every interval.
    let opening = match (&first, keep_alive) {
        (None, Some(_)) => Some(Ok::<_, Infallible>(Bytes::from_static(
            KEEP_ALIVE_COMMENT.as_bytes(),
        ))),
        _ => None,
    };
    let stream = futures_util::stream::unfold(
        (first, rx, chunks, false),
        move |(pending, mut rx, mut chunks, done)| async move {
            if done {
                return None;
            }
            let event = match (pending, keep_alive) {
                (Some(e), _) => Some(e),
                (None, None) => rx.recv().await,
                (None, Some(wait)) => match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(event) => event,
                    Err(_) => {
                        let comment = Bytes::from_static(KEEP_ALIVE_COMMENT.as_bytes());
                        return Some((Ok::<_, Infallible>(comment), (None, rx, chunks, false)));
                    }
                },
            };
            let finished = !matches!(event, Some(Event::Text(_)));
            let data = match event {
                Some(Event::Text(t)) => chunks.delta(&t),
                Some(Event::Finished(summary)) => chunks.finish(&summary),
                Some(Event::Failed(e)) => chunks.error(&engine_error(e)),
                Some(Event::Ended(why)) => chunks.error(&ended(why)),
                None => chunks.error(&engine_gone()),
            };
            Some((
                Ok::<_, Infallible>(Bytes::from(data)),
                (None, rx, chunks, finished),
            ))
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(
            futures_util::stream::iter(opening).chain(stream),
        ))
        .unwrap_or_else(|_| engine_gone().into_response())
}

/// Builds the response bodies and stream chunks of one request.
struct ChunkWriter {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
    sent_role: bool,
}

impl ChunkWriter {
    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn choice(&self, text: &str, finish_reason: Value, streaming: bool) -> Value {
        match (self.endpoint, streaming) {
            (Endpoint::Chat, false) => json!({"index": 0, "finish_reason": finish_reason,
                "message": {"role": "assistant", "content": text}, "logprobs": null}),
            (Endpoint::Chat, true) => {
                let mut delta = json!({});
                if !self.sent_role {
                    delta["role"] = json!("assistant");
                }
                if !text.is_empty() || !self.sent_role {
                    delta["content"] = json!(text);
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null})
            }
            (Endpoint::Completion, _) => {
                json!({"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": null})
            }
        }
    }

    fn envelope(&self, choices: Value, streaming: bool) -> Value {
        json!({"id": self.id, "object": self.object(streaming), "created": self.created,
            "model": self.model, "choices": choices})
    }

    /// The whole answer of a non-streaming request.
    fn whole(&self, text: &str, summary: &Summary) -> Value {
        let mut body = self.envelope(
            json!([self.choice(text, json!(summary.finish_reason), false)]),
            false,
        );
        body["usage"] = json!(summary.usage);
        body["dynexec"] = json!(summary.report);
        body
    }

    fn sse(value: &Value) -> String {
        format!("data: {value}\n\n")
    }

    fn delta(&mut self, text: &str) -> String {
        let chunk = self.envelope(json!([self.choice(text, Value::Null, true)]), true);
        self.sent_role = true;
        Self::sse(&chunk)
    }

    /// The last chunk (finish reason and dynexec's report), usage if asked, and `[DONE]`.
    fn finish(&mut self, summary: &Summary) -> String {
        let mut last = self.envelope(
            json!([self.choice("", json!(summary.finish_reason), true)]),
            true,
        );
        last["dynexec"] = json!(summary.report);
        let mut out = Self::sse(&last);
        if self.include_usage {
            let mut usage = self.envelope(json!([]), true);
            usage["usage"] = json!(summary.usage);
            out.push_str(&Self::sse(&usage));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }

    fn error(&self, error: &ApiError) -> String {
        format!("{}data: [DONE]\n\n", Self::sse(&error.body()))
    }
}

/// A JSON answer with 200, or the error.
fn json_answer(answer: Result<Value, ApiError>) -> Response {
    match answer {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    }
}

/// llama-server's `POST /tokenize`: `{"content", "add_special": false, "with_pieces": false}`
/// → `{"tokens": [ids]}`, or `[{"id", "piece"}]` with pieces.
async fn tokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let answer = async {
        let mut fields = Fields::parse(&body)?;
        let content = fields.string("content")?.ok_or_else(|| {
            ApiError::invalid(Some("content"), "`content` is missing: send the text to tokenize")
        })?;
        let add_special = fields.bool("add_special")?.unwrap_or(false);
        let with_pieces = fields.bool("with_pieces")?.unwrap_or(false);
        if fields.bool("parse_special")? == Some(false) {
            return Err(ApiError::invalid(
                Some("parse_special"),
                "special-token text always maps to its token here; `parse_special: false` is not supported",
            ));
        }
        fields.finish()?;
        let tokens = state
            .tokenize("content", move |tokenizer| {
                let ids = if add_special {
                    tokenizer.encode(&content)?
                } else {
                    tokenizer.encode_without_specials(&content)?
                };
                if !with_pieces {
                    return Ok(json!(ids));
                }
                let pieces = ids
                    .iter()
                    .map(|&id| {
                        let piece = tokenizer.decode(&[id])?;
                        Ok(json!({"id": id, "piece": piece}))
                    })
                    .collect::<dynexec_core::Result<Vec<_>>>()?;
                Ok(json!(pieces))
            })
            .await?;
        Ok(json!({"tokens": tokens}))
    }
    .await;
    json_answer(answer)
}

/// llama-server's `POST /detokenize`: `{"tokens": [ids]}` → `{"content"}`.
async fn detokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let answer = async {
        let mut fields = Fields::parse(&body)?;
        let bad = || ApiError::invalid(Some("tokens"), "`tokens` must be a list of token ids");
        let ids: Vec<u32> = match fields.take("tokens") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(bad)
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad()),
        };
        fields.finish()?;
        let vocab = state.engine.info().tokenizer.vocab_size();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                Some("tokens"),
                format!("token id {id} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        let content = state
            .tokenize("tokens", move |tokenizer| tokenizer.decode(&ids))
            .await?;
        Ok(json!({"content": content}))
    }
    .await;
    json_answer(answer)
}

/// OpenAI's `POST /v1/embeddings`, when the server has a sentence encoder.
async fn embeddings(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let Some(embedder) = state.embedder.clone() else {
        return ApiError::invalid(
            Some("model"),
            "this server has no embedding model: it serves text generation only",
        )
        .with_code(404, "model_not_found")
        .into_response();
    };
    json_answer(embedder.answer(&body).await)
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let info = state.engine.info();
    let mut models = vec![json!({
        "id": info.name, "object": "model", "created": state.started, "owned_by": "dynexec",
        "context_length": info.context_length,
        "dynexec": {"layers": info.num_layers, "vocab_size": info.tokenizer.vocab_size(),
            "draft": info.draft,
            "lookahead": info.lookahead, "exit_layers": info.exit_layers,
            "exit_classifiers": info.exit_classifiers,
            "traces": state.limits.trace_quota.is_some()},
    })];
    if let Some(embedder) = &state.embedder {
        models.push(json!({
            "id": embedder.name(), "object": "model", "created": state.started,
            "owned_by": "dynexec", "context_length": embedder.max_tokens(),
            "dynexec": {"task": "embedding", "dimensions": embedder.dimensions()},
        }));
    }
    json_response(StatusCode::OK, &json!({"object": "list", "data": models}))
}

/// `/health`: the engine's state. 200 with `ok` (a slot is free) or `busy` (every slot is
/// taken: new requests queue); 503 with `shutting_down` or `stalled` (a step has run for
/// over a minute). `/health?ready` also answers 503 while the queue is full, for load
/// balancers that should send the next request elsewhere.
async fn health(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Response {
    let get = |gauge: &AtomicU64| gauge.load(Ordering::Relaxed);
    let config = state.engine.config();
    let queued = get(&state.metrics.queue_depth);
    let active = get(&state.metrics.active_sequences);
    let step = state.engine.status().step_running_for();
    let ready_check = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("ready")));
    let queue_full = queued >= config.max_queue as u64;
    let status = if state.shutting_down.load(Ordering::Relaxed) {
        "shutting_down"
    } else if step.is_some_and(|s| s > STALLED_AFTER) {
        "stalled"
    } else if active >= config.max_batch as u64 {
        "busy"
    } else {
        "ok"
    };
    let healthy = matches!(status, "ok" | "busy") && !(ready_check && queue_full);
    let body = json!({
        "status": status,
        "ready": healthy && !queue_full,
        "queue_depth": queued,
        "queue_capacity": config.max_queue,
        "active_sequences": active,
        "prefilling_sequences": get(&state.metrics.prefilling_sequences),
        "max_batch": config.max_batch,
        "step_running_ms": step.map(|s| s.as_millis() as u64),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = json_response(code, &body);
    if !healthy {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    response
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::invalid(
        None,
        "no such endpoint: dynexec serves POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models, POST /tokenize, POST /detokenize, GET /health and GET /metrics",
    )
    .with_code(404, "not_found")
    .into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::invalid(None, "this endpoint does not take that HTTP method")
        .with_code(405, "method_not_allowed")
        .into_response()
}
