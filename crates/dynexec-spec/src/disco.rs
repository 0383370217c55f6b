//! DISCO (Mamou et al. 2024, "Dynamic Speculation Lookahead Accelerates Speculative Decoding
//! of Large Language Models", arXiv 2405.04304): after each draft token a small classifier,
//! fed the draft's own signals (its probability of the token, the runner-up's, the entropy,
//! the position in the draft), predicts whether the target will accept that token; drafting
//! stops when the prediction falls below a threshold.
//!
//! Training ([`collect`], [`train`]) drafts a fixed maximum lookahead on training prompts and
//! labels each draft token with the target's verdict. The classifier here is a logistic
//! regression on standardized features (the paper uses a small feed-forward network; with
//! five features a linear model separates as well, and fits in milliseconds). The threshold
//! is the one whose stopping rule, replayed on the recorded drafts with the measured cost of
//! a draft token and of verifying K+1 rows, yields the most tokens per unit of time.
//!
//! A classifier is made for one target and draft: [`Disco`] refuses any other pair.
//!
//! ```no_run
//! # fn main() -> dynexec_core::Result<()> {
//! use dynexec_spec::lookahead::parse;
//! let lookahead = parse("disco:models/disco-qwen2.5-coder-1.5b-0.5b")?;
//! assert_eq!(lookahead.name(), "disco");
//! # Ok(()) }
//! ```

use crate::cost::VerifyCost;
use crate::lookahead::{DraftSignal, Lookahead};
use dynexec_core::{Error, Result};
use dynexec_models::llama::Llama;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The manifest name of the classifier `--lookahead disco` uses when it names none.
pub const DEFAULT_DISCO: &str = "disco-qwen2.5-coder-1.5b-0.5b";

/// The card file of a DISCO folder.
pub const DISCO_CARD: &str = "card.json";

/// What the classifier reads, in order.
pub const FEATURES: [&str; 5] = [
    "confidence",
    "runner_up",
    "margin",
    "entropy",
    "ln_position",
];

fn features(s: &DraftSignal) -> [f64; 5] {
    let (p, q) = (f64::from(s.confidence), f64::from(s.runner_up));
    [p, q, p - q, f64::from(s.entropy), (s.position as f64).ln()]
}

/// The target a classifier was trained for, by shape (a path or a name may differ).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetShape {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Vocabulary rows.
    pub vocab_size: usize,
}

impl TargetShape {
    /// The shape of `model`.
    pub fn of(model: &Llama) -> Self {
        let c = model.config();
        Self {
            layers: c.num_layers,
            hidden_size: c.hidden_size,
            vocab_size: c.vocab_size,
        }
    }
}

/// A logistic regression on standardized features.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Logistic {
    /// Subtracted from each feature.
    pub mean: Vec<f64>,
    /// Each centred feature is divided by it.
    pub scale: Vec<f64>,
    /// One weight per feature.
    pub weights: Vec<f64>,
    /// Added before the sigmoid.
    pub bias: f64,
}

impl Logistic {
    /// The probability that a token with `signal` is accepted.
    pub fn predict(&self, signal: &DraftSignal) -> f64 {
        let x = features(signal);
        let z = self.bias
            + x.iter()
                .zip(&self.mean)
                .zip(&self.scale)
                .zip(&self.weights)
                .map(|(((x, m), s), w)| w * (x - m) / s)
                .sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }

