//! `dynexec diffusion train`.

use super::FASHION_LABELS;
use crate::commands::common::read_prompts;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use dynexec_diffusion::schedule::NoiseSchedule;
use dynexec_diffusion::text_unet::{
    check_context_dim, DiffusionCard, DiffusionTraining, SentenceEncoder, CARD_FILE,
    TEST_PROMPTS_FILE, TRAIN_PROMPTS_FILE, WEIGHTS_FILE,
};
use dynexec_diffusion::train::{train, TrainEvent, TrainingSet};
use dynexec_exit::data::{read_idx, Examples};
use dynexec_models::init::seeded_init;
use dynexec_models::unet::{Unet, UnetConfig};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainArgs {
    /// Folder with MNIST-style idx files (default: $DYNEXEC_CACHE/data/fashion-mnist, where
    /// scripts/fetch-fashion-mnist.sh puts them).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training prompts (JSONL or CSV with `text` and `label`, labels being class names).
    #[arg(long)]
    prompts: PathBuf,
    /// Held-out prompts to keep with the model for `bench diffusion` (same format).
    #[arg(long)]
    test_prompts: Option<PathBuf>,
    /// Folder to write unet.safetensors, card.json and the prompt sets into.
    #[arg(long)]
    out: PathBuf,
    /// Names of the idx classes 0, 1, ..., comma separated, as the prompts' labels spell them.
    #[arg(long, value_delimiter = ',', default_value = FASHION_LABELS)]
    labels: Vec<String>,
    /// Sentence encoder that embeds prompts.
    #[arg(long, default_value = "minilm-l6")]
    text_encoder: String,
    /// UNet channels per resolution (full resolution first; each further entry halves it).
    #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
    channels: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    embed_dim: usize,
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak AdamW learning rate (warm-up, then cosine decay to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    /// Probability of training on the empty prompt (needed for classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    prompt_dropout: f64,
    #[arg(long, default_value_t = 0.995)]
    ema_decay: f64,
    /// Guidance scale recorded as the model's default.
    #[arg(long, default_value_t = 2.0)]
    guidance_scale: f64,
    /// Default threshold of `--steps converge`, recorded in the card.
    #[arg(long, default_value_t = 0.01)]
    converge_epsilon: f64,
    /// Default finishing steps of `--steps converge`, recorded in the card.
    #[arg(long, default_value_t = 3)]
    converge_finish_steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue training the model in this folder (its card's architecture and weights); the
    /// card then records both commands and the total steps.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Train on the first N images only (quick experiments, tests).
    #[arg(long)]
    train_limit: Option<usize>,
}

pub fn run(global: &GlobalOptions, args: TrainArgs) -> Result<()> {
    let device = global.open_device()?;
    let data_dir = args
        .data
        .clone()
        .unwrap_or_else(|| dynexec_core::hub::default_cache_dir().join("data/fashion-mnist"));
    let mut data = read_idx(
        &data_dir.join("train-images-idx3-ubyte"),
        &data_dir.join("train-labels-idx1-ubyte"),
        &device,
    )
    .with_context(|| {
        format!(
            "reading the training images in {} (fetch them with scripts/fetch-fashion-mnist.sh)",
            data_dir.display()
        )
    })?;
    if let Some(limit) = args.train_limit {
        data = data.take(limit)?;
    }
    let Examples::Images(images) = &data.inputs else {
        bail!("{} holds no images", data_dir.display());
    };
    let labels = data
        .labels
        .iter()
        .map(|l| match l.parse::<usize>() {
            Ok(i) if i < args.labels.len() => Ok(i),
            _ => bail!(
                "image label {l} has no name in --labels ({} names)",
                args.labels.len()
            ),
        })
        .collect::<Result<Vec<_>>>()?;

    let prompts = read_prompts(&args.prompts)?;
    let encoder = SentenceEncoder::load(&global.hub()?, &args.text_encoder, &device)?;
    let mut class_prompts = Vec::with_capacity(args.labels.len());
    for name in &args.labels {
        let texts: Vec<&str> = prompts
            .iter()
            .filter(|(_, l)| l == name)
            .map(|(t, _)| t.as_str())
            .collect();
        if texts.is_empty() {
            bail!(
                "{} has no prompt labelled `{name}`: every class needs prompts",
                args.prompts.display()
            );
        }
        class_prompts.push(encoder.embed(&texts)?);
    }
    if let Some((_, l)) = prompts.iter().find(|(_, l)| !args.labels.contains(l)) {
        bail!("prompt label `{l}` is not one of --labels");
    }

    let previous = match &args.resume {
        Some(dir) => Some(DiffusionCard::read(&dir.join(CARD_FILE))?),
        None => None,
    };
    let config = match &previous {
        Some(card) => card.unet.clone(),
        None => UnetConfig {
            image_size: images.dim(1)?,
            in_channels: 1,
            channels: args.channels.clone(),
            context_dim: encoder.dim(),
            embed_dim: args.embed_dim,
            groups: args.groups,
        },
    };
    let mut varmap = VarMap::new();
    let unet = Unet::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &config,
    )?;
    check_context_dim(&encoder, &config)?;
    seeded_init(&varmap, args.seed)?;
    if let Some(dir) = &args.resume {
        let weights = dir.join(WEIGHTS_FILE);
        varmap
            .load(&weights)
            .with_context(|| format!("loading {} to resume from", weights.display()))?;
    }
    let schedule = NoiseSchedule::ddpm_linear();
    let mut record = DiffusionTraining {
        steps: args.steps,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        prompt_dropout: args.prompt_dropout,
        ema_decay: args.ema_decay,
        seed: args.seed,
        final_loss: f32::NAN,
        data: format!(
            "{}: {} training images; prompts {}",
            data_dir.display(),
            labels.len(),
            args.prompts.display()
        ),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let bar = progress_bar(
        global,
        args.steps as u64,
        "training UNet [{bar:30}] {pos}/{len} {msg} ({elapsed} / ~{duration})",
    );
    let set = TrainingSet {
        images,
        labels: &labels,
        class_prompts: &class_prompts,
    };
    let loss = train(&unet, &varmap, &set, &schedule, &record, |event| {
        let TrainEvent::Step { step, loss, .. } = event;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4}"));
        // Off a terminal the bar is hidden: leave a trace in logs every 100 steps.
        if bar.is_hidden() && !global.quiet && step % 100 == 0 {
            eprintln!("step {step}/{}: loss {loss:.4}", args.steps);
        }
    })?;
    bar.finish_and_clear();
    record.final_loss = loss;
    if let Some(card) = &previous {
        record.steps += card.training.steps;
        record.command = format!("{} && {}", card.training.command, record.command);
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    varmap.save(args.out.join(WEIGHTS_FILE))?;
    copy_unless_same(&args.prompts, &args.out.join(TRAIN_PROMPTS_FILE))?;
    if let Some(test) = &args.test_prompts {
        read_prompts(test)?;
        copy_unless_same(test, &args.out.join(TEST_PROMPTS_FILE))?;
    }
    let card = DiffusionCard {
        text_encoder: args.text_encoder.clone(),
        unet: config,
        schedule,
        guidance_scale: args.guidance_scale,
        labels: args.labels.clone(),
        converge_epsilon: args.converge_epsilon,
        converge_finish_steps: args.converge_finish_steps,
        training: record,
    };
    card.write(&args.out.join(CARD_FILE))?;
    if global.json {
        print_json(&serde_json::json!({"out": args.out, "final_loss": loss}))?;
    } else {
        println!(
            "trained {} steps (mean loss of the last 100: {loss:.4}); wrote {}",
            args.steps,
            args.out.display()
        );
    }
    Ok(())
}

fn copy_unless_same(from: &Path, to: &Path) -> Result<()> {
    let same = match (from.canonicalize(), to.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}
