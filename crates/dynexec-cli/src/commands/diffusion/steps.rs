//! `dynexec diffusion train-steps`: fit the step predictor to `diffusion label`'s output.

use crate::commands::common::load_pipeline;
use crate::options::{print_json, GlobalOptions};
use anyhow::{bail, Result};
use candle_nn::VarMap;
use clap::Args;
use dynexec_diffusion::labels::read_labels;
use dynexec_diffusion::pipeline::Pipeline;
use dynexec_diffusion::predictor::{PredictorCard, StepPredictor};
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainStepsArgs {
    /// Labels written by `dynexec diffusion label`.
    #[arg(long)]
    labels: PathBuf,
    /// The text-UNet's folder; the predictor is written into it (steps.json, steps.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Default probability that the predicted step count suffices (higher: more steps, fewer
    /// misses).
    #[arg(long, default_value_t = 0.9)]
    quantile: f64,
    /// Full-batch AdamW iterations.
    #[arg(long, default_value_t = 500)]
    epochs: usize,
    #[arg(long, default_value_t = 0.02)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(global: &GlobalOptions, args: TrainStepsArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.quantile) {
        bail!("--quantile must be between 0 and 1");
    }
    let lines = read_labels(&args.labels)?;
    let first = &lines[0];
    let model_ref = args.model.to_string_lossy().to_string();
    let pipeline = load_pipeline(global, &model_ref)?;
    let Pipeline::Unet(model) = &pipeline else {
        bail!("train-steps fits predictors for dynexec's text-UNets");
    };
    let prompts: Vec<&str> = lines.iter().map(|l| l.prompt.as_str()).collect();
    let embeddings = model.encoder.embed(&prompts)?;
    let labels: Vec<usize> = lines.iter().map(|l| l.steps).collect();
    let card = PredictorCard {
        grid: first.grid.clone(),
        tau: first.tau,
        reference_steps: first.reference_steps,
        quantile: args.quantile,
        embedding_dim: 0,
        examples: 0,
        train_coverage: 0.0,
        mean_label: 0.0,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let varmap = VarMap::new();
    let predictor = StepPredictor::train(
        &embeddings,
        &labels,
        card,
        args.epochs,
        args.learning_rate,
        args.seed,
        &varmap,
    )?;
    predictor.save(&args.model, &varmap)?;
    let predicted = predictor.predict(&embeddings, args.quantile)?;
    let mean_predicted = predicted.iter().sum::<usize>() as f64 / predicted.len() as f64;
    if global.json {
        print_json(&predictor.card)?;
    } else {
        println!(
            "{} examples: mean label {:.1} steps, mean prediction {mean_predicted:.1} at quantile \
             {} (covers {:.1}% of labels); wrote the predictor into {}",
            predictor.card.examples,
            predictor.card.mean_label,
            args.quantile,
            100.0 * predictor.card.train_coverage,
            args.model.display()
        );
    }
    Ok(())
}
