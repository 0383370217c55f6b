//! `dynexec exits train`.

use crate::commands::common::read_splits;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_core::card::{reproduce_command, with_cache_variable};
use dynexec_exit::assemble::{NewBackbone, Untrained};
use dynexec_exit::card::{
    DataRecord, ExitCard, InputKind, TrainMode, TrainingRecord, CARD_FILE, WEIGHTS_FILE,
};
use dynexec_exit::data::{distinct_labels, Examples, Splits};
use dynexec_exit::train::TrainEvent;
use dynexec_models::bert::EncoderFiles;
use dynexec_models::cnn::CnnConfig;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// Folder with the splits: {train,val,test}.jsonl or .csv (text,label), or MNIST-style idx
    /// files (the last --val-size training images become the validation split); or a data
    /// set's name (`reviews`, `fashion-mnist`), pulled on first use.
    #[arg(long)]
    data: PathBuf,
    /// Folder to write exits.safetensors and card.json into.
    #[arg(long)]
    out: PathBuf,
    /// `cnn` (images, trained from scratch) or an encoder: manifest name, hf:ORG/REPO or folder.
    #[arg(long, default_value = "minilm-l6")]
    backbone: String,
    /// Task name for the card (default: the data folder's name).
    #[arg(long)]
    task: Option<String>,
    /// frozen (heads only; default for encoders) or joint (heads and backbone; the CNN's only
    /// mode).
    #[arg(long, value_parser = ["frozen", "joint"])]
    mode: Option<String>,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// AdamW learning rate (default 1e-3 for frozen heads and the CNN, 3e-5 for joint
    /// fine-tuning of an encoder).
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight of each exit's loss, comma separated (default 1, 2, ..., L: growing with depth).
    #[arg(long, value_delimiter = ',')]
    loss_weights: Option<Vec<f32>>,
    /// Hidden size of each exit head (default: the encoder's hidden size; 64 for the CNN).
    #[arg(long)]
    head_hidden: Option<usize>,
    /// Output channels of each CNN block.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
    cnn_channels: Vec<usize>,
    /// Names of numbered classes (idx labels 0, 1, ...), comma separated, in order.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// idx data: the last N training images are the validation split.
    #[arg(long, default_value_t = 5000)]
    val_size: usize,
    /// Train on the first N training examples only (quick experiments, tests).
    #[arg(long)]
    train_limit: Option<usize>,
}

