//! The end-to-end comparison: delay-embed, fit DMD, align the two dynamics matrices.

use crate::dmd::{Dmd, DmdConfig, Rank};
use crate::error::Result;
use crate::optimizer::OptimizerConfig;
use crate::similarity::{compare_matrices, eigenvalue_wasserstein, Scores};
use crate::trajectories::Trajectories;

/// Settings of a DSA comparison (the reference's `DSA(...)` arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DsaConfig {
    /// Samples per delay-embedded row (1 = no embedding).
    pub n_delays: usize,
    /// Steps between consecutive delays.
    pub delay_interval: usize,
    /// Rank of the DMD regression.
    pub rank: Rank,
    /// Ridge penalty of the regression.
    pub lamb: f64,
    /// Reduced-rank instead of principal-component regression.
    pub reduced_rank_reg: bool,
    /// The alignment search.
    pub optimizer: OptimizerConfig,
}

impl Default for DsaConfig {
    fn default() -> Self {
        let dmd = DmdConfig::default();
        Self {
            n_delays: dmd.n_delays,
            delay_interval: dmd.delay_interval,
            rank: dmd.rank,
            lamb: dmd.lamb,
            reduced_rank_reg: dmd.reduced_rank_reg,
            optimizer: OptimizerConfig::default(),
        }
    }
}

impl DsaConfig {
    /// The DMD part of the settings.
    pub fn dmd(&self) -> DmdConfig {
        DmdConfig {
            n_delays: self.n_delays,
            delay_interval: self.delay_interval,
            rank: self.rank,
            lamb: self.lamb,
            reduced_rank_reg: self.reduced_rank_reg,
        }
    }
}

/// Dynamical similarity analysis with fixed settings.
#[derive(Debug, Clone, Default)]
pub struct Dsa {
    config: DsaConfig,
}

impl Dsa {
    /// A DSA comparer with these settings.
    pub fn new(config: DsaConfig) -> Self {
        Self { config }
    }

    /// The settings.
    pub fn config(&self) -> &DsaConfig {
        &self.config
    }

    /// Fits the DMD model of one system (reuse it to compare one system with many).
    pub fn fit(&self, x: &Trajectories) -> Result<Dmd> {
        Dmd::fit(x, &self.config.dmd())
    }

    /// Fits both systems and compares them.
    pub fn compare(&self, x: &Trajectories, y: &Trajectories) -> Result<Scores> {
        self.compare_fitted(&self.fit(x)?, &self.fit(y)?)
    }

    /// Compares two already fitted systems.
    pub fn compare_fitted(&self, x: &Dmd, y: &Dmd) -> Result<Scores> {
        let mut scores = compare_matrices(x.a_v(), y.a_v(), &self.config.optimizer)?;
        // The fits already hold their eigenvalues; reuse them.
        scores.wasserstein = eigenvalue_wasserstein(x.eigenvalues(), y.eigenvalues());
        Ok(scores)
    }
}