    /// Fits by Newton's method (iteratively reweighted least squares) with a small ridge
    /// penalty, which keeps separable data finite.
    pub fn fit(examples: &[(DraftSignal, bool)]) -> Result<Self> {
        let positives = examples.iter().filter(|(_, y)| *y).count();
        if positives == 0 || positives == examples.len() {
            return Err(Error::InvalidArgument(format!(
                "training DISCO needs accepted and rejected drafts; got {positives} accepted of {}: use more or other prompts, or a longer lookahead",
                examples.len()
            )));
        }
        let n = FEATURES.len();
        let rows: Vec<[f64; 5]> = examples.iter().map(|(s, _)| features(s)).collect();
        let count = rows.len() as f64;
        let mean: Vec<f64> = (0..n)
            .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / count)
            .collect();
        let scale: Vec<f64> = (0..n)
            .map(|j| {
                let var = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / count;
                if var > 1e-12 {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        // Column 0 is the intercept.
        let design: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                std::iter::once(1.0)
                    .chain((0..n).map(|j| (r[j] - mean[j]) / scale[j]))
                    .collect()
            })
            .collect();
        let labels: Vec<f64> = examples
            .iter()
            .map(|(_, y)| if *y { 1.0 } else { 0.0 })
            .collect();
        let mut beta = vec![0.0; n + 1];
        let ridge = 1e-3 * count;
        for _ in 0..50 {
            let mut gradient = vec![0.0; n + 1];
            let mut hessian = vec![vec![0.0; n + 1]; n + 1];
            for (x, y) in design.iter().zip(&labels) {
                let z: f64 = x.iter().zip(&beta).map(|(a, b)| a * b).sum();
                let p = 1.0 / (1.0 + (-z).exp());
                let w = (p * (1.0 - p)).max(1e-9);
                for a in 0..=n {
                    gradient[a] += (p - y) * x[a];
                    for b in 0..=n {
                        hessian[a][b] += w * x[a] * x[b];
                    }
                }
            }
            for a in 1..=n {
                gradient[a] += ridge * beta[a];
                hessian[a][a] += ridge;
            }
            let step = solve(hessian, gradient)?;
            let size: f64 = step.iter().map(|s| s.abs()).fold(0.0, f64::max);
            for (b, s) in beta.iter_mut().zip(&step) {
                *b -= s;
            }
            if size < 1e-9 {
                break;
            }
        }
        Ok(Self {
            mean,
            scale,
            bias: beta[0],
            weights: beta[1..].to_vec(),
        })
    }
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        if a[pivot][col].abs() < 1e-12 {
            return Err(Error::InvalidArgument(
                "DISCO's features are degenerate on these drafts (a constant or duplicated feature)".to_string(),
            ));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x)
}

/// One recorded draft: the signal of each token and how many the target accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedStep {
    /// The draft's tokens' signals, in order.
    pub signals: Vec<DraftSignal>,
    /// How many of them the target kept.
    pub accepted: usize,
}

/// What a step costs, in decoding steps of the target: a draft token, and verifying n rows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepCosts {
    /// One draft forward, over one target decoding step.
    pub draft_token: f64,
    /// `verify[n - 1]`: the target's forward over n rows, over one decoding step.
    pub verify: Vec<f64>,
}

impl StepCosts {
    /// From a measured draft forward time and the target's measured verification costs.
    pub fn new(draft_secs: f64, verify: &[VerifyCost]) -> Result<Self> {
        let step = verify.first().map(|v| v.secs).ok_or_else(|| {
            Error::InvalidArgument("no verification cost was measured".to_string())
        })?;
        Ok(Self {
            draft_token: draft_secs / step,
            verify: verify.iter().map(|v| v.fraction_of_step).collect(),
        })
    }

    fn verify_rows(&self, rows: usize) -> f64 {
        match self.verify.get(rows.saturating_sub(1)) {
            Some(&v) => v,
            // Past the measured range, extend the last measured slope.
            None => {
                let n = self.verify.len();
                let last = self.verify.last().copied().unwrap_or(1.0);
                let slope = if n >= 2 {
                    last - self.verify[n - 2]
                } else {
                    0.0
                };
                last + slope * (rows - n) as f64
            }
        }
    }

    /// Tokens per decoding step's worth of time when each recorded draft is cut after
    /// `drafted(step)` tokens (the tokens accepted stay those the full draft had, up to the
    /// cut; the target adds one of its own).
    pub fn speed(&self, steps: &[RecordedStep], drafted: impl Fn(&RecordedStep) -> usize) -> f64 {
        let (mut tokens, mut cost) = (0.0, 0.0);
        for step in steps {
            let k = drafted(step).min(step.signals.len());
            tokens += (step.accepted.min(k) + 1) as f64;
            cost += k as f64 * self.draft_token + self.verify_rows(k + 1);
        }
        tokens / cost.max(f64::MIN_POSITIVE)
    }
}

/// Where the stop rule first fires: the number of tokens drafted.
fn cut(model: &Logistic, threshold: f64, step: &RecordedStep) -> usize {
    step.signals
        .iter()
        .position(|s| model.predict(s) < threshold)
        .map_or(step.signals.len(), |i| i + 1)
}

