//! `dynexec bench ...`: baseline and technique measured side by side in one process.

mod diffusion;
mod dsa;
mod exits;
mod serve;
mod speculative;
mod token_exits;

use crate::commands::common::{
    evaluate, load_encoder, load_model, read_text, ModelArgs, WindowArgs,
};
use crate::options::{parse_format, parse_isa, print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dynexec_core::device::device_name;
use dynexec_core::stats::{interleave, Summary};
use dynexec_engine::bench::llama_cpp::{build_names, LlamaCpp, LLAMA_CPP_NAME};
use dynexec_engine::bench::{
    bench_prompt, run_generation, CandlePeer, Contestant, Greedy, HeldToIsa, Row, NO_SAMPLES,
};
use dynexec_models::bert::EncoderFiles;
use dynexec_models::cpu_kernels::{cpu_isa, Isa};
use dynexec_models::linear::CpuKernels;
use dynexec_quant::QuantTarget;
use dynexec_quant::WeightFormat;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Load a running `dynexec serve`: N concurrent streaming clients, throughput, time to
    /// first token and time per output token (p50/p95/p99), errors; speculative on and off.
    Serve(serve::BenchServeArgs),
    /// Prefill and decode tokens/s of a decoder (optionally next to candle-transformers'
    /// quantized_llama on the same GGUF), median and spread over several runs.
    #[command(
        after_help = "Example:\n  dynexec bench generate --threads 2 --prompt-tokens 64 --gen-tokens 128 --runs 3 --peer"
    )]
    Generate(BenchGenerateArgs),
    /// Every precision of one decoder side by side: weight bytes in memory, prefill and
    /// decode tok/s, and perplexity on a held-out text.
    #[command(
        after_help = "Example:\n  scripts/fetch-sotu.sh\n  dynexec bench quant --threads 2 --formats f32,q8_0,q4_1 --eval-tokens 1024"
    )]
    Quant(BenchQuantArgs),
    /// Speculative decoding: plain decoding vs every drafter x lookahead controller on the
    /// same target and prompts (TruthfulQA questions, BBC articles to summarize).
    Speculative(speculative::BenchSpeculativeArgs),
    /// Dynamical similarity analysis: seconds per end-to-end comparison on the reference
    /// cases, next to the reference implementation's time, and a 10 x 10 distance matrix.
    Dsa(dsa::BenchDsaArgs),
    /// Early exit: accuracy, mean exit layer, % layers saved, batch-1 latency and batched
    /// throughput of each exit policy next to full depth, on a task's test split.
    #[command(
        after_help = "Example:\n  scripts/fetch-reviews.sh\n  dynexec bench exits --model minilm-l6-reviews --data $DYNEXEC_CACHE/data/reviews --threads 2"
    )]
    Exits(exits::BenchExitsArgs),
    /// Per-token early exit in a decoder: agreement with full-depth greedy tokens, perplexity,
    /// mean exit layer and decode speed of each policy next to full depth.
    #[command(
        name = "token-exits",
        after_help = "Example:\n  scripts/fetch-prompts.sh; scripts/fetch-sotu.sh\n  dynexec bench token-exits --threads 2 --policies confidence:0.9,saturation:0.99"
    )]
    TokenExits(token_exits::BenchTokenExitsArgs),
    /// Adaptive-step diffusion: fixed steps vs the predicted and converge policies on held-out
    /// prompts — mean steps, wall time, SSIM to the fixed-step image, class consistency, FID.
    #[command(
        after_help = "Example:\n  scripts/fetch-fashion-mnist.sh\n  dynexec bench diffusion --threads 2 --seeds 2"
    )]
    Diffusion(diffusion::BenchDiffusionArgs),
}

