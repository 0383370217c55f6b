//! The engine: one thread that owns the model and decodes every admitted request, a step at
//! a time, so the async HTTP side never waits on model work.
//!
//! Each step samples one token for every plain sequence and feeds them all through the model
//! in one batched forward (each linear layer reads its weights once for all rows). Requests
//! that asked for speculative decoding or per-token early exit take their own forward in the
//! same step, so every kind of request progresses together.

use crate::metrics::{add, Metrics};
use crate::stop::{StopCheck, StopMatcher};
use candle_core::Tensor;
use dynexec_core::tokenizer::{TextTokenizer, TokenStream};
use dynexec_core::{Error, Result};
use dynexec_engine::{batch_rows, BatchMember, Sequence, Strategy};
pub use dynexec_engine::{EarlyExitReport, SpeculativeReport};
use dynexec_exit::token_exit::{ExitAdapters, TokenExitPolicy};
use dynexec_models::generation::GenerateOptions;
use dynexec_models::llama::Llama;
use dynexec_spec::drafter::Drafter;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
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
    /// The model's decoder layers.
    pub num_layers: usize,
    /// The draft's name, when the server can decode speculatively.
    pub draft: Option<String>,
    /// The default lookahead of speculative requests.
    pub lookahead: String,
    /// The layers with exit adapters, when the server can exit early.
    pub exit_layers: Option<Vec<usize>>,
}

/// How many sequences decode together and how many requests may wait.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together; 1 serves requests one at a time.
    pub max_batch: usize,
    /// Requests waiting for a slot before new ones are refused (HTTP 503).
    pub max_queue: usize,
    /// Speculative sequences draft only while at most this many sequences are active.
    pub spec_max_batch: usize,
}

/// Dynamic execution chosen for one request.
#[derive(Debug, Clone, Default)]
pub struct Dynamic {
    /// Decode speculatively with the server's draft and this lookahead.
    pub speculative: Option<String>,
    /// Let each token leave at an exit layer under this policy.
    pub early_exit: Option<TokenExitPolicy>,
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
    metrics: Arc<Metrics>,
    abort: Arc<AtomicBool>,
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
        let thread = {
            let (metrics, abort) = (metrics.clone(), abort.clone());
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
                    Scheduler::new(&served, config, metrics, abort).run(queue);
                })
                .map_err(|e| format!("starting the engine thread: {e}"))?
        };
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok(Self {
                jobs: Some(jobs),
                info,
                metrics,
                abort,
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
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl ServedModel {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.name.clone(),
            tokenizer: Arc::new(self.tokenizer.clone()),
            context_length: self.model.config().context_length,
            num_layers: self.model.num_layers(),
            draft: self.drafter.as_ref().map(|d| d.name()),
            lookahead: self.lookahead.clone(),
            exit_layers: self.exit_adapters.as_ref().map(|a| a.card.layers.clone()),
        }
    }
}

/// A sequence being decoded for one request.
struct Active<'m> {
    events: UnboundedSender<Event>,
    /// Decodes with the request's strategy; plain ones share a batched forward.
    decoder: Sequence<'m>,
    tokenizer: &'m TextTokenizer,
    stream: TokenStream<'m>,
    stops: StopMatcher,
    options: GenerateOptions,
    /// Prompt and generated tokens (the sampler's repetition-penalty history).
    tokens: Vec<u32>,
    prompt_tokens: usize,
    context: usize,
    received: Instant,
    queue_secs: f64,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

impl Active<'_> {
    /// Tokens generated so far (all of `tokens` after the prompt).
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_tokens
    }
}

/// What emitting a token led to.
enum Outcome {
    Continue,
    Finished(FinishReason),
    /// The client went away.
    Cancelled,
    /// An error, already sent to the client.
    Failed,
}

struct Scheduler<'m> {
    served: &'m ServedModel,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    abort: Arc<AtomicBool>,
    active: Vec<Active<'m>>,
}

impl<'m> Scheduler<'m> {
    fn new(
        served: &'m ServedModel,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        abort: Arc<AtomicBool>,
    ) -> Self {
        Self {
            served,
            config,
            metrics,
            abort,
            active: Vec::new(),
        }
    }

