//! The engine: one thread that owns the model and decodes every admitted request, a step at
//! a time, so the async HTTP side never waits on model work. [`Engine`] is the handle the
//! HTTP side holds; the step itself is in [`crate::scheduler`].

use crate::metrics::{add, Metrics};
use crate::scheduler::Scheduler;
use crate::traces::{TraceReport, TraceStore};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::Error;
pub use dynexec_engine::{EarlyExitReport, SpeculativeReport};
use dynexec_exit::token_exit::{ExitAdapters, TokenExitPolicy};
use dynexec_models::generation::GenerateOptions;
use dynexec_models::llama::Llama;
use dynexec_spec::drafter::Drafter;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What the engine serves: a decoder, its tokenizer, and what dynamic execution can use.
pub struct ServedModel {
    /// The name clients give as `model`.
    pub name: String,
    /// The decoder every request runs on.
    pub model: Llama,
    /// The model's tokenizer, chat template included.
    pub tokenizer: TextTokenizer,
    /// The draft speculative requests use; each request gets a fresh copy.
    pub drafter: Option<Box<dyn Drafter>>,
    /// The lookahead speculative requests use unless they name one.
    pub lookahead: String,
    /// Exit adapters for requests that ask for per-token early exit.
    pub exit_adapters: Option<ExitAdapters>,
}

/// What the HTTP side needs to know about the served model.
#[derive(Clone)]
pub struct ModelInfo {
    /// The name clients give as `model`.
    pub name: String,
    /// The model's tokenizer, for encoding prompts on the HTTP side.
    pub tokenizer: Arc<TextTokenizer>,
    /// The model's context, in tokens (prompt plus generated).
    pub context_length: usize,
    /// The most bytes of prompt text one token can cover, normalization included; `None`
    /// when the tokenizer's normalizer may delete text (no bound then).
    pub text_bytes_per_token: Option<usize>,
    /// The model's decoder layers.
    pub num_layers: usize,
    /// Features of the residual stream (a traced position takes 4 bytes each per layer).
    pub hidden_size: usize,
    /// The draft's name, when the server can decode speculatively.
    pub draft: Option<String>,
    /// The default lookahead of speculative requests.
    pub lookahead: String,
    /// The layers with exit adapters, when the server can exit early.
    pub exit_layers: Option<Vec<usize>>,
    /// Whether the exit adapters carry exit classifiers (`early_exit: "classifier:T"`).
    pub exit_classifiers: bool,
}

/// How many sequences decode together, how many tokens a step may run, and how many
/// requests may wait.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together (prefilling ones included); 1 serves requests one at a time.
    pub max_batch: usize,
    /// Requests waiting for a slot before new ones are refused (HTTP 503).
    pub max_queue: usize,
    /// Speculative sequences draft only while at most this many sequences are decoding.
    pub spec_max_batch: usize,
    /// Tokens one step may run, decoding rows and prompt pieces together, each counted at
    /// its cost in rows at the start of a context ([`crate::prefill::PieceCost`]; vLLM's
    /// `max_num_batched_tokens`, llama-server's `n_batch`, there uncounted). Prompts are
    /// prefilled in pieces that fit it, so a long prompt holds the others up for one piece
    /// at a time.
    pub step_tokens: usize,
    /// Keep finished plain sequences' KV caches for later requests with the same prefix.
    pub prefix_cache: bool,
    /// Where requests that ask for a trace have it saved (`None`: tracing is off).
    pub traces: Option<TraceStore>,
}

/// What the engine thread is doing, for `/health`.
#[derive(Debug)]
pub struct EngineStatus {
    epoch: Instant,
    /// Milliseconds after `epoch` at which the running step began, plus one; 0 when idle.
    step_began: AtomicU64,
}

impl EngineStatus {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            step_began: AtomicU64::new(0),
        }
    }

    pub(crate) fn step_begins(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.step_began.store(ms + 1, Ordering::Relaxed);
    }

    pub(crate) fn step_ends(&self) {
        self.step_began.store(0, Ordering::Relaxed);
    }

    /// How long the step in progress has run; `None` while the engine waits for work.
    pub fn step_running_for(&self) -> Option<Duration> {
        match self.step_began.load(Ordering::Relaxed) {
            0 => None,
            began => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(began - 1)),
            ),
        }
    }
}

/// Dynamic execution chosen for one request.
#[derive(Debug, Clone, Default)]
pub struct Dynamic {
    /// Decode speculatively with the server's draft and this lookahead.
    pub speculative: Option<String>,
    /// Let each token leave at an exit layer under this policy.
    pub early_exit: Option<TokenExitPolicy>,
    /// Start from the longest cached prefix of the prompt, where a plain sequence can.
    pub cache_prompt: bool,
    /// Which cached prefixes the request may reuse: only those left by requests of the same
    /// scope (the same API key and `cache_salt`), so no client learns from timings or
    /// `cached_tokens` what another sent.
    pub cache_scope: u64,
    /// Record the residual stream and save it ([`crate::traces`]).
    pub trace: Option<TraceRequest>,
}

/// A request's trace: which layers, and the name its files get (the response id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// Layers to record, ascending (0 = embeddings, the model's layer count = the last).
    pub layers: Vec<usize>,
    /// The file name without extension; the HTTP side sets it to the response id.
    pub name: String,
}

