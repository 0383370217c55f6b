//! `dynexec bench diffusion`: fixed-step sampling vs the adaptive step policies on held-out
//! prompts, in one process — steps, wall time, SSIM to the fixed-step image, class
//! consistency and FID on the early-exit Fashion-MNIST classifier's features.

use crate::commands::common::load_pipeline;
use crate::commands::common::read_prompts;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use dynexec_diffusion::metrics::{frechet_distance, ssim_u8};
use dynexec_diffusion::pipeline::{resolve_policy, Pipeline, StepsSpec};
use dynexec_diffusion::text_unet::TEST_PROMPTS_FILE;
use dynexec_exit::data::{read_idx, Examples};
use dynexec_exit::model::ExitClassifier;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

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

#[derive(Serialize)]
struct Row {
    policy: String,
    mean_steps: f64,
    /// Mean wall time per prompt (all its seeds), including step prediction.
    seconds: f64,
    ssim_to_full: f64,
    class_consistency: f64,
    fid: f64,
}

/// Everything generated under one policy.
struct Run {
    name: String,
    steps: Vec<usize>,
    seconds: Vec<f64>,
    /// `(samples, h, w)` u8 images, in prompt-then-seed order.
    images: Vec<Tensor>,
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
    let predictor = pipeline.predictor_for(&policies)?;
    let options = pipeline.options(args.guidance, "ddim");
    let seeds: Vec<u64> = (0..args.seeds as u64).collect();
    let mut runs: Vec<Run> = Vec::new();
    let bar = progress_bar(
        global,
        prompts.len() as u64,
        "bench diffusion [{bar:30}] {pos}/{len} prompts ({elapsed} / ~{duration})",
    );
    for (i, (prompt, _)) in prompts.iter().enumerate() {
        // Policies take turns on each prompt, so machine noise spreads over all of them.
        for (p, steps) in policies.iter().enumerate() {
            let started = Instant::now();
            let context = pipeline.condition(&[prompt.as_str()], args.seeds)?;
            let (policy, name) = resolve_policy(
                &pipeline,
                steps,
                predictor.as_ref(),
                &context,
                Some(args.reference_steps),
            )?;
            let sampled = pipeline.sample(&context, &seeds, &policy, &options, |_, _| {})?;
            let images = pipeline.to_images(&sampled.samples)?.squeeze(3)?;
            let seconds = started.elapsed().as_secs_f64();
            if runs.len() <= p {
                runs.push(Run {
                    name,
                    steps: Vec::new(),
                    seconds: Vec::new(),
                    images: Vec::new(),
                });
            }
            let run = &mut runs[p];
            run.steps.extend(&sampled.steps_used);
            run.seconds.push(seconds);
            run.images.push(images);
        }
        bar.set_position(i as u64 + 1);
        if bar.is_hidden() && !global.quiet && (i + 1) % 25 == 0 {
            eprintln!("{} of {} prompts", i + 1, prompts.len());
        }
    }
    bar.finish_and_clear();

    let reference = fid_reference(&args, &classifier)?;
    let expected: Vec<usize> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, args.seeds))
        .collect();
    let baseline = Tensor::cat(&runs[0].images, 0)?;
    let baseline_pixels = baseline.flatten_from(1)?.to_vec2::<u8>()?;
    let side = baseline.dim(1)?;
    let mut rows = Vec::new();
    for run in &runs {
        let images = Tensor::cat(&run.images, 0)?;
        let pixels = images.flatten_from(1)?.to_vec2::<u8>()?;
        let mut ssim_sum = 0.0;
        for (a, b) in pixels.iter().zip(&baseline_pixels) {
            ssim_sum += ssim_u8(a, b, side, side)?;
        }
        let (predicted, features) = classify(&classifier, &images)?;
        let correct = predicted
            .iter()
            .zip(&expected)
            .filter(|(p, e)| p == e)
            .count();
        rows.push(Row {
            policy: run.name.clone(),
            mean_steps: run.steps.iter().sum::<usize>() as f64 / run.steps.len() as f64,
            seconds: run.seconds.iter().sum::<f64>() / run.seconds.len() as f64,
            ssim_to_full: ssim_sum / pixels.len() as f64,
            class_consistency: correct as f64 / expected.len() as f64,
            fid: frechet_distance(&features, &reference)?,
        });
    }
    if global.json {
        return print_json(&serde_json::json!({ "rows": rows }));
    }
    println!(
        "{} held-out prompts × {} seeds, guidance {}, DDIM; FID on {}'s last-exit features vs {} test images",
        prompts.len(),
        args.seeds,
        options.guidance_scale,
        args.classifier,
        reference.len()
    );
    println!(
        "{:<18} {:>10} {:>11} {:>12} {:>8} {:>13} {:>11} {:>8}",
        "policy",
        "mean steps",
        "steps saved",
        "s / prompt",
        "speedup",
        "SSIM to full",
        "class cons.",
        "FID"
    );
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

/// The classifier's full-depth class and last-exit features for u8 images `(n, h, w)`.
fn classify(classifier: &ExitClassifier, images: &Tensor) -> Result<(Vec<usize>, Vec<Vec<f64>>)> {
    let mut classes = Vec::new();
    let mut features = Vec::new();
    let n = images.dim(0)?;
    for start in (0..n).step_by(256) {
        let batch = Examples::Images(images.narrow(0, start, 256.min(n - start))?);
        let logits = classifier.all_exit_logits(&batch)?;
        let last = logits.last().context("the classifier has no exits")?;
        classes.extend(
            last.argmax(1)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|c| c as usize),
        );
        let f = classifier.all_exit_features(&batch)?;
        let f = f
            .last()
            .context("the classifier has no exits")?
            .to_vec2::<f32>()?;
        features.extend(
            f.into_iter()
                .map(|r| r.into_iter().map(f64::from).collect::<Vec<_>>()),
        );
    }
    Ok((classes, features))
}

/// Last-exit features of the first `--fid-reference` test images.
fn fid_reference(args: &BenchDiffusionArgs, classifier: &ExitClassifier) -> Result<Vec<Vec<f64>>> {
    let dir = args
        .data
        .clone()
        .unwrap_or_else(|| dynexec_core::hub::default_cache_dir().join("data/fashion-mnist"));
    let test = read_idx(
        &dir.join("t10k-images-idx3-ubyte"),
        &dir.join("t10k-labels-idx1-ubyte"),
        &classifier.device,
    )
    .with_context(|| {
        format!(
            "reading FID's reference images in {} (fetch them with scripts/fetch-fashion-mnist.sh)",
            dir.display()
        )
    })?
    .take(args.fid_reference.max(2))?;
    let Examples::Images(pixels) = &test.inputs else {
        bail!("{} holds no images", dir.display());
    };
    Ok(classify(classifier, pixels)?.1)
}