    fn run(mut self, queue: Receiver<Job>) {
        let mut open = true;
        loop {
            while open && self.active.len() < self.config.max_batch.max(1) {
                // Idle, the engine sleeps until a job comes; busy, it only takes waiting ones.
                let job = if self.active.is_empty() {
                    queue.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    queue.try_recv()
                };
                match job {
                    Ok(job) => {
                        self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                        self.admit(job);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if self.active.is_empty() {
                if open {
                    continue;
                }
                return;
            }
            if self.abort.load(Ordering::Relaxed) {
                for seq in self.active.drain(..) {
                    add(&self.metrics.requests_failed, 1);
                    let _ = seq.events.send(Event::Ended(
                        "the server is shutting down and ended this generation before it finished"
                            .to_string(),
                    ));
                }
                continue;
            }
            self.step();
        }
    }

    /// Prefills a job's prompt and emits its first token.
    fn admit(&mut self, job: Job) {
        if job.events.is_closed() {
            add(&self.metrics.requests_cancelled, 1);
            return;
        }
        if self.abort.load(Ordering::Relaxed) {
            add(&self.metrics.requests_failed, 1);
            let _ = job.events.send(Event::Ended(
                "the server is shutting down and did not start this generation".to_string(),
            ));
            return;
        }
        let queue_secs = job.received.elapsed().as_secs_f64();
        self.metrics.queue_wait.observe(queue_secs);
        add(&self.metrics.prompt_tokens, job.prompt_ids.len() as u64);
        let events = job.events.clone();
        match self.prefill(job, queue_secs) {
            Ok((mut seq, first)) => match emit(&mut seq, &[first]) {
                Outcome::Continue => self.active.push(seq),
                outcome => finish(&self.metrics, seq, outcome, self.active.len() + 1),
            },
            Err(e) => {
                add(&self.metrics.requests_failed, 1);
                let _ = events.send(Event::Failed(e));
            }
        }
    }

    fn prefill(&self, job: Job, queue_secs: f64) -> Result<(Active<'m>, u32)> {
        let served = self.served;
        let model = &served.model;
        let prompt = &job.prompt_ids;
        dynexec_models::generation::check_prompt(model, prompt, &job.options)?;
        let strategy = match (&job.dynamic.speculative, job.dynamic.early_exit) {
            (Some(lookahead), _) => {
                let drafter = served.drafter.as_ref().ok_or_else(|| {
                    Error::InvalidArgument("this server has no draft: speculative decoding needs a server started with a draft model".into())
                })?;
                Strategy::Speculative {
                    drafter: drafter.fresh(),
                    lookahead: dynexec_spec::lookahead::parse(lookahead)?,
                }
            }
            (None, Some(policy)) => {
                let adapters = served.exit_adapters.as_ref().ok_or_else(|| {
                    Error::InvalidArgument(
                        "this server has no exit adapters: early exit needs a server started with them".into(),
                    )
                })?;
                Strategy::EarlyExit { adapters, policy }
            }
            (None, None) => Strategy::Plain,
        };
        let (decoder, first) = Sequence::start(model, strategy, prompt, &job.options)?;
        let seq = Active {
            events: job.events,
            decoder,
            tokenizer: &served.tokenizer,
            stream: TokenStream::new(&served.tokenizer),
            stops: StopMatcher::new(job.stop),
            tokens: job.prompt_ids.clone(),
            prompt_tokens: job.prompt_ids.len(),
            context: model.config().context_length,
            options: job.options,
            received: job.received,
            queue_secs,
            first_token_at: None,
            last_token_at: None,
        };
        Ok((seq, first))
    }

    /// One token (or, speculatively, one verified run of tokens) for every active sequence.
    /// Plain sequences' last tokens and speculative sequences' last tokens with their drafts
    /// go through the target in one forward (each sequence a run of rows); early-exit ones
    /// step themselves. Above `spec_max_batch` active sequences nobody drafts this step:
    /// a batch that large already keeps the weights busy, and extra rows would cost more
    /// than they save (vLLM's `speculative_disable_by_batch_size`).
    fn step(&mut self) {
        let model = &self.served.model;
        let speculate = self.active.len() <= self.config.spec_max_batch;
        if !speculate && self.active.iter().any(|s| s.decoder.is_speculative()) {
            add(&self.metrics.speculation_disabled_steps, 1);
        }
        let counts_before: Vec<_> = self
            .active
            .iter()
            .map(|s| s.decoder.draft_counts())
            .collect();
        // Rows for the shared forward, drafted together where sequences share a draft model.
        let gone: Vec<bool> = self.active.iter().map(|s| s.events.is_closed()).collect();
        let prepared = {
            let mut members: Vec<BatchMember<'_, '_>> = self
                .active
                .iter_mut()
                .zip(&gone)
                .filter(|(_, gone)| !**gone)
                .map(|(seq, _)| BatchMember {
                    // Never draft past max_tokens: a verification adds one token of its own.
                    max_drafts: seq.options.max_tokens.saturating_sub(seq.generated() + 1),
                    sequence: &mut seq.decoder,
                    history: &seq.tokens,
                })
                .collect();
            batch_rows(&mut members, speculate)
        };
        let mut prepared = prepared.into_iter();
        // Per sequence: in the shared forward, stepping itself, failed while drafting, or gone.
        let mut plans: Vec<Plan> = Vec::with_capacity(self.active.len());
        let mut segments: Vec<Vec<u32>> = Vec::new();
        let mut caches = Vec::new();
        for (seq, gone) in self.active.iter_mut().zip(gone) {
            if gone {
                plans.push(Plan::Gone);
                continue;
            }
            match prepared.next() {
                Some(Ok(Some(rows))) => match seq.decoder.batch_cache() {
                    Some(cache) => {
                        plans.push(Plan::Batched(rows.len()));
                        segments.push(rows);
                        caches.push(cache);
                    }
                    None => plans.push(Plan::Own),
                },
                Some(Ok(None)) => plans.push(Plan::Own),
                Some(Err(e)) => plans.push(Plan::Failed(e)),
                None => plans.push(Plan::Failed(Error::InvalidArgument(
                    "a sequence was not prepared for the step".into(),
                ))),
            }
        }
        let batch_size = segments.len();
        let batch_logits: Result<Tensor> = if batch_size == 0 {
            Err(Error::InvalidArgument("no sequence is in the batch".into()))
        } else {
            let runs: Vec<&[u32]> = segments.iter().map(Vec::as_slice).collect();
            model.forward_segments(&runs, &mut caches)
        };
        drop(caches);
        if batch_size > 0 {
            self.metrics.batch_size.observe(batch_size as f64);
        }
        let mut first_row = 0;
        let mut outcomes = Vec::with_capacity(self.active.len());
        for ((seq, plan), before) in self.active.iter_mut().zip(plans).zip(counts_before) {
            let next = match plan {
                Plan::Gone => {
                    outcomes.push(Outcome::Cancelled);
                    continue;
                }
                Plan::Own => {
                    let max_drafts = seq.options.max_tokens.saturating_sub(seq.generated() + 1);
                    seq.decoder.step(&seq.tokens, max_drafts)
                }
                Plan::Failed(e) => Err(e),
                Plan::Batched(rows) => {
                    let start = first_row;
                    first_row += rows;
                    match &batch_logits {
                        Ok(all) => all
                            .narrow(0, start, rows)
                            .map_err(Error::from)
                            .and_then(|logits| seq.decoder.take_rows(&logits, &seq.tokens)),
                        Err(e) => Err(Error::InvalidArgument(format!(
                            "batched decoding failed: {e}"
                        ))),
                    }
                }
            };
            let after = seq.decoder.draft_counts();
            add(&self.metrics.drafts, (after.0 - before.0) as u64);
            add(&self.metrics.draft_proposed, (after.1 - before.1) as u64);
            add(&self.metrics.draft_accepted, (after.2 - before.2) as u64);
            outcomes.push(match next {
                Ok(tokens) => emit(seq, &tokens),
                Err(e) => {
                    add(&self.metrics.requests_failed, 1);
                    let _ = seq.events.send(Event::Failed(e));
                    Outcome::Failed
                }
            });
        }
        // Retire finished and cancelled sequences, keeping the order of the others.
        let batch_total = self.active.len();
        let mut kept = Vec::with_capacity(batch_total);
        for (seq, outcome) in self.active.drain(..).zip(outcomes) {
            match outcome {
                Outcome::Continue => kept.push(seq),
                outcome => finish(&self.metrics, seq, outcome, batch_total),
            }
        }
        self.active = kept;
        self.metrics
            .active_sequences
            .store(self.active.len() as u64, Ordering::Relaxed);
    }
}

/// How a sequence takes part in a step.
enum Plan {
    /// Its rows (this many) are in the shared forward.
    Batched(usize),
    /// It steps itself (early exit).
    Own,
    /// Drafting failed.
    Failed(Error),
    /// Its client went away.
    Gone,
}

/// Hands `tokens` to the client, stopping at end-of-sequence, a stop string, `max_tokens` or
/// the end of the context. No tokens means the client has gone.
fn emit(seq: &mut Active<'_>, tokens: &[u32]) -> Outcome {
    if tokens.is_empty() || seq.events.is_closed() {
        return Outcome::Cancelled;
    }
    for &token in tokens {
        let now = Instant::now();
        seq.first_token_at.get_or_insert(now);
        if seq.options.stop_at_eos && seq.tokenizer.is_eos(token) {
            return Outcome::Finished(FinishReason::Stop);
        }
        seq.tokens.push(token);
        seq.last_token_at = Some(now);
        let piece = match seq.stream.push(token) {
            Ok(piece) => piece,
            Err(e) => {
                let _ = seq.events.send(Event::Failed(e));
                return Outcome::Cancelled;
            }
        };
        if let Some(piece) = piece {
            let (text, stopped) = match seq.stops.push(&piece) {
                StopCheck::Continue(t) => (t, false),
                StopCheck::Stop(t) => (t, true),
            };
            if !text.is_empty() && seq.events.send(Event::Text(text)).is_err() {
                return Outcome::Cancelled;
            }
            if stopped {
                return Outcome::Finished(FinishReason::Stop);
            }
        }
        if seq.generated() >= seq.options.max_tokens || seq.tokens.len() >= seq.context {
            return Outcome::Finished(FinishReason::Length);
        }
    }
    Outcome::Continue
}

/// Sends the rest of a finished sequence's text and its summary, and records its metrics.
fn finish(metrics: &Metrics, mut seq: Active<'_>, outcome: Outcome, batch_size: usize) {
    let generated = seq.generated();
    add(&metrics.generated_tokens, generated as u64);
    let finish_reason = match outcome {
        Outcome::Finished(reason) => reason,
        Outcome::Cancelled => {
            add(&metrics.requests_cancelled, 1);
            return;
        }
        Outcome::Continue | Outcome::Failed => return,
    };
    // Text held back for a possible stop string (or an incomplete character) is released,
    // unless a stop string ended the text.
    let mut rest = String::new();
    if let Ok(Some(piece)) = seq.stream.finish() {
        let (StopCheck::Continue(t) | StopCheck::Stop(t)) = seq.stops.push(&piece);
        rest.push_str(&t);
    }
    rest.push_str(&seq.stops.finish());
    if !rest.is_empty() && seq.events.send(Event::Text(rest)).is_err() {
        add(&metrics.requests_cancelled, 1);
        return;
    }
    let ttft = seq
        .first_token_at
        .map_or(0.0, |t| t.duration_since(seq.received).as_secs_f64());
    metrics.ttft.observe(ttft);
    if let (Some(first), Some(last), true) = (seq.first_token_at, seq.last_token_at, generated > 1)
    {
        let per_token = last.duration_since(first).as_secs_f64() / (generated - 1) as f64;
        metrics.time_per_output_token.observe(per_token);
    }
    metrics
        .request_duration
        .observe(seq.received.elapsed().as_secs_f64());
    let dynexec_engine::DecodeReport {
        speculative,
        early_exit,
    } = seq.decoder.report();
    if let Some(e) = &early_exit {
        add(&metrics.early_exit_tokens, e.exit_layers.len() as u64);
        add(
            &metrics.early_exit_layers,
            e.exit_layers.iter().sum::<usize>() as u64,
        );
    }
    let summary = Summary {
        finish_reason,
        usage: Usage {
            prompt_tokens: seq.prompt_tokens,
            completion_tokens: generated,
            total_tokens: seq.prompt_tokens + generated,
        },
        report: DynamicReport {
            batch_size,
            queue_ms: seq.queue_secs * 1000.0,
            ttft_ms: ttft * 1000.0,
            speculative,
            early_exit,
        },
    };
    // Counted before sending, so a client that reads /metrics after its answer sees it.
    if seq.events.is_closed() {
        add(&metrics.requests_cancelled, 1);
    } else {
        add(&metrics.requests_ok, 1);
        let _ = seq.events.send(Event::Finished(summary));
    }
}
