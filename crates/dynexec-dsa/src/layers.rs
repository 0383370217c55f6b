//! Comparing layers: every pair of one system's layers ([`layer_matrices`]), and each layer of
//! one system with its counterpart in another ([`compare_systems`]): which layer faces which,
//! each trajectory reduced to its principal components, every metric for one pair.

use crate::{
    cka_linear, distance_matrix, dmd_entropy, procrustes_angular, rsa, DistanceMatrix, Dsa, Error,
    Metric, RdmComparison, RdmDistance, Result, Trajectories,
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
    matrices.extend(distance_matrix(layers, dsa, &geometry_metrics, threads)?);
    let entropy = reduced
        .iter()
        .map(|t| Ok(dmd_entropy(&dsa.fit(t)?)))
        .collect::<Result<_>>()?;
    Ok((matrices, entropy))
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
