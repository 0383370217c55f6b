//! `dynexec bench token-exits`: per-token early exit in a decoder next to full-depth decoding,
//! in one process — agreement with full-depth greedy tokens, perplexity, layers used and
//! decoding speed for each policy.

use crate::commands::common::{
    load_exit_adapters, read_jsonl, read_text, ModelArgs, DEFAULT_EXIT_ADAPTERS,
};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::Result;
use candle_core::Tensor;
use clap::Args;
use dynexec_engine::mean;
use dynexec_exit::token_exit::{TokenExit, TokenExitPolicy};
use dynexec_models::generation::{generate, generate_with_step, GenerateOptions};
use dynexec_models::kv_cache::KvCache;
use dynexec_models::llama::Llama;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchTokenExitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Exit adapters: a manifest name or a folder with adapters.json.
    #[arg(long, default_value = DEFAULT_EXIT_ADAPTERS)]
    exit_adapters: String,
    /// Policies to compare with full depth.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "confidence:0.9,confidence:0.7,confidence:0.5,saturation:0.99,saturation:0.98,saturation:0.97"
    )]
    policies: Vec<String>,
    /// Folder with truthfulqa.jsonl (default: where scripts/fetch-prompts.sh puts it); the
    /// first --questions questions are the prompts.
    #[arg(long)]
    prompts_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    questions: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Held-out text for perplexity (default: the State of the Union slice of scripts/fetch-sotu.sh).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the text scored, one decoding step each.
    #[arg(long, default_value_t = 256)]
    eval_tokens: usize,
}

#[derive(Serialize)]
struct Row {
    policy: String,
    /// Share of decoding steps, fed the full-depth greedy tokens, whose top token is the
    /// full-depth one.
    agreement: f64,
    /// Prompts whose free-running output equals full-depth decoding's.
    identical_outputs: usize,
    mean_exit_layer: f64,
    layers_saved_pct: f64,
    decode_tokens_per_s: f64,
    /// Over full-depth decoding of the same prompts, interleaved prompt by prompt.
    speedup: f64,
    perplexity: f64,
    perplexity_delta_pct: f64,
}

/// How a decoding step is done: full depth, or with an early-exit policy.
enum Stepper<'a> {
    Full(&'a Llama),
    Exit(TokenExit<'a>),
}

impl Stepper<'_> {
    fn step(&mut self, ids: &[u32], cache: &mut KvCache) -> dynexec_core::Result<Tensor> {
        match self {
            Stepper::Full(model) => model.forward_last(ids, cache, None),
            Stepper::Exit(exit) => exit.step(ids, cache),
        }
    }

    fn exit_layers(&self) -> &[usize] {
        match self {
            Stepper::Full(_) => &[],
            Stepper::Exit(exit) => &exit.exit_layers,
        }
    }
}

