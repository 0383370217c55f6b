//! A load generator for a running server: N concurrent streaming clients send chat
//! requests and measure throughput, time to first token and time per output token, as
//! `dynexec bench serve` reports them. It speaks only the OpenAI API (plus the `dynexec`
//! extension fields), so it can load any compatible server.

mod conversation;

pub use conversation::{ConversationRow, FOLLOW_UPS};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a load run could not be made or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Nothing answered at the URL.
    #[error("no server answers at {url}: start one with `dynexec serve` ({reason})")]
    NoServer {
        /// The base URL tried.
        url: String,
        /// What the connection attempt said.
        reason: String,
    },
    /// The server answered something this client cannot use.
    #[error("{0}")]
    Protocol(String),
    /// The server refused or failed a request.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The response body (an OpenAI error object).
        body: String,
    },
    /// A request was not what the server can run.
    #[error("{0}")]
    Request(String),
}

/// What a load run sends.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Tokens generated per request (end-of-sequence is ignored).
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    pub temperature: f64,
    /// Total requests, spread over the clients.
    pub requests: usize,
    /// Which requests ask for their hidden-state trace (`"dynexec": {"trace": true}`; the
    /// server needs `--trace-dir`).
    pub trace: TraceLoad,
}

/// Which requests of a load are traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceLoad {
    /// None.
    Off,
    /// All.
    On,
    /// Every other one, the rest untraced: one run gives a traced and an untraced row
    /// measured under the same load ([`Target::load_rows`]).
    Alternate,
}

impl TraceLoad {
    fn traces(self, request: usize) -> bool {
        match self {
            TraceLoad::Off => false,
            TraceLoad::On => true,
            TraceLoad::Alternate => request % 2 == 1,
        }
    }
}

/// The server under load, as `GET /v1/models` describes it.
pub struct Target {
    base: String,
    /// The served model's id.
    pub model: String,
    /// Whether the server has a draft (speculative requests work).
    pub has_draft: bool,
    /// The model's vocabulary size, when the server says (dynexec's servers do).
    pub vocab_size: Option<u32>,
    /// Whether the server saves traces (started with `--trace-dir`).
    pub traces: bool,
}

/// Chat questions to cycle through when the user gives none.
pub const BUILTIN_PROMPTS: &[&str] = &[
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for vegetable soup.",
    "Summarise the rules of chess in a paragraph.",
    "Why is the sky blue?",
    "List five tips for learning a new language.",
    "Describe the water cycle to a ten-year-old.",
];

/// One concurrency level with speculative decoding on or off.
#[derive(Debug, Clone, Serialize)]
pub struct LoadRow {
    /// Concurrent clients.
    pub concurrency: usize,
    /// Whether requests asked for speculative decoding.
    pub speculative: bool,
    /// Whether requests asked for a hidden-state trace.
    pub trace: bool,
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed.
    pub errors: usize,
    /// Tokens generated over all requests.
    pub generated_tokens: usize,
    /// Seconds from the first request to the last answer.
    pub wall_s: f64,
    /// Generated tokens per wall-clock second.
    pub throughput_tokens_per_s: f64,
    /// Finished requests per wall-clock second.
    pub requests_per_s: f64,
    /// Time to first token, 50th percentile (ms).
    pub ttft_ms_p50: f64,
    /// Time to first token, 95th percentile (ms).
    pub ttft_ms_p95: f64,
    /// Time to first token, 99th percentile (ms).
    pub ttft_ms_p99: f64,
    /// Time per output token after the first, 50th percentile (ms).
    pub tpot_ms_p50: f64,
    /// Time per output token, 95th percentile (ms).
    pub tpot_ms_p95: f64,
    /// Time per output token, 99th percentile (ms).
    pub tpot_ms_p99: f64,
    /// Mean batch size the server reported for these requests.
    pub mean_batch_size: f64,
    /// Accepted over proposed draft tokens (speculative rows that drafted at all; none when
    /// the server switched drafting off for the whole row, `serve --spec-max-batch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acceptance_rate: Option<f64>,
}

