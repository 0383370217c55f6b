//! Step Saver (Yu & Barad 2024): predict from the prompt alone how many denoising steps it
//! needs.
//!
//! Labels come from generating each prompt at every step count of a grid and taking the
//! smallest count whose image reaches SSIM ≥ τ against the largest count's image. The
//! predictor is a softmax classifier over the grid on the prompt's sentence embedding; it
//! answers with the smallest step count whose predicted probability of sufficing reaches a
//! quantile, so one knob trades steps for safety.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, AdamW, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use dynexec_core::card::{read_card, write_card};
use dynexec_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File names of a step predictor inside its model's folder.
pub const PREDICTOR_CARD_FILE: &str = "steps.json";
/// The classifier's weights, beside the card.
pub const PREDICTOR_WEIGHTS_FILE: &str = "steps.safetensors";

/// The smallest step count of `grid` (ascending) whose SSIM to the reference reaches `tau`;
/// the largest when none does.
pub fn needed_steps(grid: &[usize], ssim_to_reference: &[f64], tau: f64) -> usize {
    grid.iter()
        .zip(ssim_to_reference)
        .find(|(_, &s)| s >= tau)
        .map_or(grid.last().copied().unwrap_or(0), |(&n, _)| n)
}

/// The predictor's card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictorCard {
    /// Step counts the classifier chooses among, ascending.
    pub grid: Vec<usize>,
    /// SSIM threshold the labels were made with.
    pub tau: f64,
    /// Step count of the reference image the labels compare against.
    pub reference_steps: usize,
    /// Default probability that the predicted count suffices.
    pub quantile: f64,
    /// Size of the prompt embeddings it reads.
    pub embedding_dim: usize,
    /// Training examples (prompts) it was fitted on.
    pub examples: usize,
    /// Share of training examples whose quantile prediction is at least their label.
    pub train_coverage: f64,
    /// Mean needed step count over the training examples.
    pub mean_label: f64,
    /// The command that reproduces the predictor.
    pub command: String,
}

/// A loaded or trained step predictor.
pub struct StepPredictor {
    classifier: Linear,
    /// Grid, labelling settings and training record.
    pub card: PredictorCard,
}

impl StepPredictor {
    /// Fits the classifier to `(embedding, needed steps)` pairs; every label must be a grid
    /// entry.
    pub fn train(
        embeddings: &Tensor,
        labels: &[usize],
        mut card: PredictorCard,
        epochs: usize,
        learning_rate: f64,
        seed: u64,
        varmap: &VarMap,
    ) -> Result<Self> {
        let (rows, dim) = embeddings.dims2()?;
        if rows != labels.len() || rows == 0 {
            return Err(Error::InvalidArgument(format!(
                "{rows} embeddings for {} labels",
                labels.len()
            )));
        }
        check_grid(&card.grid)?;
        let classes = labels
            .iter()
            .map(|l| {
                card.grid.iter().position(|g| g == l).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "label {l} steps is not in the grid {:?}",
                        card.grid
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let device = embeddings.device();
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        let classifier = linear(dim, card.grid.len(), vb.pp("classifier"))?;
        dynexec_models::init::seeded_init(varmap, seed)?;
        let targets = Tensor::from_vec(
            classes.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            rows,
            device,
        )?;
        let mut optimizer = AdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: learning_rate,
                weight_decay: 1e-3,
                ..Default::default()
            },
        )?;
        for _ in 0..epochs {
            let logits = classifier.forward(embeddings)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            optimizer.backward_step(&loss)?;
        }
        card.embedding_dim = dim;
        card.examples = rows;
        card.mean_label = labels.iter().sum::<usize>() as f64 / rows as f64;
        let predictor = Self { classifier, card };
        let predicted = predictor.predict(embeddings, predictor.card.quantile)?;
        let covered = predicted.iter().zip(labels).filter(|(p, l)| p >= l).count();
        let mut predictor = predictor;
        predictor.card.train_coverage = covered as f64 / rows as f64;
        Ok(predictor)
    }

