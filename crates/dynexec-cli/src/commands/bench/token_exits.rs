//! `dynexec bench token-exits`: per-token early exit in a decoder next to full-depth decoding,
//! in one process — agreement with full-depth greedy tokens, perplexity, layers used and
//! decoding speed for each policy.

use crate::commands::common::{
    default_exit_adapters, load_exit_adapters, read_jsonl, read_text, ModelArgs,
};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::Result;
use clap::Args;
use dynexec_engine::bench::token_exits::{bench_token_exits, tradeoff};
use dynexec_exit::token_exit::TokenExitPolicy;
use dynexec_models::generation::GenerateOptions;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchTokenExitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Exit adapters: a manifest name or a folder with adapters.json (default: the manifest's
    /// MODEL-exits).
    #[arg(long)]
    exit_adapters: Option<String>,
    /// Policies to compare with full depth.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "classifier:0.95,classifier:0.9,classifier:0.8,classifier:0.9:propagate,confidence:0.9,saturation:0.99"
    )]
    policies: Vec<String>,
    /// Folder with truthfulqa.jsonl (default: the `prompts` data set, pulled on first use); the
    /// first --questions questions are the prompts.
    #[arg(long)]
    prompts_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    questions: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Held-out text for perplexity (default: the held-out slice of the `sotu` data set).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the text scored, one decoding step each.
    #[arg(long, default_value_t = 256)]
    eval_tokens: usize,
    /// Also draw each measure's agreement with full-depth greedy tokens against the layers it
    /// saves, across the thresholds given, into this PNG.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

pub fn run(global: &GlobalOptions, args: BenchTokenExitsArgs) -> Result<()> {
    let loaded = args.model.load(global)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let adapters_name = match &args.exit_adapters {
        Some(name) => name.clone(),
        None => default_exit_adapters(global, &args.model.model)?,
    };
    let adapters = load_exit_adapters(global, &adapters_name, model)?;
    let policies = args
        .policies
        .iter()
        .map(|p| TokenExitPolicy::parse(p))
        .collect::<dynexec_core::Result<Vec<_>>>()?;
    let dir = global.data_dir(args.prompts_dir.as_deref(), "prompts")?;
    let prompts = read_jsonl(&dir.join("truthfulqa.jsonl"), "question", args.questions)?
        .iter()
        .map(|q| Ok(tokenizer.encode(&tokenizer.chat_prompt(None, q)?)?))
        .collect::<Result<Vec<_>>>()?;
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => global.data_dir(None, "sotu")?.join("heldout.txt"),
    };
    let mut text_ids = tokenizer.encode(&read_text(&text_path)?)?;
    text_ids.truncate(args.eval_tokens + 1);
    let options = GenerateOptions::greedy(args.max_tokens);

    let bar = progress_bar(
        global,
        (policies.len() + 1) as u64,
        "policies {bar:30} {pos}/{len} {msg}",
    );
    let rows = bench_token_exits(
        model,
        tokenizer,
        &adapters,
        &policies,
        &prompts,
        &text_ids,
        &options,
        |policy| {
            bar.set_message(policy.to_string());
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    if let Some(path) = &args.plot {
        let series = tradeoff(&rows);
        let title = format!("{}: per-token early exit", args.model.model);
        let chart = dynexec_plot::curves::LineChart {
            title: &title,
            x_desc: "layers saved (%)",
            y_desc: "agreement with full-depth greedy tokens (%)",
            series: &series,
        };
        crate::commands::common::write_curves(global, path, &chart)?;
    }
    if global.json {
        return print_json(&serde_json::json!({
            "model": args.model.model,
            "adapters": adapters_name,
            "prompts": prompts.len(),
            "max_tokens": args.max_tokens,
            "eval_tokens": text_ids.len().saturating_sub(1),
            "threads": global.threads,
            "rows": rows,
        }));
    }
    println!(
        "{} prompts x {} tokens; perplexity over {} tokens of {}",
        prompts.len(),
        args.max_tokens,
        text_ids.len().saturating_sub(1),
        text_path.display()
    );
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>7}",
        "policy", "agreement", "identical", "mean exit", "saved", "tok/s", "speedup", "ppl", "Δppl"
    );
    for r in &rows {
        println!(
            "{:<26} {:>8.1}% {:>6}/{:<2} {:>9.1} {:>6.1}% {:>8.1} {:>7.2}x {:>8.2} {:>6.1}%",
            r.policy,
            r.agreement * 100.0,
            r.identical_outputs,
            prompts.len(),
            r.mean_exit_layer,
            r.layers_saved_pct,
            r.decode_tokens_per_s,
            r.speedup,
            r.perplexity,
            r.perplexity_delta_pct
        );
    }
    Ok(())
}
