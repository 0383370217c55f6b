//! `dynexec bench quant`: every precision of one model side by side.

use crate::commands::common::{load_model, read_text, ModelArgs};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::Result;
use clap::Args;
use dynexec_core::device::device_name;
use dynexec_engine::bench::bench_prompt;
use dynexec_engine::bench::quant::{
    bench_decoder_formats, bench_encoder_formats, sentences_of, QuantRow,
};
use dynexec_models::bert::EncoderFiles;
use dynexec_quant::perplexity::Window;
use dynexec_quant::{QuantTarget, WeightFormat};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct BenchQuantArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Formats to compare (f32, f16, q8_0, q4_0, q4_1).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,q8_0,q4_0,q4_1")]
    formats: Vec<WeightFormat>,
    /// Held-out text for perplexity (default: the held-out slice of the `sotu` data set).
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

pub fn run(global: &GlobalOptions, args: BenchQuantArgs) -> Result<()> {
    anyhow::ensure!(
        args.runs > 0 && !args.formats.is_empty(),
        "--runs and --formats must not be empty"
    );
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => global.data_dir(None, "sotu")?.join("heldout.txt"),
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
    let mut text_ids = models[0].tokenizer.encode(&text)?;
    text_ids.truncate(args.eval_tokens);
    let total = ((args.warmup + args.runs) * models.len()) as u64;
    let bar = progress_bar(global, total, "speed [{bar:30}] {pos}/{len} runs {msg}");
    let scored = progress_bar(
        global,
        text_ids.len().saturating_sub(1) as u64,
        "perplexity {msg} [{bar:30}] {pos}/{len} tokens {per_sec}",
    );
    let formats: Vec<_> = args
        .formats
        .iter()
        .zip(&models)
        .map(|(&format, loaded)| (format, &loaded.model))
        .collect();
    let window = Window {
        context: args.context,
        stride: args.stride,
    };
    let rows = bench_decoder_formats(
        &formats,
        &prompt,
        args.gen_tokens,
        args.warmup,
        args.runs,
        &text_ids,
        window,
        |format| {
            bar.set_message(format.to_string());
            bar.inc(1);
        },
        |format, done, _| {
            bar.finish_and_clear();
            scored.set_message(format.to_string());
            scored.set_position(done as u64);
        },
    )?;
    scored.finish_and_clear();
    bar.finish_and_clear();
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

fn bench_quant_encoder(
    global: &GlobalOptions,
    args: &BenchQuantArgs,
    files: &dynexec_core::files::ModelFiles,
    text: &str,
    text_path: &Path,
) -> Result<()> {
    let sentences = sentences_of(text, args.sentences);
    let encoder = EncoderFiles::find(files, args.model.tokenizer.as_deref())?;
    let (reference, tokenizer) = encoder.load(&global.open_device()?)?;
    let device = reference.device().clone();
    let rows = bench_encoder_formats(
        &reference,
        &tokenizer,
        &sentences,
        &args.formats,
        args.batch_size,
        args.warmup,
        args.runs,
    )
    .map_err(|e| e.context(text_path.display().to_string()))?;
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
