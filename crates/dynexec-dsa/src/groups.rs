//! Do two groups of inputs move differently through a model? [`compare_groups`] takes, per
//! layer, one short trajectory per input (the hidden states of the tokens leading up to a
//! position, or an input's first tokens) and a label saying which group each belongs to —
//! accepted vs rejected drafts, inputs that exit early vs those that run to full depth — and
//! asks at every layer:
//!
//! - **dynamics**: the DSA angle between a linear model fitted to group A's trajectories and
//!   one fitted to group B's ([`GroupLayer::dsa_angular`]);
//! - **geometry**: the cosine distance between the groups' mean states at the trajectories'
//!   last step ([`GroupLayer::centroid_cosine`]), and each group's mean state norm;
//! - **depth**: how much the layer moves each group's last state, `‖h_l − h_{l−1}‖ / ‖h_{l−1}‖`
//!   ([`GroupLayer::update_a`]).
//!
//! Two groups drawn from one population still differ by chance, more so when they are small,
//! so both distances come with a **permutation test**: the labels are permuted (group sizes
//! kept) `permutations` times, and each distance is reported beside the permutations' mean
//! and the share at least as far apart (`p`, with the usual +1 correction); the DSA distance
//! also in standard deviations of its null (`z`). Independent inputs are shuffled
//! ([`Null::Shuffle`]). Positions of one text are not independent — neighbouring windows
//! overlap, and labels come in runs — so for them the labels are instead rotated along the
//! sequence by a random offset ([`Null::Rotate`]), which keeps both the runs and the overlap
//! and only breaks the alignment between labels and states. A layer where the groups differ has a
//! distance well above its null and a small `p`. Many layers are tested at once, so each `p`
//! also comes adjusted for the false discovery rate over the layers (`q`, Benjamini and
//! Hochberg): read "differs" from `q`, not `p`.

use crate::layers::principal_components;
use crate::matrix::{parallel_map, thread_count};
use crate::small::SplitMix64;
use crate::{Dsa, Error, Result, Trajectories};

/// How the labels are permuted for the null distribution; serialised as `shuffle` or
/// `rotate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Null {
    /// Uniformly random permutations: for independent inputs.
    Shuffle,
    /// The label sequence rotated by a random offset: for trials in sequence order (the
    /// positions of a text), whose neighbours are related.
    Rotate,
}

/// How [`compare_groups`] runs.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// DSA sees each layer's top principal components (computed over both groups together,
    /// so both are seen in the same basis).
    pub components: usize,
    /// Label shuffles for the null distribution (0: no test; `p` is then NaN).
    pub permutations: usize,
    /// Seed of the permutations.
    pub seed: u64,
    /// How labels are permuted.
    pub null: Null,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            components: 10,
            permutations: 200,
            seed: 0,
            null: Null::Shuffle,
        }
    }
}

/// One layer's comparison of the two groups.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GroupLayer {
    /// The layer.
    pub layer: usize,
    /// DSA angular distance (radians) between the groups' fitted dynamics.
    pub dsa_angular: f64,
    /// Its mean over the label permutations.
    pub dsa_null: f64,
    /// Share of shuffles whose DSA distance is at least the observed one.
    pub dsa_p: f64,
    /// `dsa_p` adjusted for the false discovery rate over all layers given.
    pub dsa_q: f64,
    /// How many null standard deviations the DSA distance lies above the null mean.
    pub dsa_z: f64,
    /// Cosine distance between the groups' mean last states.
    pub centroid_cosine: f64,
    /// Its mean over label shuffles.
    pub centroid_null: f64,
    /// Share of shuffles whose centroid distance is at least the observed one.
    pub centroid_p: f64,
    /// `centroid_p` adjusted for the false discovery rate over all layers given.
    pub centroid_q: f64,
    /// Group A's mean last-state norm.
    pub norm_a: f64,
    /// Group B's mean last-state norm.
    pub norm_b: f64,
    /// Group A's mean relative change from the previous layer given (NaN for the first).
    pub update_a: f64,
    /// Group B's mean relative change from the previous layer given (NaN for the first).
    pub update_b: f64,
}

