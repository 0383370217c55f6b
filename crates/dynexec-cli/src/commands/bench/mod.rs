//! `dynexec bench ...`: baseline and technique measured side by side in one process.

mod diffusion;
mod dsa;
mod exits;
mod generate;
mod quant;
mod serve;
mod speculative;
mod token_exits;

use crate::options::GlobalOptions;
use anyhow::Result;
use clap::Subcommand;

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
    Generate(generate::BenchGenerateArgs),
    /// Every precision of one decoder side by side: weight bytes in memory, prefill and
    /// decode tok/s, and perplexity on a held-out text.
    #[command(
        after_help = "Example:\n  dynexec bench quant --threads 2 --formats f32,q8_0,q4_1 --eval-tokens 1024"
    )]
    Quant(quant::BenchQuantArgs),
    /// Speculative decoding: plain decoding vs every drafter x lookahead controller on the
    /// same target and prompts (TruthfulQA questions, BBC articles to summarize).
    Speculative(speculative::BenchSpeculativeArgs),
    /// Dynamical similarity analysis: seconds per end-to-end comparison on the reference
    /// cases, next to the reference implementation's time, and a 10 x 10 distance matrix.
    Dsa(dsa::BenchDsaArgs),
    /// Early exit: accuracy, mean exit layer, % layers saved, batch-1 latency and batched
    /// throughput of each exit policy next to full depth, on a task's test split.
    #[command(
        after_help = "Example:\n  dynexec bench exits --model minilm-l6-reviews --threads 2"
    )]
    Exits(exits::BenchExitsArgs),
    /// Per-token early exit in a decoder: agreement with full-depth greedy tokens, perplexity,
    /// mean exit layer and decode speed of each policy next to full depth.
    #[command(
        name = "token-exits",
        after_help = "Example:\n  dynexec bench token-exits --threads 2 --policies confidence:0.9,saturation:0.99"
    )]
    TokenExits(token_exits::BenchTokenExitsArgs),
    /// Adaptive-step diffusion: fixed steps vs the predicted and converge policies on held-out
    /// prompts — mean steps, wall time, SSIM to the fixed-step image, class consistency, FID.
    #[command(after_help = "Example:\n  dynexec bench diffusion --threads 2 --seeds 2")]
    Diffusion(diffusion::BenchDiffusionArgs),
}

pub fn run(global: &GlobalOptions, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(args) => generate::run(global, args),
        BenchCommand::Quant(args) => quant::run(global, args),
        BenchCommand::Speculative(args) => speculative::run(global, args),
        BenchCommand::Dsa(args) => dsa::run(global, args),
        BenchCommand::Exits(args) => exits::run(global, args),
        BenchCommand::TokenExits(args) => token_exits::run(global, args),
        BenchCommand::Diffusion(args) => diffusion::run(global, args),
        BenchCommand::Serve(args) => serve::run(global, args),
    }
}