/// How a long prompt's prefill delays short requests: one request with a prompt of
/// `long_prompt_tokens` tokens, and short chat requests sent one after another while it
/// prefills (from just after it was sent until its first token).
#[derive(Debug, Clone, Serialize)]
pub struct InterferenceRow {
    /// Tokens in the long prompt.
    pub long_prompt_tokens: usize,
    /// The long request's time to first token (its whole prefill), ms.
    pub long_ttft_ms: f64,
    /// Short requests sent while the long prompt was prefilling.
    pub short_requests: usize,
    /// Their time to first token, 50th percentile (ms).
    pub short_ttft_ms_p50: f64,
    /// Their time to first token, 95th percentile (ms).
    pub short_ttft_ms_p95: f64,
    /// Their longest time to first token (ms).
    pub short_ttft_ms_max: f64,
    /// Requests that failed.
    pub errors: usize,
}

/// What one streamed request measured.
#[derive(Clone)]
struct Sample {
    ttft: f64,
    /// The text streamed.
    text: String,
    /// Prompt tokens the server took from a cached prefix (OpenAI's `cached_tokens`).
    cached_tokens: usize,
    /// Prompt tokens in all.
    prompt_tokens: usize,
    /// Mean time per output token after the first.
    tpot: Option<f64>,
    tokens: usize,
    batch_size: f64,
    drafted: Option<(usize, usize)>,
}

fn request(
    model: &str,
    prompt: &str,
    config: &LoadConfig,
    speculative: bool,
    trace: bool,
) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "seed": 1,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
        "speculative": speculative,
    });
    if trace {
        body["dynexec"] = json!({"trace": true});
    }
    body
}

impl Target {
    /// Asks the server at `url` what it serves.
    pub fn probe(url: &str) -> Result<Self, LoadError> {
        let base = url.trim_end_matches('/').to_string();
        let models: Value = ureq::get(&format!("{base}/v1/models"))
            .call()
            .map_err(|e| LoadError::NoServer {
                url: base.clone(),
                reason: e.to_string(),
            })?
            .into_json()
            .map_err(|_| LoadError::Protocol("GET /v1/models did not return JSON".into()))?;
        let model = models["data"][0]["id"]
            .as_str()
            .ok_or_else(|| LoadError::Protocol("GET /v1/models lists no model".into()))?
            .to_string();
        let has_draft = !models["data"][0]["dynexec"]["draft"].is_null();
        let traces = models["data"][0]["dynexec"]["traces"] == Value::Bool(true);
        let vocab_size = models["data"][0]["dynexec"]["vocab_size"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok());
        Ok(Self {
            base,
            model,
            has_draft,
            vocab_size,
            traces,
        })
    }

    /// The base URL, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// One request, unmeasured: the first touch of the server's caches and pools.
    pub fn warm_up(&self, prompt: &str, config: &LoadConfig) -> Result<(), LoadError> {
        stream_request(
            &self.base,
            &request(&self.model, prompt, config, false, false),
        )
        .map(|_| ())
    }

    /// Sends `config.requests` requests over `concurrency` clients, cycling through
    /// `prompts`; failed requests are counted and told to `on_error(request, error)`.
    pub fn load(
        &self,
        prompts: &[String],
        config: &LoadConfig,
        concurrency: usize,
        speculative: bool,
        on_error: impl Fn(usize, &LoadError) + Sync,
    ) -> Result<LoadRow, LoadError> {
        let mut rows = self.load_rows(prompts, config, concurrency, speculative, on_error)?;
        Ok(rows.remove(0))
    }

    /// Like [`Self::load`], with one row per kind of request: with
    /// [`TraceLoad::Alternate`], the untraced then the traced requests of the same run (each
    /// row's wall time is its requests' share of the run, by their durations).
    pub fn load_rows(
        &self,
        prompts: &[String],
        config: &LoadConfig,
        concurrency: usize,
        speculative: bool,
        on_error: impl Fn(usize, &LoadError) + Sync,
    ) -> Result<Vec<LoadRow>, LoadError> {
        if concurrency == 0 || config.requests == 0 || prompts.is_empty() {
            return Err(LoadError::Request(
                "a load needs at least one client, one request and one prompt".into(),
            ));
        }
        if speculative && !self.has_draft {
            return Err(LoadError::Request("the server has no draft: start one with a draft model to load it with speculative requests".into()));
        }
        if config.trace != TraceLoad::Off && !self.traces {
            return Err(LoadError::Request("the server saves no traces: start it with `dynexec serve --trace-dir DIR` to load it with traced requests".into()));
        }
        Ok(run_row(
            &self.base,
            &self.model,
            prompts,
            config,
            concurrency,
            speculative,
            &on_error,
        ))
    }

