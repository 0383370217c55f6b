//! `dynexec`: the command-line interface over dynexec's engines.
//!
//! Results go to stdout (text, or one JSON object with `--json`); progress and diagnostics go
//! to stderr.

mod commands;
mod options;

use clap::{Parser, Subcommand};
use options::GlobalOptions;

/// Dynamic-execution inference runtime: spend on each input only the compute it needs.
#[derive(Parser)]
#[command(name = "dynexec", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a decoder model, streaming it to stdout.
    Generate(commands::generate::GenerateArgs),
    /// Classify sentences or images with an early-exit model: each input stops at the layer
    /// its exit policy allows.
    #[command(
        after_help = "Examples:\n  dynexec classify --model minilm-l6-reviews \"A gorgeous, witty, seductive movie.\"\n  dynexec classify --model minilm-l6-reviews --policy confidence:0.9 --file reviews.txt --json\n  dynexec classify --model cnn-fashion-mnist shoe.png"
    )]
    Classify(commands::classify::ClassifyArgs),
    /// Train early-exit heads and calibrate their thresholds.
    #[command(subcommand)]
    Exits(commands::exits::ExitsCommand),
    /// Text to image with an adaptive number of denoising steps: fixed, predicted from the
    /// prompt, or stopped once the image has converged.
    #[command(
        after_help = "Examples:\n  dynexec diffuse --prompt \"a pair of jeans\" --steps predicted --n 4 --out jeans.png\n  dynexec diffuse --prompt \"an ankle boot\" --steps converge:0.01 --json\n  dynexec diffuse --model sd-turbo --prompt \"a red bicycle\" --steps 1   (Stable Diffusion from the hub)"
    )]
    Diffuse(commands::diffuse::DiffuseArgs),
    /// Train the diffusion model and its step predictor.
    #[command(subcommand)]
    Diffusion(commands::diffusion::DiffusionCommand),
    /// Benchmark an engine: baseline and technique side by side in one process.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Serve a decoder over HTTP with OpenAI's API (chat and text completions, streaming),
    /// batching concurrent requests; requests choose speculative decoding or early exit.
    Serve(commands::serve::ServeArgs),
    /// Prepare speculative decoding: rank tokens for a draft vocabulary (FR-Spec), train a
    /// lookahead classifier (DISCO).
    #[command(subcommand)]
    Spec(commands::spec::SpecCommand),
    /// Convert a model's linear layers (f32, f16, q8_0, q4_0, q4_1) and write a GGUF.
    Quantize(commands::quantize::QuantizeArgs),
    /// Measure model quality (perplexity).
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Look inside a model: compare the dynamics (DSA) and geometry (Procrustes, CKA, RSA) of
    /// its layers' hidden states, across precisions, prompts or models; or of any two arrays.
    Analyze(commands::analyze::AnalyzeArgs),
    /// List, pull and locate the models of the manifest.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
}

fn main() {
    let cli = Cli::parse();
    cli.global.apply_process_settings();
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(&cli.global, args),
        Command::Bench(cmd) => commands::bench::run(&cli.global, cmd),
        Command::Classify(args) => commands::classify::run(&cli.global, args),
        Command::Exits(cmd) => commands::exits::run(&cli.global, cmd),
        Command::Diffusion(cmd) => commands::diffusion::run(&cli.global, cmd),
        Command::Diffuse(args) => commands::diffuse::run(&cli.global, args),
        Command::Models(cmd) => commands::models::run(&cli.global, cmd),
        Command::Serve(args) => commands::serve::run(&cli.global, args),
        Command::Spec(cmd) => commands::spec::run(&cli.global, cmd),
        Command::Quantize(args) => commands::quantize::run(&cli.global, args),
        Command::Eval(cmd) => commands::eval::run(&cli.global, cmd),
        Command::Analyze(args) => commands::analyze::run(&cli.global, args),
    };
    if let Err(err) = result {
        eprintln!("error: {}", options::error_message(&err));
        std::process::exit(1);
    }
}
