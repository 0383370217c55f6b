//! Many systems at once: every metric as an n × n matrix. Each system's DMD is fitted once;
//! pairs are spread over threads. Results do not depend on the thread count.

use crate::dmd::Dmd;
use crate::dsa::Dsa;
use crate::error::Result;
use crate::geometry::{cka_linear, procrustes_angular, rsa, RdmComparison, RdmDistance};
use crate::similarity::Scores;
use crate::trajectories::Trajectories;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A metric the distance-matrix API can fill in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// DSA angular distance (radians).
    DsaAngular,
    /// DSA Euclidean distance ‖Â − C B̂ Cᵀ‖_F.
    DsaEuclidean,
    /// Eigenvalue Wasserstein score.
    DsaWasserstein,
    /// Angular Procrustes shape distance (radians).
    ProcrustesAngular,
    /// Linear CKA (a similarity: 1 on the diagonal).
    CkaLinear,
    /// RSA: Spearman correlation of Euclidean-distance RDMs (a similarity).
    RsaSpearmanEuclidean,
    /// RSA: Spearman correlation of correlation-distance RDMs (a similarity).
    RsaSpearmanCorrelation,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 7] = [
        Metric::DsaAngular,
        Metric::DsaEuclidean,
        Metric::DsaWasserstein,
        Metric::ProcrustesAngular,
        Metric::CkaLinear,
        Metric::RsaSpearmanEuclidean,
        Metric::RsaSpearmanCorrelation,
    ];

    /// A short snake_case name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Metric::DsaAngular => "dsa_angular",
            Metric::DsaEuclidean => "dsa_euclidean",
            Metric::DsaWasserstein => "dsa_wasserstein",
            Metric::ProcrustesAngular => "procrustes_angular",
            Metric::CkaLinear => "cka_linear",
            Metric::RsaSpearmanEuclidean => "rsa_spearman_euclidean",
            Metric::RsaSpearmanCorrelation => "rsa_spearman_correlation",
        }
    }

    /// Whether the metric needs the DMD fits (one of the three DSA scores).
    pub fn is_dsa(self) -> bool {
        matches!(
            self,
            Metric::DsaAngular | Metric::DsaEuclidean | Metric::DsaWasserstein
        )
    }

    /// Whether the metric is blind to rotations and shifts of the feature space (Procrustes,
    /// CKA), so it can be computed in any orthonormal basis of the centred states: for wide
    /// states, their principal components, a far smaller matrix. (Euclidean RSA is blind to
    /// them too, but its ranks would see rounding break exact ties, e.g. repeated tokens.)
    pub fn rotation_invariant(self) -> bool {
        matches!(self, Metric::ProcrustesAngular | Metric::CkaLinear)
    }

    /// The value of a system compared with itself.
    fn self_value(self) -> f64 {
        match self {
            Metric::CkaLinear | Metric::RsaSpearmanEuclidean | Metric::RsaSpearmanCorrelation => {
                1.0
            }
            _ => 0.0,
        }
    }
}

/// One metric over all pairs of systems, symmetric, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct DistanceMatrix {
    /// Which metric.
    pub metric: Metric,
    /// Number of systems.
    pub n: usize,
    /// `n × n` values, row-major.
    pub values: Vec<f64>,
}

impl DistanceMatrix {
    /// The value between systems `i` and `j`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.values[i * self.n + j]
    }
}

/// Computes the requested metrics between every pair of `systems`, on `threads` threads
/// (`None`: all available cores). Returned in the order of `metrics`. The diagonal holds each
/// metric's value for identical inputs (0 for distances, 1 for CKA and RSA) without computing
/// it. Geometry metrics need every system to have the same number of samples.
pub fn distance_matrix(
    systems: &[Trajectories],
    dsa: &Dsa,
    metrics: &[Metric],
    threads: Option<usize>,
) -> Result<Vec<DistanceMatrix>> {
    let n = systems.len();
    let threads = thread_count(threads);
    let fits: Vec<Option<Dmd>> = if metrics.iter().any(|m| m.is_dsa()) {
        parallel_map(n, threads, |i| dsa.fit(&systems[i]))?
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None; n]
    };
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .collect();
    let values = parallel_map(pairs.len(), threads, |k| {
        let (i, j) = pairs[k];
        let fitted = fits[i].as_ref().zip(fits[j].as_ref());
        let (x, y) = (&systems[i], &systems[j]);
        pair_metrics(dsa, metrics, fitted, View::same(x), View::same(y))
    })?;
    Ok(metrics
        .iter()
        .enumerate()
        .map(|(m, &metric)| {
            let mut out = vec![metric.self_value(); n * n];
            for (k, &(i, j)) in pairs.iter().enumerate() {
                out[i * n + j] = values[k][m];
                out[j * n + i] = values[k][m];
            }
            DistanceMatrix {
                metric,
                n,
                values: out,
            }
        })
        .collect())
}

/// A system's states, and the same states in a smaller basis that gives the rotation-blind
/// metrics the same values ([`Metric::rotation_invariant`]).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub full: &'a Trajectories,
    pub compact: &'a Trajectories,
}

impl<'a> View<'a> {
    /// No smaller basis: both are the states themselves.
    pub fn same(x: &'a Trajectories) -> Self {
        Self {
            full: x,
            compact: x,
        }
    }

    fn for_metric(self, metric: Metric) -> &'a Trajectories {
        if metric.rotation_invariant() {
            self.compact
        } else {
            self.full
        }
    }
}

/// Every metric in `metrics` between `x` and `y`, in order; DSA scores from their fitted
/// models (NaN without them).
pub(crate) fn pair_metrics(
    dsa: &Dsa,
    metrics: &[Metric],
    fitted: Option<(&Dmd, &Dmd)>,
    x_view: View,
    y_view: View,
) -> Result<Vec<f64>> {
    let scores: Option<Scores> = match fitted {
        Some((a, b)) => Some(dsa.compare_fitted(a, b)?),
        None => None,
    };
    metrics
        .iter()
        .map(|&metric| {
            let (x, y) = (x_view.for_metric(metric), y_view.for_metric(metric));
            Ok(match metric {
                Metric::DsaAngular => scores.map_or(f64::NAN, |s| s.angular),
                Metric::DsaEuclidean => scores.map_or(f64::NAN, |s| s.euclidean),
                Metric::DsaWasserstein => scores.map_or(f64::NAN, |s| s.wasserstein),
                Metric::ProcrustesAngular => procrustes_angular(x, y)?,
                Metric::CkaLinear => cka_linear(x, y)?,
                Metric::RsaSpearmanEuclidean => {
                    rsa(x, y, RdmDistance::Euclidean, RdmComparison::Spearman)?
                }
                Metric::RsaSpearmanCorrelation => {
                    rsa(x, y, RdmDistance::Correlation, RdmComparison::Spearman)?
                }
            })
        })
        .collect()
}

/// Threads to use: `threads`, or every available core.
pub(crate) fn thread_count(threads: Option<usize>) -> usize {
    threads
        .or_else(|| std::thread::available_parallelism().ok().map(|p| p.get()))
        .unwrap_or(1)
        .max(1)
}

/// `f(0..len)` on up to `threads` scoped threads, results in index order; the first error wins.
pub(crate) fn parallel_map<T: Send>(
    len: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<T>>>> = (0..len).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(len) {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= len {
                    break;
                }
                let value = f(k);
                if let Ok(mut slot) = slots[k].lock() {
                    *slot = Some(value);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err(crate::Error::Numerical("a worker thread panicked".into())))
        })
        .collect()
}
