//! How many tokens to draft: fixed, heuristic, by the draft's own confidence, or by a
//! trained classifier (DISCO).

use dynexec_core::{Error, Result, Setting};
use dynexec_models::llama::Llama;
use serde::{Deserialize, Serialize};

/// What the draft knew when it proposed a token: what a controller decides from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DraftSignal {
    /// The token's place in the current draft, from 1.
    pub position: usize,
    /// The draft's probability of the token it proposed.
    pub confidence: f32,
    /// The draft's highest probability among the other tokens.
    pub runner_up: f32,
    /// The entropy of the draft's distribution, in nats.
    pub entropy: f32,
}

impl DraftSignal {
    /// A deterministic proposal (prompt lookup): certain, nothing else possible.
    pub fn certain(position: usize) -> Self {
        Self {
            position,
            confidence: 1.0,
            runner_up: 0.0,
            entropy: 0.0,
        }
    }

    /// The signal of `chosen` in the probability vector `probs`.
    pub fn from_probs(position: usize, probs: &[f32], chosen: usize) -> Self {
        let mut runner_up = 0f32;
        let mut entropy = 0f32;
        for (i, &p) in probs.iter().enumerate() {
            if i != chosen && p > runner_up {
                runner_up = p;
            }
            if p > 0.0 {
                entropy -= p * p.ln();
            }
        }
        Self {
            position,
            confidence: probs.get(chosen).copied().unwrap_or(0.0),
            runner_up,
            entropy,
        }
    }

