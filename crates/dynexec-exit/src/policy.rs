//! Exit policies: when a multi-exit model may stop.
//!
//! A policy sees the class probabilities of each exit in turn and says whether to stop there.
//! The last exit always stops (that is full depth). Policies are plain values, parsed from
//! `confidence:T`, `entropy:T`, `patience:N`, `fixed:K` or `full`, where `T` is one threshold
//! for every exit or a comma-separated list with one per exit (the last exit's may be omitted).

use dynexec_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// When to stop, given each exit's class probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "lowercase")]
pub enum ExitPolicy {
    /// Stop at the first exit whose top probability is at least its threshold
    /// (0 stops at the first exit, anything above 1 runs full depth).
    Confidence {
        /// Minimum top probability (0–1), one for every exit or one per exit.
        thresholds: Vec<f32>,
    },
    /// Stop at the first exit whose entropy, divided by ln(classes) so it lies in [0, 1], is at
    /// most its threshold (1 stops at the first exit, anything below 0 runs full depth).
    Entropy {
        /// Maximum entropy divided by ln(classes) (0–1), one for every exit or one per exit.
        thresholds: Vec<f32>,
    },
    /// PABEE: stop once the predicted class has stayed the same for `patience` consecutive
    /// exits after the one it first appeared at (0 stops at the first exit).
    Patience {
        /// How many later exits in a row must predict the same class before stopping.
        patience: usize,
    },
    /// Stop at exit `exit` (1-based), whatever the prediction.
    Fixed {
        /// The exit to stop at, counting from 1.
        exit: usize,
    },
    /// Run every layer.
    Full,
}

/// Where a policy stopped, for one input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitDecision {
    /// 0-based index of the exit that answered.
    pub exit: usize,
    /// The class that exit predicts (its argmax).
    pub class: usize,
    /// That exit's probability of the class.
    pub confidence: f32,
}

impl ExitPolicy {
    /// Parses `confidence:0.9`, `confidence:0.95,0.9,0.9`, `entropy:0.2`, `patience:2`,
    /// `fixed:3` or `full`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "bad exit policy `{text}`: {why}; write confidence:T, entropy:T (T one number or one per exit, comma separated), patience:N, fixed:K or full"
            ))
        };
        let (kind, value) = text.split_once(':').unwrap_or((text, ""));
        let thresholds = || -> Result<Vec<f32>> {
            let values = value
                .split(',')
                .map(|v| v.trim().parse::<f32>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad("thresholds must be numbers"))?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad("thresholds must be finite"));
            }
            Ok(values)
        };
        let count = || -> Result<usize> {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| bad("expected a whole number"))
        };
        match kind.trim() {
            "confidence" => Ok(Self::Confidence {
                thresholds: thresholds()?,
            }),
            "entropy" => Ok(Self::Entropy {
                thresholds: thresholds()?,
            }),
            "patience" => Ok(Self::Patience { patience: count()? }),
            "fixed" => match count()? {
                0 => Err(bad("exits are numbered from 1")),
                exit => Ok(Self::Fixed { exit }),
            },
            "full" if value.is_empty() => Ok(Self::Full),
            _ => Err(bad("unknown policy")),
        }
    }

    /// The policy's name: confidence, entropy, patience, fixed or full.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Confidence { .. } => "confidence",
            Self::Entropy { .. } => "entropy",
            Self::Patience { .. } => "patience",
            Self::Fixed { .. } => "fixed",
            Self::Full => "full",
        }
    }

    /// Checks the policy fits a model with `exits` exits.
    pub fn check(&self, exits: usize) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(format!("exit policy {self}: {why}")));
        match self {
            Self::Confidence { thresholds } | Self::Entropy { thresholds }
                if thresholds.len() != 1
                    && !(exits.saturating_sub(1)..=exits).contains(&thresholds.len()) =>
            {
                return bad(format!(
                    "{} thresholds for a model with {exits} exits: give one, or one per exit",
                    thresholds.len()
                ));
            }
            Self::Fixed { exit } if *exit > exits => {
                return bad(format!("the model has only {exits} exits"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Starts a decision for one input on a model with `exits` exits.
    pub fn start(&self, exits: usize) -> ExitRun<'_> {
        ExitRun {
            policy: self,
            exits,
            previous: None,
            streak: 0,
        }
    }

    /// The decision for one input whose every exit has been computed (`probs[exit][class]`).
    pub fn decide(&self, probs: &[Vec<f32>]) -> ExitDecision {
        let mut run = self.start(probs.len());
        for (exit, p) in probs.iter().enumerate() {
            if let Some(decision) = run.observe(exit, p) {
                return decision;
            }
        }
        // Unreachable for non-empty input: the last exit always stops.
        ExitDecision {
            exit: probs.len().saturating_sub(1),
            class: 0,
            confidence: 0.0,
        }
    }
}

impl fmt::Display for ExitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |t: &[f32]| {
            t.iter()
                .map(|v| format!("{v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Self::Confidence { thresholds } => write!(f, "confidence:{}", list(thresholds)),
            Self::Entropy { thresholds } => write!(f, "entropy:{}", list(thresholds)),
            Self::Patience { patience } => write!(f, "patience:{patience}"),
            Self::Fixed { exit } => write!(f, "fixed:{exit}"),
            Self::Full => write!(f, "full"),
        }
    }
}

/// The state of one input's decision, fed one exit at a time.
pub struct ExitRun<'a> {
    policy: &'a ExitPolicy,
    exits: usize,
    previous: Option<usize>,
    streak: usize,
}

impl ExitRun<'_> {
    /// Feeds exit `exit`'s class probabilities; `Some` when the input stops here.
    pub fn observe(&mut self, exit: usize, probs: &[f32]) -> Option<ExitDecision> {
        let (class, confidence) = argmax(probs);
        self.streak = match self.previous {
            Some(p) if p == class => self.streak + 1,
            _ => 0,
        };
        self.previous = Some(class);
        let stop = exit + 1 >= self.exits
            || match self.policy {
                ExitPolicy::Confidence { thresholds } => {
                    threshold_at(thresholds, exit).is_some_and(|t| confidence >= t)
                }
                ExitPolicy::Entropy { thresholds } => {
                    threshold_at(thresholds, exit).is_some_and(|t| normalized_entropy(probs) <= t)
                }
                ExitPolicy::Patience { patience } => self.streak >= *patience,
                ExitPolicy::Fixed { exit: at } => exit + 1 >= *at,
                ExitPolicy::Full => false,
            };
        stop.then_some(ExitDecision {
            exit,
            class,
            confidence,
        })
    }
}

