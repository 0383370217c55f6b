//! `dynexec exits train | calibrate`: fit exit heads and pick their thresholds.

mod adapters;
mod train;

use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use dynexec_exit::calibrate::{calibrate, ExitPredictions};
use dynexec_exit::card::{CalibrationRecord, ExitCard, CARD_FILE};
use dynexec_exit::data::{read_splits, Dataset, Splits};
use dynexec_exit::model::{Backbone, ExitClassifier};
use std::path::{Path, PathBuf};

pub use train::TrainArgs;

#[derive(Subcommand)]
pub enum ExitsCommand {
    /// Train an exit head after every layer of an encoder (frozen backbone or joint
    /// fine-tuning) or of a CNN trained from scratch; saves exits.safetensors and card.json.
    #[command(
        after_help = "Examples:\n  scripts/fetch-reviews.sh\n  dynexec exits train --data $DYNEXEC_CACHE/data/reviews --backbone minilm-l6 --out my-reviews\n  scripts/fetch-fashion-mnist.sh\n  dynexec exits train --data $DYNEXEC_CACHE/data/fashion-mnist --backbone cnn --mode joint --out my-cnn"
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
        after_help = "Example:\n  scripts/fetch-prompts.sh\n  dynexec exits train-adapters --model smollm2-135m-instruct --out my-adapters"
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

/// Loads an exit model (a manifest name or a folder holding card.json) and its backbone,
/// converting the encoder's linear layers to `--quant` when given.
pub fn load_classifier(global: &GlobalOptions, reference: &str) -> Result<ExitClassifier> {
    let mut classifier = ExitClassifier::load(&global.hub()?, reference, &global.open_device()?)?;
    if let Some(format) = global.quant_format() {
        match &mut classifier.backbone {
            Backbone::Text { bert, .. } => {
                dynexec_quant::quantize_in_place(bert, format)?;
            }
            Backbone::Image { .. } => bail!(
                "--quant applies to encoders' linear layers; the CNN has none (its convolutions stay f32)"
            ),
        }
    }
    Ok(classifier)
}

/// The task's splits with class numbers named as the model's labels.
/// The splits of an exit model's task, from `data` or else from where the fetch scripts put
/// the card's task (`$DYNEXEC_CACHE/data/TASK`).
pub fn read_task_splits(
    global: &GlobalOptions,
    data: Option<&Path>,
    card: &ExitCard,
    val_size: usize,
) -> Result<Splits> {
    let default = dynexec_core::hub::default_cache_dir()
        .join("data")
        .join(&card.task);
    read_named_splits(global, data.unwrap_or(&default), val_size, &card.labels)
}

/// The splits in `data` with class numbers named as `labels`.
pub fn read_named_splits(
    global: &GlobalOptions,
    data: &Path,
    val_size: usize,
    labels: &[String],
) -> Result<Splits> {
    let splits = read_splits(data, val_size, &global.open_device()?)?;
    Ok(Splits {
        train: splits.train.name_classes(labels),
        val: splits.val.name_classes(labels),
        test: splits.test.name_classes(labels),
        source: splits.source,
    })
}

/// Every exit's predictions on a split, with a progress bar.
pub fn predict_split(
    global: &GlobalOptions,
    classifier: &ExitClassifier,
    data: &Dataset,
    batch_size: usize,
    what: &str,
) -> Result<ExitPredictions> {
    let bar = progress_bar(
        global,
        data.len() as u64,
        &format!("{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed}}<{{eta}}]"),
    );
    let predictions = classifier.predict(data, batch_size, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(predictions)
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
