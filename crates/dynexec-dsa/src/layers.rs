//! Comparing layers: every pair of one system's layers ([`layer_matrices`]), and each layer of
//! one system with its counterpart in another ([`compare_systems`]): which layer faces which,
//! each trajectory reduced to its principal components, every metric for one pair.

use crate::matrix::{pair_metrics, parallel_map, thread_count, View};
use crate::{
    cka_linear, distance_matrix, dmd_entropy, procrustes_angular, rsa, DistanceMatrix, Dmd, Dsa,
    Error, Metric, RdmComparison, RdmDistance, Result, Trajectories,
};
use faer::Mat;
use std::collections::{BTreeMap, BTreeSet};

/// Layers of `b` paired with those of `a` by relative depth (equal depths pair one to one):
/// each layer of `a` meets the traced layer of `b` nearest its depth scaled to `b`'s.
pub fn pair_layers(a: &[usize], b: &[usize]) -> Vec<(usize, usize)> {
    let (a_last, b_last) = (
        a.last().copied().unwrap_or(0),
        b.last().copied().unwrap_or(0),
    );
    let traced: BTreeSet<usize> = b.iter().copied().collect();
    a.iter()
        .filter_map(|&la| {
            let target = if a_last == 0 {
                0
            } else {
                ((la as f64) * b_last as f64 / a_last as f64).round() as usize
            };
            // The traced layer of b nearest to the target depth.
            let below = traced.range(..=target).next_back().copied();
            let above = traced.range(target..).next().copied();
            let nearest = match (below, above) {
                (Some(x), Some(y)) => Some(if target - x <= y - target { x } else { y }),
                (x, y) => x.or(y),
            };
            nearest.map(|lb| (la, lb))
        })
        .collect()
}

/// The trajectory in its top `k` principal directions (centred), via a thin SVD: the
/// state of a wide layer reduced to what DSA can fit from few time points.
pub fn principal_components(x: &Trajectories, k: usize) -> Result<Trajectories> {
    let (t, f) = (x.n_samples(), x.features());
    let data = x.data();
    let mean: Vec<f64> = (0..f)
        .map(|j| (0..t).map(|i| data[i * f + j]).sum::<f64>() / t as f64)
        .collect();
    let centred = Mat::from_fn(t, f, |i, j| data[i * f + j] - mean[j]);
    let svd = centred
        .thin_svd()
        .map_err(|e| Error::Numerical(format!("PCA of a layer's states failed: {e:?}")))?;
    let k = k.min(t.min(f));
    let (u, s) = (svd.U(), svd.S());
    let mut out = Vec::with_capacity(t * k);
    for i in 0..t {
        for c in 0..k {
            out.push(u[(i, c)] * s[c]);
        }
    }
    match x.trials() {
        1 => Trajectories::from_2d(t, k, out),
        trials => Trajectories::from_3d(trials, x.time(), k, out),
    }
}

/// The states in the basis of their own principal directions, centred, every direction with
/// variance kept: for wide states (more features than samples, as a model's hidden states
/// over a few hundred tokens) a far smaller matrix on which Procrustes and CKA give the same
/// values up to rounding ([`Metric::rotation_invariant`]); other states are returned as they
/// are.
pub fn compact(x: &Trajectories) -> Result<Trajectories> {
    if x.features() <= x.n_samples() {
        return Ok(x.clone());
    }
    principal_components(x, x.n_samples())
}

/// The most principal components `dsa` can use on `time` positions: its delay embedding
/// must keep at least as many rows as columns.
pub fn max_components(dsa: &Dsa, time: usize) -> usize {
    let config = dsa.config();
    let rows = time.saturating_sub((config.n_delays - 1) * config.delay_interval);
    (rows / config.n_delays).max(1)
}

/// The first `time` samples of a single-trial trajectory.
fn truncate(x: &Trajectories, time: usize) -> Result<Trajectories> {
    let f = x.features();
    Trajectories::from_2d(time, f, x.data()[..time * f].to_vec())
}

