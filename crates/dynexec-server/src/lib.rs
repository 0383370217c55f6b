//! An OpenAI-compatible HTTP server over dynexec's engines.
//!
//! `POST /v1/chat/completions` and `/v1/completions` (whole or streamed as server-sent
//! events), `/v1/embeddings` (with a sentence encoder beside the decoder), `GET /v1/models`,
//! llama-server's `/tokenize` and `/detokenize`, `/health` and `/metrics` (Prometheus text). Requests choose
//! dynamic execution with extra fields — `speculative`, `lookahead`, `early_exit` — and every
//! response reports what was used in a `dynexec` field.
//!
//! Model work runs on one engine thread ([`engine`]), off the async runtime: each step runs
//! every admitted request's next rows in one forward, long prompts a piece at a time
//! (chunked prefill). A bounded queue in front of it answers 503 when full; a client that
//! disconnects has its sequence dropped at the next step. Before a handler runs, [`guard`]
//! checks sizes, Host, Origin, API key and Content-Type and reads the body under a deadline;
//! prompts are tokenized on blocking threads, so `/health` never waits on a big one. On
//! shutdown the server stops taking connections, lets requests in flight finish, and after
//! the shutdown timeout ends whatever is left.

#![warn(missing_docs)]

pub mod api;
pub mod embeddings;
pub mod engine;
pub mod guard;
pub mod loadgen;
pub mod metrics;
pub mod prefill;
mod routes;
mod scheduler;
pub mod stop;
pub mod traces;

pub use api::Limits;
pub use embeddings::Embedder;
pub use engine::{Engine, EngineConfig, ServedModel};
pub use guard::Access;
pub use metrics::Metrics;
pub use traces::TraceStore;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Per-request limits.
    pub limits: Limits,
    /// Who may call, from where, and how big and slow a request body may be.
    pub access: Access,
    /// How long a client may take to send a request's headers; also how long a kept-alive
    /// connection may sit idle.
    pub header_timeout: Duration,
    /// After a shutdown signal, how long requests in flight may run before they are ended
    /// and their connections closed.
    pub shutdown_timeout: Duration,
    /// Runtime threads for HTTP work (model work has its own thread).
    pub http_threads: usize,
    /// The sentence encoder behind `/v1/embeddings`, if any.
    pub embedder: Option<Arc<Embedder>>,
    /// How long a stream may wait for its next event (in the queue, in a long prefill)
    /// before it gets an SSE keep-alive comment; `None`: never.
    pub sse_keep_alive: Option<Duration>,
}

/// Why [`serve`] could not run; request errors are answered, never returned here.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound (often: the port is taken).
    #[error("could not listen on {addr} (is another server using the port? pick another port)")]
    Bind {
        /// The address that was asked for ([`ServeOptions::addr`]).
        addr: SocketAddr,
        /// The OS error from binding the socket.
        source: std::io::Error,
    },
    /// The async runtime could not be built or failed while serving.
    #[error("the HTTP runtime failed: {0}")]
    Runtime(std::io::Error),
}

/// Serves `engine` until Ctrl-C or SIGTERM, calling `on_listening` with the bound address
/// (useful with port 0). On the signal it stops accepting connections and lets requests in
/// flight finish; after `shutdown_timeout` the engine ends the generations left (their
/// streams get an error event) and every connection still open is closed, a stalled client's
/// included. The engine thread is then given a moment to end.
pub fn serve(
    engine: Engine,
    metrics: Arc<Metrics>,
    options: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.http_threads.max(1))
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let mut state = routes::AppState::new(engine, metrics, options.limits);
    state.embedder = options.embedder.clone();
    state.keep_alive = options.sse_keep_alive;
    let state = Arc::new(state);
    let served = runtime.block_on(run(state.clone(), &options, on_listening));
    // Blocking work (a tokenization) is not waited for past a second.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served?;
    if let Ok(state) = Arc::try_unwrap(state) {
        state.engine.shut_down(Duration::from_secs(5));
    }
    Ok(())
}

async fn run(
    state: Arc<routes::AppState>,
    options: &ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: options.addr,
            source,
        })?;
    on_listening(listener.local_addr().map_err(ServeError::Runtime)?);
    let app = routes::router(state.clone(), Arc::new(options.access.clone()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        // Room for the guard to answer oversized heads itself, in JSON.
        .max_buf_size(4 * guard::MAX_HEADER_BYTES)
        .max_headers(200);
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // A failed accept concerns one connection; out of descriptors, the next
                // would fail too, so pause rather than spin.
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let connection = http.serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(app.clone()),
                );
                let mut closing = closing_rx.clone();
                connections.spawn(async move {
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        _ = closing.changed() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut signal => break,
        }
    }
    drop(listener);
    state.shutting_down.store(true, Ordering::Relaxed);
    let timeout = options.shutdown_timeout;
    eprintln!(
        "dynexec serve: shutting down; finishing requests in flight (at most {}s)",
        timeout.as_secs()
    );
    let _ = closing.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(timeout, drain).await.is_err() {
        // Generations still running end now; their streams get an error event and [DONE]
        // if their clients are reading (the engine stops between steps). Then every
        // connection left (a stalled client's too) is closed.
        let generating = state.metrics.active_sequences.load(Ordering::Relaxed)
            + state.metrics.queue_depth.load(Ordering::Relaxed);
        if generating > 0 {
            state.engine.abort_in_flight();
            let ended = async { while connections.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(Duration::from_secs(2), ended).await;
        }
        connections.shutdown().await;
    }
    Ok(())
}
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