    /// Measures [`InterferenceRow`]: the long prompt is token ids spread over the
    /// vocabulary (its content does not matter to the cost), sent to `/v1/completions`; the
    /// short requests ask `short_prompt`, `short_tokens` tokens each.
    pub fn interference(
        &self,
        long_prompt_tokens: usize,
        short_prompt: &str,
        short_tokens: usize,
    ) -> Result<InterferenceRow, LoadError> {
        // Ordinary tokens sit past the first few hundred ids (bytes, special tokens).
        let vocab = u64::from(self.vocab_size.unwrap_or(20_000).max(2_000));
        let ids: Vec<u32> = (0..long_prompt_tokens as u64)
            .map(|i| (1000 + (i * 7919) % (vocab - 1000)) as u32)
            .collect();
        let long = json!({"model": self.model, "prompt": ids, "max_tokens": 2, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
            "speculative": false});
        let short = LoadConfig {
            max_tokens: short_tokens,
            temperature: 0.0,
            requests: 1,
            trace: TraceLoad::Off,
        };
        let short = request(&self.model, short_prompt, &short, false, false);
        let long_done = std::sync::atomic::AtomicBool::new(false);
        let sent = Instant::now();
        let (long_result, shorts) = std::thread::scope(|s| {
            let long_thread = s.spawn(|| {
                let result = stream_to(&self.base, "/v1/completions", &long);
                long_done.store(true, Ordering::Relaxed);
                result
            });
            // Let the long request reach the engine first.
            std::thread::sleep(Duration::from_millis(300));
            let mut shorts = Vec::new();
            while !long_done.load(Ordering::Relaxed) {
                let sent_at = sent.elapsed();
                shorts.push((sent_at, stream_request(&self.base, &short)));
            }
            (long_thread.join(), shorts)
        });
        let long = long_result
            .map_err(|_| LoadError::Protocol("the long request's thread panicked".into()))??;
        let long_first = Duration::from_secs_f64(long.ttft);
        // Only requests sent while the long prompt was still prefilling count.
        let during: Vec<_> = shorts
            .into_iter()
            .filter(|(sent_at, _)| *sent_at < long_first)
            .collect();
        let errors = during.iter().filter(|(_, r)| r.is_err()).count();
        let ttft: Vec<f64> = during
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|s| s.ttft * 1000.0)
            .collect();
        Ok(InterferenceRow {
            long_prompt_tokens,
            long_ttft_ms: long.ttft * 1000.0,
            short_requests: during.len(),
            short_ttft_ms_p50: percentile(&ttft, 50.0),
            short_ttft_ms_p95: percentile(&ttft, 95.0),
            short_ttft_ms_max: ttft.iter().cloned().fold(0.0, f64::max),
            errors,
        })
    }
}

fn run_row(
    base: &str,
    model: &str,
    prompts: &[String],
    config: &LoadConfig,
    concurrency: usize,
    speculative: bool,
    on_error: &(dyn Fn(usize, &LoadError) + Sync),
) -> Vec<LoadRow> {
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::new());
    let errors = AtomicUsize::new(0);
    let traced_errors = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= config.requests {
                    return;
                }
                let traced = config.trace.traces(i);
                let body = request(
                    model,
                    &prompts[i % prompts.len()],
                    config,
                    speculative,
                    traced,
                );
                let sent = Instant::now();
                match stream_request(base, &body) {
                    Ok(sample) => samples.lock().unwrap_or_else(|e| e.into_inner()).push((
                        traced,
                        sent.elapsed().as_secs_f64(),
                        sample,
                    )),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if traced {
                            traced_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        on_error(i, &e);
                    }
                }
            });
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let samples = samples.into_inner().unwrap_or_else(|e| e.into_inner());
    let (errors, traced_errors) = (errors.into_inner(), traced_errors.into_inner());
    if config.trace != TraceLoad::Alternate {
        let samples: Vec<Sample> = samples.into_iter().map(|(_, _, s)| s).collect();
        let traced = config.trace == TraceLoad::On;
        return vec![row_of(
            &samples,
            wall,
            concurrency,
            speculative,
            traced,
            config.requests,
            errors,
        )];
    }
    let busy: f64 = samples.iter().map(|(_, secs, _)| secs).sum();
    [false, true]
        .into_iter()
        .map(|traced| {
            let (secs, part): (Vec<f64>, Vec<Sample>) = samples
                .iter()
                .filter(|(t, _, _)| *t == traced)
                .map(|(_, secs, s)| (*secs, s.clone()))
                .unzip();
            // The run's wall time, shared in proportion to the requests' durations.
            let share = wall * secs.iter().sum::<f64>() / busy.max(f64::MIN_POSITIVE);
            let requests = (0..config.requests)
                .filter(|&i| config.trace.traces(i) == traced)
                .count();
            let errors = match traced {
                true => traced_errors,
                false => errors - traced_errors,
            };
            row_of(
                &part,
                share,
                concurrency,
                speculative,
                traced,
                requests,
                errors,
            )
        })
        .collect()
}

