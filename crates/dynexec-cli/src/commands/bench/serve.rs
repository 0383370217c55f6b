//! `dynexec bench serve`: N concurrent streaming clients against a running server.

use crate::options::{print_json, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dynexec_server::loadgen::{LoadConfig, LoadRow, Target, TraceLoad, BUILTIN_PROMPTS};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Serialize)]
struct Report {
    url: String,
    model: String,
    max_tokens: usize,
    client_threads: usize,
    rows: Vec<LoadRow>,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  dynexec serve --draft ngram &\n  dynexec bench serve --concurrency 1,4,16 --requests 32 --max-tokens 64\n  dynexec bench serve --url http://10.0.0.5:8080 --speculative off --json\n  dynexec bench serve --chat-turns 5 --max-tokens 64\n\nscripts/bench-serve.sh runs the whole comparison (batched and one-at-a-time servers)."
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
    #[arg(long, value_enum)]
    pub speculative: Option<OffOnBoth>,

    /// Hidden-state traces per request: `off` (default), `on`, or `both` (every other
    /// request traced, in one run, reported as an untraced and a traced row: what tracing
    /// costs under the same load). The server needs `--trace-dir`.
    #[arg(long, value_enum, default_value = "off")]
    pub trace: OffOnBoth,

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

    /// Instead of the load rows: send one prompt of this many tokens and, while it is being
    /// prefilled, short chat requests one after another; report their time to first token
    /// (how much a long prompt holds others up; see `serve --batch-size`).
    #[arg(long, value_name = "TOKENS", conflicts_with = "chat_turns")]
    pub long_prompt: Option<usize>,

    /// Instead of the load rows: hold greedy conversations of N turns (the prompts open
    /// them, general follow-ups continue them), send every turn reusing the server's cached
    /// prefix and then without it (`cache_prompt: false`), and report each turn's time to
    /// first token both ways (what prefix caching saves a chat).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=8), conflicts_with_all = ["concurrency", "requests", "speculative"])]
    pub chat_turns: Option<u16>,

    /// With --chat-turns: conversations to hold (medians over them).
    #[arg(long, default_value_t = 3, requires = "chat_turns", value_parser = clap::value_parser!(u16).range(1..))]
    pub conversations: u16,
}

/// The values of `--speculative` and `--trace`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffOnBoth {
    Off,
    On,
    Both,
}

pub fn run(global: &GlobalOptions, args: BenchServeArgs) -> Result<()> {
    let target = Target::probe(&args.url)?;
    let has_draft = target.has_draft;
    let modes: Vec<bool> = match args.speculative {
        None if has_draft => vec![false, true],
        None | Some(OffOnBoth::Off) => vec![false],
        Some(OffOnBoth::On) => vec![true],
        Some(OffOnBoth::Both) => vec![false, true],
    };
    if modes.contains(&true) && !has_draft {
        bail!("the server has no draft: start it with `dynexec serve --draft ...` to benchmark speculative decoding");
    }
    let trace = match args.trace {
        OffOnBoth::Off => TraceLoad::Off,
        OffOnBoth::On => TraceLoad::On,
        OffOnBoth::Both => TraceLoad::Alternate,
    };
    if trace != TraceLoad::Off && !target.traces {
        bail!("the server saves no traces: start it with `dynexec serve --trace-dir DIR` to benchmark traced requests");
    }
    if trace == TraceLoad::Alternate && args.requests < 2 {
        bail!("--trace both alternates traced and untraced requests: give --requests 2 or more");
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
    let config = LoadConfig {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        requests: args.requests,
        trace,
    };
    // A warm-up request, so no row pays for first-touch costs.
    target.warm_up(&prompts[0], &config)?;
    if let Some(turns) = args.chat_turns {
        let rows = target.conversation(
            &prompts,
            usize::from(turns),
            usize::from(args.conversations),
            args.max_tokens,
        )?;
        if global.json {
            return print_json(
                &serde_json::json!({"url": target.url(), "model": target.model,
                "max_tokens": args.max_tokens, "conversations": args.conversations, "turns": rows}),
            );
        }
        println!("| turn | prompt tokens | cached tokens | TTFT reused ms | TTFT cold ms | cold / reused | same answer |");
        println!("|---|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2}x | {} |",
                r.turn,
                r.prompt_tokens,
                r.cached_tokens,
                r.ttft_ms_reused,
                r.ttft_ms_cold,
                r.speedup,
                if r.same_answer { "yes" } else { "no" }
            );
        }
        return Ok(());
    }
    if let Some(tokens) = args.long_prompt {
        let row = target.interference(tokens, &prompts[0], 4)?;
        if global.json {
            return print_json(&row);
        }
        println!("| long prompt tokens | long TTFT ms | short requests meanwhile | short TTFT p50 / p95 / max ms | errors |");
        println!("|---|---|---|---|---|");
        println!(
            "| {} | {:.0} | {} | {:.0} / {:.0} / {:.0} | {} |",
            row.long_prompt_tokens,
            row.long_ttft_ms,
            row.short_requests,
            row.short_ttft_ms_p50,
            row.short_ttft_ms_p95,
            row.short_ttft_ms_max,
            row.errors
        );
        return Ok(());
    }

    let mut rows = Vec::new();
    for &speculative in &modes {
        for &concurrency in &args.concurrency {
            let measured =
                target.load_rows(&prompts, &config, concurrency, speculative, |i, e| {
                    eprintln!("request {i} failed: {e}")
                })?;
            for row in measured {
                if !global.json {
                    eprintln!(
                    "concurrency {:>3} speculative {:<5} trace {:<5}: {:>7.1} tok/s, TTFT p50 {:>7.0} ms, TPOT p50 {:>6.1} ms, batch {:.1}, {} errors",
                    row.concurrency,
                    row.speculative,
                    row.trace,
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
    }
    let report = Report {
        url: target.url().to_string(),
        model: target.model.clone(),
        max_tokens: args.max_tokens,
        client_threads: *args.concurrency.iter().max().unwrap_or(&1),
        rows,
    };
    if global.json {
        return print_json(&report);
    }
    println!(
        "| clients | speculative | traced | requests | errors | tok/s | TTFT p50 / p95 / p99 ms | TPOT p50 / p95 / p99 ms | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.1} |",
            r.concurrency,
            if r.speculative { "on" } else { "off" },
            if r.trace { "yes" } else { "no" },
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
