//! Evaluating exit policies on every exit's predictions, and picking thresholds.
//!
//! A policy's decision for one input depends only on the exits up to where it stops, so the
//! probabilities of every exit, computed once per input, let any policy be evaluated exactly
//! without running the model again. Calibration searches thresholds on such predictions for
//! the fewest layers whose accuracy stays within the allowed drop of full depth.

use crate::policy::{argmax, normalized_entropy, ExitPolicy};
use dynexec_core::{Error, Result, Setting};
use serde::Serialize;

/// Class probabilities of every exit for a set of labelled inputs.
#[derive(Debug, Clone)]
pub struct ExitPredictions {
    /// `probs[input][exit][class]`.
    pub probs: Vec<Vec<Vec<f32>>>,
    /// The true class of each input.
    pub labels: Vec<usize>,
}

/// How a policy did on a set of predictions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Evaluation {
    /// Fraction of inputs classified correctly where they stopped.
    pub accuracy: f64,
    /// Mean 1-based exit the inputs stopped at.
    pub mean_exit: f64,
    /// How many inputs stopped at each exit.
    pub exit_counts: Vec<usize>,
    /// Inputs classified correctly (the count behind `accuracy`).
    #[serde(skip)]
    pub correct: usize,
}

impl ExitPredictions {
    /// Number of inputs.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no inputs.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Exits per input (0 when there are no inputs).
    pub fn num_exits(&self) -> usize {
        self.probs.first().map_or(0, Vec::len)
    }

    /// Accuracy of each exit on its own.
    pub fn accuracy_per_exit(&self) -> Vec<f64> {
        (0..self.num_exits())
            .map(|e| {
                let correct = self
                    .probs
                    .iter()
                    .zip(&self.labels)
                    .filter(|(p, &label)| argmax(&p[e]).0 == label)
                    .count();
                correct as f64 / self.len().max(1) as f64
            })
            .collect()
    }

    /// Runs `policy` on every input.
    pub fn evaluate(&self, policy: &ExitPolicy) -> Evaluation {
        let mut exit_counts = vec![0; self.num_exits()];
        let mut correct = 0;
        let mut exit_sum = 0usize;
        for (probs, &label) in self.probs.iter().zip(&self.labels) {
            let d = policy.decide(probs);
            exit_counts[d.exit] += 1;
            exit_sum += d.exit + 1;
            correct += usize::from(d.class == label);
        }
        let n = self.len().max(1) as f64;
        Evaluation {
            accuracy: correct as f64 / n,
            mean_exit: exit_sum as f64 / n,
            exit_counts,
            correct,
        }
    }
}

/// The outcome of calibrating one kind of policy.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// The policy that stops earliest within the budget ([`ExitPolicy::Full`] if none does).
    pub policy: ExitPolicy,
    /// The allowed drop it was calibrated for, as a fraction.
    pub max_accuracy_drop: f64,
    /// Accuracy at full depth on the same predictions.
    pub full_accuracy: f64,
    /// How `policy` did on them.
    pub evaluation: Evaluation,
}

/// Picks the `kind` policy (confidence, entropy, patience or fixed) that stops earliest on
/// `predictions` while losing at most `max_accuracy_drop` (a fraction: 0.01 = one point) of
/// full-depth accuracy there. Thresholds are first searched as one value for every exit, then
/// refined exit by exit (confidence and entropy).
pub fn calibrate(
    predictions: &ExitPredictions,
    kind: &str,
    max_accuracy_drop: f64,
) -> Result<Calibration> {
    if predictions.is_empty() || predictions.num_exits() == 0 {
        return Err(Error::InvalidArgument(
            "calibration needs at least one labelled input".into(),
        ));
    }
    if !(0.0..=1.0).contains(&max_accuracy_drop) {
        return Err(Error::setting(
            Setting::MaxAccuracyDrop,
            format!("{max_accuracy_drop} must lie in [0, 1] (0.01 is one point)"),
        ));
    }
    let exits = predictions.num_exits();
    let full = predictions.evaluate(&ExitPolicy::Full);
    // Integer bound: never more wrong answers than the drop allows on this split.
    let allowed_losses = (max_accuracy_drop * predictions.len() as f64 + 1e-9).floor() as usize;
    let feasible = |e: &Evaluation| e.correct + allowed_losses >= full.correct;
    let better = |a: &Evaluation, b: &Evaluation| {
        a.mean_exit < b.mean_exit || (a.mean_exit == b.mean_exit && a.correct > b.correct)
    };
    let mut best = (ExitPolicy::Full, full.clone());
    let consider = |policy: ExitPolicy, best: &mut (ExitPolicy, Evaluation)| {
        let e = predictions.evaluate(&policy);
        if feasible(&e) && better(&e, &best.1) {
            *best = (policy, e);
        }
    };
    match kind {
        "confidence" | "entropy" => {
            let confidence = kind == "confidence";
            let candidates = threshold_candidates(predictions, confidence);
            let make = |thresholds: Vec<f32>| {
                if confidence {
                    ExitPolicy::Confidence { thresholds }
                } else {
                    ExitPolicy::Entropy { thresholds }
                }
            };
            for &t in &candidates {
                consider(make(vec![t]), &mut best);
            }
            let global = match &best.0 {
                ExitPolicy::Confidence { thresholds } | ExitPolicy::Entropy { thresholds } => {
                    thresholds[0]
                }
                _ => *candidates.last().unwrap_or(&0.0),
            };
            let mut per_exit = vec![global; exits - 1];
            for exit in 0..exits - 1 {
                for &t in &candidates {
                    let mut trial = per_exit.clone();
                    trial[exit] = t;
                    consider(make(trial), &mut best);
                }
                if let ExitPolicy::Confidence { thresholds } | ExitPolicy::Entropy { thresholds } =
                    &best.0
                {
                    if thresholds.len() == exits - 1 {
                        per_exit.clone_from(thresholds);
                    }
                }
            }
        }
        "patience" => {
            for patience in 0..exits {
                consider(ExitPolicy::Patience { patience }, &mut best);
            }
        }
        "fixed" => {
            for exit in 1..=exits {
                consider(ExitPolicy::Fixed { exit }, &mut best);
            }
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "cannot calibrate `{other}`: choose confidence, entropy, patience or fixed"
            )))
        }
    }
    Ok(Calibration {
        policy: best.0,
        max_accuracy_drop,
        full_accuracy: full.accuracy,
        evaluation: best.1,
    })
}

