//! `dynexec bench speculative`: plain decoding against every drafter x controller, on the
//! same target and prompts, in one process.

use crate::commands::common::{build_drafter, load_model, read_jsonl, ModelArgs};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::Result;
use clap::Args;
use dynexec_core::device::device_name;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_engine::bench::speculative::{
    bench_prompt_set, NamedDrafter, PromptSet, HUMANEVAL_TEST_START,
};
use dynexec_models::generation::GenerateOptions;
use dynexec_quant::QuantTarget;
use dynexec_quant::WeightFormat;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Example:\n  scripts/fetch-prompts.sh\n  dynexec bench speculative --threads 2 --target-quant f32 --target-quant q8_0"
)]
pub struct BenchSpeculativeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Target precisions to compare (repeat the flag; `auto` keeps a GGUF's stored types where
    /// a fast kernel takes them); each is measured against its own plain decoding.
    #[arg(long = "target-quant", default_values = ["f32", "q8_0"])]
    target_quants: Vec<QuantTarget>,
    /// Drafters (repeat the flag), as `generate --draft` takes them.
    #[arg(long = "draft", default_values = ["ngram:3,10", "self-quant:q4_0", "self-layers:8"])]
    drafts: Vec<String>,
    /// Convert draft models to this format, as `generate --draft-quant`.
    #[arg(long)]
    draft_quant: Option<WeightFormat>,
    /// Lookahead controllers (repeat the flag), as `generate --lookahead` takes them.
    #[arg(long = "lookahead", default_values = ["fixed:2", "fixed:4", "fixed:8", "heuristic", "confidence"])]
    lookaheads: Vec<String>,
    /// Folder with truthfulqa.jsonl, xsum.jsonl and humaneval.jsonl (default: where
    /// scripts/fetch-prompts.sh and fetch-humaneval.sh put them).
    #[arg(long)]
    prompts_dir: Option<PathBuf>,
    /// TruthfulQA questions to use.
    #[arg(long, default_value_t = 2)]
    questions: usize,
    /// BBC articles to summarize.
    #[arg(long, default_value_t = 2)]
    articles: usize,
    /// HumanEval problems to complete as code (raw prompts), taken from its test split (the
    /// last 82; scripts/fetch-humaneval.sh fetches them).
    #[arg(long, default_value_t = 0)]
    humaneval: usize,
    /// Articles are cut to this many tokens.
    #[arg(long, default_value_t = 384)]
    article_tokens: usize,
    /// Tokens to generate per prompt (greedy).
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
}

fn prompt_sets(args: &BenchSpeculativeArgs, tokenizer: &TextTokenizer) -> Result<Vec<PromptSet>> {
    let dir = args
        .prompts_dir
        .clone()
        .unwrap_or_else(|| dynexec_core::files::default_cache_dir().join("data/prompts"));
    let questions = read_jsonl(&dir.join("truthfulqa.jsonl"), "question", args.questions)?;
    let articles = read_jsonl(&dir.join("xsum.jsonl"), "document", args.articles)?;
    let mut summarize = Vec::new();
    for article in &articles {
        let ids = tokenizer.encode(article)?;
        let cut = tokenizer.decode(&ids[..ids.len().min(args.article_tokens)])?;
        summarize.push(format!("Summarize: {cut}"));
    }
    let humaneval = match args.humaneval {
        0 => Vec::new(),
        n => {
            let path = dir.join("humaneval.jsonl");
            let all = read_jsonl(&path, "prompt", usize::MAX)?;
            all.into_iter().skip(HUMANEVAL_TEST_START).take(n).collect()
        }
    };
    let sets = vec![
        PromptSet::chat("truthfulqa", &questions, tokenizer)?,
        PromptSet::chat("summarize", &summarize, tokenizer)?,
        PromptSet::raw("humaneval", &humaneval, tokenizer)?,
    ];
    // A set asked for with 0 prompts has no rows (rather than rows of NaN).
    let sets: Vec<PromptSet> = sets.into_iter().filter(|s| !s.prompts.is_empty()).collect();
    if sets.is_empty() {
        anyhow::bail!("--questions, --articles and --humaneval are all 0: nothing to benchmark");
    }
    Ok(sets)
}

pub fn run(global: &GlobalOptions, args: BenchSpeculativeArgs) -> Result<()> {
    let options = GenerateOptions::greedy(args.max_tokens);
    let mut rows = Vec::new();
    let mut device = String::new();
    for &quant in &args.target_quants {
        let target = load_model(
            global,
            &args.model.model,
            args.model.tokenizer.as_deref(),
            Some(quant),
        )?;
        device = device_name(target.model.device());
        let sets = prompt_sets(&args, &target.tokenizer)?;
        let runs = sets.iter().map(|s| s.prompts.len()).sum::<usize>()
            * (1 + args.drafts.len() * args.lookaheads.len());
        let bar = progress_bar(
            global,
            runs as u64,
            &format!("target {quant} [{{bar:30}}] {{pos}}/{{len}} generations {{msg}}"),
        );
        let mut drafters = args
            .drafts
            .iter()
            .map(|name| {
                Ok(NamedDrafter {
                    name: name.clone(),
                    drafter: build_drafter(
                        global,
                        &name.parse()?,
                        args.draft_quant,
                        &target,
                        None,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for set in &sets {
            rows.extend(bench_prompt_set(
                &target.model,
                &target.tokenizer,
                &quant.to_string(),
                set,
                &mut drafters,
                &args.lookaheads,
                &options,
                |label| {
                    bar.set_message(label.to_string());
                    bar.inc(1);
                },
            )?);
        }
        bar.finish_and_clear();
    }
    if global.json {
        return print_json(&serde_json::json!({
            "model": args.model.model,
            "device": device,
            "threads": candle_core::utils::get_num_threads(),
            "max_tokens": args.max_tokens,
            "rows": rows,
        }));
    }
    println!(
        "model {} | device {} | threads {} | greedy, up to {} tokens per prompt | {} questions, {} articles",
        args.model.model,
        device,
        candle_core::utils::get_num_threads(),
        args.max_tokens,
        args.questions,
        args.articles
    );
    println!("prompts     target draft              lookahead      tok/s  speedup   accept acc/step identical");
    for r in &rows {
        println!(
            "{:<11} {:<6} {:<18} {:<11} {:>8.1} {:>7.2}x {:>7.1}% {:>8.2} {:>9}",
            r.prompts,
            r.target_quant.to_string(),
            r.draft,
            r.lookahead,
            r.tokens_per_s,
            r.speedup,
            r.acceptance_rate * 100.0,
            r.mean_accepted_length,
            if r.identical_to_plain { "yes" } else { "NO" }
        );
    }
    Ok(())
}
