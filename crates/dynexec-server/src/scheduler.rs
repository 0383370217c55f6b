//! The engine thread's loop: admit waiting jobs into free slots, then run one step for every
//! slot, until the queue closes.
//!
//! A step is one forward of the model shared by every sequence (each linear layer reads its
//! weights once for all rows). Decoding sequences put in their last token (speculative ones
//! also their drafts); prefilling ones put in the next piece of their prompt. Decoding rows
//! go first, then prompt pieces while the step's token budget lasts, rows counted at their
//! cost ([`crate::prefill`]: deep rows cost more) and at least one piece a step (so a step
//! runs at most the decoding rows plus one budget), shortest prompt first (a piece that has
//! waited a few steps goes ahead). So a long prompt advances a piece per step instead of
//! freezing everyone for its whole prefill, and a short request that arrives meanwhile waits
//! for one piece, not for the long prompt. A prompt is always cut at the same places,
//! whatever else the server is doing.
//! Early-exit sequences decode in their own forwards.

use crate::engine::{
    DynamicReport, EngineConfig, EngineStatus, Event, FinishReason, Job, PromptTokensDetails,
    ServedModel, Summary, Usage,
};
use crate::metrics::{add, Metrics};
use crate::prefill::PieceCost;
use crate::stop::{StopCheck, StopMatcher};
use crate::traces::{bytes_needed, Reservation, TraceReport, TraceStore};
use candle_core::Tensor;
use dynexec_core::tokenizer::{TextTokenizer, TokenStream};
use dynexec_core::trace::Trace;
use dynexec_core::{Error, Result};
use dynexec_engine::{batch_rows, BatchMember, CachedPrefix, Sequence, Strategy};
use dynexec_models::generation::{check_prompt, GenerateOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Steps a prompt piece may be passed over for shorter ones before it goes first.
const MAX_SKIPPED_STEPS: usize = 4;

/// A sequence being prefilled or decoded for one request.
struct Active<'m> {
    events: UnboundedSender<Event>,
    /// Decodes with the request's strategy; plain and speculative ones share the forward.
    decoder: Sequence<'m>,
    tokenizer: &'m TextTokenizer,
    stream: TokenStream<'m>,
    stops: StopMatcher,
    options: GenerateOptions,
    /// Prompt and generated tokens (the sampler's penalty history).
    tokens: Vec<u32>,
    prompt_tokens: usize,
    /// Prompt tokens already in the cache; the sequence decodes once all are.
    prefilled: usize,
    /// Prompt tokens that came from a cached prefix.
    cached_tokens: usize,
    /// The request's prefix-cache scope, which the cache it leaves keeps.
    cache_scope: u64,
    /// Steps in a row its next prompt piece was passed over.
    skipped: usize,
    context: usize,
    received: Instant,
    queue_secs: f64,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    /// The residual stream of every position the cache holds, when the request asked for it
    /// ([`crate::traces`]).
    trace: Option<Recording>,
}

/// A trace being recorded: the states, the name its files get, and the memory reserved for
/// it under the server's trace quota (given back when it is saved or dropped).
struct Recording {
    trace: Trace,
    name: String,
    _reserved: Reservation,
}

impl Active<'_> {
    /// Tokens generated so far (all of `tokens` after the prompt).
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_tokens
    }

    fn is_decoding(&self) -> bool {
        self.prefilled == self.prompt_tokens
    }

    /// The most tokens a speculative step may draft: a verification adds one of its own.
    fn max_drafts(&self) -> usize {
        self.options.max_tokens.saturating_sub(self.generated() + 1)
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

/// How a sequence takes part in a step.
enum Plan {
    /// Its decoding rows (this many) are in the shared forward.
    Batched(usize),
    /// It decodes in its own forward (early exit).
    Own,
    /// Its next prompt piece (this many tokens) is in the shared forward; `last` when it
    /// ends the prompt (its last row's logits give the first token).
    Prefill { len: usize, last: bool },
    /// Its prompt piece waits for a later step.
    Waiting,
    /// Drafting failed.
    Failed(Error),
    /// Its client went away.
    Gone,
}

pub(crate) struct Scheduler<'m> {
    served: &'m ServedModel,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    abort: Arc<AtomicBool>,
    status: Arc<EngineStatus>,
    active: Vec<Active<'m>>,
    cost: PieceCost,
    /// Caches finished plain sequences left, oldest first, each with the cache scope of the
    /// request that left it. With the active sequences' they never number more than
    /// `max_batch`, so prefix caching costs no more memory than full slots do.
    prefixes: Vec<(u64, CachedPrefix)>,
}

