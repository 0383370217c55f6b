//! `dynexec bench ...`: baseline and technique measured side by side in one process.

use super::generate::ModelArgs;
use crate::options::{print_json, GlobalOptions};
use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use dynexec_core::device::device_name;
use dynexec_core::stats::Summary;
use dynexec_models::llama::Llama;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s of a decoder (optionally next to candle-transformers'
    /// quantized_llama on the same GGUF), median and spread over several runs.
    #[command(
        after_help = "Example:\n  dynexec bench generate --threads 2 --prompt-tokens 64 --gen-tokens 128 --runs 3 --peer"
    )]
    Generate(BenchGenerateArgs),
}

#[derive(Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement (like llama-bench's pp).
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens to decode after the prompt (like llama-bench's tg).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Measured runs per implementation.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Unmeasured runs first, to warm caches and thread pools.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Also run candle-transformers' quantized_llama on the same GGUF (the peer the decoder
    /// is checked against), interleaved run by run.
    #[arg(long)]
    peer: bool,
}

pub fn run(global: &GlobalOptions, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(args) => bench_generate(global, args),
    }
}

/// Text the synthetic benchmark prompt is cut from (repeated as needed).
const BENCH_TEXT: &str = "The history of computing is a story of ideas that moved from laboratories into everyday \
life. Early machines filled rooms and needed teams of engineers, while today a phone in a pocket holds more power \
than all of them together. Along the way, people learned to describe problems precisely, to measure what programs \
cost, and to trade memory for time. ";

/// One implementation under test: prefill a prompt, then greedy-decode.
trait Decoder {
    fn name(&self) -> &'static str;
    /// Runs the prompt and `gen_tokens` greedy steps; returns (prefill secs, decode secs).
    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)>;
}

struct Ours<'a>(&'a Llama);

impl Decoder for Ours<'_> {
    fn name(&self) -> &'static str {
        "dynexec"
    }

    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
        let model = self.0;
        let mut cache = model.new_cache();
        let start = Instant::now();
        let logits = model.forward_last(prompt, &mut cache, None)?;
        let mut next = logits.argmax(0)?.to_scalar::<u32>()?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..gen_tokens {
            let logits = model.forward_last(&[next], &mut cache, None)?;
            next = logits.argmax(0)?.to_scalar::<u32>()?;
        }
        Ok((prefill, start.elapsed().as_secs_f64()))
    }
}

struct Peer {
    weights: candle_transformers::models::quantized_llama::ModelWeights,
    device: Device,
}

impl Peer {
    fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let weights = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content, &mut file, device,
        )?;
        Ok(Self {
            weights,
            device: device.clone(),
        })
    }
}

impl Decoder for Peer {
    fn name(&self) -> &'static str {
        "candle-transformers quantized_llama"
    }

    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
        let start = Instant::now();
        let input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, 0)?.squeeze(0)?;
        let mut next = logits.argmax(0)?.to_scalar::<u32>()?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for i in 0..gen_tokens {
            let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
            let logits = self.weights.forward(&input, prompt.len() + i)?.squeeze(0)?;
            next = logits.argmax(0)?.to_scalar::<u32>()?;
        }
        Ok((prefill, start.elapsed().as_secs_f64()))
    }
}

#[derive(Serialize)]
struct Row {
    implementation: &'static str,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    prefill: Summary,
    decode: Summary,
}

#[derive(Serialize)]
struct Report {
    model: String,
    format: &'static str,
    device: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: usize,
    warmup: usize,
    rows: Vec<Row>,
    /// dynexec's median over the peer's, when the peer ran.
    prefill_ratio_vs_peer: Option<f64>,
    decode_ratio_vs_peer: Option<f64>,
}

fn bench_generate(global: &GlobalOptions, args: BenchGenerateArgs) -> Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    let loaded = args.model.load(global)?;
    let model = &loaded.model;
    let context = model.config().context_length;
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= context,
        "--prompt-tokens + --gen-tokens = {} exceeds the model's context of {context}",
        args.prompt_tokens + args.gen_tokens
    );
    let mut prompt = Vec::new();
    while prompt.len() < args.prompt_tokens {
        prompt.extend(loaded.tokenizer.encode(BENCH_TEXT)?);
    }
    prompt.truncate(args.prompt_tokens);

    let mut decoders: Vec<Box<dyn Decoder + '_>> = vec![Box::new(Ours(model))];
    if args.peer {
        let files = global.hub()?.resolve(&args.model.model)?;
        let gguf = files
            .find(".gguf")
            .context("--peer compares on a GGUF model; this model has no .gguf file")?;
        decoders.push(Box::new(Peer::load(gguf, model.device())?));
    }

    let total = ((args.warmup + args.runs) * decoders.len()) as u64;
    let bar = if global.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    if let Ok(style) = ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} runs {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); decoders.len()];
    // Interleave implementations run by run so drift in machine load hits both alike.
    for run in 0..args.warmup + args.runs {
        for (i, decoder) in decoders.iter_mut().enumerate() {
            bar.set_message(decoder.name());
            let (prefill, decode) = decoder.run(&prompt, args.gen_tokens)?;
            if run >= args.warmup {
                samples[i].0.push(args.prompt_tokens as f64 / prefill);
                if args.gen_tokens > 0 {
                    samples[i].1.push(args.gen_tokens as f64 / decode);
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let rows: Vec<Row> = decoders
        .iter()
        .zip(&samples)
        .map(|(d, (pp, tg))| {
            let prefill = Summary::of(pp).unwrap_or(ZERO);
            let decode = Summary::of(tg).unwrap_or(ZERO);
            Row {
                implementation: d.name(),
                prefill_tokens_per_s: prefill.median,
                decode_tokens_per_s: decode.median,
                prefill,
                decode,
            }
        })
        .collect();
    let ratio = |f: fn(&Row) -> f64| {
        (rows.len() > 1 && f(&rows[1]) > 0.0).then(|| f(&rows[0]) / f(&rows[1]))
    };
    let report = Report {
        model: args.model.model.clone(),
        format: loaded.format,
        device: device_name(model.device()),
        threads: candle_core::utils::get_num_threads(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        runs: args.runs,
        warmup: args.warmup,
        prefill_ratio_vs_peer: ratio(|r| r.prefill_tokens_per_s),
        decode_ratio_vs_peer: ratio(|r| r.decode_tokens_per_s),
        rows,
    };
    if global.json {
        return print_json(&report);
    }
    println!(
        "model {} ({}) | device {} | threads {} | pp{} tg{} | {} runs + {} warm-up",
        report.model,
        report.format,
        report.device,
        report.threads,
        report.prompt_tokens,
        report.gen_tokens,
        report.runs,
        report.warmup
    );
    println!(
        "{:<38} {:>22} {:>22}",
        "implementation", "prefill tok/s", "decode tok/s"
    );
    for row in &report.rows {
        println!(
            "{:<38} {:>22} {:>22}",
            row.implementation,
            format!("{:.1} ± {:.1}", row.prefill.median, row.prefill.stddev),
            format!("{:.1} ± {:.1}", row.decode.median, row.decode.stddev)
        );
    }
    if let (Some(p), Some(d)) = (report.prefill_ratio_vs_peer, report.decode_ratio_vs_peer) {
        println!(
            "{:<38} {:>22} {:>22}",
            "ratio dynexec / peer",
            format!("{p:.2}x"),
            format!("{d:.2}x")
        );
    }
    Ok(())
}

const ZERO: Summary = Summary {
    median: 0.0,
    mean: 0.0,
    stddev: 0.0,
    min: 0.0,
    max: 0.0,
    runs: 0,
};