/// Compares group A (`in_a[i]`) with group B (the rest) at every layer. Each layer is
/// `(index, trials × time × features)` with one trial per input, the same inputs in the
/// same order at every layer; layers run in parallel on `threads`. Each group needs at least
/// two trials.
pub fn compare_groups(
    layers: &[(usize, Trajectories)],
    in_a: &[bool],
    dsa: &Dsa,
    config: &GroupConfig,
    threads: Option<usize>,
) -> Result<Vec<GroupLayer>> {
    if let Some((layer, t)) = layers.iter().find(|(_, t)| t.trials() != in_a.len()) {
        return Err(Error::Shape(format!(
            "layer {layer} has {} trials for {} labels",
            t.trials(),
            in_a.len()
        )));
    }
    let sizes = (
        in_a.iter().filter(|&&a| a).count(),
        in_a.iter().filter(|&&a| !a).count(),
    );
    if sizes.0 < 2 || sizes.1 < 2 {
        return Err(Error::Shape(format!(
            "each group needs at least 2 inputs to compare, got {} and {}",
            sizes.0, sizes.1
        )));
    }
    // The same shuffles at every layer, so layers are compared on equal terms.
    let mut rng = SplitMix64::new(config.seed);
    let shuffles: Vec<Vec<bool>> = (0..config.permutations)
        .map(|_| match config.null {
            Null::Shuffle => shuffled(in_a, &mut rng),
            Null::Rotate => rotated(in_a, &mut rng),
        })
        .collect();
    let lasts: Vec<Vec<Vec<f64>>> = layers.iter().map(|(_, t)| last_states(t)).collect();
    // The smaller group's delay embedding must stay tall: rows (trials × embedded steps per
    // trial) at least as many as columns (components × delays).
    let time = layers.first().map_or(0, |(_, t)| t.time());
    let settings = dsa.config();
    let steps = time.saturating_sub((settings.n_delays - 1) * settings.delay_interval);
    let components = config
        .components
        .min((sizes.0.min(sizes.1) * steps) / settings.n_delays)
        .max(1);
    let mut rows = parallel_map(layers.len(), thread_count(threads), |i| {
        let (layer, states) = &layers[i];
        let reduced = principal_components(states, components)?;
        let dsa_distance = |labels: &[bool]| -> Result<f64> {
            let (a, b) = (
                select_trials(&reduced, labels, true)?,
                select_trials(&reduced, labels, false)?,
            );
            Ok(dsa.compare(&a, &b)?.angular)
        };
        let centroid_distance = |labels: &[bool]| {
            cosine_distance(
                &mean(&lasts[i], labels, true),
                &mean(&lasts[i], labels, false),
            )
        };
        let observed = dsa_distance(in_a)?;
        let centroid = centroid_distance(in_a);
        let null_dsa: Vec<f64> = shuffles
            .iter()
            .map(|s| dsa_distance(s))
            .collect::<Result<_>>()?;
        let null_centroid: Vec<f64> = shuffles.iter().map(|s| centroid_distance(s)).collect();
        let norm = |group: bool| {
            average(
                lasts[i]
                    .iter()
                    .zip(in_a)
                    .filter(|(_, &a)| a == group)
                    .map(|(h, _)| l2(h)),
            )
        };
        let update = |group: bool| match i {
            0 => f64::NAN,
            _ => average(
                lasts[i]
                    .iter()
                    .zip(&lasts[i - 1])
                    .zip(in_a)
                    .filter(|(_, &a)| a == group)
                    .map(|((h, prev), _)| relative_change(h, prev)),
            ),
        };
        Ok(GroupLayer {
            layer: *layer,
            dsa_angular: observed,
            dsa_null: average(null_dsa.iter().copied()),
            dsa_p: p_value(observed, &null_dsa),
            dsa_q: f64::NAN,
            dsa_z: z_score(observed, &null_dsa),
            centroid_cosine: centroid,
            centroid_null: average(null_centroid.iter().copied()),
            centroid_p: p_value(centroid, &null_centroid),
            centroid_q: f64::NAN,
            norm_a: norm(true),
            norm_b: norm(false),
            update_a: update(true),
            update_b: update(false),
        })
    })?;
    let dsa_q = false_discovery_rate(&rows.iter().map(|r| r.dsa_p).collect::<Vec<_>>());
    let centroid_q = false_discovery_rate(&rows.iter().map(|r| r.centroid_p).collect::<Vec<_>>());
    for ((row, dq), cq) in rows.iter_mut().zip(dsa_q).zip(centroid_q) {
        (row.dsa_q, row.centroid_q) = (dq, cq);
    }
    Ok(rows)
}

