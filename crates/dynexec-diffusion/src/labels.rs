//! Step Saver's labels (Yu & Barad 2024): how many denoising steps each prompt needs. Every
//! prompt and seed is sampled at every step count of a grid; its label is the smallest count
//! whose image reaches SSIM ≥ τ against the largest count's. The labels are written as JSON
//! lines and read back to fit the step predictor.

use crate::metrics::ssim_u8;
use crate::pipeline::Pipeline;
use crate::predictor::needed_steps;
use crate::StepPolicy;
use dynexec_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One labelled example: a prompt, a seed and the steps it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLabel {
    /// The prompt.
    pub prompt: String,
    /// Its class label.
    pub label: String,
    /// The sampling seed.
    pub seed: u64,
    /// Step counts tried, ascending.
    pub grid: Vec<usize>,
    /// SSIM of each count's image against the reference (the last count's).
    pub ssim: Vec<f64>,
    /// The smallest count reaching `tau`.
    pub steps: usize,
    /// The SSIM threshold.
    pub tau: f64,
    /// The reference's step count (the grid's last).
    pub reference_steps: usize,
}

/// How labelling runs.
#[derive(Debug, Clone)]
pub struct LabelPlan {
    /// Step counts to try, ascending, at least two; the last is the reference.
    pub grid: Vec<usize>,
    /// SSIM a count's image must reach against the reference.
    pub tau: f64,
    /// Seeds per prompt (each one example).
    pub seeds: usize,
    /// Prompts denoised together.
    pub batch_size: usize,
    /// Guidance scale (default: the model's).
    pub guidance: Option<f64>,
}

/// Labels `prompts` (`(text, label)` pairs) with `pipeline`, a text-UNet. `on_batch` gets
/// each finished batch's labels (so they can be saved as they come) and the prompts done;
/// an error from it stops labelling. Labels come back in prompt-then-seed order.
pub fn label_prompts(
    pipeline: &Pipeline,
    prompts: &[(String, String)],
    plan: &LabelPlan,
    mut on_batch: impl FnMut(&[StepLabel], usize) -> Result<()>,
) -> Result<Vec<StepLabel>> {
    let grid = &plan.grid;
    if grid.len() < 2 || grid.windows(2).any(|w| w[0] >= w[1]) || grid[0] == 0 {
        return Err(Error::InvalidArgument(
            "the step grid needs two or more increasing step counts, e.g. 5,10,20,50".into(),
        ));
    }
    if plan.seeds == 0 || plan.batch_size == 0 {
        return Err(Error::InvalidArgument(
            "labelling needs at least one seed and a batch of at least one prompt".into(),
        ));
    }
    let Pipeline::Unet(model) = pipeline else {
        return Err(Error::InvalidArgument(
            "labels are made on dynexec's text-UNets (SSIM on their pixels)".into(),
        ));
    };
    let options = pipeline.options(plan.guidance, "ddim");
    let reference = grid[grid.len() - 1];
    let side = model.card.unet.image_size;
    let mut labels = Vec::with_capacity(prompts.len() * plan.seeds);
    let mut done = 0;
    for chunk in prompts.chunks(plan.batch_size) {
        let batch_start = labels.len();
        let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
        let context = pipeline.condition(&texts, plan.seeds)?;
        let seeds: Vec<u64> = (0..texts.len() * plan.seeds)
            .map(|i| (i % plan.seeds) as u64)
            .collect();
        // Images of every grid step count, as u8 pixels per sample.
        let mut by_steps = Vec::with_capacity(grid.len());
        for &n in grid {
            let sampled =
                pipeline.sample(&context, &seeds, &StepPolicy::Fixed(n), &options, |_, _| {})?;
            let pixels = pipeline
                .to_images(&sampled.samples)?
                .flatten_from(1)?
                .to_vec2::<u8>()?;
            by_steps.push(pixels);
        }
        let reference_images = &by_steps[by_steps.len() - 1];
        for (row, &seed) in seeds.iter().enumerate() {
            let ssim = by_steps
                .iter()
                .map(|images| ssim_u8(&images[row], &reference_images[row], side, side))
                .collect::<Result<Vec<_>>>()?;
            let (prompt, label) = &chunk[row / plan.seeds];
            labels.push(StepLabel {
                prompt: prompt.clone(),
                label: label.clone(),
                seed,
                grid: grid.clone(),
                steps: needed_steps(grid, &ssim, plan.tau),
                ssim,
                tau: plan.tau,
                reference_steps: reference,
            });
        }
        done += chunk.len();
        on_batch(&labels[batch_start..], done)?;
    }
    Ok(labels)
}

/// Writes labels as JSON lines to `out`, the file at `path`.
pub fn append_labels(out: &mut impl Write, path: &Path, labels: &[StepLabel]) -> Result<()> {
    for label in labels {
        let line = serde_json::to_string(label)
            .map_err(|e| Error::InvalidArgument(format!("serializing a label: {e}")))?;
        writeln!(out, "{line}").map_err(|e| Error::file(path, e))?;
    }
    out.flush().map_err(|e| Error::file(path, e))
}

/// Writes labels as a JSON-lines file.
pub fn write_labels(path: &Path, labels: &[StepLabel]) -> Result<()> {
    let mut out = std::fs::File::create(path).map_err(|e| Error::file(path, e))?;
    append_labels(&mut out, path, labels)
}

/// Reads labels written by [`write_labels`]; they must share one grid and threshold.
pub fn read_labels(path: &Path) -> Result<Vec<StepLabel>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let labels = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<StepLabel>(l).map_err(|_| {
                Error::InvalidArgument(format!(
                    "{} line {}: not a `diffusion label` line",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = labels.first() else {
        return Err(Error::InvalidArgument(format!(
            "{} holds no labels",
            path.display()
        )));
    };
    if labels
        .iter()
        .any(|l| l.grid != first.grid || l.tau != first.tau)
    {
        return Err(Error::InvalidArgument(
            "the labels mix step grids or thresholds: label every prompt with one grid and threshold".into(),
        ));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_mixed_grids_are_refused() {
        let label = StepLabel {
            prompt: "a shoe".into(),
            label: "Sneaker".into(),
            seed: 1,
            grid: vec![5, 10],
            ssim: vec![0.9, 1.0],
            steps: 10,
            tau: 0.95,
            reference_steps: 10,
        };
        let dir = std::env::temp_dir().join(format!("dynexec-labels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("labels.jsonl");
        write_labels(&path, &[label.clone(), label.clone()]).unwrap();
        assert_eq!(
            read_labels(&path).unwrap(),
            vec![label.clone(), label.clone()]
        );
        let other = StepLabel {
            grid: vec![5, 20],
            ..label.clone()
        };
        write_labels(&path, &[label, other]).unwrap();
        assert!(read_labels(&path).unwrap_err().to_string().contains("mix"));
        std::fs::write(&path, "{}\n").unwrap();
        assert!(read_labels(&path)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
