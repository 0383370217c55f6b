//! `dynexec spec rank-tokens | train-lookahead`: what speculative decoding learns ahead of
//! time (FR-Spec's token ranking, DISCO's lookahead classifier).

use super::common::{build_drafter, read_jsonl, DraftCostArgs, ModelArgs};
use crate::options::{progress_bar, GlobalOptions};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use dynexec_core::card::reproduce_command;
use dynexec_engine::bench::speculative::{PromptSet, HUMANEVAL_TEST_START};
use dynexec_models::generation::GenerateOptions;
use dynexec_spec::cost::verification_costs;
use dynexec_spec::disco::{collect, train, Disco, DiscoCard, StepCosts, TargetShape, FEATURES};
use dynexec_spec::token_ranking::TokenRanking;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum SpecCommand {
    /// Count token frequencies on a corpus with a model's tokenizer (FR-Spec): `--draft-vocab
    /// N:FILE` then lets a draft model propose only the N most frequent tokens.
    #[command(
        name = "rank-tokens",
        after_help = "Example (the committed qwen2.5-token-ranking):\n  dynexec spec rank-tokens -m qwen2.5-coder-0.5b-instruct --corpus \"$(python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"stdlib\"])')\" --out models/qwen2.5-token-ranking/ranking.json"
    )]
    RankTokens(RankTokensArgs),
    /// Train DISCO's lookahead classifier for a target and draft: decode HumanEval's
    /// training problems drafting a fixed maximum, label each draft token with the target's
    /// verdict, fit, and pick the stopping threshold by simulated speed with the measured
    /// costs. Use it with `--lookahead disco:DIR`.
    #[command(
        name = "train-lookahead",
        after_help = "Example (the committed disco-qwen2.5-coder-1.5b-0.5b):\n  dynexec --threads 2 spec train-lookahead -m qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct --out models/disco-qwen2.5-coder-1.5b-0.5b"
    )]
    TrainLookahead(TrainLookaheadArgs),
}

#[derive(Args)]
pub struct TrainLookaheadArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The draft, as `generate --draft` takes it.
    #[arg(long)]
    draft: String,
    #[command(flatten)]
    draft_cost: DraftCostArgs,
    /// Tokens drafted per step while recording: the classifier's maximum lookahead.
    #[arg(long, default_value_t = 8)]
    max_lookahead: usize,
    /// HumanEval training problems to decode (from the first 82, the training split).
    #[arg(long, default_value_t = HUMANEVAL_TEST_START)]
    problems: usize,
    /// The last share of the problems is held out to report accuracy and speed.
    #[arg(long, default_value_t = 0.25)]
    validation_share: f64,
    /// Tokens generated per problem (greedy).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Folder with humaneval.jsonl (default: the `humaneval` data set, pulled on first use).
    #[arg(long)]
    prompts_dir: Option<PathBuf>,
    /// Folder to write the classifier's card.json into.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct RankTokensArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to count: files, or folders read recursively (files that are not UTF-8 text or
    /// are over 4 MB are skipped); a .jsonl file counts the string fields of each line.
    #[arg(long, required = true)]
    corpus: Vec<PathBuf>,
    /// Where to write the ranking (JSON).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(global: &GlobalOptions, command: SpecCommand) -> Result<()> {
    match command {
        SpecCommand::RankTokens(args) => rank_tokens(global, args),
        SpecCommand::TrainLookahead(args) => train_lookahead(global, args),
    }
}

/// Largest corpus file read: bigger ones are data, not text worth counting.
const MAX_CORPUS_FILE: u64 = 4 << 20;

/// The texts of `path`: a file's (a .jsonl file's string fields), or every file's under a
/// folder, in path order. Returns the texts and how many files were skipped.
fn corpus_texts(path: &Path, texts: &mut Vec<String>) -> Result<usize> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("--corpus {}: no such file or folder", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let mut skipped = 0;
        for entry in entries {
            // Links are skipped: they can loop, and point at files counted elsewhere.
            if std::fs::symlink_metadata(&entry).is_ok_and(|m| m.file_type().is_symlink()) {
                continue;
            }
            skipped += corpus_texts(&entry, texts)?;
        }
        return Ok(skipped);
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(1);
    };
    if meta.len() > MAX_CORPUS_FILE {
        return Ok(1);
    }
    if path.extension().is_some_and(|e| e == "jsonl") {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let value: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("bad JSON line in {}", path.display()))?;
            if let Some(object) = value.as_object() {
                texts.extend(
                    object
                        .values()
                        .filter_map(|v| v.as_str().map(str::to_string)),
                );
            }
        }
    } else {
        texts.push(text);
    }
    Ok(0)
}

