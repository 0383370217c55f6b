//! How many tokens to draft: fixed, heuristic, or by the draft's own confidence.

use dynexec_core::{Error, Result, Setting};

/// Decides the lookahead before each step and learns from what was accepted.
pub trait Lookahead {
    /// A name for reports, e.g. `fixed:4`.
    fn name(&self) -> String;
    /// The most tokens to draft in the next step.
    fn next_k(&self) -> usize;
    /// Whether to keep drafting after a token the draft gave probability `confidence`.
    fn keep_drafting(&self, _confidence: f32) -> bool {
        true
    }
    /// The outcome of a step: `confidences[i]` of each proposed token, the first `accepted`
    /// of which the target kept.
    fn observe(&mut self, confidences: &[f32], accepted: usize);
}

/// A borrowed controller decides like the one it borrows (so a sequence can own either).
impl<T: Lookahead + ?Sized> Lookahead for &mut T {
    fn name(&self) -> String {
        (**self).name()
    }
    fn next_k(&self) -> usize {
        (**self).next_k()
    }
    fn keep_drafting(&self, confidence: f32) -> bool {
        (**self).keep_drafting(confidence)
    }
    fn observe(&mut self, confidences: &[f32], accepted: usize) {
        (**self).observe(confidences, accepted)
    }
}

/// Always `k`.
pub struct Fixed(pub usize);

impl Lookahead for Fixed {
    fn name(&self) -> String {
        format!("fixed:{}", self.0)
    }
    fn next_k(&self) -> usize {
        self.0
    }
    fn observe(&mut self, _: &[f32], _: usize) {}
}

/// transformers' "heuristic" schedule: +2 after a fully accepted draft, −1 otherwise, at
/// least 1.
pub struct Heuristic {
    k: usize,
}

impl Heuristic {
    /// Starts at `start` drafts per step (at least 1).
    pub fn new(start: usize) -> Self {
        Self { k: start.max(1) }
    }
}

impl Lookahead for Heuristic {
    fn name(&self) -> String {
        "heuristic".to_string()
    }
    fn next_k(&self) -> usize {
        self.k
    }
    fn observe(&mut self, confidences: &[f32], accepted: usize) {
        if confidences.is_empty() {
            return;
        }
        self.k = if accepted == confidences.len() {
            self.k + 2
        } else {
            self.k.saturating_sub(1).max(1)
        };
    }
}

/// Draft until the draft's probability of its own token drops below a threshold (up to
/// `max` tokens); the threshold is re-tuned after every step from all accept/reject outcomes
/// seen so far, minimising FPR + 3·FNR as transformers' dynamic assistant threshold does
/// (a false negative — stopping before a token that would have been accepted — costs more
/// than drafting one that is rejected).
pub struct Confidence {
    threshold: f32,
    max: usize,
    history: Vec<(f32, bool)>,
}

impl Confidence {
    /// Starting threshold when none is given.
    pub const DEFAULT_THRESHOLD: f32 = 0.4;
    /// Most drafts per step when no maximum is given.
    pub const DEFAULT_MAX: usize = 20;

    /// Starts at `threshold`, drafting at most `max` tokens per step (at least 1).
    pub fn new(threshold: f32, max: usize) -> Self {
        Self {
            threshold,
            max: max.max(1),
            history: Vec::new(),
        }
    }

    /// The current threshold (re-tuned after every step).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// The threshold with the lowest FPR + 3·FNR over `history`, where "positive" means the
    /// target accepted the token and a token is predicted positive when its confidence
    /// reaches the threshold. `None` until both outcomes have been seen.
    fn tuned_threshold(history: &[(f32, bool)]) -> Option<f32> {
        let positives = history.iter().filter(|(_, a)| *a).count();
        let negatives = history.len() - positives;
        if positives == 0 || negatives == 0 {
            return None;
        }
        let mut candidates: Vec<f32> = history.iter().map(|(c, _)| *c).collect();
        candidates.sort_by(|a, b| b.total_cmp(a));
        candidates.dedup();
        let mut best: Option<(f64, f32)> = None;
        for threshold in candidates {
            let tp = history
                .iter()
                .filter(|(c, a)| *a && *c >= threshold)
                .count();
            let fp = history
                .iter()
                .filter(|(c, a)| !*a && *c >= threshold)
                .count();
            let fpr = fp as f64 / negatives as f64;
            let fnr = 1.0 - tp as f64 / positives as f64;
            let cost = fpr + 3.0 * fnr;
            if best.is_none_or(|(b, _)| cost < b) {
                best = Some((cost, threshold));
            }
        }
        best.map(|(_, t)| t)
    }
}

