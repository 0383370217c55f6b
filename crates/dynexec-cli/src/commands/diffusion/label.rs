//! `dynexec diffusion label`: how many steps each prompt needs (Step Saver's labels).

use crate::commands::common::load_pipeline;
use crate::commands::common::read_prompts;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_diffusion::metrics::ssim_u8;
use dynexec_diffusion::pipeline::Pipeline;
use dynexec_diffusion::predictor::needed_steps;
use dynexec_diffusion::text_unet::TRAIN_PROMPTS_FILE;
use dynexec_diffusion::StepPolicy;
use std::io::Write;
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
    if args.grid.len() < 2 || args.grid.windows(2).any(|w| w[0] >= w[1]) || args.grid[0] == 0 {
        bail!("--grid needs two or more increasing step counts, e.g. 5,10,20,50");
    }
    if args.seeds == 0 || args.batch_size == 0 {
        bail!("--seeds and --batch-size must be at least 1");
    }
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
    let options = pipeline.options(args.guidance, "ddim");
    let reference = *args.grid.last().unwrap_or(&1);
    let mut out = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let work: usize = args.grid.iter().sum::<usize>() * prompts.len();
    let bar = progress_bar(
        global,
        work as u64,
        "labelling [{bar:30}] {pos}/{len} prompt-steps ({elapsed} / ~{duration})",
    );
    let mut labels = Vec::new();
    let (h, w) = (model.card.unet.image_size, model.card.unet.image_size);
    for (chunk_index, chunk) in prompts.chunks(args.batch_size).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
        let context = pipeline.condition(&texts, args.seeds)?;
        let seeds: Vec<u64> = (0..texts.len() * args.seeds)
            .map(|i| (i % args.seeds) as u64)
            .collect();
        // Images of every grid step count, as u8 pixels per sample.
        let mut by_steps = Vec::with_capacity(args.grid.len());
        for &n in &args.grid {
            let sampled =
                pipeline.sample(&context, &seeds, &StepPolicy::Fixed(n), &options, |_, _| {})?;
            let pixels = pipeline
                .to_images(&sampled.samples)?
                .flatten_from(1)?
                .to_vec2::<u8>()?;
            by_steps.push(pixels);
            bar.inc((n * texts.len()) as u64);
        }
        let reference_images = &by_steps[by_steps.len() - 1];
        for (row, seed) in seeds.iter().enumerate() {
            let scores = by_steps
                .iter()
                .map(|images| ssim_u8(&images[row], &reference_images[row], h, w))
                .collect::<dynexec_core::Result<Vec<_>>>()?;
            let steps = needed_steps(&args.grid, &scores, args.tau);
            let (text, label) = &chunk[row / args.seeds];
            labels.push(steps);
            writeln!(
                out,
                "{}",
                serde_json::json!({"prompt": text, "label": label, "seed": seed,
                    "grid": args.grid, "ssim": scores, "steps": steps,
                    "tau": args.tau, "reference_steps": reference})
            )?;
        }
        if bar.is_hidden() && !global.quiet {
            let done = ((chunk_index + 1) * args.batch_size).min(prompts.len());
            eprintln!("labelled {done} of {} prompts", prompts.len());
        }
    }
    bar.finish_and_clear();
    let mean = labels.iter().sum::<usize>() as f64 / labels.len().max(1) as f64;
    if global.json {
        print_json(
            &serde_json::json!({"out": args.out, "examples": labels.len(), "mean_steps": mean}),
        )?;
    } else {
        let mut histogram = String::new();
        for &n in &args.grid {
            let count = labels.iter().filter(|&&l| l == n).count();
            histogram.push_str(&format!(" {n}:{count}"));
        }
        println!(
            "{} examples, mean {mean:.1} steps needed for SSIM ≥ {} vs {reference} steps; \
             histogram{histogram}; wrote {}",
            labels.len(),
            args.tau,
            args.out.display()
        );
    }
    Ok(())
}