pub fn run(global: &GlobalOptions, mut args: TrainArgs) -> Result<()> {
    args.data = global.data_dir(Some(&args.data), "")?;
    let device = global.open_device()?;
    let probe = dynexec_exit::data::read_splits(&args.data, args.val_size, &device)?;
    let images = matches!(probe.train.inputs, Examples::Images(_));
    if images != (args.backbone == "cnn") {
        bail!(
            "--backbone {} does not fit {}: images train `--backbone cnn`, text an encoder such as minilm-l6",
            args.backbone,
            args.data.display()
        );
    }
    let labels = match &args.labels {
        Some(names) => names.clone(),
        None => distinct_labels(&probe.train),
    };
    drop(probe);
    if labels.len() < 2 {
        bail!("the training split has only one label: a classifier needs two or more");
    }
    let splits = read_splits(global, &args.data, args.val_size, &labels)?;
    let train_split = match args.train_limit {
        Some(n) => splits.train.take(n)?,
        None => splits.train.clone(),
    };
    let mode = match args.mode.as_deref() {
        Some("joint") => TrainMode::Joint,
        Some(_) => TrainMode::Frozen,
        None => TrainMode::default_for(images),
    };
    if images && mode == TrainMode::Frozen {
        bail!(
            "the CNN is trained from scratch, so its backbone cannot be frozen: use --mode joint"
        );
    }
    let task = args.task.clone().unwrap_or_else(|| {
        let name = args.data.file_name().map(|n| n.to_string_lossy());
        name.map_or("task".into(), |n| n.into_owned())
    });
    let card = ExitCard::for_training(
        task,
        if images {
            InputKind::Image
        } else {
            InputKind::Text
        },
        (!images).then(|| args.backbone.clone()),
        labels.clone(),
        TrainingRecord {
            mode,
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args
                .learning_rate
                .unwrap_or(mode.default_learning_rate(images)),
            weight_decay: args.weight_decay,
            seed: args.seed,
            loss_weights: Vec::new(),
            command: reproduce_command(),
        },
        DataRecord {
            source: with_cache_variable(&splits.source),
            train: train_split.len(),
            val: splits.val.len(),
            test: splits.test.len(),
        },
    );
    let backbone = if images {
        NewBackbone::Cnn(CnnConfig {
            channels: args.cnn_channels.clone(),
            ..CnnConfig::default()
        })
    } else {
        NewBackbone::Encoder(EncoderFiles::find(
            &global.hub()?.resolve(&args.backbone)?,
            None,
        )?)
    };
    let untrained = Untrained::build(
        backbone,
        card,
        args.head_hidden,
        args.loss_weights.clone(),
        &device,
    )?;
    let features_bar = progress_bar(global, 0, "features {bar:40} {pos}/{len} [{elapsed}<{eta}]");
    let step_bar = progress_bar(
        global,
        0,
        "epoch {msg} {bar:40} {pos}/{len} [{elapsed}<{eta}]",
    );
    let quiet = global.quiet || global.json;
    let splits = Splits {
        train: train_split,
        ..splits
    };
    let test_bar = progress_bar(
        global,
        splits.test.len() as u64,
        "test {bar:40} {pos}/{len}",
    );
    let mut speeds = Vec::new();
    let trained = untrained.train(
        &splits,
        args.batch_size,
        |event| match event {
            TrainEvent::Features { done, total } => {
                features_bar.set_length(total as u64);
                features_bar.set_position(done as u64);
            }
            TrainEvent::Step {
                epoch,
                done,
                total,
                loss,
            } => {
                features_bar.finish_and_clear();
                step_bar.set_length(total as u64);
                step_bar.set_position(done as u64);
                step_bar.set_message(format!("{epoch} loss {loss:.3}"));
            }
            TrainEvent::Epoch {
                epoch,
                mean_loss,
                val_accuracy,
                examples_per_sec,
            } => {
                speeds.push(examples_per_sec);
                step_bar.reset();
                if !quiet {
                    step_bar.suspend(|| {
                        eprintln!(
                            "epoch {epoch}: mean loss {mean_loss:.4}; val accuracy per exit {}; {examples_per_sec:.1} training examples/s",
                            percentages(&val_accuracy)
                        )
                    });
                }
            }
        },
        |n| test_bar.inc(n as u64),
    )?;
    step_bar.finish_and_clear();
    test_bar.finish_and_clear();
    trained
        .save(&args.out)
        .with_context(|| format!("writing the model into {}", args.out.display()))?;
    let card = &trained.classifier.card;
    let examples_per_sec = speeds.iter().sum::<f64>() / speeds.len().max(1) as f64;
    if global.json {
        return print_json(&serde_json::json!({ "out": args.out, "card": card,
            "training_examples_per_sec": examples_per_sec }));
    }
    eprintln!(
        "training: {examples_per_sec:.1} examples/s (mean over epochs; validation not counted)"
    );
    println!("exit  val      test");
    for (i, (v, t)) in card
        .accuracy
        .val_per_exit
        .iter()
        .zip(&card.accuracy.test_per_exit)
        .enumerate()
    {
        println!("{:<5} {:>6.2}%  {:>6.2}%", i + 1, v * 100.0, t * 100.0);
    }
    eprintln!(
        "wrote {} and {}; next: dynexec exits calibrate {} --data {}",
        args.out.join(WEIGHTS_FILE).display(),
        args.out.join(CARD_FILE).display(),
        args.out.display(),
        args.data.display()
    );
    Ok(())
}

fn percentages(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{:.1}%", v * 100.0))
        .collect::<Vec<_>>()
        .join(" ")
}
