//! `dynexec bench speculative`: plain decoding against every drafter x controller, on the
//! same target and prompts, in one process.

use crate::commands::common::{
    build_drafter, load_model, read_jsonl, resolve_lookahead, DraftCostArgs, ModelArgs,
};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{Context, Result};
use clap::Args;
use dynexec_core::device::device_name;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_engine::bench::llama_cpp::LlamaSpeculative;
use dynexec_engine::bench::speculative::LlamaSpeculativePeer;
use dynexec_engine::bench::speculative::{
    bench_prompt_set, NamedDrafter, PromptSet, HUMANEVAL_TEST_START,
};
use dynexec_models::generation::GenerateOptions;
use dynexec_quant::QuantTarget;
use dynexec_quant::WeightFormat;
use dynexec_spec::cost::verification_costs;
use dynexec_spec::draft_spec::DraftSpec;
use dynexec_spec::token_ranking::DraftVocabSpec;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Example:\n  dynexec bench speculative --threads 2 --target-quant f32 --target-quant q8_0"
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
    /// Draft-model formats to compare (repeat the flag): `stored`, or a format to convert
    /// to as `generate --draft-quant` does; each model draft runs with each.
    #[arg(long = "draft-quant", default_values = ["stored"])]
    draft_quants: Vec<String>,
    /// Draft vocabularies to compare (repeat the flag): `full`, or `N[:RANKING]` as
    /// `generate --draft-vocab` takes it (FR-Spec); each model draft runs with each.
    #[arg(long = "draft-vocab", default_values = ["full"])]
    draft_vocabs: Vec<String>,
    /// Also run llama.cpp's `llama-speculative-simple` (this binary) on the same target
    /// GGUF and the first draft model's GGUF, the same prompts, greedy, with the same threads,
    /// at each fixed lookahead's K as its maximum draft length; rows interleave prompt by
    /// prompt. scripts/build-llama-bench.sh builds it.
    #[arg(long, value_name = "PATH")]
    compare_llama_cpp: Option<PathBuf>,
    /// Measure the target's forward over 1..=N rows as a fraction of one decoding step (the
    /// verification cost); 0 skips it.
    #[arg(long, default_value_t = 8)]
    verify_rows: usize,
    /// Lookahead controllers (repeat the flag), as `generate --lookahead` takes them.
    #[arg(long = "lookahead", default_values = ["fixed:2", "fixed:4", "fixed:8", "heuristic", "confidence"])]
    lookaheads: Vec<String>,
    /// Folder with truthfulqa.jsonl, xsum.jsonl and humaneval.jsonl (default: where
    /// the `prompts` and `humaneval` data sets, pulled on first use).
    #[arg(long)]
    prompts_dir: Option<PathBuf>,
    /// TruthfulQA questions to use.
    #[arg(long, default_value_t = 2)]
    questions: usize,
    /// BBC articles to summarize.
    #[arg(long, default_value_t = 2)]
    articles: usize,
    /// HumanEval problems to complete as code (raw prompts), from --humaneval-split
    /// (the `humaneval` data set).
    #[arg(long, default_value_t = 0)]
    humaneval: usize,
    /// Which half of HumanEval: `test` (the last 82, for reported figures) or `train` (the
    /// first 82, for choosing settings and training DISCO).
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    humaneval_split: String,
    /// Articles are cut to this many tokens.
    #[arg(long, default_value_t = 384)]
    article_tokens: usize,
    /// Tokens to generate per prompt (greedy).
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
}