/// How a classifier did in training, for its card.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiscoReport {
    /// Prompts whose drafts trained the classifier and chose the threshold (set by the
    /// caller, which split the prompts).
    pub training_prompts: usize,
    /// Prompts whose drafts measure accuracy and pick nothing.
    pub validation_prompts: usize,
    /// Draft tokens labelled for training.
    pub training_tokens: usize,
    /// Draft tokens labelled for validation.
    pub validation_tokens: usize,
    /// Share of validation tokens the target accepted (the majority baseline's accuracy is
    /// the larger of it and its complement).
    pub validation_acceptance: f64,
    /// Validation accuracy of "accepted iff P ≥ 0.5".
    pub validation_accuracy: f64,
    /// Simulated tokens per decoding step's time on the validation drafts: DISCO at its
    /// threshold, and each fixed lookahead K = 1..max.
    pub validation_speed_disco: f64,
    /// As above, for fixed:K, K = 1..max.
    pub validation_speed_fixed: Vec<f64>,
}

/// A trained DISCO classifier and what it was trained on (the card).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiscoCard {
    /// The target it was trained for.
    pub target: TargetShape,
    /// The draft it was trained for, as [`crate::drafter::Drafter::name`] names it.
    pub draft: String,
    /// The prompts it was trained on.
    pub data: String,
    /// Feature names, in the weights' order.
    pub features: Vec<String>,
    /// The classifier.
    pub classifier: Logistic,
    /// Drafting stops after a token whose predicted acceptance is below this.
    pub threshold: f64,
    /// The most tokens drafted per step.
    pub max_lookahead: usize,
    /// The measured costs the threshold was chosen with.
    pub costs: StepCosts,
    /// Training and validation figures.
    pub report: DiscoReport,
    /// The command that reproduces it.
    pub command: String,
}

/// Splits recorded steps into labelled tokens: a token is positive when the target kept it.
fn labelled(steps: &[RecordedStep]) -> Vec<(DraftSignal, bool)> {
    steps
        .iter()
        .flat_map(|s| {
            s.signals
                .iter()
                .enumerate()
                .map(move |(i, signal)| (*signal, i < s.accepted))
        })
        .collect()
}

/// Fits a classifier on `training` steps and picks its threshold by simulated speed on them;
/// `validation` steps (other prompts) give the card's accuracy and speeds.
pub fn train(
    training: &[RecordedStep],
    validation: &[RecordedStep],
    costs: &StepCosts,
    max_lookahead: usize,
) -> Result<(Logistic, f64, DiscoReport)> {
    let train_examples = labelled(training);
    let classifier = Logistic::fit(&train_examples)?;
    let speeds: Vec<(f64, f64)> = (0..=100)
        .map(|i| {
            let threshold = f64::from(i) / 100.0;
            (
                threshold,
                costs.speed(training, |s| cut(&classifier, threshold, s)),
            )
        })
        .collect();
    let best = speeds.iter().map(|s| s.1).fold(f64::MIN, f64::max);
    // The middle of the thresholds that tie for the best speed: the farthest from both
    // classes where the training data separates them.
    let tied: Vec<f64> = speeds
        .iter()
        .filter(|s| s.1 >= best - 1e-12)
        .map(|s| s.0)
        .collect();
    let threshold = tied[tied.len() / 2];
    let held_out = labelled(validation);
    let correct = held_out
        .iter()
        .filter(|(s, y)| (classifier.predict(s) >= 0.5) == *y)
        .count();
    let accepted = held_out.iter().filter(|(_, y)| *y).count();
    let report = DiscoReport {
        training_prompts: 0,
        validation_prompts: 0,
        training_tokens: train_examples.len(),
        validation_tokens: held_out.len(),
        validation_acceptance: accepted as f64 / held_out.len().max(1) as f64,
        validation_accuracy: correct as f64 / held_out.len().max(1) as f64,
        validation_speed_disco: costs.speed(validation, |s| cut(&classifier, threshold, s)),
        validation_speed_fixed: (1..=max_lookahead)
            .map(|k| costs.speed(validation, |_| k))
            .collect(),
    };
    Ok((classifier, threshold, report))
}