impl<'m> Scheduler<'m> {
    pub(crate) fn new(
        served: &'m ServedModel,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        abort: Arc<AtomicBool>,
        status: Arc<EngineStatus>,
    ) -> Self {
        Self {
            served,
            config,
            metrics,
            abort,
            status,
            active: Vec::new(),
            cost: PieceCost::for_model(served.model.config()),
            prefixes: Vec::new(),
        }
    }

    pub(crate) fn run(mut self, queue: Receiver<Job>) {
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
                self.publish_gauges();
                continue;
            }
            self.status.step_begins();
            self.step();
            self.status.step_ends();
            self.publish_gauges();
        }
    }

    fn publish_gauges(&self) {
        let prefilling = self.active.iter().filter(|s| !s.is_decoding()).count();
        self.metrics
            .active_sequences
            .store(self.active.len() as u64, Ordering::Relaxed);
        self.metrics
            .prefilling_sequences
            .store(prefilling as u64, Ordering::Relaxed);
        // Positions held in the slots' KV caches (a sequence's last token is not cached yet).
        let cached: usize = self
            .active
            .iter()
            .map(|s| s.prefilled + s.generated().saturating_sub(1))
            .chain(self.prefixes.iter().map(|(_, p)| p.tokens().len()))
            .sum();
        let capacity = self.config.max_batch.max(1) * self.served.model.config().context_length;
        self.metrics
            .kv_cache_tokens
            .store(cached as u64, Ordering::Relaxed);
        self.metrics
            .kv_cache_capacity
            .store(capacity as u64, Ordering::Relaxed);
    }

    /// Gives a job a slot; its prompt is prefilled by the steps that follow.
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
        let started = self.recording(&job).and_then(|recording| {
            self.sequence(&job)
                .map(|(decoder, reuse)| (decoder, reuse, recording))
        });
        match started {
            Ok((decoder, reuse, recording)) => {
                let served = self.served;
                let cached_tokens = reuse.unwrap_or(0);
                if reuse.is_some() {
                    let looked_up = job.prompt_ids.len() as u64;
                    add(&self.metrics.prefix_cache_queries, looked_up);
                    add(&self.metrics.prefix_cache_hits, cached_tokens as u64);
                }
                self.active.push(Active {
                    decoder,
                    tokenizer: &served.tokenizer,
                    stream: TokenStream::new(&served.tokenizer),
                    stops: StopMatcher::new(job.stop),
                    prompt_tokens: job.prompt_ids.len(),
                    cache_scope: job.dynamic.cache_scope,
                    tokens: job.prompt_ids,
                    prefilled: cached_tokens,
                    cached_tokens,
                    skipped: 0,
                    context: served.model.config().context_length,
                    options: job.options,
                    events: job.events,
                    received: job.received,
                    queue_secs,
                    first_token_at: None,
                    last_token_at: None,
                    trace: recording,
                });
                self.bound_prefixes();
                self.publish_gauges();
            }
            Err(e) => {
                add(&self.metrics.requests_failed, 1);
                let _ = job.events.send(Event::Failed(e));
            }
        }
    }

    /// The trace a job asked for, with memory reserved for it under the server's trace quota
    /// (which bounds what traces being recorded hold, as it bounds the folder).
    fn recording(&self, job: &Job) -> Result<Option<Recording>> {
        let Some(request) = &job.dynamic.trace else {
            return Ok(None);
        };
        let store = self.config.traces.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this server saves no traces: start it with `dynexec serve --trace-dir DIR`".into(),
            )
        })?;
        let positions = job.prompt_ids.len() + job.options.max_tokens;
        let hidden = self.served.model.config().hidden_size;
        let reserved = store.reserve(bytes_needed(request.layers.len(), positions, hidden))?;
        Ok(Some(Recording {
            trace: Trace::new(request.layers.iter().copied()),
            name: request.name.clone(),
            _reserved: reserved,
        }))
    }

    /// Drops the oldest cached prefixes while they and the active sequences would hold
    /// more than `max_batch` caches.
    fn bound_prefixes(&mut self) {
        let room = self
            .config
            .max_batch
            .max(1)
            .saturating_sub(self.active.len());
        if self.prefixes.len() > room {
            self.prefixes.drain(..self.prefixes.len() - room);
        }
    }

    /// The cached prefix of `scope` that serves the most of `prompt` (on a tie, the one that
    /// loses the fewest cached tokens), taken out of the pool. As llama-server does with its
    /// slots, a cache that would lose more than half of what it holds is left for the
    /// conversation it belongs to while there is room for a fresh one.
    fn take_prefix(&mut self, scope: u64, prompt: &[u32]) -> Option<CachedPrefix> {
        let (best, reusable, held) = self
            .prefixes
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| *s == scope)
            .map(|(i, (_, p))| (i, p.reusable(prompt), p.tokens().len()))
            .max_by_key(|&(i, n, held)| (n, std::cmp::Reverse(held), i))?;
        let room = self.active.len() + self.prefixes.len() < self.config.max_batch.max(1);
        if reusable == 0 || (2 * reusable < held && room) {
            return None;
        }
        Some(self.prefixes.remove(best).1)
    }

    /// The job's sequence with its strategy, and, for a sequence that looked for a cached
    /// prefix (plain ones, when the request and the server allow), how many prompt tokens
    /// came from one.
    fn sequence(&mut self, job: &Job) -> Result<(Sequence<'m>, Option<usize>)> {
        let served = self.served;
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
        // A traced sequence computes its whole prompt, so its trace covers every position.
        let reusing = matches!(strategy, Strategy::Plain)
            && job.dynamic.trace.is_none()
            && job.dynamic.cache_prompt
            && self.config.prefix_cache;
        if reusing {
            // Checked before a cache is taken, so a refused prompt costs no one theirs.
            check_prompt(&served.model, &job.prompt_ids, &job.options)?;
            if let Some(prefix) = self.take_prefix(job.dynamic.cache_scope, &job.prompt_ids) {
                let (sequence, reused) =
                    Sequence::resume(&served.model, &job.prompt_ids, &job.options, prefix)?;
                return Ok((sequence, Some(reused)));
            }
        }
        let sequence = Sequence::new(&served.model, strategy, &job.prompt_ids, &job.options)?;
        Ok((sequence, reusing.then_some(0)))
    }

    /// Which prefilling sequences put a prompt piece into this step, and how long: pieces
    /// that waited too long first, then the shortest remaining prompts, while the budget
    /// left after the decoding rows (`decode_cost`) lasts, counting rows at their cost
    /// ([`PieceCost`]); at least one piece goes, so prefill always progresses. A piece is the
    /// longest that a whole budget allows at its depth, so a prompt is cut at the same places
    /// whatever else runs.
    fn choose_pieces(&self, decode_cost: f64, gone: &[bool]) -> Vec<Option<usize>> {
        let budget = self.config.step_tokens.max(1) as f64;
        let mut waiting: Vec<usize> = (0..self.active.len())
            .filter(|&i| !gone[i] && !self.active[i].is_decoding())
            .collect();
        // Pieces that waited too long go first, the longest-waiting first; then the shortest
        // remaining prompts.
        waiting.sort_by_key(|&i| {
            let seq = &self.active[i];
            if seq.skipped >= MAX_SKIPPED_STEPS {
                (0, usize::MAX - seq.skipped)
            } else {
                (1, seq.prompt_tokens - seq.prefilled)
            }
        });
        let mut left = budget - decode_cost;
        let mut pieces = vec![None; self.active.len()];
        let mut any = false;
        for i in waiting {
            let seq = &self.active[i];
            let len = self
                .cost
                .piece_len(seq.prefilled, seq.prompt_tokens - seq.prefilled, budget);
            let cost = self.cost.cost(seq.prefilled, len);
            if cost <= left || !any {
                pieces[i] = Some(len);
                left -= cost;
                any = true;
            }
        }
        pieces
    }

    /// One step: a token (or a verified run of tokens) for every decoding sequence and a
    /// prompt piece for prefilling ones, in one forward ([`Self`]'s module explains the
    /// order). Above `spec_max_batch` decoding sequences nobody drafts this step: a batch
    /// that large already keeps the weights busy, and extra rows would cost more than they
    /// save (vLLM's `speculative_disable_by_batch_size`).
    fn step(&mut self) {
        let decoding = self.active.iter().filter(|s| s.is_decoding()).count();
        let speculate = decoding <= self.config.spec_max_batch;
        if !speculate
            && self
                .active
                .iter()
                .any(|s| s.is_decoding() && s.decoder.is_speculative())
        {
            add(&self.metrics.speculation_disabled_steps, 1);
        }
        let counts_before: Vec<_> = self
            .active
            .iter()
            .map(|s| s.decoder.draft_counts())
            .collect();
        let gone: Vec<bool> = self.active.iter().map(|s| s.events.is_closed()).collect();
        // Decoding rows, drafted together where sequences share a draft model.
        let prepared = {
            let mut members: Vec<BatchMember<'_, '_>> = self
                .active
                .iter_mut()
                .zip(&gone)
                .filter(|(seq, gone)| !**gone && seq.is_decoding())
                .map(|(seq, _)| BatchMember {
                    max_drafts: seq.max_drafts(),
                    sequence: &mut seq.decoder,
                    history: &seq.tokens,
                })
                .collect();
            batch_rows(&mut members, speculate)
        };
        let decoding_depths = self
            .active
            .iter()
            .zip(&gone)
            .filter(|(seq, gone)| !**gone && seq.is_decoding())
            .map(|(seq, _)| seq.tokens.len() - 1);
        let decode_cost: f64 = prepared
            .iter()
            .zip(decoding_depths)
            .map(|(rows, depth)| match rows {
                Ok(Some(rows)) => self.cost.cost(depth, rows.len()),
                _ => 0.0,
            })
            .sum();
        let pieces = self.choose_pieces(decode_cost, &gone);
        let mut prepared = prepared.into_iter();
        // Per sequence, its plan; for the shared forward, its rows and cache.
        let mut plans: Vec<Plan> = Vec::with_capacity(self.active.len());
        let mut segments: Vec<Vec<u32>> = Vec::new();
        let mut caches = Vec::new();
        let mut traces: Vec<Option<&mut Trace>> = Vec::new();
        for ((seq, gone), piece) in self.active.iter_mut().zip(gone).zip(pieces) {
            if gone {
                plans.push(Plan::Gone);
                continue;
            }
            if !seq.is_decoding() {
                match piece {
                    Some(len) => {
                        let start = seq.prefilled;
                        segments.push(seq.tokens[start..start + len].to_vec());
                        caches.push(seq.decoder.prompt_cache());
                        traces.push(seq.trace.as_mut().map(|r| &mut r.trace));
                        plans.push(Plan::Prefill {
                            len,
                            last: start + len == seq.prompt_tokens,
                        });
                    }
                    None => plans.push(Plan::Waiting),
                }
                continue;
            }
            match prepared.next() {
                Some(Ok(Some(rows))) => match seq.decoder.batch_cache() {
                    Some(cache) => {
                        plans.push(Plan::Batched(rows.len()));
                        segments.push(rows);
                        caches.push(cache);
                        traces.push(seq.trace.as_mut().map(|r| &mut r.trace));
                    }
                    None => plans.push(Plan::Own),
                },
                Some(Ok(None)) => plans.push(Plan::Own),
                Some(Err(e)) => plans.push(Plan::Failed(e)),
                None => plans.push(Plan::Failed(internal(
                    "a sequence was not prepared for the step".into(),
                ))),
            }
        }
        // Logits are needed for decoding rows and for the last row of a prompt's last piece.
        let mut wanted: Vec<u32> = Vec::new();
        let mut row = 0;
        for plan in &plans {
            match *plan {
                Plan::Batched(rows) => {
                    wanted.extend(row as u32..(row + rows) as u32);
                    row += rows;
                }
                Plan::Prefill { len, last } => {
                    if last {
                        wanted.push((row + len - 1) as u32);
                    }
                    row += len;
                }
                _ => {}
            }
        }
        let in_forward = segments.len();
        let logits: Result<Option<Tensor>> = if in_forward == 0 {
            Ok(None)
        } else {
            let runs: Vec<&[u32]> = segments.iter().map(Vec::as_slice).collect();
            shared_forward(self.served, &runs, &mut caches, &mut traces, &wanted)
        };
        drop(caches);
        drop(traces);
        if in_forward > 0 {
            self.metrics.batch_size.observe(in_forward as f64);
        }
        let mut next_row = 0;
        let mut outcomes = Vec::with_capacity(self.active.len());
        for ((seq, plan), before) in self.active.iter_mut().zip(plans).zip(counts_before) {
            let rows_of = |count: usize, next_row: &mut usize| -> Result<Tensor> {
                let start = *next_row;
                *next_row += count;
                match &logits {
                    Ok(Some(all)) => Ok(all.narrow(0, start, count)?),
                    Ok(None) => Err(internal(
                        "the shared forward computed no logits for this sequence".into(),
                    )),
                    Err(e) => Err(internal(format!("the batched forward failed: {e}"))),
                }
            };
            let next = match plan {
                Plan::Gone => {
                    outcomes.push(Outcome::Cancelled);
                    continue;
                }
                Plan::Waiting => {
                    seq.skipped += 1;
                    outcomes.push(Outcome::Continue);
                    continue;
                }
                Plan::Prefill { len, last } => {
                    seq.skipped = 0;
                    seq.prefilled += len;
                    add(&self.metrics.prompt_tokens, len as u64);
                    add(&self.metrics.prefill_pieces, 1);
                    // Its logits row is taken first, so the rows after it stay in step
                    // whatever happens next.
                    let row = last.then(|| rows_of(1, &mut next_row));
                    let prefilled = seq.prefilled;
                    let drafted = match &logits {
                        Ok(_) => seq.decoder.prefill_draft(prefilled),
                        Err(e) => Err(internal(format!("the batched forward failed: {e}"))),
                    };
                    match (drafted, row) {
                        (Err(e), _) => Err(e),
                        (Ok(()), None) => {
                            outcomes.push(Outcome::Continue);
                            continue;
                        }
                        (Ok(()), Some(row)) => row.and_then(|row| {
                            let row = row.squeeze(0)?;
                            seq.decoder.begin(&row, &seq.tokens).map(|t| vec![t])
                        }),
                    }
                }
                Plan::Own => seq.decoder.step(&seq.tokens, seq.max_drafts()),
                Plan::Failed(e) => Err(e),
                Plan::Batched(rows) => rows_of(rows, &mut next_row)
                    .and_then(|logits| seq.decoder.take_rows(&logits, &seq.tokens))
                    .and_then(|tokens| {
                        // The cache now holds the history and the new tokens but the last;
                        // rows for rejected drafts leave the trace as they left the cache.
                        if let Some(recording) = &mut seq.trace {
                            let held = seq.tokens.len() + tokens.len() - 1;
                            if recording.trace.positions() > held {
                                recording.trace.truncate(held)?;
                            }
                        }
                        Ok(tokens)
                    }),
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
                outcome => {
                    let scope = seq.cache_scope;
                    let traces = self.config.traces.as_ref();
                    let kept = finish(
                        &self.metrics,
                        traces,
                        &self.served.name,
                        seq,
                        outcome,
                        batch_total,
                    );
                    if let Some(prefix) = kept.filter(|_| self.config.prefix_cache) {
                        self.prefixes.push((scope, prefix));
                    }
                }
            }
        }
        self.active = kept;
        self.bound_prefixes();
    }
}

