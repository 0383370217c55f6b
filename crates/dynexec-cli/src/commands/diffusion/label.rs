//! `dynexec diffusion label`: how many steps each prompt needs (Step Saver's labels).

use crate::commands::common::load_pipeline;
use crate::commands::common::read_prompts;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_diffusion::labels::{append_labels, label_prompts, LabelPlan};
use dynexec_diffusion::pipeline::Pipeline;
use dynexec_diffusion::text_unet::TRAIN_PROMPTS_FILE;
use std::path::PathBuf;

#[derive(Args)]
pub struct LabelArgs {
    /// dynexec text-UNet (manifest name or folder).
    #[arg(long, default_value = "unet-fashion-mnist")]
    model: String,
    /// Prompts to label (default: the model's training prompts).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Label the first N prompts only.
    #[arg(long)]
    count: Option<usize>,
    /// Seeds per prompt (each seed is one labelled example).
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Step counts to try, ascending; the last is the reference image.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "5,10,15,20,25,30,40,50,70,100"
    )]
    grid: Vec<usize>,
    /// SSIM a step count's image must reach against the reference to suffice.
    #[arg(long, default_value_t = 0.95)]
    tau: f64,
    /// Prompts denoised together.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long)]
    guidance: Option<f64>,
    /// JSONL file to write: one line per prompt and seed.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(global: &GlobalOptions, args: LabelArgs) -> Result<()> {
    let pipeline = load_pipeline(global, &args.model)?;
    let Pipeline::Unet(model) = &pipeline else {
        bail!("diffusion label works on dynexec's text-UNets (SSIM on their pixels)");
    };
    let prompts_path = args
        .prompts
        .clone()
        .unwrap_or_else(|| model.dir.join(TRAIN_PROMPTS_FILE));
    let mut prompts = read_prompts(&prompts_path)?;
    if let Some(count) = args.count {
        prompts.truncate(count);
    }
    let plan = LabelPlan {
        grid: args.grid.clone(),
        tau: args.tau,
        seeds: args.seeds,
        batch_size: args.batch_size,
        guidance: args.guidance,
    };
    let work = args.grid.iter().sum::<usize>() * prompts.len();
    let bar = progress_bar(
        global,
        work as u64,
        "labelling [{bar:30}] {pos}/{len} prompt-steps ({elapsed} / ~{duration})",
    );
    // Labels are written as each batch finishes: an interrupted run keeps what it made.
    let mut out = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let per_prompt: usize = args.grid.iter().sum();
    let labels = label_prompts(&pipeline, &prompts, &plan, |batch, done| {
        append_labels(&mut out, &args.out, batch)?;
        bar.set_position((per_prompt * done) as u64);
        if bar.is_hidden() && !global.quiet {
            eprintln!("labelled {done} of {} prompts", prompts.len());
        }
        Ok(())
    })
    .context("--grid, --seeds, --batch-size")?;
    bar.finish_and_clear();
    let reference = *args.grid.last().unwrap_or(&1);
    let steps: Vec<usize> = labels.iter().map(|l| l.steps).collect();
    let mean = steps.iter().sum::<usize>() as f64 / steps.len().max(1) as f64;
    if global.json {
        print_json(
            &serde_json::json!({"out": args.out, "examples": steps.len(), "mean_steps": mean}),
        )?;
    } else {
        let mut histogram = String::new();
        for &n in &args.grid {
            let count = steps.iter().filter(|&&l| l == n).count();
            histogram.push_str(&format!(" {n}:{count}"));
        }
        println!(
            "{} examples, mean {mean:.1} steps needed for SSIM ≥ {} vs {reference} steps; \
             histogram{histogram}; wrote {}",
            steps.len(),
            args.tau,
            args.out.display()
        );
    }
    Ok(())
}
