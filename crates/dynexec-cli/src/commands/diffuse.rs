//! `dynexec diffuse`: text to image with a step policy.

use super::common::load_pipeline;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Result};
use clap::Args;
use dynexec_diffusion::pipeline::{resolve_policy, StepsSpec};
use dynexec_plot::images::write_grid;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct DiffuseArgs {
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// dynexec's text-UNet (manifest name or folder), or Stable Diffusion from the Hugging Face
    /// hub: sd-v1-5, sd-v2-1 or sd-turbo.
    #[arg(long, default_value = "unet-fashion-mnist")]
    model: String,
    /// N (fixed), predicted[:Q] (the model's step predictor; Q = probability the count
    /// suffices, default the predictor's) or converge[:EPS[:K]] (once the predicted image
    /// changes by less than EPS RMS between steps, finish in K more steps; defaults: the
    /// model's).
    #[arg(long, default_value = "predicted")]
    steps: String,
    /// Steps the converge policy schedules (and stops within).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Images to draw, from seeds --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier-free guidance scale (default: the model's).
    #[arg(long)]
    guidance: Option<f64>,
    /// ddim (deterministic) or ddpm (ancestral sampling, DDIM with η = 1).
    #[arg(long, default_value = "ddim", value_parser = ["ddim", "ddpm"])]
    scheduler: String,
    /// PNG to write: the images side by side.
    #[arg(long, default_value = "diffuse.png")]
    out: PathBuf,
    /// Pixel scale of the PNG (default 4 for images under 128 pixels, else 1).
    #[arg(long)]
    scale: Option<u32>,
}

pub fn run(global: &GlobalOptions, args: DiffuseArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let steps: StepsSpec = args.steps.parse()?;
    let pipeline = load_pipeline(global, &args.model)?;
    let predictor = pipeline.predictor_for(std::slice::from_ref(&steps))?;
    let started = Instant::now();
    let context = pipeline.condition(&[args.prompt.as_str()], args.n)?;
    let (policy, policy_name) = resolve_policy(
        &pipeline,
        &steps,
        predictor.as_ref(),
        &context,
        args.max_steps,
    )?;
    let options = pipeline.options(args.guidance, &args.scheduler);
    let seeds: Vec<u64> = (0..args.n as u64).map(|i| args.seed + i).collect();
    let bar = progress_bar(
        global,
        policy.scheduled_steps() as u64,
        "denoising [{bar:30}] {pos}/{len} steps ({elapsed})",
    );
    let sampled = pipeline.sample(&context, &seeds, &policy, &options, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let images = pipeline.to_images(&sampled.samples)?;
    let seconds = started.elapsed().as_secs_f64();
    write_grid(&images, &args.out, args.scale)?;
    if global.json {
        print_json(&serde_json::json!({
            "prompt": args.prompt,
            "steps_policy": policy_name,
            "steps_used": sampled.steps_used,
            "seconds": seconds,
            "outputs": [args.out],
        }))?;
    } else {
        println!(
            "{}: {} image(s), steps used {:?} ({policy_name}), {seconds:.2} s → {}",
            args.prompt,
            args.n,
            sampled.steps_used,
            args.out.display()
        );
    }
    Ok(())
}