    /// The signal of the most likely entry of `logits`, with it (one pass, no copy of the
    /// probabilities): what greedy drafting needs.
    pub fn of_argmax(position: usize, logits: &[f32]) -> (usize, Self) {
        let (mut best, mut best_logit, mut second_logit) =
            (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
        for (i, &l) in logits.iter().enumerate() {
            if l > best_logit {
                second_logit = best_logit;
                best_logit = l;
                best = i;
            } else if l > second_logit {
                second_logit = l;
            }
        }
        // p_i = e^(l_i - max) / Z; H = ln Z - sum p_i (l_i - max).
        let (mut z, mut weighted) = (0f64, 0f64);
        for &l in logits {
            let d = f64::from(l - best_logit);
            let e = d.exp();
            z += e;
            weighted += e * d;
        }
        let signal = Self {
            position,
            confidence: (1.0 / z) as f32,
            runner_up: (f64::from(second_logit - best_logit).exp() / z) as f32,
            entropy: (z.ln() - weighted / z) as f32,
        };
        (best, signal)
    }
}

/// Decides the lookahead before each step and learns from what was accepted.
pub trait Lookahead {
    /// A name for reports, e.g. `fixed:4`.
    fn name(&self) -> String;
    /// The most tokens to draft in the next step.
    fn next_k(&self) -> usize;
    /// Whether to keep drafting after a token the draft proposed with `signal`.
    fn keep_drafting(&self, _signal: &DraftSignal) -> bool {
        true
    }
    /// The outcome of a step: the signal of each proposed token, the first `accepted` of
    /// which the target kept.
    fn observe(&mut self, signals: &[DraftSignal], accepted: usize);
    /// Refuses a target and draft it was not made for (a trained controller); the draft is
    /// named as [`crate::drafter::Drafter::name`] names it.
    fn check_pair(&self, _target: &Llama, _draft: &str) -> Result<()> {
        Ok(())
    }
}

/// A borrowed controller decides like the one it borrows (so a sequence can own either).
impl<T: Lookahead + ?Sized> Lookahead for &mut T {
    fn name(&self) -> String {
        (**self).name()
    }
    fn next_k(&self) -> usize {
        (**self).next_k()
    }
    fn keep_drafting(&self, signal: &DraftSignal) -> bool {
        (**self).keep_drafting(signal)
    }
    fn observe(&mut self, signals: &[DraftSignal], accepted: usize) {
        (**self).observe(signals, accepted)
    }
    fn check_pair(&self, target: &Llama, draft: &str) -> Result<()> {
        (**self).check_pair(target, draft)
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
    fn observe(&mut self, _: &[DraftSignal], _: usize) {}
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
    fn observe(&mut self, signals: &[DraftSignal], accepted: usize) {
        if signals.is_empty() {
            return;
        }
        self.k = if accepted == signals.len() {
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
    fn keep_drafting(&self, signal: &DraftSignal) -> bool {
        signal.confidence >= self.threshold
    }
    fn observe(&mut self, signals: &[DraftSignal], accepted: usize) {
        for (i, s) in signals.iter().enumerate() {
            self.history.push((s.confidence, i < accepted));
        }
        if let Some(t) = Self::tuned_threshold(&self.history) {
            self.threshold = t;
        }
    }
}

/// Another controller held between `min` and `max` drafted tokens per step: llama.cpp's
/// `--draft-min`/`--draft-max` over any controller. Below `min` the inner controller's stop
/// signals are overruled (llama.cpp instead discards drafts shorter than its minimum; here
/// the draft is extended, which keeps every step's verification worth its batch).
pub struct Bounded {
    inner: Box<dyn Lookahead>,
    min: usize,
    max: usize,
}

impl Bounded {
    /// `inner` held to `min..=max` tokens per step; `None` when the bounds are empty.
    pub fn new(inner: Box<dyn Lookahead>, min: usize, max: usize) -> Option<Self> {
        (max >= 1 && min <= max).then_some(Self { inner, min, max })
    }
}

impl Lookahead for Bounded {
    fn name(&self) -> String {
        let mut name = self.inner.name();
        if self.min > 0 {
            name.push_str(&format!(",min={}", self.min));
        }
        if self.max < usize::MAX {
            name.push_str(&format!(",max={}", self.max));
        }
        name
    }
    fn next_k(&self) -> usize {
        self.inner.next_k().clamp(self.min.max(1), self.max)
    }
    fn keep_drafting(&self, signal: &DraftSignal) -> bool {
        signal.position < self.min || self.inner.keep_drafting(signal)
    }
    fn observe(&mut self, signals: &[DraftSignal], accepted: usize) {
        self.inner.observe(signals, accepted)
    }
    fn check_pair(&self, target: &Llama, draft: &str) -> Result<()> {
        self.inner.check_pair(target, draft)
    }
}

/// The `,min=N` and `,max=N` suffixes of a lookahead spec, split off its controller: the
/// controller (a prefix of `spec`), the bounds, and whether a bound was malformed or repeated.
pub fn split_bounds(spec: &str) -> (&str, Option<usize>, Option<usize>, bool) {
    let (mut rest, mut min, mut max, mut bad) = (spec, None, None, false);
    while let Some((head, tail)) = rest.rsplit_once(',') {
        let slot = match tail.split_once('=') {
            Some(("min", n)) => (&mut min, n),
            Some(("max", n)) => (&mut max, n),
            _ => break,
        };
        match slot.1.parse::<usize>() {
            Ok(n) if slot.0.is_none() => *slot.0 = Some(n),
            _ => bad = true,
        }
        rest = head;
    }
    (rest, min, max, bad)
}

/// Parses `fixed:K`, `heuristic[:START]`, `confidence[:THRESHOLD]` or `disco:PATH` (a
/// DISCO classifier's folder or card file; front ends turn `disco[:NAME]` into a path first,
/// see [`crate::disco::DEFAULT_DISCO`]), each optionally followed by `,min=N` and/or
/// `,max=N` ([`Bounded`]; the CLI's `--draft-min`/`--draft-max`).
pub fn parse(spec: &str) -> Result<Box<dyn Lookahead>> {
    let (controller, min, max, bad_bounds) = split_bounds(spec);
    let bad = |why: &str| Error::BadSpec {
        setting: Setting::Lookahead,
        spec: spec.to_string(),
        help: format!("{why}; bounds are ,min=N and ,max=N with 0 <= N and 1 <= max, min <= max"),
    };
    if bad_bounds {
        return Err(bad("a bound is not a whole number or is given twice"));
    }
    let inner = parse_controller(controller)?;
    if min.is_none() && max.is_none() {
        return Ok(inner);
    }
    let (min, max) = (min.unwrap_or(0), max.unwrap_or(usize::MAX));
    match Bounded::new(inner, min, max) {
        Some(bounded) => Ok(Box::new(bounded)),
        None => Err(bad("the bounds are empty")),
    }
}

fn parse_controller(spec: &str) -> Result<Box<dyn Lookahead>> {
    let bad = |why: &str| {
        Error::BadSpec {
        setting: Setting::Lookahead,
        spec: spec.to_string(),
        help: format!(
            "{why}; use fixed:K, heuristic[:START], confidence[:THRESHOLD] or disco[:MODEL], optionally followed by ,min=N and ,max=N"
        ),
    }
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
        ("disco", Some(path)) => Ok(Box::new(crate::disco::Disco::load(std::path::Path::new(
            path,
        ))?)),
        ("disco", None) => Err(bad("disco needs a trained classifier, disco:MODEL")),
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
    fn bounds_clamp_any_controller_and_overrule_early_stops() {
        let bounded = parse("fixed:8,max=3").unwrap();
        assert_eq!(bounded.next_k(), 3);
        assert_eq!(parse("fixed:1,min=2,max=4").unwrap().next_k(), 2);
        // A confidence controller stops on a weak token, but not below min.
        let c = parse("confidence:0.9,min=2").unwrap();
        let weak = |position| DraftSignal {
            position,
            confidence: 0.1,
            runner_up: 0.0,
            entropy: 0.0,
        };
        assert!(c.keep_drafting(&weak(1)) && !c.keep_drafting(&weak(2)));
        assert_eq!(c.next_k(), Confidence::DEFAULT_MAX);
        assert_eq!(
            parse("heuristic,max=16").unwrap().name(),
            "heuristic,max=16"
        );
        assert_eq!(parse("fixed:3,min=2").unwrap().name(), "fixed:3,min=2");
        for bad in [
            "fixed:4,max=0",
            "fixed:4,min=5,max=3",
            "fixed:4,max=x",
            "fixed:4,max=2,max=3",
        ] {
            let err = parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("bounds"), "{bad}: {err}");
        }
    }

    /// Signals with these confidences, at positions 1, 2, ...
    pub(crate) fn signals(confidences: &[f32]) -> Vec<DraftSignal> {
        confidences
            .iter()
            .enumerate()
            .map(|(i, &c)| DraftSignal {
                position: i + 1,
                confidence: c,
                runner_up: (1.0 - c) / 2.0,
                entropy: 1.0 - c,
            })
            .collect()
    }

    #[test]
    fn signals_from_logits_match_those_from_probabilities() {
        let logits = [1.0f32, 3.0, -2.0, 2.5];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let probs: Vec<f32> = logits.iter().map(|l| l.exp() / z).collect();
        let (best, a) = DraftSignal::of_argmax(2, &logits);
        let b = DraftSignal::from_probs(2, &probs, 1);
        assert_eq!(best, 1);
        assert!((a.confidence - b.confidence).abs() < 1e-6);
        assert!((a.runner_up - b.runner_up).abs() < 1e-6);
        assert!((a.entropy - b.entropy).abs() < 1e-5, "{a:?} {b:?}");
        assert_eq!(a.position, 2);
    }

    #[test]
    fn heuristic_grows_by_two_and_shrinks_by_one_with_a_floor() {
        let mut h = Heuristic::new(2);
        h.observe(&signals(&[0.9, 0.9]), 2);
        assert_eq!(h.next_k(), 4);
        h.observe(&signals(&[0.9, 0.9, 0.9, 0.9]), 1);
        assert_eq!(h.next_k(), 3);
        for _ in 0..5 {
            h.observe(&signals(&[0.1]), 0);
        }
        assert_eq!(h.next_k(), 1);
    }

    #[test]
    fn confidence_stops_below_its_threshold_and_retunes() {
        let mut c = Confidence::new(0.4, 20);
        let one = |p: f32| signals(&[p])[0];
        assert!(c.keep_drafting(&one(0.5)) && !c.keep_drafting(&one(0.3)));
        // Accepted tokens had confidence >= 0.7, rejected ones <= 0.3: the cheapest
        // threshold keeps every accepted token and drops the rejected ones.
        c.observe(&signals(&[0.9, 0.8, 0.7, 0.3]), 3);
        c.observe(&signals(&[0.95, 0.2]), 1);
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