    /// Loads `steps.json` and `steps.safetensors` from a model folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let card_path = dir.join(PREDICTOR_CARD_FILE);
        let weights = dir.join(PREDICTOR_WEIGHTS_FILE);
        if !card_path.exists() || !weights.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} has no step predictor ({PREDICTOR_CARD_FILE}, {PREDICTOR_WEIGHTS_FILE}): \
                 make one with `dynexec diffusion label` and `dynexec diffusion train-steps`, \
                 or use a fixed step count or converge",
                dir.display()
            )));
        }
        let card: PredictorCard = read_card(&card_path, "a step-predictor card")?;
        check_grid(&card.grid)?;
        // SAFETY: read-only mapping of a file dynexec does not modify while it is open.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }?;
        let classifier =
            linear(card.embedding_dim, card.grid.len(), vb.pp("classifier")).map_err(|e| {
                Error::InvalidModel {
                    path: weights.clone(),
                    message: format!("{e} (weights and {PREDICTOR_CARD_FILE} disagree)"),
                }
            })?;
        Ok(Self { classifier, card })
    }

    /// Writes the card and weights into `dir`.
    pub fn save(&self, dir: &Path, varmap: &VarMap) -> Result<()> {
        varmap.save(dir.join(PREDICTOR_WEIGHTS_FILE))?;
        write_card(&dir.join(PREDICTOR_CARD_FILE), &self.card)
    }

    /// For each embedded prompt, the smallest grid step count whose cumulative predicted
    /// probability reaches `quantile`.
    pub fn predict(&self, embeddings: &Tensor, quantile: f64) -> Result<Vec<usize>> {
        if !(0.0..=1.0).contains(&quantile) {
            return Err(Error::InvalidArgument(format!(
                "quantile {quantile} must be between 0 and 1"
            )));
        }
        let probs = candle_nn::ops::softmax(&self.classifier.forward(embeddings)?, D::Minus1)?
            .to_vec2::<f32>()?;
        Ok(probs
            .iter()
            .map(|row| {
                let mut cumulative = 0.0;
                for (p, &n) in row.iter().zip(&self.card.grid) {
                    cumulative += *p as f64;
                    if cumulative >= quantile - 1e-9 {
                        return n;
                    }
                }
                self.card.grid.last().copied().unwrap_or(0)
            })
            .collect())
    }
}

fn check_grid(grid: &[usize]) -> Result<()> {
    match !grid.is_empty() && grid[0] > 0 && grid.windows(2).all(|w| w[0] < w[1]) {
        true => Ok(()),
        false => Err(Error::InvalidArgument(format!(
            "step grid {grid:?} must be positive and strictly increasing"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_steps_is_the_first_count_reaching_tau() {
        let grid = [5, 10, 20, 50];
        assert_eq!(needed_steps(&grid, &[0.5, 0.96, 0.94, 1.0], 0.95), 10);
        assert_eq!(needed_steps(&grid, &[0.5, 0.6, 0.7, 0.8], 0.95), 50);
        assert_eq!(needed_steps(&grid, &[1.0, 1.0, 1.0, 1.0], 0.95), 5);
    }

    #[test]
    fn the_predictor_learns_separable_prompts_and_the_quantile_is_conservative() {
        let device = Device::Cpu;
        // Two kinds of prompt embedding: kind A needs 10 steps, kind B needs 40 (or 20).
        let mut rows: Vec<f32> = Vec::new();
        let mut labels = Vec::new();
        for i in 0..40 {
            let kind_b = i % 2 == 1;
            rows.extend([
                if kind_b { 0.0 } else { 1.0 },
                if kind_b { 1.0 } else { 0.0 },
                0.1,
            ]);
            labels.push(match (kind_b, i % 4) {
                (false, _) => 10,
                (true, 1) => 40,
                (true, _) => 20,
            });
        }
        let embeddings = Tensor::from_vec(rows, (40, 3), &device).unwrap();
        let card = PredictorCard {
            grid: vec![5, 10, 20, 40],
            tau: 0.95,
            reference_steps: 40,
            quantile: 0.9,
            embedding_dim: 0,
            examples: 0,
            train_coverage: 0.0,
            mean_label: 0.0,
            command: String::new(),
        };
        let varmap = VarMap::new();
        let p = StepPredictor::train(&embeddings, &labels, card, 400, 0.1, 0, &varmap).unwrap();
        let a = Tensor::new(&[[1f32, 0.0, 0.1]], &device).unwrap();
        let b = Tensor::new(&[[0f32, 1.0, 0.1]], &device).unwrap();
        assert_eq!(p.predict(&a, 0.9).unwrap(), vec![10]);
        // Kind B needs 20 or 40 half the time each: the median is 20, the 0.9 quantile 40.
        assert_eq!(p.predict(&b, 0.9).unwrap(), vec![40]);
        assert_eq!(p.predict(&b, 0.3).unwrap(), vec![20]);
        assert_eq!(p.card.train_coverage, 1.0);

        let dir = tempfile::tempdir().unwrap();
        p.save(dir.path(), &varmap).unwrap();
        let loaded = StepPredictor::load(dir.path(), &device).unwrap();
        assert_eq!(loaded.predict(&b, 0.9).unwrap(), vec![40]);
        assert!(StepPredictor::train(
            &embeddings,
            &[7; 40],
            p.card.clone(),
            1,
            0.1,
            0,
            &VarMap::new()
        )
        .is_err());
        let err = StepPredictor::load(Path::new("/nonexistent"), &device)
            .err()
            .unwrap();
        assert!(err.to_string().contains("diffusion label"), "{err}");
    }
}