/// Every metric in `metrics` between two trajectories, by name. DSA runs on `components`
/// principal components (capped by [`max_components`]); geometry metrics compare samples
/// one to one, so both are cut to the shorter length for them.
pub fn compare_pair(
    dsa: &Dsa,
    components: usize,
    metrics: &[Metric],
    x: &Trajectories,
    y: &Trajectories,
) -> Result<BTreeMap<&'static str, f64>> {
    let scores = if metrics.iter().any(|m| m.is_dsa()) {
        let components = components.min(max_components(dsa, x.time().min(y.time())));
        Some(dsa.compare(
            &principal_components(x, components)?,
            &principal_components(y, components)?,
        )?)
    } else {
        None
    };
    let time = x.time().min(y.time());
    let (xs, ys) = (truncate(x, time)?, truncate(y, time)?);
    let mut out = BTreeMap::new();
    for &metric in metrics {
        let (xs, ys) = match metric.rotation_invariant() {
            true => (compact(&xs)?, compact(&ys)?),
            false => (xs.clone(), ys.clone()),
        };
        let value = match metric {
            Metric::DsaAngular => scores.map_or(f64::NAN, |s| s.angular),
            Metric::DsaEuclidean => scores.map_or(f64::NAN, |s| s.euclidean),
            Metric::DsaWasserstein => scores.map_or(f64::NAN, |s| s.wasserstein),
            Metric::ProcrustesAngular => procrustes_angular(&xs, &ys)?,
            Metric::CkaLinear => cka_linear(&xs, &ys)?,
            Metric::RsaSpearmanEuclidean => {
                rsa(&xs, &ys, RdmDistance::Euclidean, RdmComparison::Spearman)?
            }
            Metric::RsaSpearmanCorrelation => {
                rsa(&xs, &ys, RdmDistance::Correlation, RdmComparison::Spearman)?
            }
        };
        out.insert(metric.name(), value);
    }
    Ok(out)
}

/// Every metric between every pair of one system's layers: a layer × layer matrix per
/// metric (DSA on `components` principal components, geometry on the full states, pairs in
/// parallel on `threads`), and each layer's DMD entropy when a DSA metric is asked for.
pub fn layer_matrices(
    layers: &[Trajectories],
    dsa: &Dsa,
    metrics: &[Metric],
    components: usize,
    threads: Option<usize>,
) -> Result<(Vec<DistanceMatrix>, Vec<f64>)> {
    let (dsa_metrics, geometry_metrics): (Vec<Metric>, Vec<Metric>) =
        metrics.iter().partition(|m| m.is_dsa());
    let reduced: Vec<Trajectories> = if dsa_metrics.is_empty() {
        Vec::new()
    } else {
        layers
            .iter()
            .map(|t| principal_components(t, components))
            .collect::<Result<_>>()?
    };
    let mut matrices = distance_matrix(&reduced, dsa, &dsa_metrics, threads)?;
    let (invariant, other): (Vec<Metric>, Vec<Metric>) = geometry_metrics
        .iter()
        .partition(|m| m.rotation_invariant());
    if !invariant.is_empty() {
        let compacted: Vec<Trajectories> = layers.iter().map(compact).collect::<Result<_>>()?;
        matrices.extend(distance_matrix(&compacted, dsa, &invariant, threads)?);
    }
    matrices.extend(distance_matrix(layers, dsa, &other, threads)?);
    let entropy = reduced
        .iter()
        .map(|t| Ok(dmd_entropy(&dsa.fit(t)?)))
        .collect::<Result<_>>()?;
    Ok((matrices, entropy))
}

/// One metric between every layer of one system (rows) and every layer of another
/// (columns): all pairs, not just those at the same relative depth.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossMatrix {
    /// Which metric.
    pub metric: Metric,
    /// Layers of the first system.
    pub rows: usize,
    /// Layers of the second system.
    pub columns: usize,
    /// `rows × columns` values, row-major.
    pub values: Vec<f64>,
}

impl CrossMatrix {
    /// The value between row layer `i` and column layer `j`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.values[i * self.columns + j]
    }
}

