//! `dynexec eval perplexity MODEL --text FILE`.

use super::generate::{load_model, DEFAULT_DECODER};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use dynexec_models::llama::LoadedDecoder;
use dynexec_quant::perplexity::{perplexity, Perplexity, Window};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Sliding-window perplexity of a decoder on a text file.
    #[command(
        after_help = "Examples:\n  scripts/fetch-sotu.sh   # held-out State of the Union text\n  dynexec eval perplexity smollm2-135m-instruct --text \"$DYNEXEC_CACHE/data/sotu/heldout.txt\" --max-tokens 2048\n  dynexec eval perplexity smollm2-135m-instruct --quant q8_0 --text heldout.txt --json"
    )]
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// The model (manifest name, hf: reference or path).
    #[arg(default_value = DEFAULT_DECODER)]
    pub model: String,
    /// UTF-8 text to score.
    #[arg(long)]
    pub text: PathBuf,
    #[command(flatten)]
    pub window: WindowArgs,
}

#[derive(Args, Clone)]
pub struct WindowArgs {
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// How far each window advances (a window scores only the tokens past the previous one).
    #[arg(long, default_value_t = 256)]
    pub stride: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

impl WindowArgs {
    pub fn window(&self) -> Window {
        Window {
            context: self.context,
            stride: self.stride,
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    model: &'a str,
    quant: Option<String>,
    perplexity: f64,
    tokens: usize,
    mean_nll: f64,
    context: usize,
    stride: usize,
}

pub fn run(global: &GlobalOptions, cmd: EvalCommand) -> Result<()> {
    let EvalCommand::Perplexity(args) = cmd;
    let text = read_text(&args.text)?;
    let loaded = load_model(global, &args.model, None, global.quant)?;
    let result = evaluate(&loaded, &text, &args.window, global)?;
    let report = Report {
        model: &args.model,
        quant: global.quant.map(|q| q.to_string()),
        perplexity: result.perplexity,
        tokens: result.tokens,
        mean_nll: result.mean_nll,
        context: args.window.context,
        stride: args.window.stride,
    };
    if global.json {
        return print_json(&report);
    }
    println!(
        "perplexity {:.4} over {} tokens (context {}, stride {}, linear layers {})",
        report.perplexity,
        report.tokens,
        report.context,
        report.stride,
        report.quant.as_deref().unwrap_or("as stored")
    );
    Ok(())
}

pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading --text {} (for the State of the Union slice run scripts/fetch-sotu.sh)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        !text.trim().is_empty(),
        "--text {} is empty",
        path.display()
    );
    Ok(text)
}

/// Tokenizes `text` (cut to `--max-tokens`) and scores it, with a progress bar.
pub fn evaluate(
    loaded: &LoadedDecoder,
    text: &str,
    window: &WindowArgs,
    global: &GlobalOptions,
) -> Result<Perplexity> {
    let mut tokens = loaded.tokenizer.encode(text)?;
    if let Some(max) = window.max_tokens {
        tokens.truncate(max);
    }
    let bar = progress_bar(
        global,
        tokens.len().saturating_sub(1) as u64,
        "perplexity [{bar:30}] {pos}/{len} tokens {per_sec}",
    );
    let result = perplexity(&loaded.model, &tokens, window.window(), |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(result)
}
