//! The forward-noising schedule (betas → cumulative alphas) and which training timesteps a
//! sampler visits for a given step count.

use dynexec_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// How betas grow over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas linear in t (Ho et al. 2020).
    Linear,
    /// Square roots of the betas linear in t (Stable Diffusion's `scaled_linear`).
    ScaledLinear,
}

/// How `n` sampling steps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    /// `t = i·T/n + offset` (diffusers' `leading`, Stable Diffusion 1.5/2.1 with offset 1).
    Leading {
        /// Added to every timestep (Stable Diffusion 1.5/2.1 use 1).
        offset: usize,
    },
    /// `t = T − 1 − i·T/n`: always starts from the noisiest timestep, which keeps low step
    /// counts usable (Lin et al. 2024, "Common diffusion noise schedules are flawed").
    Trailing,
}

/// What the denoiser's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise ε that was added.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (Stable Diffusion 2.x).
    VPrediction,
}

/// Noise schedule over `train_steps` timesteps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseSchedule {
    /// How betas grow from `beta_start` to `beta_end`.
    pub beta_schedule: BetaSchedule,
    /// Beta at the first timestep, in (0, `beta_end`].
    pub beta_start: f64,
    /// Beta at the last timestep, below 1.
    pub beta_end: f64,
    /// Training timesteps T, at least 2.
    pub train_steps: usize,
    /// Which timesteps a sampler with fewer steps visits.
    pub spacing: Spacing,
    /// What the denoiser trained on this schedule outputs.
    pub prediction: Prediction,
}

impl NoiseSchedule {
    /// The DDPM schedule (linear betas 1e-4 → 0.02 over 1000 steps), sampled with trailing
    /// spacing; what dynexec's own denoisers are trained with.
    pub fn ddpm_linear() -> Self {
        Self {
            beta_schedule: BetaSchedule::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
            train_steps: 1000,
            spacing: Spacing::Trailing,
            prediction: Prediction::Epsilon,
        }
    }

    /// ᾱ_t for every training timestep.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let t = self.train_steps;
        let denominator = (t.max(2) - 1) as f64;
        let mut product = 1.0;
        (0..t)
            .map(|i| {
                let fraction = i as f64 / denominator;
                let beta = match self.beta_schedule {
                    BetaSchedule::Linear => {
                        self.beta_start + fraction * (self.beta_end - self.beta_start)
                    }
                    BetaSchedule::ScaledLinear => {
                        let (s, e) = (self.beta_start.sqrt(), self.beta_end.sqrt());
                        (s + fraction * (e - s)).powi(2)
                    }
                };
                product *= 1.0 - beta;
                product
            })
            .collect()
    }

    /// The training timesteps `n` sampling steps visit, noisiest first.
    pub fn timesteps(&self, n: usize) -> Result<Vec<usize>> {
        let t = self.train_steps;
        if n == 0 || n > t {
            return Err(Error::InvalidArgument(format!(
                "{n} sampling steps: use between 1 and the schedule's {t} training steps"
            )));
        }
        let ratio = t as f64 / n as f64;
        let mut steps: Vec<usize> = match self.spacing {
            Spacing::Leading { offset } => (0..n)
                .map(|i| ((i as f64 * (t / n) as f64) as usize + offset).min(t - 1))
                .collect(),
            Spacing::Trailing => (0..n)
                .map(|i| ((t as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                .collect(),
        };
        steps.sort_unstable_by(|a, b| b.cmp(a));
        steps.dedup();
        Ok(steps)
    }

    /// Checks `0 < beta_start ≤ beta_end < 1` and `train_steps ≥ 2`; a schedule read from a
    /// file could break them.
    pub fn check(&self) -> Result<()> {
        let ok = self.train_steps >= 2
            && self.beta_start > 0.0
            && self.beta_end < 1.0
            && self.beta_start <= self.beta_end;
        match ok {
            true => Ok(()),
            false => Err(Error::InvalidArgument(format!(
                "noise schedule needs 0 < beta_start ≤ beta_end < 1 and at least 2 training \
                 steps, got {self:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_alphas_match_closed_form_products() {
        let s = NoiseSchedule::ddpm_linear();
        let a = s.alphas_cumprod();
        assert_eq!(a.len(), 1000);
        assert!((a[0] - (1.0 - 1e-4)).abs() < 1e-15);
        let beta1 = 1e-4 + (0.02 - 1e-4) / 999.0;
        assert!((a[1] - (1.0 - 1e-4) * (1.0 - beta1)).abs() < 1e-15);
        // Known value of the classic DDPM schedule: ᾱ_999 ≈ 4.04e-5.
        assert!((a[999] - 4.0358e-5).abs() < 1e-8, "{}", a[999]);
        assert!(a.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn scaled_linear_matches_stable_diffusion() {
        let s = NoiseSchedule {
            beta_schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            train_steps: 1000,
            spacing: Spacing::Leading { offset: 1 },
            prediction: Prediction::Epsilon,
        };
        let a = s.alphas_cumprod();
        // diffusers' scaled_linear: ᾱ_999 ≈ 0.0047.
        assert!((a[999] - 0.004660).abs() < 1e-5, "{}", a[999]);
        assert_eq!(s.timesteps(4).unwrap(), vec![751, 501, 251, 1]);
    }

    #[test]
    fn trailing_spacing_starts_at_the_noisiest_step() {
        let s = NoiseSchedule::ddpm_linear();
        assert_eq!(s.timesteps(4).unwrap(), vec![999, 749, 499, 249]);
        assert_eq!(s.timesteps(1).unwrap(), vec![999]);
        assert_eq!(s.timesteps(1000).unwrap().len(), 1000);
        assert!(s.timesteps(0).is_err() && s.timesteps(1001).is_err());
    }
}
