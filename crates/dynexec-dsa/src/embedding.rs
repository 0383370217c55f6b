//! Delay (Hankel) embedding: each row stacks a sample with its `n_delays - 1` predecessors,
//! turning partially observed dynamics into a state the linear model can advance.

use crate::error::{Error, Result};
use crate::trajectories::Trajectories;
use faer::Mat;

/// Delay-embedded data: the trials' Hankel matrices stacked vertically.
#[derive(Debug, Clone)]
pub struct Hankel {
    /// `(trials · rows_per_trial) × (n_delays · features)`.
    pub matrix: Mat<f64>,
    /// Number of trials stacked.
    pub trials: usize,
    /// Rows each trial contributes: `time - (n_delays - 1) · delay_interval`.
    pub rows_per_trial: usize,
}

/// Builds the stacked Hankel matrix. Row t of a trial, column block j, holds
/// `x[t + (n_delays - 1 - j) · delay_interval]`, so block 0 is the most recent sample.
pub fn delay_embed(x: &Trajectories, n_delays: usize, delay_interval: usize) -> Result<Hankel> {
    if n_delays == 0 || delay_interval == 0 {
        return Err(Error::Config(format!(
            "n_delays ({n_delays}) and delay_interval ({delay_interval}) must be at least 1"
        )));
    }
    let span = (n_delays - 1)
        .checked_mul(delay_interval)
        .ok_or_else(|| Error::Config("n_delays × delay_interval overflows".into()))?;
    // Two rows per trial are the minimum for one time-shifted pair.
    if x.time() < span + 2 {
        return Err(Error::TooShort(format!(
            "{} steps per trial, but {n_delays} delays at interval {delay_interval} need at least {}",
            x.time(),
            span + 2
        )));
    }
    let rows_per_trial = x.time() - span;
    let n = x.features();
    let matrix = Mat::from_fn(x.trials() * rows_per_trial, n_delays * n, |row, col| {
        let (trial, t) = (row / rows_per_trial, row % rows_per_trial);
        let (block, feature) = (col / n, col % n);
        x.at(trial, t + (n_delays - 1 - block) * delay_interval)[feature]
    });
    Ok(Hankel {
        matrix,
        trials: x.trials(),
        rows_per_trial,
    })
}