/// Every metric between every layer of `a` and every layer of `b` (two models over the same
/// tokens, say): DSA on `components` principal components, each layer's DMD fitted once;
/// geometry metrics on the full states cut to the shorter length; pairs in parallel.
pub fn cross_layer_matrices(
    a: &[Trajectories],
    b: &[Trajectories],
    dsa: &Dsa,
    metrics: &[Metric],
    components: usize,
    threads: Option<usize>,
) -> Result<Vec<CrossMatrix>> {
    let threads = thread_count(threads);
    let time = a
        .iter()
        .chain(b)
        .map(Trajectories::time)
        .min()
        .ok_or_else(|| Error::Shape("no layers to compare".into()))?;
    let fit_all = |systems: &[Trajectories]| -> Result<Vec<Option<Dmd>>> {
        if !metrics.iter().any(|m| m.is_dsa()) {
            return Ok(vec![None; systems.len()]);
        }
        // Multi-trial systems embed every trial: their Hankel has trials times the rows.
        let rows = a.iter().chain(b).map(|x| x.trials()).min().unwrap_or(1);
        let components = components.min(rows * max_components(dsa, time)).max(1);
        parallel_map(systems.len(), threads, |i| {
            Ok(Some(
                dsa.fit(&principal_components(&systems[i], components)?)?,
            ))
        })
    };
    let (fits_a, fits_b) = (fit_all(a)?, fit_all(b)?);
    let cut = |systems: &[Trajectories]| -> Result<Vec<Trajectories>> {
        systems.iter().map(|x| truncate(x, time)).collect()
    };
    // Geometry metrics pair samples one to one: single trials cut to the shorter length.
    let geometry = metrics.iter().any(|m| !m.is_dsa());
    if geometry && a.iter().chain(b).any(|x| x.trials() > 1) {
        return Err(Error::Shape(
            "geometry metrics compare single-trial systems; use DSA alone for trials".into(),
        ));
    }
    let (cut_a, cut_b) = match geometry {
        true => (cut(a)?, cut(b)?),
        false => (a.to_vec(), b.to_vec()),
    };
    let compact_all = |systems: &[Trajectories]| -> Result<Vec<Trajectories>> {
        match metrics.iter().any(|m| m.rotation_invariant()) {
            true => parallel_map(systems.len(), threads, |i| compact(&systems[i])),
            false => Ok(systems.to_vec()),
        }
    };
    let (compact_a, compact_b) = (compact_all(&cut_a)?, compact_all(&cut_b)?);
    let columns = b.len();
    let values = parallel_map(a.len() * columns, threads, |k| {
        let (i, j) = (k / columns, k % columns);
        let fitted = fits_a[i].as_ref().zip(fits_b[j].as_ref());
        let x = View {
            full: &cut_a[i],
            compact: &compact_a[i],
        };
        let y = View {
            full: &cut_b[j],
            compact: &compact_b[j],
        };
        pair_metrics(dsa, metrics, fitted, x, y)
    })?;
    Ok(metrics
        .iter()
        .enumerate()
        .map(|(m, &metric)| CrossMatrix {
            metric,
            rows: a.len(),
            columns,
            values: values.iter().map(|v| v[m]).collect(),
        })
        .collect())
}

/// One layer of a system facing its counterpart in another.
#[derive(Debug, Clone)]
pub struct PairedLayers {
    /// The first system's layer.
    pub layer_a: usize,
    /// The second system's layer at the same relative depth.
    pub layer_b: usize,
    /// Every metric between them, by name.
    pub values: BTreeMap<&'static str, f64>,
}