/// A DISCO controller: drafts up to its maximum, stopping after a token the classifier
/// predicts the target will reject.
#[derive(Debug, Clone)]
pub struct Disco {
    card: DiscoCard,
}

impl Disco {
    /// A controller from its card.
    pub fn new(card: DiscoCard) -> Self {
        Self { card }
    }

    /// Its card.
    pub fn card(&self) -> &DiscoCard {
        &self.card
    }

    /// Reads a card: a DISCO folder or its card file.
    pub fn load(path: &Path) -> Result<Self> {
        let file: PathBuf = if path.is_dir() {
            path.join(DISCO_CARD)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::file(&file, e))?;
        let card: DiscoCard = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} is not a DISCO card ({e}); train one with `dynexec spec train-lookahead`",
                file.display()
            ))
        })?;
        if card.classifier.weights.len() != FEATURES.len()
            || card.classifier.mean.len() != FEATURES.len()
            || card.classifier.scale.len() != FEATURES.len()
        {
            return Err(Error::InvalidArgument(format!(
                "{} has {} weights but DISCO reads {} features ({}): retrain it with this version",
                file.display(),
                card.classifier.weights.len(),
                FEATURES.len(),
                FEATURES.join(", ")
            )));
        }
        Ok(Self::new(card))
    }

    /// Writes the card into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let file = dir.join(DISCO_CARD);
        let json = serde_json::to_string_pretty(&self.card)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the card: {e}")))?;
        std::fs::write(&file, json + "\n").map_err(|e| Error::file(&file, e))
    }
}

impl Lookahead for Disco {
    fn name(&self) -> String {
        "disco".to_string()
    }
    fn next_k(&self) -> usize {
        self.card.max_lookahead
    }
    fn keep_drafting(&self, signal: &DraftSignal) -> bool {
        self.card.classifier.predict(signal) >= self.card.threshold
    }
    fn observe(&mut self, _: &[DraftSignal], _: usize) {}
    fn check_pair(&self, target: &Llama, draft: &str) -> Result<()> {
        let shape = TargetShape::of(target);
        if shape != self.card.target || draft != self.card.draft {
            return Err(Error::InvalidArgument(format!(
                "this DISCO classifier was trained for draft `{}` on a target with {} layers, hidden size {} and {} tokens; this run drafts with `{draft}` for a target with {} layers, hidden size {} and {} tokens: train one for this pair with `dynexec spec train-lookahead`, or use another --lookahead",
                self.card.draft,
                self.card.target.layers,
                self.card.target.hidden_size,
                self.card.target.vocab_size,
                shape.layers,
                shape.hidden_size,
                shape.vocab_size
            )));
        }
        Ok(())
    }
}

/// Drafts recorded on a prompt set, prompt by prompt, and what drafting cost.
pub struct Collected {
    /// Each prompt's recorded steps.
    pub per_prompt: Vec<Vec<RecordedStep>>,
    /// Seconds spent drafting, over all prompts.
    pub draft_secs: f64,
    /// The drafter's forward passes, over all prompts.
    pub draft_forwards: usize,
}

/// Decodes each prompt speculatively with `max_lookahead` drafts per step, recording every
/// draft and the target's verdict; `on_prompt` hears each finished prompt's index.
pub fn collect(
    target: &Llama,
    drafter: &mut dyn crate::drafter::Drafter,
    tokenizer: &dynexec_core::tokenizer::TextTokenizer,
    prompts: &[Vec<u32>],
    max_lookahead: usize,
    options: &dynexec_models::generation::GenerateOptions,
    mut on_prompt: impl FnMut(usize),
) -> Result<Collected> {
    let mut collected = Collected {
        per_prompt: Vec::with_capacity(prompts.len()),
        draft_secs: 0.0,
        draft_forwards: 0,
    };
    for (i, prompt) in prompts.iter().enumerate() {
        drafter.rollback(0)?;
        let mut recorder = Recorder::new(max_lookahead);
        let out = crate::engine::generate_speculative(
            target,
            &mut *drafter,
            &mut recorder,
            tokenizer,
            prompt,
            options,
            |_| Ok(()),
        )?;
        collected.draft_secs += out.spec.draft_secs;
        collected.draft_forwards += out.spec.draft_forwards;
        collected.per_prompt.push(recorder.steps);
        on_prompt(i);
    }
    Ok(collected)
}