/// A failure of the engine, not of the request (reported as a server error).
fn internal(message: String) -> Error {
    Error::Candle(candle_core::Error::Msg(message))
}

/// The shared forward: every run of rows on its own cache, then the head on the `wanted`
/// rows only (a prompt piece needs no logits, the last piece only its last row's), as
/// `(wanted, vocab)`; `None` when no row is wanted.
fn shared_forward(
    served: &ServedModel,
    runs: &[&[u32]],
    caches: &mut [&mut dynexec_models::kv_cache::KvCache],
    traces: &mut [Option<&mut Trace>],
    wanted: &[u32],
) -> Result<Option<Tensor>> {
    let model = &served.model;
    let hidden = model.hidden_segments_traced(runs, caches, traces)?;
    if wanted.is_empty() {
        return Ok(None);
    }
    let rows = Tensor::new(wanted, hidden.device())?;
    let picked = hidden.index_select(&rows, 1)?;
    Ok(Some(model.head(&picked)?.squeeze(0)?))
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
                return Outcome::Failed;
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
/// Ends a sequence: its summary goes to its client, and its cache, when it can serve a
/// later prompt, comes back.
fn finish(
    metrics: &Metrics,
    traces: Option<&TraceStore>,
    model_name: &str,
    mut seq: Active<'_>,
    outcome: Outcome,
    batch_size: usize,
) -> Option<CachedPrefix> {
    let generated = seq.generated();
    add(&metrics.generated_tokens, generated as u64);
    let finish_reason = match outcome {
        Outcome::Finished(reason) => reason,
        Outcome::Cancelled => {
            add(&metrics.requests_cancelled, 1);
            return seq.decoder.into_prefix(&seq.tokens);
        }
        Outcome::Continue | Outcome::Failed => return None,
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
        return seq.decoder.into_prefix(&seq.tokens);
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
    let recording = seq.trace.take();
    let mut summary = Summary {
        finish_reason,
        usage: Usage {
            prompt_tokens: seq.prompt_tokens,
            completion_tokens: generated,
            total_tokens: seq.prompt_tokens + generated,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: seq.cached_tokens,
            },
        },
        report: DynamicReport {
            batch_size,
            queue_ms: seq.queue_secs * 1000.0,
            ttft_ms: ttft * 1000.0,
            speculative,
            early_exit,
            trace: None,
        },
    };
    // Counted before sending, so a client that reads /metrics after its answer sees it.
    if seq.events.is_closed() {
        add(&metrics.requests_cancelled, 1);
        return seq.decoder.into_prefix(&seq.tokens);
    }
    add(&metrics.requests_ok, 1);
    match (recording, traces) {
        (Some(recording), Some(store)) => {
            // Writing a trace takes a while: a thread of its own does it and then answers,
            // so the other sequences keep decoding meanwhile.
            let (store, model, tokens) =
                (store.clone(), model_name.to_string(), seq.tokens.clone());
            let (events, prompt_tokens) = (seq.events.clone(), seq.prompt_tokens);
            let writer = move || {
                let Recording {
                    mut trace,
                    name,
                    _reserved,
                } = recording;
                // The positions of the tokens handed out: a speculative step may have run
                // rows past an end-of-sequence or a stop string.
                let report = match trace.truncate(tokens.len()) {
                    Ok(()) => store.save(&name, &trace, &model, &tokens, prompt_tokens),
                    Err(e) => TraceReport::failed(&trace, e.to_string()),
                };
                summary.report.trace = Some(report);
                let _ = events.send(Event::Finished(summary));
            };
            if let Err(e) = std::thread::Builder::new()
                .name("dynexec-trace-writer".into())
                .spawn(writer)
            {
                let _ = seq.events.send(Event::Failed(internal(format!(
                    "starting the thread that saves the trace: {e}"
                ))));
            }
        }
        _ => {
            let _ = seq.events.send(Event::Finished(summary));
        }
    }
    seq.decoder.into_prefix(&seq.tokens)
}