fn rank_tokens(global: &GlobalOptions, args: RankTokensArgs) -> Result<()> {
    let mut texts = Vec::new();
    let mut skipped = 0;
    for path in &args.corpus {
        skipped += corpus_texts(path, &mut texts)?;
    }
    if texts.is_empty() {
        anyhow::bail!("--corpus holds no UTF-8 text to count");
    }
    let tokenizer = args.model.load(global)?.tokenizer;
    let corpus = args
        .corpus
        .iter()
        .map(|p| dynexec_core::card::with_cache_variable(&p.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut ranking = TokenRanking::count(&tokenizer, &corpus, texts.iter().map(String::as_str))?;
    ranking.command = reproduce_command();
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    ranking.write(&args.out)?;
    let coverage: Vec<String> = ranking
        .coverage
        .iter()
        .map(|(n, share)| format!("top {n}: {:.2}%", share * 100.0))
        .collect();
    eprintln!(
        "counted {} tokens in {} texts ({skipped} files skipped): {} distinct ids of {}; share of the counted tokens covered by the {}; wrote {}",
        ranking.counted_tokens,
        texts.len(),
        ranking.ranking.len(),
        tokenizer.vocab_size(),
        coverage.join(", "),
        args.out.display()
    );
    Ok(())
}

fn train_lookahead(global: &GlobalOptions, args: TrainLookaheadArgs) -> Result<()> {
    if !(0.0..1.0).contains(&args.validation_share) {
        anyhow::bail!(
            "--validation-share must be in [0, 1), not {}",
            args.validation_share
        );
    }
    if args.problems == 0 || args.problems > HUMANEVAL_TEST_START {
        anyhow::bail!(
            "--problems must be 1..={HUMANEVAL_TEST_START}: HumanEval's training split (the rest is for reported figures)"
        );
    }
    if args.max_lookahead == 0 {
        anyhow::bail!("--max-lookahead must be at least 1");
    }
    let dir = global.data_dir(args.prompts_dir.as_deref(), "humaneval")?;
    let texts = read_jsonl(&dir.join("humaneval.jsonl"), "prompt", args.problems)?;
    let draft: dynexec_spec::draft_spec::DraftSpec = args.draft.parse()?;
    let target = args.model.load(global)?;
    let mut drafter = build_drafter(
        global,
        &draft,
        &args.draft_cost,
        (&args.model.model, &target),
        None,
    )?;
    let prompts = PromptSet::raw("humaneval", &texts, &target.tokenizer)?.prompts;
    let bar = progress_bar(
        global,
        prompts.len() as u64,
        "recording drafts [{bar:30}] {pos}/{len} problems",
    );
    let collected = collect(
        &target.model,
        drafter.as_mut(),
        &target.tokenizer,
        &prompts,
        args.max_lookahead,
        &GenerateOptions::greedy(args.max_tokens),
        |_| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let verify = verification_costs(&target.model, &prompts[0], args.max_lookahead + 1, 5)?;
    let draft_secs = collected.draft_secs / collected.draft_forwards.max(1) as f64;
    let costs = StepCosts::new(draft_secs, &verify)?;
    let held_out = ((prompts.len() as f64) * args.validation_share).round() as usize;
    let split = prompts.len() - held_out.min(prompts.len() - 1);
    let training: Vec<_> = collected.per_prompt[..split].concat();
    let validation: Vec<_> = collected.per_prompt[split..].concat();
    let (classifier, threshold, mut report) =
        train(&training, &validation, &costs, args.max_lookahead)?;
    report.training_prompts = split;
    report.validation_prompts = prompts.len() - split;
    let card = DiscoCard {
        target: TargetShape::of(&target.model),
        draft: drafter.name(),
        data: format!(
            "HumanEval problems 0..{} (training split), {} tokens each, greedy; the last {} held out",
            prompts.len(),
            args.max_tokens,
            report.validation_prompts
        ),
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
        classifier,
        threshold,
        max_lookahead: args.max_lookahead,
        costs,
        report,
        command: reproduce_command(),
    };
    Disco::new(card.clone()).save(&args.out)?;
    let r = &card.report;
    let best_fixed = r
        .validation_speed_fixed
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(k, v)| (k + 1, *v))
        .unwrap_or((0, 0.0));
    eprintln!(
        "DISCO for `{}`: threshold {:.2}; validation ({} problems, {} draft tokens, {:.1}% accepted): accuracy {:.1}%; simulated tokens per step-time {:.3} against {:.3} for the best fixed lookahead (fixed:{}), {:+.1}%; draft token {:.2} of a step, verifying {} rows {:.2}; wrote {}",
        card.draft,
        card.threshold,
        r.validation_prompts,
        r.validation_tokens,
        r.validation_acceptance * 100.0,
        r.validation_accuracy * 100.0,
        r.validation_speed_disco,
        best_fixed.1,
        best_fixed.0,
        (r.validation_speed_disco / best_fixed.1 - 1.0) * 100.0,
        card.costs.draft_token,
        args.max_lookahead + 1,
        card.costs.verify.last().copied().unwrap_or(0.0),
        args.out.join(dynexec_spec::disco::DISCO_CARD).display()
    );
    Ok(())
}