fn prompt_sets(
    global: &GlobalOptions,
    args: &BenchSpeculativeArgs,
    tokenizer: &TextTokenizer,
) -> Result<Vec<PromptSet>> {
    let dir = global.data_dir(args.prompts_dir.as_deref(), "prompts")?;
    if args.prompts_dir.is_none() && args.humaneval > 0 {
        global.data_dir(None, "humaneval")?;
    }
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
            let skip = if args.humaneval_split == "train" {
                0
            } else {
                HUMANEVAL_TEST_START
            };
            let split_len = if skip == 0 {
                HUMANEVAL_TEST_START
            } else {
                usize::MAX
            };
            all.into_iter().skip(skip).take(n.min(split_len)).collect()
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

/// The GGUF file a model reference resolves to (llama.cpp reads only GGUF).
fn gguf_of(global: &GlobalOptions, reference: &str) -> Result<PathBuf> {
    let files = global.hub()?.resolve(reference)?;
    Ok(files
        .find(".gguf")
        .with_context(|| format!("`{reference}` has no GGUF file for llama.cpp to read"))?
        .to_path_buf())
}

/// The first draft model among `drafts` (inside a chain too).
fn first_draft_model(drafts: &[DraftSpec]) -> Option<String> {
    fn find(spec: &DraftSpec) -> Option<String> {
        match spec {
            DraftSpec::Model(reference) => Some(reference.clone()),
            DraftSpec::Chain(first, then) => find(first).or_else(|| find(then)),
            _ => None,
        }
    }
    drafts.iter().find_map(find)
}

/// Each value parsed, `none` (the word for "leave it as it is") as `None`.
fn parse_or_none<T: std::str::FromStr<Err = dynexec_core::Error>>(
    values: &[String],
    none: &str,
) -> dynexec_core::Result<Vec<Option<T>>> {
    values
        .iter()
        .map(|v| {
            if v == none {
                Ok(None)
            } else {
                v.parse().map(Some)
            }
        })
        .collect()
}

pub fn run(global: &GlobalOptions, args: BenchSpeculativeArgs) -> Result<()> {
    let options = GenerateOptions::greedy(args.max_tokens);
    let lookaheads: Vec<String> = args
        .lookaheads
        .iter()
        .map(|l| resolve_lookahead(global, l))
        .collect::<Result<_>>()?;
    let drafts: Vec<DraftSpec> = args
        .drafts
        .iter()
        .map(|d| d.parse())
        .collect::<Result<_, _>>()?;
    let draft_quants: Vec<Option<WeightFormat>> = parse_or_none(&args.draft_quants, "stored")?;
    let vocabs: Vec<Option<DraftVocabSpec>> = parse_or_none(&args.draft_vocabs, "full")?;
    let threads = candle_core::utils::get_num_threads();
    let llama_cpp = match &args.compare_llama_cpp {
        None => Vec::new(),
        Some(binary) => {
            let draft = first_draft_model(&drafts).context("--compare-llama-cpp needs a draft model among --draft (llama.cpp drafts with a model)")?;
            let mut draft_max: Vec<usize> = args
                .lookaheads
                .iter()
                .filter_map(|l| l.strip_prefix("fixed:")?.parse().ok())
                .collect();
            if draft_max.is_empty() {
                draft_max.push(4);
            }
            let tool = LlamaSpeculative::new(
                binary,
                &gguf_of(global, &args.model.model)?,
                &gguf_of(global, &draft)?,
                threads,
            )?;
            vec![LlamaSpeculativePeer { tool, draft_max }]
        }
    };
    let mut rows = Vec::new();
    let mut verify = Vec::new();
    let mut device = String::new();
    for &quant in &args.target_quants {
        let target = load_model(
            global,
            &args.model.model,
            args.model.tokenizer.as_deref(),
            Some(quant),
        )?;
        device = device_name(target.model.device());
        let sets = prompt_sets(global, &args, &target.tokenizer)?;
        if args.verify_rows > 0 {
            let context = &sets[0].prompts[0];
            for cost in verification_costs(&target.model, context, args.verify_rows, 5)? {
                verify.push((quant.to_string(), cost));
            }
        }
        let mut drafters = Vec::new();
        for spec in &drafts {
            // Only a draft model can be converted or narrowed: other drafts run once.
            let (quants, vocabs) = if spec.uses_a_model() {
                (draft_quants.as_slice(), vocabs.as_slice())
            } else {
                (&[None][..], &[None][..])
            };
            for quant in quants {
                for vocab in vocabs {
                    let cost = DraftCostArgs {
                        draft_quant: *quant,
                        draft_vocab: vocab.clone(),
                    };
                    let drafter =
                        build_drafter(global, spec, &cost, (&args.model.model, &target), None)?;
                    let name = drafter.name();
                    drafters.push(NamedDrafter { name, drafter });
                }
            }
        }
        let per_prompt = 1
            + drafters.len() * args.lookaheads.len()
            + llama_cpp.iter().map(|p| p.draft_max.len()).sum::<usize>();
        let runs = sets.iter().map(|s| s.prompts.len()).sum::<usize>() * per_prompt;
        let bar = progress_bar(
            global,
            runs as u64,
            &format!("target {quant} [{{bar:30}}] {{pos}}/{{len}} generations {{msg}}"),
        );
        for set in &sets {
            rows.extend(bench_prompt_set(
                &target.model,
                &target.tokenizer,
                &quant.to_string(),
                set,
                &mut drafters,
                &lookaheads,
                &llama_cpp,
                &options,
                |label| {
                    bar.set_message(label.to_string());
                    bar.inc(1);
                },
            )?);
        }
        bar.finish_and_clear();
    }
    let verify_json: Vec<_> = verify
        .iter()
        .map(|(quant, c)| serde_json::json!({"target_quant": quant, "rows": c.rows, "ms": c.secs * 1e3, "fraction_of_step": c.fraction_of_step}))
        .collect();
    if global.json {
        return print_json(&serde_json::json!({
            "model": args.model.model,
            "device": device,
            "threads": threads,
            "max_tokens": args.max_tokens,
            "verification": verify_json,
            "rows": rows,
        }));
    }
    println!(
        "model {} | device {} | threads {} | greedy, up to {} tokens per prompt | {} questions, {} articles, {} HumanEval problems ({} split)",
        args.model.model,
        device,
        threads,
        args.max_tokens,
        args.questions,
        args.articles,
        args.humaneval,
        args.humaneval_split
    );
    if !verify.is_empty() {
        println!("verification: target forward over N rows, as a fraction of one decoding step");
        for (quant, c) in &verify {
            println!(
                "  {quant:<6} {:>2} rows {:>7.1} ms {:>5.2}x",
                c.rows,
                c.secs * 1e3,
                c.fraction_of_step
            );
        }
    }
    println!("prompts     target engine    draft                          lookahead      tok/s  speedup   accept acc/step draft-ms verify-ms identical");
    for r in &rows {
        println!(
            "{:<11} {:<6} {:<9} {:<30} {:<11} {:>8.1} {:>7.2}x {:>7.1}% {:>8.2} {:>8.1} {:>9.1} {:>9}",
            r.prompts,
            r.target_quant,
            r.engine,
            r.draft,
            r.lookahead,
            r.tokens_per_s,
            r.speedup,
            r.acceptance_rate * 100.0,
            r.mean_accepted_length,
            r.draft_ms_per_forward,
            r.verify_ms_per_step,
            match r.identical_to_plain {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    Ok(())
}
