//! Spectral entropies: how evenly a spectrum spreads its mass. 1 means every mode carries the
//! same weight, 0 means one mode carries everything.
//!
//! Definition: for magnitudes m_i ≥ 0 (k of them), p_i = m_i / Σ m, and
//! H = −Σ p_i ln p_i / ln k, with 0 ln 0 = 0. Of a DMD model we take |λ_i| of A_v's
//! eigenvalues; of a weight matrix, its singular values.

use crate::dmd::Dmd;
use crate::error::{Error, Result};
use faer::MatRef;

/// Normalised Shannon entropy of a spectrum of magnitudes (signs are ignored), in [0, 1].
/// Zero for fewer than two values or an all-zero spectrum.
pub fn spectral_entropy(magnitudes: &[f64]) -> f64 {
    let total: f64 = magnitudes.iter().map(|m| m.abs()).sum();
    if magnitudes.len() < 2 || total == 0.0 || !total.is_finite() {
        return 0.0;
    }
    let h: f64 = magnitudes
        .iter()
        .map(|m| m.abs() / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h / (magnitudes.len() as f64).ln()
}

/// Entropy of the DMD eigenvalue moduli |λ_i|.
pub fn dmd_entropy(dmd: &Dmd) -> f64 {
    let moduli: Vec<f64> = dmd.eigenvalues().iter().map(|l| l.norm()).collect();
    spectral_entropy(&moduli)
}

/// Entropy of a weight matrix's singular values.
pub fn weight_entropy(weights: MatRef<'_, f64>) -> Result<f64> {
    let s = weights
        .singular_values()
        .map_err(|e| Error::Numerical(format!("SVD: {e:?}")))?;
    Ok(spectral_entropy(&s))
}