/// Up to 200 quantiles of the early exits' confidences (or entropies), plus the value that
/// never stops early.
fn threshold_candidates(predictions: &ExitPredictions, confidence: bool) -> Vec<f32> {
    let exits = predictions.num_exits();
    let mut values: Vec<f32> = predictions
        .probs
        .iter()
        .flat_map(|p| p[..exits - 1].iter())
        .map(|p| {
            if confidence {
                argmax(p).1
            } else {
                normalized_entropy(p)
            }
        })
        .collect();
    values.sort_by(f32::total_cmp);
    let steps = values.len().min(200);
    let mut candidates: Vec<f32> = (0..steps)
        .map(|i| values[i * values.len() / steps])
        .collect();
    candidates.push(if confidence { 1.01 } else { -0.01 });
    candidates.dedup();
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Synthetic three-exit predictions: deeper exits are right more often and surer.
    fn synthetic(n: usize, seed: u64) -> ExitPredictions {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut probs = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            let label = rng.random_range(0..3usize);
            let exits = (0..3)
                .map(|e| {
                    let skill = 0.5 + 0.2 * e as f32;
                    let right = rng.random::<f32>() < skill;
                    let class = if right {
                        label
                    } else {
                        (label + 1 + rng.random_range(0..2usize)) % 3
                    };
                    let top = 0.34 + 0.66 * rng.random::<f32>().powf(1.0 - 0.3 * e as f32);
                    let mut p = vec![(1.0 - top) / 2.0; 3];
                    p[class] = top;
                    p
                })
                .collect();
            probs.push(exits);
            labels.push(label);
        }
        ExitPredictions { probs, labels }
    }

    #[test]
    fn calibration_never_exceeds_the_requested_drop_on_its_split() {
        for seed in 0..5 {
            let predictions = synthetic(400, seed);
            let full = predictions.evaluate(&ExitPolicy::Full).accuracy;
            for kind in ["confidence", "entropy", "patience", "fixed"] {
                for drop in [0.0, 0.01, 0.05] {
                    let c = calibrate(&predictions, kind, drop).unwrap();
                    let again = predictions.evaluate(&c.policy);
                    assert_eq!(again, c.evaluation, "{kind}: the reported evaluation");
                    assert!(
                        full - again.accuracy <= drop + 1e-12,
                        "{kind} drop {drop}: {full} -> {}",
                        again.accuracy
                    );
                    assert!(again.mean_exit <= 3.0);
                }
            }
        }
    }

    #[test]
    fn a_generous_drop_buys_earlier_exits() {
        let predictions = synthetic(400, 7);
        let strict = calibrate(&predictions, "confidence", 0.0).unwrap();
        let loose = calibrate(&predictions, "confidence", 0.5).unwrap();
        assert!(loose.evaluation.mean_exit < strict.evaluation.mean_exit);
        assert_eq!(
            loose.evaluation.mean_exit, 1.0,
            "half the accuracy allows exit 1"
        );
    }

    #[test]
    fn evaluation_counts_exits_and_accuracy() {
        let predictions = ExitPredictions {
            probs: vec![
                vec![vec![0.9, 0.1], vec![0.9, 0.1]],
                vec![vec![0.6, 0.4], vec![0.1, 0.9]],
            ],
            labels: vec![0, 1],
        };
        let e = predictions.evaluate(&ExitPolicy::parse("confidence:0.8").unwrap());
        assert_eq!(
            (e.exit_counts.clone(), e.accuracy, e.mean_exit),
            (vec![1, 1], 1.0, 1.5)
        );
        assert_eq!(predictions.accuracy_per_exit(), vec![0.5, 1.0]);
        assert!(calibrate(&predictions, "sometimes", 0.01).is_err());
        assert!(calibrate(&predictions, "confidence", 2.0).is_err());
    }
}
