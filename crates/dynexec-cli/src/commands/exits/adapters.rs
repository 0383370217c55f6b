//! `dynexec exits train-adapters`: exit adapters for per-token early exit in a decoder,
//! distilled from its final layer on text it generates, and each exit's classifier (CALM's
//! learned measure, `--early-exit classifier:T`).

use crate::commands::common::{read_jsonl, ModelArgs};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_core::card::{reproduce_command, with_cache_variable};
use dynexec_exit::distill::{distill, DistillEvent, DistillPlan, KeptAdapters};
use dynexec_exit::exit_classifier::ClassifierPlan;
use dynexec_exit::token_exit::{AdapterCard, AdapterTraining, ADAPTERS_CARD, ADAPTERS_FILE};
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainAdaptersArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder to write adapters.safetensors and adapters.json into.
    #[arg(long)]
    out: PathBuf,
    /// JSONL prompts whose `question` field the model answers to make the training text
    /// (default: TruthfulQA from the `prompts` data set, pulled on first use).
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
    /// Keep these trained adapters (a manifest name or a folder with adapters.json) and
    /// train only their exit classifiers; the adapters' own training record is kept.
    #[arg(long, value_name = "ADAPTERS", conflicts_with_all = ["layers", "rank", "epochs", "batch_size", "learning_rate"])]
    keep_adapters: Option<String>,
    /// Full-batch AdamW steps fitting each exit classifier (logistic regression).
    #[arg(long, default_value_t = ClassifierPlan::default().steps)]
    classifier_steps: usize,
    /// Learning rate of the exit classifiers.
    #[arg(long, default_value_t = ClassifierPlan::default().learning_rate)]
    classifier_lr: f64,
}

pub fn run(global: &GlobalOptions, args: TrainAdaptersArgs) -> Result<()> {
    let loaded = args.model.load(global)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let depth = model.num_layers();
    let kept = match &args.keep_adapters {
        Some(reference) => {
            let files = global.hub()?.resolve(reference)?;
            let card = files.find(ADAPTERS_CARD).with_context(|| {
                format!("--keep-adapters `{reference}` holds no {ADAPTERS_CARD}")
            })?;
            let dir = card.parent().unwrap_or(std::path::Path::new("."));
            Some(
                KeptAdapters::load(dir, model)
                    .with_context(|| format!("--keep-adapters `{reference}`"))?,
            )
        }
        None => None,
    };
    let layers = match (&kept, &args.layers) {
        (Some(kept), _) => kept.layers().to_vec(),
        (None, Some(layers)) => layers.clone(),
        (None, None) => (5..depth).step_by(5).collect(),
    };
    let prompts_path = match &args.prompts {
        Some(p) => p.clone(),
        None => global.data_dir(None, "prompts")?.join("truthfulqa.jsonl"),
    };
    let questions = read_jsonl(&prompts_path, "question", args.skip + args.count)?;
    let questions = &questions[args.skip.min(questions.len())..];
    if questions.len() < 2 {
        bail!(
            "{} has too few prompts after skipping {}: lower --skip",
            prompts_path.display(),
            args.skip
        );
    }
    let plan = DistillPlan {
        layers: layers.clone(),
        rank: args.rank,
        gen_tokens: args.gen_tokens,
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        seed: args.seed,
        held_out: args.held_out,
        classifier: ClassifierPlan {
            steps: args.classifier_steps,
            learning_rate: args.classifier_lr,
            ..ClassifierPlan::default()
        },
    };
    let card_base = AdapterCard {
        model: args.model.model.clone(),
        training: AdapterTraining {
            prompts: with_cache_variable(&format!(
                "{} (`question`, lines {}..{}, chat template), {} greedy tokens each",
                prompts_path.display(),
                args.skip,
                args.skip + questions.len(),
                args.gen_tokens
            )),
            command: reproduce_command(),
            ..Default::default()
        },
        ..Default::default()
    };
    let bar = progress_bar(
        global,
        questions.len() as u64,
        "generating {bar:40} {pos}/{len} [{elapsed}<{eta}]",
    );
    let distilled = distill(
        model,
        tokenizer,
        questions,
        &plan,
        card_base,
        kept,
        |event| match event {
            DistillEvent::Generated(n) => bar.set_position(n as u64),
            DistillEvent::Tapped(n) => {
                bar.set_message("tapping");
                bar.set_position(n as u64)
            }
            DistillEvent::Step(epoch, step, steps, loss) => {
                bar.set_length(steps as u64);
                bar.set_position(step as u64);
                bar.set_message(format!("epoch {epoch} loss {loss:.3}"));
            }
            DistillEvent::Classifiers => bar.set_message("fitting the exit classifiers"),
        },
    )
    .context("training exit adapters (check --layers and --held-out)")?;
    bar.finish_and_clear();
    distilled.save(&args.out)?;
    let card = &distilled.card;
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
    if let Some(classifier) = &card.classifier {
        println!(
            "exit layer  exit classifier on held-out positions: agreement rate, accuracy, ROC AUC"
        );
        for (i, layer) in layers.iter().enumerate() {
            println!(
                "{layer:>10}  {:>6.1}%  {:>6.1}%  {:.3}",
                classifier.held_out_agreement[i] * 100.0,
                classifier.held_out_accuracy[i] * 100.0,
                classifier.held_out_auc[i]
            );
        }
    }
    eprintln!(
        "wrote {} and {}",
        args.out.join(ADAPTERS_FILE).display(),
        args.out.join(ADAPTERS_CARD).display()
    );
    Ok(())
}