/// Benjamini–Hochberg adjusted p-values (`q`): a set of tests with `q < α` holds a share of
/// false discoveries of at most α in expectation. NaNs stay NaN.
pub fn false_discovery_rate(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| p[i].is_finite()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = order.len() as f64;
    let mut q = vec![f64::NAN; p.len()];
    let mut smallest = 1.0f64;
    for (rank, &i) in order.iter().enumerate().rev() {
        smallest = smallest.min(p[i] * m / (rank + 1) as f64);
        q[i] = smallest;
    }
    q
}

/// `(observed − null mean) / null standard deviation`; NaN without a spread.
fn z_score(observed: f64, null: &[f64]) -> f64 {
    let mean = average(null.iter().copied());
    let var = average(null.iter().map(|v| (v - mean).powi(2)));
    if var > 0.0 {
        (observed - mean) / var.sqrt()
    } else {
        f64::NAN
    }
}

/// The labels in a uniformly random order (Fisher–Yates).
fn shuffled(labels: &[bool], rng: &mut SplitMix64) -> Vec<bool> {
    let mut out = labels.to_vec();
    for i in (1..out.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

/// The labels rotated by a random offset from 1 to `len - 1`.
fn rotated(labels: &[bool], rng: &mut SplitMix64) -> Vec<bool> {
    let n = labels.len();
    let offset = 1 + (rng.next_u64() % (n as u64 - 1).max(1)) as usize;
    (0..n).map(|i| labels[(i + offset) % n]).collect()
}

/// The trials of `x` whose label is `group`, as one multi-trial trajectory.
pub fn select_trials(x: &Trajectories, labels: &[bool], group: bool) -> Result<Trajectories> {
    let (time, features) = (x.time(), x.features());
    let mut data = Vec::new();
    let mut trials = 0;
    for (trial, _) in labels.iter().enumerate().filter(|(_, &l)| l == group) {
        for t in 0..time {
            data.extend_from_slice(x.at(trial, t));
        }
        trials += 1;
    }
    Trajectories::from_3d(trials, time, features, data)
}

/// Each trial's state at its last step.
fn last_states(x: &Trajectories) -> Vec<Vec<f64>> {
    (0..x.trials())
        .map(|trial| x.at(trial, x.time() - 1).to_vec())
        .collect()
}

fn mean(states: &[Vec<f64>], labels: &[bool], group: bool) -> Vec<f64> {
    let features = states.first().map_or(0, Vec::len);
    let mut sum = vec![0.0; features];
    let mut count = 0.0;
    for (h, _) in states.iter().zip(labels).filter(|(_, &l)| l == group) {
        sum.iter_mut().zip(h).for_each(|(s, v)| *s += v);
        count += 1.0;
    }
    sum.iter_mut().for_each(|s| *s /= count);
    sum
}

fn l2(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn cosine_distance(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norms = l2(a) * l2(b);
    if norms == 0.0 {
        return 0.0;
    }
    1.0 - dot / norms
}

fn relative_change(h: &[f64], prev: &[f64]) -> f64 {
    let diff: f64 = h
        .iter()
        .zip(prev)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let base = l2(prev);
    if base == 0.0 {
        f64::NAN
    } else {
        diff / base
    }
}

fn average(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// `(1 + shuffles at least as extreme) / (1 + shuffles)`; NaN without shuffles.
fn p_value(observed: f64, null: &[f64]) -> f64 {
    if null.is_empty() {
        return f64::NAN;
    }
    let extreme = null.iter().filter(|&&v| v >= observed - 1e-12).count();
    (1 + extreme) as f64 / (1 + null.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DsaConfig, Rank};

    /// `trials` trajectories of a damped rotation at `angle` per step in 3-D, from varied
    /// starts, plus a little noise.
    fn rotations(trials: usize, angle: f64, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64::new(seed);
        let mut data = Vec::new();
        for _ in 0..trials {
            let mut x = [rng.normal(), rng.normal(), rng.normal()];
            for _ in 0..12 {
                data.extend_from_slice(&x);
                let (c, s) = (angle.cos() * 0.97, angle.sin() * 0.97);
                x = [
                    c * x[0] - s * x[1] + 0.01 * rng.normal(),
                    s * x[0] + c * x[1] + 0.01 * rng.normal(),
                    0.9 * x[2] + 0.01 * rng.normal(),
                ];
            }
        }
        data
    }

    fn layer(groups: &[(usize, f64)], seed: u64) -> (Trajectories, Vec<bool>) {
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for (g, &(trials, angle)) in groups.iter().enumerate() {
            data.extend(rotations(trials, angle, seed + g as u64));
            labels.extend(std::iter::repeat_n(g == 0, trials));
        }
        let total = groups.iter().map(|g| g.0).sum();
        (Trajectories::from_3d(total, 12, 3, data).unwrap(), labels)
    }

    fn dsa() -> Dsa {
        Dsa::new(DsaConfig {
            n_delays: 1,
            rank: Rank::Full,
            ..DsaConfig::default()
        })
    }

    #[test]
    fn different_dynamics_stand_out_from_the_shuffles_and_equal_ones_do_not() {
        let config = GroupConfig {
            components: 3,
            permutations: 30,
            seed: 1,
            null: Null::Shuffle,
        };
        // Layer 0: both groups rotate alike; layer 1: group A rotates three times as fast.
        let (same, labels) = layer(&[(12, 0.3), (12, 0.3)], 10);
        let (different, labels_1) = layer(&[(12, 0.9), (12, 0.3)], 10);
        assert_eq!(labels, labels_1);
        let rows = compare_groups(
            &[(0, same), (1, different)],
            &labels,
            &dsa(),
            &config,
            Some(2),
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        let (same, different) = (&rows[0], &rows[1]);
        assert!(same.dsa_p > 0.05, "{same:?}");
        assert!(different.dsa_p < 0.05, "{different:?}");
        assert!(
            different.dsa_angular > 3.0 * different.dsa_null,
            "{different:?}"
        );
        assert!(same.update_a.is_nan());
        assert!(different.update_a.is_finite());
        // Deterministic for a seed.
        let (again, _) = layer(&[(12, 0.3), (12, 0.3)], 10);
        let rerun = compare_groups(&[(0, again)], &labels, &dsa(), &config, Some(1)).unwrap();
        assert_eq!(
            (
                rerun[0].dsa_angular,
                rerun[0].dsa_p,
                rerun[0].centroid_cosine
            ),
            (rows[0].dsa_angular, rows[0].dsa_p, rows[0].centroid_cosine)
        );
    }

    #[test]
    fn groups_too_small_or_mismatched_are_refused() {
        let (x, labels) = layer(&[(1, 0.3), (5, 0.3)], 0);
        let config = GroupConfig::default();
        let err = compare_groups(&[(0, x.clone())], &labels, &dsa(), &config, None).unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
        let err = compare_groups(&[(0, x)], &[true, false], &dsa(), &config, None).unwrap_err();
        assert!(err.to_string().contains("6 trials for 2 labels"), "{err}");
    }

    #[test]
    fn false_discovery_rate_follows_benjamini_hochberg() {
        let q = false_discovery_rate(&[0.01, 0.04, 0.03, f64::NAN, 0.5]);
        // Sorted 0.01, 0.03, 0.04, 0.5 of m = 4: 0.04, 0.053.., 0.053.., 0.5.
        assert!((q[0] - 0.04).abs() < 1e-12);
        assert!((q[2] - 0.04 * 4.0 / 3.0).abs() < 1e-12);
        assert!((q[1] - 0.04 * 4.0 / 3.0).abs() < 1e-12);
        assert!(q[3].is_nan());
        assert_eq!(q[4], 0.5);
    }

    #[test]
    fn p_values_count_the_shuffles_at_least_as_extreme() {
        assert_eq!(p_value(1.0, &[0.0, 0.5, 2.0]), 0.5);
        assert_eq!(p_value(3.0, &[0.0, 0.5, 2.0]), 0.25);
        assert!(p_value(1.0, &[]).is_nan());
        let mut rng = SplitMix64::new(3);
        let labels = [true, true, false, false, false];
        let s = shuffled(&labels, &mut rng);
        assert_eq!(s.iter().filter(|&&l| l).count(), 2);
        // A rotation keeps the runs: the two true labels stay neighbours (cyclically).
        for _ in 0..10 {
            let r = rotated(&labels, &mut rng);
            assert_ne!(r, labels.to_vec());
            let at: Vec<usize> = (0..5).filter(|&i| r[i]).collect();
            assert!(at[1] - at[0] == 1 || (at[0] == 0 && at[1] == 4), "{r:?}");
        }
    }
}