/// A fixed lookahead that records every draft and the target's verdict on it: training data
/// for [`train`].
pub struct Recorder {
    max: usize,
    /// The steps recorded so far.
    pub steps: Vec<RecordedStep>,
}

impl Recorder {
    /// Drafts `max` tokens every step (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            steps: Vec::new(),
        }
    }
}

impl Lookahead for Recorder {
    fn name(&self) -> String {
        format!("fixed:{} (recording)", self.max)
    }
    fn next_k(&self) -> usize {
        self.max
    }
    fn observe(&mut self, signals: &[DraftSignal], accepted: usize) {
        if !signals.is_empty() {
            self.steps.push(RecordedStep {
                signals: signals.to_vec(),
                accepted,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(position: usize, confidence: f32) -> DraftSignal {
        DraftSignal {
            position,
            confidence,
            runner_up: (1.0 - confidence) * 0.6,
            entropy: 2.0 * (1.0 - confidence),
        }
    }

    /// Drafts whose tokens are accepted while the draft is confident: what a classifier
    /// should learn, and where stopping early beats every fixed lookahead.
    fn steps() -> Vec<RecordedStep> {
        (0..210)
            .map(|i| {
                // A confident streak of 0..=6 tokens, then doubt.
                let streak = i % 7;
                let signals: Vec<DraftSignal> = (1..=6)
                    .map(|p| signal(p, if p <= streak { 0.95 } else { 0.2 }))
                    .collect();
                RecordedStep {
                    signals,
                    accepted: streak.min(6),
                }
            })
            .collect()
    }

    #[test]
    fn learns_to_stop_where_the_draft_is_unsure() {
        let costs = StepCosts {
            draft_token: 0.4,
            verify: vec![1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3],
        };
        let (model, threshold, report) = train(&steps(), &steps(), &costs, 6).unwrap();
        assert!(model.predict(&signal(1, 0.95)) > 0.9);
        assert!(model.predict(&signal(1, 0.2)) < 0.1);
        assert!(report.validation_accuracy > 0.99, "{report:?}");
        assert!(threshold > 0.05 && threshold < 0.95, "{threshold}");
        let best_fixed = report
            .validation_speed_fixed
            .iter()
            .copied()
            .fold(0.0, f64::max);
        assert!(report.validation_speed_disco > best_fixed, "{report:?}");
    }

    #[test]
    fn refuses_one_sided_data() {
        let all_accepted: Vec<(DraftSignal, bool)> =
            (1..5).map(|p| (signal(p, 0.9), true)).collect();
        assert!(Logistic::fit(&all_accepted)
            .unwrap_err()
            .to_string()
            .contains("accepted and rejected"));
    }

    #[test]
    fn cards_round_trip_and_bad_ones_are_refused() {
        let costs = StepCosts {
            draft_token: 0.4,
            verify: vec![1.0, 1.1],
        };
        let (classifier, threshold, report) = train(&steps(), &steps(), &costs, 6).unwrap();
        let card = DiscoCard {
            target: TargetShape {
                layers: 2,
                hidden_size: 8,
                vocab_size: 10,
            },
            draft: "d".into(),
            data: "synthetic".into(),
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
            classifier,
            threshold,
            max_lookahead: 6,
            costs,
            report,
            command: "test".into(),
        };
        let dir = std::env::temp_dir().join(format!("dynexec-disco-{}", std::process::id()));
        Disco::new(card.clone()).save(&dir).unwrap();
        let loaded = Disco::load(&dir).unwrap().card().clone();
        assert_eq!((&loaded.target, &loaded.draft), (&card.target, &card.draft));
        assert_eq!(loaded.threshold, card.threshold);
        for (a, b) in loaded
            .classifier
            .weights
            .iter()
            .zip(&card.classifier.weights)
        {
            assert!((a - b).abs() < 1e-12);
        }
        std::fs::write(dir.join(DISCO_CARD), "{}").unwrap();
        let err = Disco::load(&dir).unwrap_err().to_string();
        assert!(err.contains("not a DISCO card"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
