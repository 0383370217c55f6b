//! DSA scores between two fitted dynamics matrices.

use crate::assignment::min_cost_assignment;
use crate::error::{Error, Result};
use crate::optimizer::{align, OptimizerConfig};
use faer::{c64, MatRef};

/// The three DSA scores of one comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// arccos(tr(Âᵀ C* B̂ C*ᵀ)) at the best orthogonal C*, radians in [0, π].
    pub angular: f64,
    /// ‖Â − C* B̂ C*ᵀ‖_F = 2 sin(angular / 2).
    pub euclidean: f64,
    /// (1/n) · min over matchings Σ |λ_i − μ_σ(i)|² of the (unnormalised) eigenvalues.
    pub wasserstein: f64,
}

/// Compares two dynamics matrices directly (the optimiser and the eigenvalue score; no DMD).
pub fn compare_matrices(
    a: MatRef<'_, f64>,
    b: MatRef<'_, f64>,
    optimizer: &OptimizerConfig,
) -> Result<Scores> {
    let alignment = align(a, b, optimizer)?;
    let ea = a
        .eigenvalues()
        .map_err(|e| Error::Numerical(format!("eigenvalues: {e:?}")))?;
    let eb = b
        .eigenvalues()
        .map_err(|e| Error::Numerical(format!("eigenvalues: {e:?}")))?;
    Ok(Scores {
        angular: alignment.angular,
        euclidean: alignment.euclidean,
        wasserstein: eigenvalue_wasserstein(&ea, &eb),
    })
}

/// Squared-distance Wasserstein score between two eigenvalue sets: the shorter set is padded
/// with zeros, the matching is exact (Hungarian), and the sum is divided by the set size.
pub fn eigenvalue_wasserstein(a: &[c64], b: &[c64]) -> f64 {
    let n = a.len().max(b.len());
    if n == 0 {
        return 0.0;
    }
    let at = |set: &[c64], i: usize| set.get(i).copied().unwrap_or(c64::new(0.0, 0.0));
    let mut cost = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let d = at(a, i) - at(b, j);
            cost[i * n + j] = d.re * d.re + d.im * d.im;
        }
    }
    min_cost_assignment(&cost, n).1 / n as f64
}
