//! An OpenAI-compatible HTTP server over dynexec's engines.
//!
//! `POST /v1/chat/completions` and `/v1/completions` (whole or streamed as server-sent
//! events), `GET /v1/models`, `/health` and `/metrics` (Prometheus text). Requests choose
//! dynamic execution with extra fields — `speculative`, `lookahead`, `early_exit` — and every
//! response reports what was used in a `dynexec` field.
//!
//! Model work runs on one engine thread ([`engine`]), off the async runtime: it decodes all
//! admitted requests together, batching the plain ones into one forward per step. A bounded
//! queue in front of it answers 503 when full; a client that disconnects has its sequence
//! dropped at the next step; shutdown stops taking requests and lets streams in flight end.

#![warn(missing_docs)]

pub mod api;
pub mod engine;
pub mod loadgen;
pub mod metrics;
mod routes;
pub mod stop;

pub use api::Limits;
pub use engine::{Engine, EngineConfig, ServedModel};
pub use metrics::Metrics;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Per-request limits.
    pub limits: Limits,
    /// After a shutdown signal, how long streams in flight may run before they are ended.
    pub shutdown_timeout: Duration,
    /// Runtime threads for HTTP work (model work has its own thread).
    pub http_threads: usize,
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
/// (useful with port 0). On the signal, new requests get 503, requests in flight finish
/// (or are ended after `shutdown_timeout`), and the engine thread is joined.
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
    let state = Arc::new(routes::AppState::new(engine, metrics, options.limits));
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: options.addr,
                source,
            })?;
        let bound = listener.local_addr().map_err(ServeError::Runtime)?;
        on_listening(bound);
        let app = routes::router(state.clone());
        let on_signal = {
            let state = state.clone();
            let timeout = options.shutdown_timeout;
            async move {
                shutdown_signal().await;
                state.shutting_down.store(true, Ordering::Relaxed);
                eprintln!(
                    "dynexec serve: shutting down; finishing requests in flight (at most {}s)",
                    timeout.as_secs()
                );
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    state.engine.abort_in_flight();
                });
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(on_signal)
            .await
            .map_err(ServeError::Runtime)
    })?;
    // Dropping the runtime ends the abort timer; dropping the last state joins the engine.
    drop(runtime);
    drop(state);
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