/// Each layer of `a` compared with the layer of `b` at the same relative depth
/// ([`pair_layers`]) on every metric ([`compare_pair`]); layers are `(index, states)`.
pub fn compare_systems(
    a: &[(usize, Trajectories)],
    b: &[(usize, Trajectories)],
    dsa: &Dsa,
    components: usize,
    metrics: &[Metric],
) -> Result<Vec<PairedLayers>> {
    let ours: BTreeMap<usize, &Trajectories> = a.iter().map(|(l, t)| (*l, t)).collect();
    let theirs: BTreeMap<usize, &Trajectories> = b.iter().map(|(l, t)| (*l, t)).collect();
    let a_layers: Vec<usize> = ours.keys().copied().collect();
    let b_layers: Vec<usize> = theirs.keys().copied().collect();
    pair_layers(&a_layers, &b_layers)
        .into_iter()
        .map(|(la, lb)| {
            Ok(PairedLayers {
                layer_a: la,
                layer_b: lb,
                values: compare_pair(dsa, components, metrics, ours[&la], theirs[&lb])?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_pair_by_relative_depth() {
        let a: Vec<usize> = (0..=30).collect();
        assert_eq!(
            pair_layers(&a, &a),
            a.iter().map(|&l| (l, l)).collect::<Vec<_>>()
        );
        let b: Vec<usize> = (0..=10).collect();
        let pairs = pair_layers(&a, &b);
        assert_eq!(pairs[0], (0, 0));
        assert_eq!(pairs[15], (15, 5));
        assert_eq!(pairs[30], (30, 10));
    }

    #[test]
    fn cross_matrices_hold_every_pair_and_match_the_square_one() {
        let mut seed = 0u64;
        let mut wave = |freq: f64| -> Trajectories {
            seed += 1;
            let data: Vec<f64> = (0..40)
                .flat_map(|t| {
                    let x = t as f64 * freq + seed as f64;
                    [x.sin(), x.cos(), (2.0 * x).sin()]
                })
                .collect();
            Trajectories::from_2d(40, 3, data).unwrap()
        };
        let a = vec![wave(0.2), wave(0.5)];
        let b = vec![wave(0.2), wave(0.9), wave(0.3)];
        let dsa = Dsa::new(crate::DsaConfig {
            n_delays: 2,
            rank: crate::Rank::Full,
            ..Default::default()
        });
        let metrics = [Metric::DsaAngular, Metric::CkaLinear];
        let cross = cross_layer_matrices(&a, &b, &dsa, &metrics, 3, Some(2)).unwrap();
        assert_eq!(
            (cross[0].rows, cross[0].columns, cross[0].values.len()),
            (2, 3, 6)
        );
        let all: Vec<Trajectories> = a.iter().chain(&b).cloned().collect();
        let square = layer_matrices(&all, &dsa, &metrics, 3, Some(1)).unwrap().0;
        for (m, matrix) in square.iter().enumerate() {
            for i in 0..2 {
                for j in 0..3 {
                    let (x, y) = (cross[m].get(i, j), matrix.get(i, 2 + j));
                    assert!(
                        (x - y).abs() < 1e-9,
                        "{:?} {i},{j}: {x} vs {y}",
                        matrix.metric
                    );
                }
            }
        }
    }

    #[test]
    fn wide_states_give_the_same_geometry_in_their_compact_basis() {
        // 12 samples x 40 features: the compact basis has 12 columns.
        let mut seed = 1u64;
        let mut noise = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let x = Trajectories::from_2d(12, 40, (0..480).map(|_| noise()).collect()).unwrap();
        let y = Trajectories::from_2d(12, 30, (0..360).map(|_| noise()).collect()).unwrap();
        let (cx, cy) = (compact(&x).unwrap(), compact(&y).unwrap());
        assert_eq!(cx.features(), 12);
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        close(
            procrustes_angular(&x, &y).unwrap(),
            procrustes_angular(&cx, &cy).unwrap(),
        );
        close(cka_linear(&x, &y).unwrap(), cka_linear(&cx, &cy).unwrap());
        assert!(Metric::ALL
            .iter()
            .filter(|m| m.rotation_invariant())
            .all(|m| !m.is_dsa()));
    }

    #[test]
    fn principal_components_keep_the_variance_of_a_flat_cloud() {
        // Points on a line in 3-D: one component holds everything.
        let data: Vec<f64> = (0..20)
            .flat_map(|i| {
                let t = i as f64;
                [t, 2.0 * t, -t]
            })
            .collect();
        let x = Trajectories::from_2d(20, 3, data).unwrap();
        let pc = principal_components(&x, 2).unwrap();
        assert_eq!((pc.time(), pc.features()), (20, 2));
        let second: f64 = (0..20).map(|i| pc.at(0, i)[1].powi(2)).sum();
        assert!(second < 1e-12, "{second}");
    }
}