impl Lookahead for Confidence {
    fn name(&self) -> String {
        "confidence".to_string()
    }
    fn next_k(&self) -> usize {
        self.max
    }
    fn keep_drafting(&self, confidence: f32) -> bool {
        confidence >= self.threshold
    }
    fn observe(&mut self, confidences: &[f32], accepted: usize) {
        for (i, &c) in confidences.iter().enumerate() {
            self.history.push((c, i < accepted));
        }
        if let Some(t) = Self::tuned_threshold(&self.history) {
            self.threshold = t;
        }
    }
}

/// Parses `fixed:K`, `heuristic[:START]` or `confidence[:THRESHOLD]`.
pub fn parse(spec: &str) -> Result<Box<dyn Lookahead>> {
    let bad = |why: &str| Error::BadSpec {
        setting: Setting::Lookahead,
        spec: spec.to_string(),
        help: format!("{why}; use fixed:K, heuristic[:START] or confidence[:THRESHOLD]"),
    };
    let (kind, arg) = match spec.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (spec, None),
    };
    match (kind, arg) {
        ("fixed", Some(k)) => match k.parse::<usize>() {
            Ok(k) if k > 0 => Ok(Box::new(Fixed(k))),
            _ => Err(bad("K must be a positive integer")),
        },
        ("fixed", None) => Err(bad("fixed needs K")),
        ("heuristic", None) => Ok(Box::new(Heuristic::new(5))),
        ("heuristic", Some(s)) => s
            .parse::<usize>()
            .map(|s| Box::new(Heuristic::new(s)) as Box<dyn Lookahead>)
            .map_err(|_| bad("START must be an integer")),
        ("confidence", None) => Ok(Box::new(Confidence::new(
            Confidence::DEFAULT_THRESHOLD,
            Confidence::DEFAULT_MAX,
        ))),
        ("confidence", Some(t)) => match t.parse::<f32>() {
            Ok(t) if (0.0..=1.0).contains(&t) => {
                Ok(Box::new(Confidence::new(t, Confidence::DEFAULT_MAX)))
            }
            _ => Err(bad("THRESHOLD must be in [0, 1]")),
        },
        _ => Err(bad("unknown controller")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heuristic_grows_by_two_and_shrinks_by_one_with_a_floor() {
        let mut h = Heuristic::new(2);
        h.observe(&[0.9, 0.9], 2);
        assert_eq!(h.next_k(), 4);
        h.observe(&[0.9, 0.9, 0.9, 0.9], 1);
        assert_eq!(h.next_k(), 3);
        for _ in 0..5 {
            h.observe(&[0.1], 0);
        }
        assert_eq!(h.next_k(), 1);
    }

    #[test]
    fn confidence_stops_below_its_threshold_and_retunes() {
        let mut c = Confidence::new(0.4, 20);
        assert!(c.keep_drafting(0.5) && !c.keep_drafting(0.3));
        // Accepted tokens had confidence >= 0.7, rejected ones <= 0.3: the cheapest
        // threshold keeps every accepted token and drops the rejected ones.
        c.observe(&[0.9, 0.8, 0.7, 0.3], 3);
        c.observe(&[0.95, 0.2], 1);
        assert_eq!(c.threshold(), 0.7);
        // Missing an accepted token costs three times a false alarm.
        let t =
            Confidence::tuned_threshold(&[(0.9, true), (0.5, true), (0.6, false), (0.55, false)])
                .unwrap();
        assert_eq!(t, 0.5);
    }

    #[test]
    fn specs_parse_or_explain() {
        assert_eq!(parse("fixed:4").unwrap().name(), "fixed:4");
        assert_eq!(parse("heuristic").unwrap().next_k(), 5);
        assert_eq!(parse("confidence:0.6").unwrap().name(), "confidence");
        for bad in ["fixed", "fixed:0", "confidence:2", "sometimes"] {
            assert!(
                parse(bad).err().unwrap().to_string().contains("fixed:K"),
                "{bad}"
            );
        }
    }
}
