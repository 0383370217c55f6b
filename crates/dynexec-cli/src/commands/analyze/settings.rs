//! The DSA and metric flags `analyze` and `analyze compare` share.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use dynexec_dsa::{Dsa, DsaConfig, Metric, OptimizerConfig, Rank};

/// Which comparisons to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricName {
    /// Dynamical similarity (angular, euclidean and eigenvalue-Wasserstein scores).
    Dsa,
    /// Angular Procrustes shape distance.
    Procrustes,
    /// Linear CKA (a similarity: 1 = same geometry).
    Cka,
    /// RSA: Spearman correlation of correlation-distance dissimilarity matrices.
    Rsa,
    /// Every metric above.
    All,
}

/// Expands `all` and removes repeats, keeping the order given.
pub fn expand(names: &[MetricName]) -> Vec<MetricName> {
    let mut out: Vec<MetricName> = Vec::new();
    for &name in names {
        let items: &[MetricName] = match name {
            MetricName::All => &[
                MetricName::Dsa,
                MetricName::Procrustes,
                MetricName::Cka,
                MetricName::Rsa,
            ],
            _ => std::slice::from_ref(&name),
        };
        for &item in items {
            if !out.contains(&item) {
                out.push(item);
            }
        }
    }
    out
}

/// The library metrics behind the names, in order.
pub fn library_metrics(names: &[MetricName]) -> Vec<Metric> {
    expand(names)
        .into_iter()
        .flat_map(|name| match name {
            MetricName::Dsa => vec![
                Metric::DsaAngular,
                Metric::DsaEuclidean,
                Metric::DsaWasserstein,
            ],
            MetricName::Procrustes => vec![Metric::ProcrustesAngular],
            MetricName::Cka => vec![Metric::CkaLinear],
            MetricName::Rsa => vec![Metric::RsaSpearmanCorrelation],
            MetricName::All => vec![],
        })
        .collect()
}

/// DSA settings (the reference implementation's `DSA(...)` arguments).
#[derive(Args, Clone, Debug)]
pub struct DsaArgs {
    /// Delays per embedded row (1 = no delay embedding).
    #[arg(long, default_value_t = 2)]
    pub n_delays: usize,

    /// Steps between consecutive delays.
    #[arg(long, default_value_t = 1)]
    pub delay_interval: usize,

    /// DMD rank: keep this many eigen-time-delay coordinates (default: all for
    /// `analyze compare`, 10 for a model's hidden states).
    #[arg(long, conflicts_with_all = ["rank_thresh", "rank_explained_variance"])]
    pub rank: Option<usize>,

    /// DMD rank: as many coordinates as singular values above this threshold.
    #[arg(long, conflicts_with = "rank_explained_variance")]
    pub rank_thresh: Option<f64>,

    /// DMD rank: the fewest coordinates explaining this fraction of the variance (0..1].
    #[arg(long)]
    pub rank_explained_variance: Option<f64>,

    /// Ridge penalty of the DMD regression.
    #[arg(long, default_value_t = 1e-8)]
    pub lamb: f64,

    /// Reduced-rank regression instead of principal-component regression.
    #[arg(long)]
    pub reduced_rank_reg: bool,

    /// Seed of the alignment search's random starts (results are a function of the seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl DsaArgs {
    /// The comparer, with `default_rank` when no rank flag was given.
    pub fn dsa(&self, default_rank: Rank) -> Result<Dsa> {
        if self.n_delays == 0 || self.delay_interval == 0 {
            bail!("--n-delays and --delay-interval must be at least 1");
        }
        let rank = match (self.rank, self.rank_thresh, self.rank_explained_variance) {
            (Some(0), _, _) => bail!("--rank must be at least 1"),
            (Some(r), _, _) => Rank::Count(r),
            (_, Some(t), _) if t.is_finite() && t >= 0.0 => Rank::Threshold(t),
            (_, Some(t), _) => bail!("--rank-thresh must be a non-negative number, got {t}"),
            (_, _, Some(v)) if v > 0.0 && v <= 1.0 => Rank::ExplainedVariance(v),
            (_, _, Some(v)) => bail!("--rank-explained-variance must be in (0, 1], got {v}"),
            _ => default_rank,
        };
        if !(self.lamb.is_finite() && self.lamb >= 0.0) {
            bail!("--lamb must be a non-negative number, got {}", self.lamb);
        }
        Ok(Dsa::new(DsaConfig {
            n_delays: self.n_delays,
            delay_interval: self.delay_interval,
            rank,
            lamb: self.lamb,
            reduced_rank_reg: self.reduced_rank_reg,
            optimizer: OptimizerConfig {
                seed: self.seed,
                ..OptimizerConfig::default()
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_expands_once_in_order() {
        assert_eq!(
            expand(&[MetricName::Cka, MetricName::All]),
            vec![
                MetricName::Cka,
                MetricName::Dsa,
                MetricName::Procrustes,
                MetricName::Rsa
            ]
        );
        assert_eq!(
            library_metrics(&[MetricName::Procrustes]),
            vec![Metric::ProcrustesAngular]
        );
    }
}