#[derive(Args)]
pub struct BenchQuantArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Formats to compare (f32, f16, q8_0, q4_0, q4_1).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,q8_0,q4_0,q4_1", value_parser = parse_format)]
    formats: Vec<WeightFormat>,
    /// Held-out text for perplexity (default: the State of the Union slice of scripts/fetch-sotu.sh).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the text to score.
    #[arg(long, default_value_t = 1024)]
    eval_tokens: usize,
    /// Perplexity window.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Perplexity window stride (= context: windows do not overlap).
    #[arg(long, default_value_t = 512)]
    stride: usize,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Measured speed runs per format (interleaved across formats).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Encoders (MiniLM): sentences of the text to embed per run.
    #[arg(long, default_value_t = 64)]
    sentences: usize,
    /// Encoders: sentences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
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
    /// Also run llama.cpp's `llama-bench` (give the binary's path) on the same GGUF with the
    /// same thread count, prompt and generation lengths, interleaved run by run, and print
    /// dynexec's ratio to it. Repeat it to compare several builds in one run (say, AVX2 and
    /// AVX-512); each is named by its CMake build folder.
    #[arg(long, value_name = "LLAMA_BENCH")]
    compare_llama_cpp: Vec<PathBuf>,
    /// Also run dynexec with its repacked kernels held to this instruction set (`avx2`),
    /// interleaved run by run: what the better one this CPU has is worth.
    #[arg(long, value_name = "ISA", value_parser = parse_isa)]
    compare_cpu_isa: Option<Isa>,
}

pub fn run(global: &GlobalOptions, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(args) => bench_generate(global, args),
        BenchCommand::Quant(args) => bench_quant(global, args),
        BenchCommand::Speculative(args) => speculative::run(global, args),
        BenchCommand::Dsa(args) => dsa::run(global, args),
        BenchCommand::Exits(args) => exits::run(global, args),
        BenchCommand::TokenExits(args) => token_exits::run(global, args),
        BenchCommand::Diffusion(args) => diffusion::run(global, args),
        BenchCommand::Serve(args) => serve::run(global, args),
    }
}

/// dynexec's medians over one llama.cpp build's.
#[derive(Serialize)]
struct LlamaCppRatio {
    implementation: &'static str,
    prefill_ratio: f64,
    /// None without generated tokens.
    decode_ratio: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    format: &'static str,
    device: String,
    /// The instruction set of dynexec's repacked CPU kernels (none: they did not run).
    cpu_isa: Option<&'static str>,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: usize,
    warmup: usize,
    rows: Vec<Row>,
    /// dynexec's median over the peer's, when the peer ran.
    prefill_ratio_vs_peer: Option<f64>,
    decode_ratio_vs_peer: Option<f64>,
    /// dynexec's median over llama.cpp's, with --compare-llama-cpp (the first build given).
    prefill_ratio_vs_llama_cpp: Option<f64>,
    decode_ratio_vs_llama_cpp: Option<f64>,
    /// The same for every build given, in order.
    llama_cpp_ratios: Vec<LlamaCppRatio>,
    /// dynexec's median over its own on the lower instruction set, with --compare-cpu-isa.
    prefill_ratio_vs_cpu_isa: Option<f64>,
    decode_ratio_vs_cpu_isa: Option<f64>,
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
    let prompt = bench_prompt(&loaded.tokenizer, args.prompt_tokens)?;

    let mut decoders: Vec<Box<dyn Contestant + '_>> = vec![Box::new(Greedy(model))];
    if let Some(isa) = args.compare_cpu_isa {
        if Isa::detect().is_none_or(|best| isa > best) {
            bail!(
                "--compare-cpu-isa {}: this CPU cannot run dynexec's kernels on it (it runs {})",
                isa.name(),
                Isa::detect().map_or("none of them", Isa::name)
            );
        }
        decoders.push(Box::new(HeldToIsa {
            model,
            isa,
            restore: global.max_cpu_isa,
        }));
    }
    if args.peer {
        let files = global.hub()?.resolve(&args.model.model)?;
        let gguf = files
            .find(".gguf")
            .context("--peer compares on a GGUF model; this model has no .gguf file")?;
        decoders.push(Box::new(CandlePeer::load(gguf, model.device())?));
    }

    // Named once: the rows and their ratios refer to the same names.
    let llama_cpp_names = build_names(&args.compare_llama_cpp);
    if !args.compare_llama_cpp.is_empty() {
        if global.quant.is_some() {
            bail!("--compare-llama-cpp runs llama.cpp on the GGUF file as stored, so dynexec must run it as stored too: drop --quant, or write the converted model with `dynexec quantize --to FORMAT --out FILE.gguf` and bench that file on both");
        }
        let files = global.hub()?.resolve(&args.model.model)?;
        let gguf = files
            .find(".gguf")
            .context("--compare-llama-cpp needs a GGUF model; this model has no .gguf file")?;
        for (binary, &name) in args.compare_llama_cpp.iter().zip(&llama_cpp_names) {
            decoders.push(Box::new(
                LlamaCpp::new(name, binary, gguf, candle_core::utils::get_num_threads())
                    .context("--compare-llama-cpp")?,
            ));
        }
    }

