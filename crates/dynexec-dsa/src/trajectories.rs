//! Recorded activity as trials × time × features, the input every metric takes.

use crate::error::{Error, Result};
use crate::npy::NpyArray;

/// Activity of one system: `trials` independent runs of `time` steps of `features` values,
/// stored row-major as `[trial][time][feature]`. A 2-D recording is one trial.
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectories {
    trials: usize,
    time: usize,
    features: usize,
    data: Vec<f64>,
}

impl Trajectories {
    /// One trial: `time` rows of `features` values, row-major.
    pub fn from_2d(time: usize, features: usize, data: Vec<f64>) -> Result<Self> {
        Self::from_3d(1, time, features, data)
    }

    /// `trials` × `time` × `features`, row-major.
    pub fn from_3d(trials: usize, time: usize, features: usize, data: Vec<f64>) -> Result<Self> {
        if trials == 0 || time == 0 || features == 0 {
            return Err(Error::Shape(format!(
                "empty trajectories ({trials} trials × {time} steps × {features} features)"
            )));
        }
        let expected = trials
            .checked_mul(time)
            .and_then(|v| v.checked_mul(features))
            .ok_or_else(|| Error::Shape("shape overflows".into()))?;
        if data.len() != expected {
            return Err(Error::Shape(format!(
                "{trials} × {time} × {features} needs {expected} values, got {}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("element {i}")));
        }
        Ok(Self {
            trials,
            time,
            features,
            data,
        })
    }

    /// Interprets a 2-D array as time × features and a 3-D one as trials × time × features.
    pub fn from_npy(array: NpyArray) -> Result<Self> {
        match array.shape[..] {
            [t, f] => Self::from_2d(t, f, array.data),
            [k, t, f] => Self::from_3d(k, t, f, array.data),
            _ => Err(Error::Shape(format!(
                "expected 2-D (time × features) or 3-D (trials × time × features), got shape {:?}",
                array.shape
            ))),
        }
    }

    /// Number of trials (1 for 2-D input).
    pub fn trials(&self) -> usize {
        self.trials
    }

    /// Time steps per trial.
    pub fn time(&self) -> usize {
        self.time
    }

    /// Features (neurons, hidden units) per time step.
    pub fn features(&self) -> usize {
        self.features
    }

    /// All values, `[trial][time][feature]` row-major.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// Number of samples (trials × time), the rows of [`Trajectories::samples`].
    pub fn n_samples(&self) -> usize {
        self.trials * self.time
    }

    /// The feature vector at (trial, t).
    pub fn at(&self, trial: usize, t: usize) -> &[f64] {
        let start = (trial * self.time + t) * self.features;
        &self.data[start..start + self.features]
    }

    /// The data flattened to samples × features (row-major), as the geometry metrics see it.
    pub fn samples(&self) -> &[f64] {
        &self.data
    }
}
