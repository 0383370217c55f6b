//! `dynexec eval perplexity MODEL --text FILE`.

use super::common::{evaluate, load_model, read_text, WindowArgs, DEFAULT_DECODER};
use crate::options::{print_json, GlobalOptions};
use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Sliding-window perplexity of a decoder on a text file.
    #[command(
        after_help = "Examples:\n  dynexec eval perplexity smollm2-135m-instruct --text \"$(dynexec data path sotu)/heldout.txt\" --max-tokens 2048\n  dynexec eval perplexity smollm2-135m-instruct --quant q8_0 --text heldout.txt --json"
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