    let total = ((args.warmup + args.runs) * decoders.len()) as u64;
    let bar = progress_bar(global, total, "bench [{bar:30}] {pos}/{len} runs {msg}");
    let rows = run_generation(
        &mut decoders,
        &prompt,
        args.gen_tokens,
        args.warmup,
        args.runs,
        |name| {
            bar.set_message(name);
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    let ratio_to = |name: &str, f: fn(&Row) -> f64| Row::ratio(&rows, name, f);
    let ratio = |f: fn(&Row) -> f64| ratio_to(CandlePeer::NAME, f);
    let isa_row = args.compare_cpu_isa.map_or("", HeldToIsa::name_on);
    let report = Report {
        model: args.model.model.clone(),
        format: loaded.format,
        device: device_name(model.device()),
        cpu_isa: (model.device().is_cpu() && global.cpu_kernels == CpuKernels::Dynexec)
            .then(cpu_isa)
            .flatten()
            .map(Isa::name),
        threads: candle_core::utils::get_num_threads(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        runs: args.runs,
        warmup: args.warmup,
        prefill_ratio_vs_peer: ratio(|r| r.prefill_tokens_per_s),
        decode_ratio_vs_peer: ratio(|r| r.decode_tokens_per_s),
        prefill_ratio_vs_llama_cpp: ratio_to(LLAMA_CPP_NAME, |r| r.prefill_tokens_per_s),
        decode_ratio_vs_llama_cpp: ratio_to(LLAMA_CPP_NAME, |r| r.decode_tokens_per_s),
        llama_cpp_ratios: llama_cpp_names
            .into_iter()
            .filter_map(|name| {
                Some(LlamaCppRatio {
                    implementation: name,
                    prefill_ratio: ratio_to(name, |r| r.prefill_tokens_per_s)?,
                    decode_ratio: ratio_to(name, |r| r.decode_tokens_per_s),
                })
            })
            .collect(),
        prefill_ratio_vs_cpu_isa: ratio_to(isa_row, |r| r.prefill_tokens_per_s),
        decode_ratio_vs_cpu_isa: ratio_to(isa_row, |r| r.decode_tokens_per_s),
        rows,
    };
    if global.json {
        return print_json(&report);
    }
    println!(
        "model {} ({}) | device {}{} | threads {} | pp{} tg{} | {} runs + {} warm-up",
        report.model,
        report.format,
        report.device,
        report
            .cpu_isa
            .map(|isa| format!(" ({isa} kernels)"))
            .unwrap_or_default(),
        report.threads,
        report.prompt_tokens,
        report.gen_tokens,
        report.runs,
        report.warmup
    );
    println!(
        "{:<42} {:>22} {:>22}",
        "implementation", "prefill tok/s", "decode tok/s"
    );
    for row in &report.rows {
        println!(
            "{:<42} {:>22} {:>22}",
            row.implementation,
            format!("{:.1} ± {:.1}", row.prefill.median, row.prefill.stddev),
            format!("{:.1} ± {:.1}", row.decode.median, row.decode.stddev)
        );
    }
    let llama_cpp_rows = report.llama_cpp_ratios.iter().map(|r| {
        let name = match r.implementation {
            LLAMA_CPP_NAME => "llama.cpp",
            build => build,
        };
        (
            format!("ratio dynexec / {name}"),
            Some(r.prefill_ratio),
            r.decode_ratio,
        )
    });
    let ratio_rows = [(
        "ratio dynexec / peer".to_string(),
        report.prefill_ratio_vs_peer,
        report.decode_ratio_vs_peer,
    )]
    .into_iter()
    .chain(llama_cpp_rows)
    .chain([(
        "ratio dynexec / its --compare-cpu-isa".to_string(),
        report.prefill_ratio_vs_cpu_isa,
        report.decode_ratio_vs_cpu_isa,
    )]);
    for (name, prefill, decode) in ratio_rows {
        if let (Some(p), Some(d)) = (prefill, decode) {
            println!(
                "{:<42} {:>22} {:>22}",
                name,
                format!("{p:.2}x"),
                format!("{d:.2}x")
            );
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct QuantRow {
    quant: WeightFormat,
    weights_bytes: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    perplexity: f64,
    perplexity_tokens: usize,
    prefill: Summary,
    decode: Summary,
}

#[derive(Serialize)]
struct QuantReport {
    model: String,
    device: String,
    threads: usize,
    text: String,
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: usize,
    rows: Vec<QuantRow>,
}

fn bench_quant(global: &GlobalOptions, args: BenchQuantArgs) -> Result<()> {
    anyhow::ensure!(
        args.runs > 0 && !args.formats.is_empty(),
        "--runs and --formats must not be empty"
    );
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => dynexec_core::hub::default_cache_dir().join("data/sotu/heldout.txt"),
    };
    let text = read_text(&text_path)?;
    let files = global.hub()?.resolve(&args.model.model)?;
    if EncoderFiles::is_encoder(&files) {
        return bench_quant_encoder(global, &args, &files, &text, &text_path);
    }
    let models = args
        .formats
        .iter()
        .map(|&f| {
            load_model(
                global,
                &args.model.model,
                args.model.tokenizer.as_deref(),
                Some(QuantTarget::To(f)),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let prompt = bench_prompt(&models[0].tokenizer, args.prompt_tokens)?;

    let total = ((args.warmup + args.runs) * models.len()) as u64;
    let bar = progress_bar(global, total, "speed [{bar:30}] {pos}/{len} runs {msg}");
    let mut contestants: Vec<Box<dyn Contestant + '_>> = models
        .iter()
        .map(|loaded| Box::new(Greedy(&loaded.model)) as Box<dyn Contestant>)
        .collect();
    let mut run = 0;
    let speed = run_generation(
        &mut contestants,
        &prompt,
        args.gen_tokens,
        args.warmup,
        args.runs,
        |_| {
            bar.set_message(args.formats[run % models.len()].to_string());
            bar.inc(1);
            run += 1;
        },
    )?;
    bar.finish_and_clear();

    let window = WindowArgs {
        context: args.context,
        stride: args.stride,
        max_tokens: Some(args.eval_tokens),
    };
    let mut rows = Vec::new();
    for (i, loaded) in models.iter().enumerate() {
        let ppl = evaluate(loaded, &text, &window, global)
            .with_context(|| format!("perplexity at {}", args.formats[i]))?;
        let Row {
            prefill, decode, ..
        } = speed[i].clone();
        rows.push(QuantRow {
            quant: args.formats[i],
            weights_bytes: loaded.model.weight_bytes(),
            prefill_tokens_per_s: prefill.median,
            decode_tokens_per_s: decode.median,
            perplexity: ppl.perplexity,
            perplexity_tokens: ppl.tokens,
            prefill,
            decode,
        });
    }
    let report = QuantReport {
        model: args.model.model.clone(),
        device: device_name(models[0].model.device()),
        threads: candle_core::utils::get_num_threads(),
        text: text_path.display().to_string(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        runs: args.runs,
        rows,
    };
    if global.json {
        return print_json(&report);
    }
    println!(
        "model {} | device {} | threads {} | pp{} tg{} x{} runs | perplexity on {} ({} tokens)",
        report.model,
        report.device,
        report.threads,
        report.prompt_tokens,
        report.gen_tokens,
        report.runs,
        report.text,
        report.rows[0].perplexity_tokens
    );
    let base = &report.rows[0];
    println!(
        "{:<6} {:>10} {:>16} {:>16} {:>11} {:>9} {:>9}",
        "quant", "weights", "prefill tok/s", "decode tok/s", "perplexity", "ppl Δ", "decode x"
    );
    for row in &report.rows {
        println!(
            "{:<6} {:>8.1}MB {:>16} {:>16} {:>11.3} {:>8.2}% {:>8.2}x",
            row.quant.to_string(),
            row.weights_bytes as f64 / 1e6,
            format!("{:.1} ± {:.1}", row.prefill.median, row.prefill.stddev),
            format!("{:.1} ± {:.1}", row.decode.median, row.decode.stddev),
            row.perplexity,
            (row.perplexity / base.perplexity - 1.0) * 100.0,
            row.decode_tokens_per_s / base.decode_tokens_per_s.max(f64::EPSILON)
        );
    }
    println!("(Δ and x are relative to the first row, {})", base.quant);
    Ok(())
}

/// Real sentences from the text: split at sentence ends, short fragments dropped.
fn sentences_of(text: &str, count: usize) -> Vec<&str> {
    text.split_inclusive(['.', '?', '!'])
        .map(str::trim)
        .filter(|s| s.len() >= 20)
        .take(count)
        .collect()
}

#[derive(Serialize)]
struct EncoderRow {
    quant: WeightFormat,
    weights_bytes: usize,
    sentences_per_s: f64,
    /// Mean cosine similarity of each sentence embedding to the f32 model's.
    cosine_vs_f32: f64,
    min_cosine_vs_f32: f64,
    speed: Summary,
}

fn bench_quant_encoder(
    global: &GlobalOptions,
    args: &BenchQuantArgs,
    files: &dynexec_core::hub::ModelFiles,
    text: &str,
    text_path: &Path,
) -> Result<()> {
    let sentences = sentences_of(text, args.sentences);
    anyhow::ensure!(
        !sentences.is_empty(),
        "{} has no sentences of 20 characters or more",
        text_path.display()
    );
    let (reference_model, tokenizer) =
        load_encoder(global, files, args.model.tokenizer.as_deref())?;
    let device = reference_model.device().clone();
    let reference = reference_model.sentence_embeddings(&tokenizer, &sentences, args.batch_size)?;
    let mut models = Vec::new();
    for &format in &args.formats {
        let mut m = reference_model.clone();
        dynexec_quant::quantize_in_place(&mut m, format)?;
        models.push(m);
    }
    let mut embeddings = Vec::new();
    let speed = interleave(models.len(), args.warmup, args.runs, |i| {
        let start = Instant::now();
        let e = models[i].sentence_embeddings(&tokenizer, &sentences, args.batch_size)?;
        let secs = start.elapsed().as_secs_f64();
        if embeddings.len() < models.len() {
            embeddings.push(e);
        }
        anyhow::Ok(sentences.len() as f64 / secs)
    })?;
    let mut rows = Vec::new();
    for (i, m) in models.iter().enumerate() {
        // Both sides are unit vectors, so the row-wise dot product is the cosine.
        let cosines: Vec<f32> = (&embeddings[i] * &reference)?.sum(1)?.to_vec1()?;
        let speed_summary = Summary::of(&speed[i]).unwrap_or(NO_SAMPLES);
        rows.push(EncoderRow {
            quant: args.formats[i],
            weights_bytes: m.weight_bytes(),
            sentences_per_s: speed_summary.median,
            cosine_vs_f32: cosines.iter().map(|&c| c as f64).sum::<f64>() / cosines.len() as f64,
            min_cosine_vs_f32: cosines.iter().cloned().fold(f32::INFINITY, f32::min) as f64,
            speed: speed_summary,
        });
    }
    let report = serde_json::json!({
        "model": args.model.model,
        "device": device_name(&device),
        "threads": candle_core::utils::get_num_threads(),
        "text": text_path.display().to_string(),
        "sentences": sentences.len(),
        "batch_size": args.batch_size,
        "runs": args.runs,
        "rows": rows,
    });
    if global.json {
        return print_json(&report);
    }
    println!(
        "model {} | device {} | threads {} | {} sentences of {} in batches of {} x{} runs",
        args.model.model,
        device_name(&device),
        candle_core::utils::get_num_threads(),
        sentences.len(),
        text_path.display(),
        args.batch_size,
        args.runs
    );
    println!(
        "{:<6} {:>10} {:>16} {:>14} {:>14}",
        "quant", "weights", "sentences/s", "cosine vs f32", "min cosine"
    );
    for row in &rows {
        println!(
            "{:<6} {:>8.1}MB {:>16} {:>14.5} {:>14.5}",
            row.quant.to_string(),
            row.weights_bytes as f64 / 1e6,
            format!("{:.1} ± {:.1}", row.speed.median, row.speed.stddev),
            row.cosine_vs_f32,
            row.min_cosine_vs_f32
        );
    }
    Ok(())
}