/// One row's statistics from its requests' samples.
fn row_of(
    samples: &[Sample],
    wall: f64,
    concurrency: usize,
    speculative: bool,
    traced: bool,
    requests: usize,
    errors: usize,
) -> LoadRow {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let ttft: Vec<f64> = samples.iter().map(|s| s.ttft * 1000.0).collect();
    let tpot: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.tpot)
        .map(|t| t * 1000.0)
        .collect();
    let drafted = samples
        .iter()
        .filter_map(|s| s.drafted)
        .fold((0, 0), |(p, a), (dp, da)| (p + dp, a + da));
    LoadRow {
        concurrency,
        speculative,
        trace: traced,
        requests,
        errors,
        generated_tokens: tokens,
        wall_s: wall,
        throughput_tokens_per_s: tokens as f64 / wall,
        requests_per_s: samples.len() as f64 / wall,
        ttft_ms_p50: percentile(&ttft, 50.0),
        ttft_ms_p95: percentile(&ttft, 95.0),
        ttft_ms_p99: percentile(&ttft, 99.0),
        tpot_ms_p50: percentile(&tpot, 50.0),
        tpot_ms_p95: percentile(&tpot, 95.0),
        tpot_ms_p99: percentile(&tpot, 99.0),
        mean_batch_size: samples.iter().map(|s| s.batch_size).sum::<f64>()
            / samples.len().max(1) as f64,
        acceptance_rate: (speculative && drafted.0 > 0)
            .then(|| drafted.1 as f64 / drafted.0 as f64),
    }
}

/// Streams one chat request, timing the first content and the rest.
fn stream_request(base: &str, body: &Value) -> Result<Sample, LoadError> {
    stream_to(base, "/v1/chat/completions", body)
}

/// Streams one request to `path`, timing the first content and the rest.
fn stream_to(base: &str, path: &str, body: &Value) -> Result<Sample, LoadError> {
    let start = Instant::now();
    let response = ureq::post(&format!("{base}{path}"))
        .timeout(Duration::from_secs(600))
        .send_json(body.clone())
        .map_err(|e| match e {
            ureq::Error::Status(status, r) => LoadError::Status {
                status,
                body: r.into_string().unwrap_or_default(),
            },
            e => LoadError::Protocol(e.to_string()),
        })?;
    let mut first = None;
    let mut last = start;
    let mut usage = None;
    let mut report = Value::Null;
    let mut text = String::new();
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.map_err(|e| LoadError::Protocol(format!("reading the stream: {e}")))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: Value = serde_json::from_str(data)
            .map_err(|_| LoadError::Protocol("a stream event is not JSON".into()))?;
        if let Some(error) = event.get("error") {
            return Err(LoadError::Protocol(format!(
                "the server ended the stream: {error}"
            )));
        }
        let choice = &event["choices"][0];
        if let Some(piece) = choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .filter(|t| !t.is_empty())
        {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            text.push_str(piece);
        }
        if !event["dynexec"].is_null() {
            report = event["dynexec"].clone();
        }
        if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
            prompt_tokens = event["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            cached_tokens = event["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0) as usize;
        }
    }
    let tokens = usage
        .ok_or_else(|| LoadError::Protocol("the stream ended without usage (no [DONE]?)".into()))?;
    let first = first.unwrap_or(last);
    let spec = &report["speculative"];
    Ok(Sample {
        ttft: first.duration_since(start).as_secs_f64(),
        text,
        cached_tokens,
        prompt_tokens,
        tpot: (tokens > 1).then(|| last.duration_since(first).as_secs_f64() / (tokens - 1) as f64),
        tokens,
        batch_size: report["batch_size"].as_f64().unwrap_or(1.0),
        drafted: spec["proposed"]
            .as_u64()
            .zip(spec["accepted"].as_u64())
            .map(|(p, a)| (p as usize, a as usize)),
    })
}

/// The `p`th percentile by linear interpolation (0 for no samples).
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [4.0, 1.0, 3.0, 2.0, 5.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 5.0);
        assert!((percentile(&v, 95.0) - 4.8).abs() < 1e-12);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