/// One request for the engine.
pub struct Job {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// Token budget, sampling settings and whether end-of-sequence stops.
    pub options: GenerateOptions,
    /// Strings that end the generation; they are not sent.
    pub stop: Vec<String>,
    /// Speculative decoding or early exit for this request.
    pub dynamic: Dynamic,
    /// When the request arrived (latencies count from here).
    pub received: Instant,
    /// Where the engine sends the request's events; a closed channel cancels the request.
    pub events: UnboundedSender<Event>,
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The next piece of text (text that may start a stop string is held back until it
    /// cannot).
    Text(String),
    /// The generation ended normally; nothing follows.
    Finished(Summary),
    /// The request was wrong for the model or the generation failed.
    Failed(Error),
    /// The server ended the generation (shutting down).
    Ended(String),
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

/// Token counts, as OpenAI's `usage` field reports them.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// The sum of the two.
    pub total_tokens: usize,
    /// OpenAI's breakdown of the prompt: `cached_tokens` came from a cached prefix.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// How much of a prompt came from the prefix cache.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were reused, not computed.
    pub cached_tokens: usize,
}

/// What dynamic execution did for a request (the `dynexec` field of a response).
#[derive(Debug, Clone, Serialize)]
pub struct DynamicReport {
    /// Sequences decoding together when the request finished.
    pub batch_size: usize,
    /// Milliseconds the request waited in the queue before it started decoding.
    pub queue_ms: f64,
    /// Milliseconds from arrival to the first generated token.
    pub ttft_ms: f64,
    /// Present when the request decoded speculatively.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpeculativeReport>,
    /// Present when the request used per-token early exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_exit: Option<EarlyExitReport>,
    /// Present when the request asked for a trace: where it went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceReport>,
}

/// The end of a request.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Why the generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// The response's `dynexec` field.
    pub report: DynamicReport,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: try again later.
    Busy,
    /// The engine has stopped.
    Closed,
}

/// The handle the HTTP side holds; dropping it lets the engine finish and exit.
pub struct Engine {
    jobs: Option<SyncSender<Job>>,
    info: ModelInfo,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    abort: Arc<AtomicBool>,
    status: Arc<EngineStatus>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread, which loads the model with `load` and then serves jobs.
    /// Returns once the model is loaded, or with the loading error.
    pub fn start(
        load: impl FnOnce() -> std::result::Result<ServedModel, String> + Send + 'static,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::result::Result<Self, String> {
        let (jobs, queue) = sync_channel(config.max_queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let abort = Arc::new(AtomicBool::new(false));
        let status = Arc::new(EngineStatus::new());
        let thread = {
            let (metrics, abort, status) = (metrics.clone(), abort.clone(), status.clone());
            let thread_config = config.clone();
            std::thread::Builder::new()
                .name("dynexec-engine".into())
                .spawn(move || {
                    let served = match load() {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(served.info()));
                    Scheduler::new(&served, thread_config, metrics, abort, status).run(queue);
                })
                .map_err(|e| format!("starting the engine thread: {e}"))?
        };
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok(Self {
                jobs: Some(jobs),
                info,
                config,
                metrics,
                abort,
                status,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the engine thread stopped while loading the model".to_string()),
        }
    }

    /// The served model, as the HTTP side sees it.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// How the engine was configured.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// What the engine thread is doing.
    pub fn status(&self) -> &EngineStatus {
        &self.status
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> std::result::Result<(), SubmitError> {
        let jobs = self.jobs.as_ref().ok_or(SubmitError::Closed)?;
        add(&self.metrics.queue_depth, 1);
        jobs.try_send(job).map_err(|e| {
            self.metrics
                .queue_depth
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => SubmitError::Busy,
                TrySendError::Disconnected(_) => SubmitError::Closed,
            }
        })
    }

    /// Ends every sequence in flight at its next step (their clients get an error event).
    pub fn abort_in_flight(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }

    /// Stops taking jobs and waits up to `deadline` for the engine thread to end (it ends
    /// after its current step once [`Self::abort_in_flight`] was called). A thread still
    /// running then is left to the process's exit.
    pub fn shut_down(mut self, deadline: Duration) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let started = Instant::now();
            while !thread.is_finished() && started.elapsed() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The most bytes of prompt text one token can cover. A token covers its decoded text (a
/// lone byte of a multi-byte character decodes to a 3-byte replacement, more than it covers)
/// or, for special tokens that decode to nothing, its spelling, which a prompt may contain.
/// Normalization can shrink text before it is split: Unicode composition at most threefold
/// (Hangul jamo), so NFC and NFKC triple the bound; a normalizer that may delete text
/// (accent stripping, replacements) leaves no bound.
fn text_bytes_per_token(tokenizer: &TextTokenizer) -> Option<usize> {
    use tokenizers::NormalizerWrapper as N;
    let shrink = match tokenizer.inner().get_normalizer() {
        None => 1,
        Some(N::NFC(_) | N::NFKC(_)) => 3,
        Some(_) => return None,
    };
    let longest = (0..tokenizer.vocab_size() as u32)
        .map(|id| match tokenizer.decode(&[id]) {
            Ok(text) if !text.is_empty() => text.len(),
            _ => tokenizer.id_to_token(id).map_or(0, |t| t.len()),
        })
        .max()
        .unwrap_or(1);
    // One more byte: decoding a lone token may drop a leading space the text holds
    // (SentencePiece's `▁`).
    Some(shrink * (longest + 1))
}

impl ServedModel {
    pub(crate) fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.name.clone(),
            tokenizer: Arc::new(self.tokenizer.clone()),
            context_length: self.model.config().context_length,
            text_bytes_per_token: text_bytes_per_token(&self.tokenizer),
            num_layers: self.model.num_layers(),
            hidden_size: self.model.config().hidden_size,
            draft: self.drafter.as_ref().map(|d| d.name()),
            lookahead: self.lookahead.clone(),
            exit_layers: self.exit_adapters.as_ref().map(|a| a.card.layers.clone()),
            exit_classifiers: self
                .exit_adapters
                .as_ref()
                .is_some_and(|a| a.classifiers().is_some()),
        }
    }
}
