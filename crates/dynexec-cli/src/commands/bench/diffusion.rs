//! `dynexec bench diffusion`: fixed-step sampling vs the adaptive step policies on held-out
//! prompts, in one process — steps, wall time, SSIM to the fixed-step image, class
//! consistency and FID on the early-exit Fashion-MNIST classifier's features.

use crate::commands::common::load_pipeline;
use crate::commands::common::read_prompts;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_diffusion::bench::{fid_reference, sample_policies, score_runs};
use dynexec_diffusion::pipeline::{Pipeline, StepsSpec};
use dynexec_diffusion::text_unet::TEST_PROMPTS_FILE;
use dynexec_exit::model::ExitClassifier;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchDiffusionArgs {
    /// dynexec text-UNet (manifest name or folder).
    #[arg(long, default_value = "unet-fashion-mnist")]
    model: String,
    /// Held-out prompts (default: the model's prompts-test.jsonl).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Use the first N prompts only.
    #[arg(long)]
    count: Option<usize>,
    /// Seeds per prompt.
    #[arg(long, default_value_t = 2)]
    seeds: usize,
    /// The baseline: this many fixed steps (also what SSIM compares against).
    #[arg(long, default_value_t = 50)]
    reference_steps: usize,
    /// Policies to compare with the baseline, as `diffuse --steps` takes them.
    #[arg(long, value_delimiter = ',', default_value = "predicted,converge")]
    policies: Vec<String>,
    /// Early-exit image classifier that scores class consistency and provides FID features.
    #[arg(long, default_value = "cnn-fashion-mnist")]
    classifier: String,
    /// Fashion-MNIST idx folder whose test split is FID's reference (default:
    /// $DYNEXEC_CACHE/data/fashion-mnist).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Test images in FID's reference set.
    #[arg(long, default_value_t = 2000)]
    fid_reference: usize,
    #[arg(long)]
    guidance: Option<f64>,
}

pub fn run(global: &GlobalOptions, args: BenchDiffusionArgs) -> Result<()> {
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let pipeline = load_pipeline(global, &args.model)?;
    let Pipeline::Unet(model) = &pipeline else {
        bail!("bench diffusion scores dynexec's Fashion-MNIST text-UNets (its classifier judges the images)");
    };
    let device = global.open_device()?;
    let classifier = ExitClassifier::load(&global.hub()?, &args.classifier, &device)?;
    let prompts_path = args
        .prompts
        .clone()
        .unwrap_or_else(|| model.dir.join(TEST_PROMPTS_FILE));
    let mut prompts = read_prompts(&prompts_path)?;
    if let Some(count) = args.count {
        prompts.truncate(count.max(1));
    }
    let classes = prompts
        .iter()
        .map(|(_, label)| {
            classifier.card.label_index(label).with_context(|| {
                format!(
                    "prompt label `{label}` is not one of {}'s classes",
                    args.classifier
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut policies = vec![StepsSpec::Fixed(args.reference_steps)];
    for p in &args.policies {
        policies.push(p.parse()?);
    }
    let seeds: Vec<u64> = (0..args.seeds as u64).collect();
    let bar = progress_bar(
        global,
        prompts.len() as u64,
        "bench diffusion [{bar:30}] {pos}/{len} prompts ({elapsed} / ~{duration})",
    );
    let texts: Vec<&str> = prompts.iter().map(|(text, _)| text.as_str()).collect();
    let runs = sample_policies(
        &pipeline,
        &texts,
        &policies,
        &seeds,
        args.reference_steps,
        args.guidance,
        |done| {
            bar.set_position(done as u64);
            if bar.is_hidden() && !global.quiet && done % 25 == 0 {
                eprintln!("{done} of {} prompts", prompts.len());
            }
        },
    )?;
    bar.finish_and_clear();

    let dir = global.data_dir(args.data.as_deref(), "fashion-mnist")?;
    let reference = fid_reference(&classifier, &dir, args.fid_reference)
        .context("FID needs the Fashion-MNIST test images (the `fashion-mnist` data set)")?;
    let expected: Vec<usize> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, args.seeds))
        .collect();
    let rows = score_runs(&runs, &classifier, &expected, &reference)?;
    if global.json {
        return print_json(&serde_json::json!({ "rows": rows }));
    }
    println!(
        "{} held-out prompts × {} seeds, guidance {}, DDIM; FID on {}'s last-exit features vs {} test images",
        prompts.len(),
        args.seeds,
        pipeline.options(args.guidance, "ddim").guidance_scale,
        args.classifier,
        reference.len()
    );
    println!("policy             mean steps steps saved   s / prompt  speedup  SSIM to full class cons.      FID");
    let (base_steps, base_seconds) = (rows[0].mean_steps, rows[0].seconds);
    for r in &rows {
        println!(
            "{:<18} {:>10.1} {:>10.1}% {:>12.3} {:>7.2}x {:>13.4} {:>10.1}% {:>8.2}",
            r.policy,
            r.mean_steps,
            100.0 * (1.0 - r.mean_steps / base_steps),
            r.seconds,
            base_seconds / r.seconds,
            r.ssim_to_full,
            100.0 * r.class_consistency,
            r.fid
        );
    }
    Ok(())
}
