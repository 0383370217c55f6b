//! `dynexec exits train | calibrate`: fit exit heads and pick their thresholds.

mod adapters;
mod train;

use super::common::{load_classifier, predict_split, read_task_splits};
use crate::options::{print_json, GlobalOptions};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use dynexec_exit::calibrate::calibrate;
use dynexec_exit::card::{CalibrationRecord, CARD_FILE};
use std::path::PathBuf;

pub use train::TrainArgs;

#[derive(Subcommand)]
pub enum ExitsCommand {
    /// Train an exit head after every layer of an encoder (frozen backbone or joint
    /// fine-tuning) or of a CNN trained from scratch; saves exits.safetensors and card.json.
    #[command(
        after_help = "Examples:\n  dynexec exits train --data reviews --backbone minilm-l6 --out my-reviews\n  dynexec exits train --data fashion-mnist --backbone cnn --mode joint --out my-cnn"
    )]
    Train(TrainArgs),
    /// Pick the thresholds that exit earliest while losing at most --max-accuracy-drop of
    /// full-depth accuracy on the validation split, and record them in the model's card.
    #[command(
        after_help = "Example:\n  dynexec exits calibrate models/minilm-l6-reviews --data $DYNEXEC_CACHE/data/reviews --max-accuracy-drop 0.01"
    )]
    Calibrate(CalibrateArgs),
    /// Train exit adapters for per-token early exit in a decoder (`generate --early-exit`):
    /// the model answers prompts, and each exit layer learns to predict the final layer's
    /// token from its hidden state.
    #[command(
        name = "train-adapters",
        after_help = "Example:\n  dynexec exits train-adapters --model smollm2-135m-instruct --out my-adapters"
    )]
    TrainAdapters(adapters::TrainAdaptersArgs),
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// The exit model's folder (its card.json is rewritten).
    model: PathBuf,
    /// Folder with the task's splits, as for `exits train` (default:
    /// $DYNEXEC_CACHE/data/TASK, TASK being the card's task).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Policy to calibrate: confidence, entropy, patience or fixed.
    #[arg(long, default_value = "confidence")]
    policy: String,
    /// Largest accuracy loss allowed on the validation split, as a fraction (0.01 = 1 point).
    #[arg(long, default_value_t = 0.01)]
    max_accuracy_drop: f64,
    /// idx data: the last N training images are the validation split.
    #[arg(long, default_value_t = 5000)]
    val_size: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

pub fn run(global: &GlobalOptions, cmd: ExitsCommand) -> Result<()> {
    match cmd {
        ExitsCommand::Train(args) => train::run(global, args),
        ExitsCommand::Calibrate(args) => run_calibrate(global, args),
        ExitsCommand::TrainAdapters(args) => adapters::run(global, args),
    }
}

fn run_calibrate(global: &GlobalOptions, args: CalibrateArgs) -> Result<()> {
    if !args.model.join(CARD_FILE).exists() {
        bail!(
            "{} has no {CARD_FILE}: calibrate a local exit-model folder (e.g. models/minilm-l6-reviews)",
            args.model.display()
        );
    }
    let classifier = load_classifier(global, &args.model.to_string_lossy())?;
    let splits = read_task_splits(
        global,
        args.data.as_deref(),
        &classifier.card,
        args.val_size,
    )?;
    let val = predict_split(global, &classifier, &splits.val, args.batch_size, "val")?;
    let test = predict_split(global, &classifier, &splits.test, args.batch_size, "test")?;
    let calibration = calibrate(&val, &args.policy, args.max_accuracy_drop)?;
    let on_test = test.evaluate(&calibration.policy);
    let test_full = test.evaluate(&dynexec_exit::policy::ExitPolicy::Full);
    let record = CalibrationRecord {
        policy: calibration.policy.clone(),
        max_accuracy_drop: args.max_accuracy_drop,
        val_full_accuracy: calibration.full_accuracy,
        val_accuracy: calibration.evaluation.accuracy,
        val_mean_exit: calibration.evaluation.mean_exit,
        test_full_accuracy: test_full.accuracy,
        test_accuracy: on_test.accuracy,
        test_mean_exit: on_test.mean_exit,
    };
    let mut card = classifier.card.clone();
    card.calibration = Some(record.clone());
    card.write(&args.model.join(CARD_FILE))?;
    if global.json {
        return print_json(&serde_json::json!({ "model": args.model, "calibration": record }));
    }
    let layers = card.layers as f64;
    println!("policy     {}", record.policy);
    for (split, full, acc, exit) in [
        (
            "val",
            record.val_full_accuracy,
            record.val_accuracy,
            record.val_mean_exit,
        ),
        (
            "test",
            record.test_full_accuracy,
            record.test_accuracy,
            record.test_mean_exit,
        ),
    ] {
        println!(
            "{split:<5} accuracy {:.2}% (full depth {:.2}%), mean exit layer {exit:.2} of {layers}, {:.1}% layers saved",
            acc * 100.0,
            full * 100.0,
            100.0 * (1.0 - exit / layers)
        );
    }
    eprintln!(
        "wrote the calibration into {}",
        args.model.join(CARD_FILE).display()
    );
    Ok(())
}
