//! The adaptive-step benchmark: fixed-step sampling against the adaptive step policies on
//! the same prompts and seeds — steps, wall time, SSIM to the fixed-step image, class
//! consistency and FID, the last two judged by an early-exit image classifier.

use crate::metrics::{frechet_distance, ssim_u8};
use crate::pipeline::{resolve_policy, Pipeline, StepsSpec};
use candle_core::Tensor;
use dynexec_core::{Error, Result};
use dynexec_exit::data::{read_idx, Examples};
use dynexec_exit::model::ExitClassifier;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// One policy's cost and quality.
#[derive(Debug, Clone, Serialize)]
pub struct DiffusionRow {
    /// The policy, resolved (e.g. `predicted:0.9`).
    pub policy: String,
    /// Mean denoising steps per image.
    pub mean_steps: f64,
    /// Mean wall time per prompt (all its seeds), including step prediction.
    pub seconds: f64,
    /// Mean SSIM to the first policy's image of the same prompt and seed.
    pub ssim_to_full: f64,
    /// Share of images the classifier puts in their prompt's class.
    pub class_consistency: f64,
    /// Fréchet distance of the classifier's last-exit features to the reference images'.
    pub fid: f64,
}

/// Everything generated under one policy.
pub struct PolicyRun {
    name: String,
    steps: Vec<usize>,
    seconds: Vec<f64>,
    /// `(samples, h, w)` u8 images, in prompt-then-seed order.
    images: Vec<Tensor>,
}

/// Samples every prompt under every policy, policies taking turns on each prompt so machine
/// noise spreads over all of them; the converge policy schedules `max_steps`. `on_prompt`
/// hears each finished prompt's number.
pub fn sample_policies(
    pipeline: &Pipeline,
    prompts: &[&str],
    policies: &[StepsSpec],
    seeds: &[u64],
    max_steps: usize,
    guidance: Option<f64>,
    mut on_prompt: impl FnMut(usize),
) -> Result<Vec<PolicyRun>> {
    let predictor = pipeline.predictor_for(policies)?;
    let options = pipeline.options(guidance, "ddim");
    let mut runs: Vec<PolicyRun> = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for (p, steps) in policies.iter().enumerate() {
            let started = Instant::now();
            let context = pipeline.condition(&[prompt], seeds.len())?;
            let (policy, name) = resolve_policy(
                pipeline,
                steps,
                predictor.as_ref(),
                &context,
                Some(max_steps),
            )?;
            let sampled = pipeline.sample(&context, seeds, &policy, &options, |_, _| {})?;
            let images = pipeline.to_images(&sampled.samples)?.squeeze(3)?;
            let seconds = started.elapsed().as_secs_f64();
            if runs.len() <= p {
                runs.push(PolicyRun {
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
        on_prompt(i + 1);
    }
    Ok(runs)
}

/// Scores each run against the first: SSIM to its images, the share `classifier` puts in
/// `expected` (one class per image), and FID to `reference` features.
pub fn score_runs(
    runs: &[PolicyRun],
    classifier: &ExitClassifier,
    expected: &[usize],
    reference: &[Vec<f64>],
) -> Result<Vec<DiffusionRow>> {
    let first = runs
        .first()
        .ok_or_else(|| Error::InvalidArgument("no policy was sampled".into()))?;
    let baseline = Tensor::cat(&first.images, 0)?;
    let baseline_pixels = baseline.flatten_from(1)?.to_vec2::<u8>()?;
    let side = baseline.dim(1)?;
    let mut rows = Vec::new();
    for run in runs {
        let images = Tensor::cat(&run.images, 0)?;
        let pixels = images.flatten_from(1)?.to_vec2::<u8>()?;
        let mut ssim_sum = 0.0;
        for (a, b) in pixels.iter().zip(&baseline_pixels) {
            ssim_sum += ssim_u8(a, b, side, side)?;
        }
        let (predicted, features) = classify(classifier, &images)?;
        let correct = predicted
            .iter()
            .zip(expected)
            .filter(|(p, e)| p == e)
            .count();
        rows.push(DiffusionRow {
            policy: run.name.clone(),
            mean_steps: run.steps.iter().sum::<usize>() as f64 / run.steps.len() as f64,
            seconds: run.seconds.iter().sum::<f64>() / run.seconds.len() as f64,
            ssim_to_full: ssim_sum / pixels.len() as f64,
            class_consistency: correct as f64 / expected.len() as f64,
            fid: frechet_distance(&features, reference)?,
        });
    }
    Ok(rows)
}

/// The classifier's full-depth class and last-exit features for u8 images `(n, h, w)`.
pub fn classify(
    classifier: &ExitClassifier,
    images: &Tensor,
) -> Result<(Vec<usize>, Vec<Vec<f64>>)> {
    let no_exits = || Error::InvalidArgument("the classifier has no exits".into());
    let mut classes = Vec::new();
    let mut features = Vec::new();
    let n = images.dim(0)?;
    for start in (0..n).step_by(256) {
        let batch = Examples::Images(images.narrow(0, start, 256.min(n - start))?);
        let logits = classifier.all_exit_logits(&batch)?;
        let last = logits.last().ok_or_else(no_exits)?;
        classes.extend(
            last.argmax(1)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|c| c as usize),
        );
        let f = classifier.all_exit_features(&batch)?;
        let f = f.last().ok_or_else(no_exits)?.to_vec2::<f32>()?;
        features.extend(
            f.into_iter()
                .map(|r| r.into_iter().map(f64::from).collect::<Vec<_>>()),
        );
    }
    Ok((classes, features))
}

/// Last-exit features of the first `count` test images of the Fashion-MNIST idx folder
/// `dir`: FID's reference.
pub fn fid_reference(
    classifier: &ExitClassifier,
    dir: &Path,
    count: usize,
) -> Result<Vec<Vec<f64>>> {
    let test = read_idx(
        &dir.join("t10k-images-idx3-ubyte"),
        &dir.join("t10k-labels-idx1-ubyte"),
        &classifier.device,
    )
    .map_err(|e| {
        e.context(format!(
            "reading FID's reference images in {}",
            dir.display()
        ))
    })?
    .take(count.max(2))?;
    let Examples::Images(pixels) = &test.inputs else {
        return Err(Error::InvalidArgument(format!(
            "{} holds no images",
            dir.display()
        )));
    };
    Ok(classify(classifier, pixels)?.1)
}
