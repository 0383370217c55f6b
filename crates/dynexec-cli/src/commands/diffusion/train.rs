//! `dynexec diffusion train`.

use super::FASHION_LABELS;
use crate::commands::common::read_prompts;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_diffusion::recipe::{train_text_unet, UnetRecipe};
use dynexec_diffusion::text_unet::{DiffusionTraining, TEST_PROMPTS_FILE, TRAIN_PROMPTS_FILE};
use dynexec_diffusion::train::TrainEvent;
use dynexec_exit::data::{read_idx, Examples};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainArgs {
    /// Folder with MNIST-style idx files (default: $DYNEXEC_CACHE/data/fashion-mnist, where
    /// `dynexec data pull fashion-mnist` puts them, pulled on first use); or a data set name.
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
    let data_dir = global.data_dir(args.data.as_deref(), "fashion-mnist")?;
    let mut data = read_idx(
        &data_dir.join("train-images-idx3-ubyte"),
        &data_dir.join("train-labels-idx1-ubyte"),
        &device,
    )
    .with_context(|| {
        format!(
            "reading the training images in {} (`--data fashion-mnist` pulls them)",
            data_dir.display()
        )
    })?;
    if let Some(limit) = args.train_limit {
        data = data.take(limit)?;
    }
    let Examples::Images(images) = &data.inputs else {
        bail!("{} holds no images", data_dir.display());
    };
    let prompts = read_prompts(&args.prompts)?;
    let recipe = UnetRecipe {
        labels: args.labels.clone(),
        text_encoder: args.text_encoder.clone(),
        channels: args.channels.clone(),
        embed_dim: args.embed_dim,
        groups: args.groups,
        training: DiffusionTraining {
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
                data.labels.len(),
                args.prompts.display()
            ),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        },
        guidance_scale: args.guidance_scale,
        converge_epsilon: args.converge_epsilon,
        converge_finish_steps: args.converge_finish_steps,
        resume: args.resume.clone(),
    };
    let bar = progress_bar(
        global,
        args.steps as u64,
        "training UNet [{bar:30}] {pos}/{len} {msg} ({elapsed} / ~{duration})",
    );
    let trained = train_text_unet(
        &global.hub()?,
        &device,
        images,
        &data.labels,
        &prompts,
        &recipe,
        |event| {
            let TrainEvent::Step { step, loss, .. } = event;
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}"));
            // Off a terminal the bar is hidden: leave a trace in logs every 100 steps.
            if bar.is_hidden() && !global.quiet && step % 100 == 0 {
                eprintln!("step {step}/{}: loss {loss:.4}", args.steps);
            }
        },
    )
    .with_context(|| format!("training on {} with --labels", args.prompts.display()))?;
    bar.finish_and_clear();
    let loss = trained.card.training.final_loss;
    trained.save(&args.out)?;
    copy_unless_same(&args.prompts, &args.out.join(TRAIN_PROMPTS_FILE))?;
    if let Some(test) = &args.test_prompts {
        read_prompts(test)?;
        copy_unless_same(test, &args.out.join(TEST_PROMPTS_FILE))?;
    }
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
