//! `dynexec bench serve`: N concurrent streaming clients against a running server.

use crate::options::{print_json, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  dynexec serve --draft ngram &\n  dynexec bench serve --concurrency 1,4,16 --requests 32 --max-tokens 64\n  dynexec bench serve --url http://10.0.0.5:8080 --speculative off --json\n\nscripts/bench-serve.sh runs the whole comparison (batched and one-at-a-time servers)."
)]
pub struct BenchServeArgs {
    /// The server to load, as started by `dynexec serve`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Concurrent clients, one row per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,

    /// Requests per row (spread over the clients).
    #[arg(long, default_value_t = 32)]
    pub requests: usize,

    /// Speculative decoding per request: `off`, `on`, or `both` (a row each; the default
    /// when the server has a draft, `off` otherwise).
    #[arg(long)]
    pub speculative: Option<String>,

    /// Tokens generated per request (end-of-sequence is ignored, so every request costs the
    /// same).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,

    /// Prompts, one per line (default: a built-in set of chat questions); requests cycle
    /// through them.
    #[arg(long)]
    pub prompts: Option<PathBuf>,

    /// Sampling temperature of every request (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
}

const BUILTIN_PROMPTS: &[&str] = &[
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for vegetable soup.",
    "Summarise the rules of chess in a paragraph.",
    "Why is the sky blue?",
    "List five tips for learning a new language.",
    "Describe the water cycle to a ten-year-old.",
];

/// One row: a concurrency level with speculative decoding on or off.
#[derive(Serialize)]
struct Row {
    concurrency: usize,
    speculative: bool,
    requests: usize,
    errors: usize,
    generated_tokens: usize,
    wall_s: f64,
    throughput_tokens_per_s: f64,
    requests_per_s: f64,
    ttft_ms_p50: f64,
    ttft_ms_p95: f64,
    ttft_ms_p99: f64,
    tpot_ms_p50: f64,
    tpot_ms_p95: f64,
    tpot_ms_p99: f64,
    /// Mean batch size the server reported for these requests.
    mean_batch_size: f64,
    /// Accepted over proposed draft tokens (speculative rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    acceptance_rate: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    url: String,
    model: String,
    max_tokens: usize,
    client_threads: usize,
    rows: Vec<Row>,
}

/// What one streamed request measured.
struct Sample {
    ttft: f64,
    /// Mean time per output token after the first.
    tpot: Option<f64>,
    tokens: usize,
    batch_size: f64,
    drafted: Option<(usize, usize)>,
}

pub fn run(global: &GlobalOptions, args: BenchServeArgs) -> Result<()> {
    let base = args.url.trim_end_matches('/').to_string();
    let models: Value = ureq::get(&format!("{base}/v1/models"))
        .call()
        .with_context(|| format!("no server answers at {base}: start one with `dynexec serve`"))?
        .into_json()
        .context("GET /v1/models did not return JSON")?;
    let model = models["data"][0]["id"]
        .as_str()
        .context("GET /v1/models lists no model")?
        .to_string();
    let has_draft = !models["data"][0]["dynexec"]["draft"].is_null();
    let modes: Vec<bool> = match args.speculative.as_deref() {
        None if has_draft => vec![false, true],
        None | Some("off") => vec![false],
        Some("on") => vec![true],
        Some("both") => vec![false, true],
        Some(other) => bail!("--speculative {other}: use off, on or both"),
    };
    if modes.contains(&true) && !has_draft {
        bail!("the server has no draft: start it with `dynexec serve --draft ...` to benchmark speculative decoding");
    }
    if args.concurrency.contains(&0) || args.requests == 0 {
        bail!("--concurrency values and --requests must be at least 1");
    }
    let prompts: Vec<String> = match &args.prompts {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompts {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    if prompts.is_empty() {
        bail!("--prompts holds no prompts (one per line)");
    }
    // A warm-up request, so no row pays for first-touch costs.
    stream_request(&base, &request(&model, &prompts[0], &args, false))?;

    let mut rows = Vec::new();
    for &speculative in &modes {
        for &concurrency in &args.concurrency {
            let row = run_row(&base, &model, &prompts, &args, concurrency, speculative);
            if !global.json {
                eprintln!(
                    "concurrency {:>3} speculative {:<5}: {:>7.1} tok/s, TTFT p50 {:>7.0} ms, TPOT p50 {:>6.1} ms, batch {:.1}, {} errors",
                    row.concurrency,
                    row.speculative,
                    row.throughput_tokens_per_s,
                    row.ttft_ms_p50,
                    row.tpot_ms_p50,
                    row.mean_batch_size,
                    row.errors
                );
            }
            rows.push(row);
        }
    }
    let report = Report {
        url: base,
        model,
        max_tokens: args.max_tokens,
        client_threads: *args.concurrency.iter().max().unwrap_or(&1),
        rows,
    };
    if global.json {
        return print_json(&report);
    }
    println!(
        "| clients | speculative | requests | errors | tok/s | TTFT p50 / p95 / p99 ms | TPOT p50 / p95 / p99 ms | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.1} |",
            r.concurrency,
            if r.speculative { "on" } else { "off" },
            r.requests,
            r.errors,
            r.throughput_tokens_per_s,
            r.ttft_ms_p50,
            r.ttft_ms_p95,
            r.ttft_ms_p99,
            r.tpot_ms_p50,
            r.tpot_ms_p95,
            r.tpot_ms_p99,
            r.mean_batch_size
        );
    }
    Ok(())
}

fn request(model: &str, prompt: &str, args: &BenchServeArgs, speculative: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": 1,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
        "speculative": speculative,
    })
}

fn run_row(
    base: &str,
    model: &str,
    prompts: &[String],
    args: &BenchServeArgs,
    concurrency: usize,
    speculative: bool,
) -> Row {
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::new());
    let errors = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.requests {
                    return;
                }
                let body = request(model, &prompts[i % prompts.len()], args, speculative);
                match stream_request(base, &body) {
                    Ok(sample) => samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(sample),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request {i} failed: {e:#}");
                    }
                }
            });
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let samples = samples.into_inner().unwrap_or_else(|e| e.into_inner());
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
    Row {
        concurrency,
        speculative,
        requests: args.requests,
        errors: errors.into_inner(),
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
        acceptance_rate: speculative.then(|| drafted.1 as f64 / drafted.0.max(1) as f64),
    }
}

/// Streams one request, timing the first content and the rest.
fn stream_request(base: &str, body: &Value) -> Result<Sample> {
    let start = Instant::now();
    let response = ureq::post(&format!("{base}/v1/chat/completions"))
        .timeout(Duration::from_secs(600))
        .send_json(body.clone())
        .map_err(|e| match e {
            ureq::Error::Status(code, r) => {
                anyhow::anyhow!("HTTP {code}: {}", r.into_string().unwrap_or_default())
            }
            e => anyhow::anyhow!("{e}"),
        })?;
    let mut first = None;
    let mut last = start;
    let mut usage = None;
    let mut report = Value::Null;
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: Value = serde_json::from_str(data).context("a stream event is not JSON")?;
        if let Some(error) = event.get("error") {
            bail!("the server ended the stream: {error}");
        }
        if event["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        }
        if !event["dynexec"].is_null() {
            report = event["dynexec"].clone();
        }
        if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
        }
    }
    let tokens = usage.context("the stream ended without usage (no [DONE]?)")?;
    let first = first.unwrap_or(last);
    let spec = &report["speculative"];
    Ok(Sample {
        ttft: first.duration_since(start).as_secs_f64(),
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
