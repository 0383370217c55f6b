//! `dynexec diffusion train | label | train-steps`: train the text-UNet, label prompts with
//! the steps they need, and fit the step predictor.

mod label;
mod steps;
mod train;

use anyhow::Result;
use clap::Subcommand;

use crate::options::GlobalOptions;

/// Fashion-MNIST's classes, in label order.
pub const FASHION_LABELS: &str =
    "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot";

#[derive(Subcommand)]
pub enum DiffusionCommand {
    /// Train the small text-conditioned UNet on Fashion-MNIST: each image is paired with a
    /// random prompt describing its class, embedded by the sentence encoder.
    #[command(
        after_help = "Example:\n  dynexec diffusion train --prompts models/unet-fashion-mnist/prompts-train.jsonl --test-prompts models/unet-fashion-mnist/prompts-test.jsonl --out my-unet"
    )]
    Train(train::TrainArgs),
    /// Step Saver labels: generate each prompt at every step count of a grid and record the
    /// smallest count whose image reaches SSIM ≥ τ against the largest count's image.
    #[command(
        after_help = "Example:\n  dynexec diffusion label --model unet-fashion-mnist --count 200 --out labels.jsonl"
    )]
    Label(label::LabelArgs),
    /// Fit the step predictor (prompt embedding → step count) on `diffusion label`'s output
    /// and save it in the model's folder, where `diffuse --steps predicted` finds it.
    #[command(
        name = "train-steps",
        after_help = "Example:\n  dynexec diffusion train-steps --labels labels.jsonl --model models/unet-fashion-mnist"
    )]
    TrainSteps(steps::TrainStepsArgs),
}

pub fn run(global: &GlobalOptions, cmd: DiffusionCommand) -> Result<()> {
    match cmd {
        DiffusionCommand::Train(args) => train::run(global, args),
        DiffusionCommand::Label(args) => label::run(global, args),
        DiffusionCommand::TrainSteps(args) => steps::run(global, args),
    }
}