/// A single threshold applies to every exit; a list gives one per exit.
fn threshold_at(thresholds: &[f32], exit: usize) -> Option<f32> {
    match thresholds {
        [one] => Some(*one),
        many => many.get(exit).copied(),
    }
}

/// Index and value of the largest probability (the first on ties).
pub fn argmax(probs: &[f32]) -> (usize, f32) {
    probs
        .iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, p)| {
            if p > best.1 {
                (i, p)
            } else {
                best
            }
        })
}

/// Entropy divided by ln(classes): 0 for a one-hot prediction, 1 for a uniform one.
pub fn normalized_entropy(probs: &[f32]) -> f32 {
    if probs.len() < 2 {
        return 0.0;
    }
    let h: f32 = probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -p * p.ln())
        .sum();
    h / (probs.len() as f32).ln()
}

/// Softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three exits, two classes: unsure, then fairly sure of class 1, then sure of class 0.
    fn exits() -> Vec<Vec<f32>> {
        vec![vec![0.55, 0.45], vec![0.2, 0.8], vec![0.97, 0.03]]
    }

    fn stop(policy: &str, probs: &[Vec<f32>]) -> (usize, usize) {
        let d = ExitPolicy::parse(policy).unwrap().decide(probs);
        (d.exit, d.class)
    }

    #[test]
    fn confidence_stops_at_the_first_exit_that_is_sure_enough() {
        assert_eq!(stop("confidence:0.75", &exits()), (1, 1));
        assert_eq!(stop("confidence:0.9", &exits()), (2, 0));
        assert_eq!(stop("confidence:0", &exits()), (0, 0));
        assert_eq!(stop("confidence:1.01", &exits()), (2, 0));
        // Per-exit thresholds: exit 2 demands more than it gets, the last exit always stops.
        assert_eq!(stop("confidence:0.9,0.85", &exits()), (2, 0));
        assert_eq!(stop("confidence:0.5,0.99", &exits()), (0, 0));
    }

    #[test]
    fn entropy_stops_when_the_prediction_is_peaked_enough() {
        // Normalized entropies: 0.993, 0.722, 0.194.
        assert_eq!(stop("entropy:0.8", &exits()), (1, 1));
        assert_eq!(stop("entropy:0.5", &exits()), (2, 0));
        assert_eq!(stop("entropy:1", &exits()), (0, 0));
        assert_eq!(stop("entropy:-1", &exits()), (2, 0));
        assert!((normalized_entropy(&[0.5, 0.5]) - 1.0).abs() < 1e-6);
        assert_eq!(normalized_entropy(&[1.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn patience_waits_for_an_unchanged_prediction() {
        let steady = vec![
            vec![0.6, 0.4],
            vec![0.3, 0.7],
            vec![0.4, 0.6],
            vec![0.2, 0.8],
            vec![0.9, 0.1],
        ];
        assert_eq!(stop("patience:0", &steady), (0, 0));
        assert_eq!(stop("patience:1", &steady), (2, 1));
        assert_eq!(stop("patience:2", &steady), (3, 1));
        assert_eq!(stop("patience:3", &steady), (4, 0));
    }

    #[test]
    fn fixed_and_full_ignore_the_prediction() {
        assert_eq!(stop("fixed:1", &exits()), (0, 0));
        assert_eq!(stop("fixed:2", &exits()), (1, 1));
        assert_eq!(stop("full", &exits()), (2, 0));
    }

    #[test]
    fn policies_parse_print_and_check() {
        for text in [
            "confidence:0.9",
            "confidence:0.9,0.8",
            "entropy:0.25",
            "patience:2",
            "fixed:3",
            "full",
        ] {
            assert_eq!(ExitPolicy::parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "confidence",
            "confidence:x",
            "confidence:nan",
            "patience:-1",
            "fixed:0",
            "sometimes:1",
            "full:2",
        ] {
            let err = ExitPolicy::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("confidence:T"), "{err}");
        }
        assert!(ExitPolicy::parse("fixed:7").unwrap().check(6).is_err());
        assert!(ExitPolicy::parse("confidence:0.9,0.9,0.9")
            .unwrap()
            .check(6)
            .is_err());
        assert!(ExitPolicy::parse("confidence:0.9,0.9,0.9,0.9,0.9")
            .unwrap()
            .check(6)
            .is_ok());
    }
}
