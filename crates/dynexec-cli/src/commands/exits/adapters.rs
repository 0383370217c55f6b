//! `dynexec exits train-adapters`: exit adapters for per-token early exit in a decoder,
//! distilled from its final layer on text it generates.

use super::train::{reproduce_command, with_cache_variable};
use crate::commands::common::{read_jsonl, ModelArgs};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_exit::assemble::save_varmaps;
use dynexec_exit::token_exit::{
    collect_distillation_data, exit_agreement, train_adapters, AdapterCard, AdapterTraining,
    ExitAdapters, ADAPTERS_CARD, ADAPTERS_FILE,
};
use dynexec_models::generation::{generate, GenerateOptions};
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainAdaptersArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder to write adapters.safetensors and adapters.json into.
    #[arg(long)]
    out: PathBuf,
    /// JSONL prompts whose `question` field the model answers to make the training text
    /// (default: TruthfulQA from scripts/fetch-prompts.sh).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Prompts skipped at the file's start (keep them for evaluation, as `bench token-exits`
    /// uses the first ones).
    #[arg(long, default_value_t = 200)]
    skip: usize,
    /// Prompts used.
    #[arg(long, default_value_t = 96)]
    count: usize,
    /// Tokens generated (greedy) per prompt.
    #[arg(long, default_value_t = 48)]
    gen_tokens: usize,
    /// Exit layers, 1-based (default: every 5th layer below the last).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Rank of each adapter's residual map.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of the sequences held out to measure agreement.
    #[arg(long, default_value_t = 0.1)]
    held_out: f64,
}

pub fn run(global: &GlobalOptions, args: TrainAdaptersArgs) -> Result<()> {
    let loaded = args.model.load(global)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let depth = model.num_layers();
    let layers = args
        .layers
        .clone()
        .unwrap_or_else(|| (5..depth).step_by(5).collect());
    if layers.is_empty()
        || layers.iter().any(|&l| l == 0 || l >= depth)
        || layers.windows(2).any(|w| w[0] >= w[1])
    {
        bail!(
            "--layers must be increasing layer numbers between 1 and {}",
            depth - 1
        );
    }
    if !(0.0..1.0).contains(&args.held_out) {
        bail!("--held-out must be at least 0 and below 1");
    }
    let prompts_path = args.prompts.clone().unwrap_or_else(|| {
        dynexec_core::hub::default_cache_dir().join("data/prompts/truthfulqa.jsonl")
    });
    let questions = read_jsonl(&prompts_path, "question", args.skip + args.count)?;
    let questions = &questions[args.skip.min(questions.len())..];
    if questions.len() < 2 {
        bail!(
            "{} has too few prompts after skipping {}: lower --skip",
            prompts_path.display(),
            args.skip
        );
    }
    let options = GenerateOptions::greedy(args.gen_tokens);
    let bar = progress_bar(
        global,
        questions.len() as u64,
        "generating {bar:40} {pos}/{len} [{elapsed}<{eta}]",
    );
    let mut sequences = Vec::with_capacity(questions.len());
    for q in questions {
        let mut ids = tokenizer.encode(&tokenizer.chat_prompt(None, q)?)?;
        let out = generate(model, tokenizer, &ids, &options, None, |_| Ok(()))?;
        ids.extend(out.token_ids);
        sequences.push(ids);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let bar = progress_bar(
        global,
        sequences.len() as u64,
        "tapping {bar:40} {pos}/{len}",
    );
    let data =
        collect_distillation_data(model, &sequences, &layers, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();

    // Whole sequences are held out, so no held-out position shares a context with training.
    let held_sequences = ((sequences.len() as f64 * args.held_out).round() as usize).max(1);
    let held_from: usize = sequences[..sequences.len() - held_sequences]
        .iter()
        .map(Vec::len)
        .sum();
    let train_positions: Vec<usize> = (0..held_from).collect();
    let held_positions: Vec<usize> = (held_from..data.targets.len()).collect();

    let mut card = AdapterCard {
        model: args.model.model.clone(),
        layers: layers.clone(),
        rank: args.rank,
        hidden_size: model.config().hidden_size,
        vocab_size: model.vocab_size(),
        training: AdapterTraining {
            prompts: with_cache_variable(&format!(
                "{} (`question`, lines {}..{}, chat template), {} greedy tokens each",
                prompts_path.display(),
                args.skip,
                args.skip + questions.len(),
                args.gen_tokens
            )),
            sequences: sequences.len(),
            positions: train_positions.len(),
            held_out_positions: held_positions.len(),
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args.learning_rate,
            seed: args.seed,
            command: reproduce_command(),
        },
        agreement_before: Vec::new(),
        agreement_after: Vec::new(),
    };
    let (adapters, vars) = ExitAdapters::untrained(card.clone(), args.seed, model.device())?;
    card.agreement_before = exit_agreement(model, &adapters, &data, &held_positions)?;
    let bar = progress_bar(
        global,
        0,
        "epoch {msg} {bar:40} {pos}/{len} [{elapsed}<{eta}]",
    );
    train_adapters(
        model,
        &adapters,
        &vars,
        &data,
        &train_positions,
        args.epochs,
        args.batch_size,
        args.learning_rate,
        args.seed,
        |epoch, step, steps, loss| {
            bar.set_length(steps as u64);
            bar.set_position(step as u64);
            bar.set_message(format!("{epoch} loss {loss:.3}"));
        },
    )?;
    bar.finish_and_clear();
    card.agreement_after = exit_agreement(model, &adapters, &data, &held_positions)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    save_varmaps(&[Some(&vars)], &args.out.join(ADAPTERS_FILE))?;
    dynexec_core::card::write_card(&args.out.join(ADAPTERS_CARD), &card)?;
    if global.json {
        return print_json(&serde_json::json!({ "out": args.out, "card": card }));
    }
    println!("exit layer  agreement with the final layer (held out): head alone -> adapter");
    for ((layer, before), after) in layers
        .iter()
        .zip(&card.agreement_before)
        .zip(&card.agreement_after)
    {
        println!(
            "{layer:>10}  {:>6.1}% -> {:>6.1}%",
            before * 100.0,
            after * 100.0
        );
    }
    eprintln!(
        "wrote {} and {}",
        args.out.join(ADAPTERS_FILE).display(),
        args.out.join(ADAPTERS_CARD).display()
    );
    Ok(())
}