pub fn run(global: &GlobalOptions, args: BenchTokenExitsArgs) -> Result<()> {
    let loaded = args.model.load(global)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let adapters = load_exit_adapters(global, &args.exit_adapters, model)?;
    let policies = args
        .policies
        .iter()
        .map(|p| TokenExitPolicy::parse(p))
        .collect::<dynexec_core::Result<Vec<_>>>()?;
    let dir = args
        .prompts_dir
        .clone()
        .unwrap_or_else(|| dynexec_core::hub::default_cache_dir().join("data/prompts"));
    let prompts = read_jsonl(&dir.join("truthfulqa.jsonl"), "question", args.questions)?
        .iter()
        .map(|q| Ok(tokenizer.encode(&tokenizer.chat_prompt(None, q)?)?))
        .collect::<Result<Vec<_>>>()?;
    let text_path = args
        .text
        .clone()
        .unwrap_or_else(|| dynexec_core::hub::default_cache_dir().join("data/sotu/heldout.txt"));
    let mut text_ids = tokenizer.encode(&read_text(&text_path)?)?;
    text_ids.truncate(args.eval_tokens + 1);
    let options = GenerateOptions::greedy(args.max_tokens);

    let bar = progress_bar(
        global,
        (policies.len() + 1) as u64,
        "policies {bar:30} {pos}/{len} {msg}",
    );
    // Full depth first: its greedy tokens are the reference.
    let mut reference = Vec::new();
    for p in &prompts {
        reference.push(generate(model, tokenizer, p, &options, None, |_| Ok(()))?.token_ids);
    }
    let full_ppl = perplexity(&mut Stepper::Full(model), model, &text_ids)?;
    bar.inc(1);
    let depth = model.num_layers();
    // Full-depth speed is measured again next to every policy, prompt by prompt, so each
    // speedup compares runs minutes (not tens of minutes) apart on this noisy machine.
    let (mut all_full_secs, mut all_full_tokens) = (0.0, 0);
    let mut rows = Vec::new();
    for policy in policies {
        bar.set_message(policy.to_string());
        // Agreement: teacher-forced on the full-depth tokens.
        let mut agree = 0;
        let mut steps = 0;
        let mut exit = TokenExit::new(model, &adapters, policy)?;
        for (p, tokens) in prompts.iter().zip(&reference) {
            let mut cache = model.new_cache();
            exit.step(p, &mut cache)?;
            for pair in tokens.windows(2) {
                let logits = exit.step(&pair[..1], &mut cache)?;
                agree += usize::from(Llama::argmax_rows(&logits.unsqueeze(0)?)?[0] == pair[1]);
                steps += 1;
            }
        }
        // Speed and identical outputs: free-running generation, interleaved with full depth.
        let mut free = TokenExit::new(model, &adapters, policy)?;
        let (mut secs, mut tokens, mut identical) = (0.0, 0, 0);
        let (mut full_secs, mut full_tokens) = (0.0, 0);
        for (p, reference) in prompts.iter().zip(&reference) {
            let full = generate(model, tokenizer, p, &options, None, |_| Ok(()))?;
            full_secs += full.stats.decode_secs;
            full_tokens += full.stats.generated_tokens.saturating_sub(1);
            let out = generate_with_step(
                model,
                tokenizer,
                p,
                &options,
                None,
                |ids, cache, _| free.step(ids, cache),
                |_| Ok(()),
            )?;
            secs += out.stats.decode_secs;
            tokens += out.stats.generated_tokens.saturating_sub(1);
            identical += usize::from(&out.token_ids == reference);
        }
        let mut scoring = Stepper::Exit(TokenExit::new(model, &adapters, policy)?);
        let ppl = perplexity(&mut scoring, model, &text_ids)?;
        let mut layers = free.exit_layers.clone();
        layers.extend_from_slice(scoring.exit_layers());
        let mean_exit = mean(&layers);
        let speed = tokens as f64 / secs.max(1e-9);
        let full_speed = full_tokens as f64 / full_secs.max(1e-9);
        all_full_secs += full_secs;
        all_full_tokens += full_tokens;
        rows.push(Row {
            policy: policy.to_string(),
            agreement: agree as f64 / steps.max(1) as f64,
            identical_outputs: identical,
            mean_exit_layer: mean_exit,
            layers_saved_pct: 100.0 * (1.0 - mean_exit / depth as f64),
            decode_tokens_per_s: speed,
            speedup: speed / full_speed,
            perplexity: ppl,
            perplexity_delta_pct: 100.0 * (ppl / full_ppl - 1.0),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    rows.insert(
        0,
        Row {
            policy: "full".into(),
            agreement: 1.0,
            identical_outputs: prompts.len(),
            mean_exit_layer: depth as f64,
            layers_saved_pct: 0.0,
            decode_tokens_per_s: all_full_tokens as f64 / all_full_secs.max(1e-9),
            speedup: 1.0,
            perplexity: full_ppl,
            perplexity_delta_pct: 0.0,
        },
    );
    if global.json {
        return print_json(&serde_json::json!({
            "model": args.model.model,
            "adapters": args.exit_adapters,
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
        "{:<18} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>7}",
        "policy", "agreement", "identical", "mean exit", "saved", "tok/s", "speedup", "ppl", "Δppl"
    );
    for r in &rows {
        println!(
            "{:<18} {:>8.1}% {:>6}/{:<2} {:>9.1} {:>6.1}% {:>8.1} {:>7.2}x {:>8.2} {:>6.1}%",
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

/// Perplexity of `ids[1..]`, scoring one token per decoding step (so early exit applies to
/// every position, as in generation).
fn perplexity(stepper: &mut Stepper, model: &Llama, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache();
    let mut nll = 0.0;
    for pair in ids.windows(2) {
        let logits = stepper.step(&pair[..1], &mut cache)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, 0)?;
        nll -= f64::from(log_probs.get(pair[1] as usize)?.to_scalar::<f32>()?);
    }
    Ok((nll / ids.len().saturating_sub(1).max(1) as f64).exp())
}
