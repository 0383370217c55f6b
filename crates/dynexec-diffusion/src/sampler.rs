//! DDIM sampling (DDPM as DDIM with η = 1) with classifier-free guidance and two step
//! policies: a fixed step count, or finishing early once the predicted clean images stop
//! changing.

use crate::noise::{batch_noise, generators};
use crate::schedule::{NoiseSchedule, Prediction};
use candle_core::{Tensor, D};
use dynexec_core::{Error, Result};

/// A noise-prediction network: what the sampler asks of any diffusion model.
pub trait Denoiser {
    /// The model output (ε or v, as [`Denoiser::prediction`] says) for noisy samples `x_t`
    /// at training timestep `timestep`, conditioned on `context` (one row per sample).
    fn forward(&self, x_t: &Tensor, timestep: usize, context: &Tensor) -> Result<Tensor>;

    /// What `forward` predicts.
    fn prediction(&self) -> Prediction;
}

/// Conditioning for a batch: the prompt's and, for classifier-free guidance, the empty
/// prompt's, with one row per sample.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The prompts' conditioning, one row per sample.
    pub cond: Tensor,
    /// The empty prompt's, same shape; `None` when guidance is off.
    pub uncond: Option<Tensor>,
}

impl Conditioning {
    /// Each row (one per prompt) repeated `per_prompt` times in place: one row per sample
    /// when every prompt is drawn from several seeds.
    pub fn repeat_rows(&self, per_prompt: usize) -> Result<Self> {
        let prompts = self.cond.dim(0)? as u32;
        let rows: Vec<u32> = (0..prompts)
            .flat_map(|p| std::iter::repeat_n(p, per_prompt))
            .collect();
        let index = Tensor::from_vec(rows.clone(), rows.len(), self.cond.device())?;
        Ok(Self {
            cond: self.cond.index_select(&index, 0)?,
            uncond: match &self.uncond {
                Some(u) => Some(u.index_select(&index, 0)?),
                None => None,
            },
        })
    }
}

/// How many steps to take.
#[derive(Debug, Clone, PartialEq)]
pub enum StepPolicy {
    /// Exactly `n` steps.
    Fixed(usize),
    /// Schedule `max_steps` steps, but once the RMS change of every sample's predicted clean
    /// sample between two steps falls below `epsilon` (after at least `min_steps`), skip
    /// ahead: finish with `finish_steps` of the remaining timesteps, evenly spaced down to the
    /// last (0: stop there and return the predicted clean samples). The prediction settles
    /// on an image's layout well before the last steps have drawn its details, which the
    /// few finishing steps still do.
    Converge {
        /// Threshold on each sample's RMS change of the predicted clean sample between steps, in the sample's own units; must be positive.
        epsilon: f64,
        /// Steps the schedule is laid out for, and the most that run.
        max_steps: usize,
        /// Steps that must have run before the policy may skip ahead.
        min_steps: usize,
        /// Timesteps still run once settled, evenly spaced down to the last; 0 stops at once.
        finish_steps: usize,
    },
}

impl StepPolicy {
    /// Steps the schedule is laid out for: `n`, or `max_steps` (at most this many run).
    pub fn scheduled_steps(&self) -> usize {
        match self {
            StepPolicy::Fixed(n) => *n,
            StepPolicy::Converge { max_steps, .. } => *max_steps,
        }
    }
}

/// Sampler settings other than the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    /// Classifier-free guidance scale; 1 disables guidance (one pass per step).
    pub guidance_scale: f64,
    /// DDIM's η: 0 is deterministic DDIM, 1 is DDPM's ancestral sampling.
    pub eta: f64,
    /// Clamp the predicted clean sample to ±this (pixel-space models); `None` for latents.
    pub clip_sample: Option<f64>,
}

/// Samples and how many denoising steps each took (the same for a whole batch).
#[derive(Debug, Clone)]
pub struct Sampled {
    /// The final predicted clean samples, `(batch, …)`.
    pub samples: Tensor,
    /// Denoising steps taken, one entry per sample.
    pub steps_used: Vec<usize>,
}

/// One DDIM update from timestep `t` (ᾱ = `alpha_t`) to the previous one (`alpha_prev`):
/// returns `(x_prev, predicted x₀)`. `noise` is needed only when `eta > 0`.
pub fn ddim_step(
    x_t: &Tensor,
    model_output: &Tensor,
    alpha_t: f64,
    alpha_prev: f64,
    prediction: Prediction,
    options: &SampleOptions,
    noise: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (sqrt_a, sqrt_1ma) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
    let (x0, eps) = match prediction {
        Prediction::Epsilon => (
            ((x_t - (model_output * sqrt_1ma)?)? / sqrt_a)?,
            model_output.clone(),
        ),
        Prediction::VPrediction => (
            ((x_t * sqrt_a)? - (model_output * sqrt_1ma)?)?,
            ((model_output * sqrt_a)? + (x_t * sqrt_1ma)?)?,
        ),
    };
    // A clamped x₀ comes with the noise that, with it, makes up x_t: keeping the model's raw
    // ε would step towards a sample of the wrong noise level, and a deterministic (η = 0)
    // trajectory never recovers from that.
    let (x0, eps) = match options.clip_sample {
        Some(c) => {
            let clamped = x0.clamp(-c, c)?;
            let eps = ((x_t - (&clamped * sqrt_a)?)? / sqrt_1ma.max(f64::MIN_POSITIVE))?;
            (clamped, eps)
        }
        None => (x0, eps),
    };
    let sigma = options.eta
        * ((1.0 - alpha_prev) / (1.0 - alpha_t)).sqrt()
        * (1.0 - alpha_t / alpha_prev).max(0.0).sqrt();
    let direction = (1.0 - alpha_prev - sigma * sigma).max(0.0).sqrt();
    let mut x_prev = ((&x0 * alpha_prev.sqrt())? + (eps * direction)?)?;
    if sigma > 0.0 {
        let noise = noise.ok_or_else(|| {
            Error::InvalidArgument("a stochastic (η > 0) step needs noise".into())
        })?;
        x_prev = (x_prev + (noise * sigma)?)?;
    }
    Ok((x_prev, x0))
}

/// Denoises `seeds.len()` samples of shape `sample_dims` from their seeds' noise.
/// `on_step(done, scheduled)` is called after every step.
#[allow(clippy::too_many_arguments)] // each is one independent choice of the caller's
pub fn sample(
    denoiser: &dyn Denoiser,
    schedule: &NoiseSchedule,
    context: &Conditioning,
    sample_dims: &[usize],
    seeds: &[u64],
    policy: &StepPolicy,
    options: &SampleOptions,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Sampled> {
    schedule.check()?;
    let batch = seeds.len();
    if batch == 0 || context.cond.dim(0)? != batch {
        return Err(Error::InvalidArgument(format!(
            "{batch} seed(s) but {} conditioning row(s): give one seed per sample",
            context.cond.dim(0)?
        )));
    }
    if let StepPolicy::Converge { epsilon, .. } = policy {
        if epsilon.is_nan() || *epsilon <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "converge:{epsilon}: the threshold must be a positive number, e.g. converge:0.01"
            )));
        }
    }
    let mut timesteps = schedule.timesteps(policy.scheduled_steps())?;
    let alphas = schedule.alphas_cumprod();
    let device = context.cond.device();
    let mut rngs = generators(seeds);
    let mut x = batch_noise(&mut rngs, sample_dims, device)?;
    let guided = options.guidance_scale != 1.0 && context.uncond.is_some();
    let both = match (&context.uncond, guided) {
        (Some(u), true) => Some(Tensor::cat(&[u, &context.cond], 0)?),
        _ => None,
    };

    let mut converged = false;
    let mut previous_x0: Option<Tensor> = None;
    let mut x0 = x.clone();
    let mut i = 0;
    while i < timesteps.len() {
        let t = timesteps[i];
        let output = match &both {
            Some(both) => {
                let doubled = Tensor::cat(&[&x, &x], 0)?;
                let out = denoiser.forward(&doubled, t, both)?;
                let (uncond, cond) = (out.narrow(0, 0, batch)?, out.narrow(0, batch, batch)?);
                (&uncond + ((cond - &uncond)? * options.guidance_scale)?)?
            }
            None => denoiser.forward(&x, t, &context.cond)?,
        };
        let alpha_prev = timesteps.get(i + 1).map_or(1.0, |&p| alphas[p]);
        let noise = match options.eta > 0.0 {
            true => Some(batch_noise(&mut rngs, sample_dims, device)?),
            false => None,
        };
        let (next, predicted) = ddim_step(
            &x,
            &output,
            alphas[t],
            alpha_prev,
            denoiser.prediction(),
            options,
            noise.as_ref(),
        )?;
        x = next;
        x0 = predicted;
        on_step(i + 1, timesteps.len());
        if let StepPolicy::Converge {
            epsilon,
            min_steps,
            finish_steps,
            ..
        } = policy
        {
            if let (Some(prev), false) = (&previous_x0, converged) {
                let settled = rms_change_per_sample(&x0, prev)?
                    .iter()
                    .all(|c| *c < *epsilon);
                if settled && i + 1 >= *min_steps {
                    converged = true;
                    if *finish_steps == 0 {
                        i += 1;
                        break;
                    }
                    let rest = timesteps.split_off(i + 1);
                    timesteps.extend(finishing_steps(&rest, *finish_steps));
                }
            }
            previous_x0 = Some(x0.clone());
        }
        i += 1;
    }
    Ok(Sampled {
        samples: x0,
        steps_used: vec![i; batch],
    })
}

/// `count` of the remaining timesteps `rest` (noisiest first), evenly spaced and ending with
/// the last, so a finished trajectory still ends where a full one does.
fn finishing_steps(rest: &[usize], count: usize) -> Vec<usize> {
    if count >= rest.len() {
        return rest.to_vec();
    }
    (1..=count)
        .map(|k| rest[(k * rest.len()).div_ceil(count) - 1])
        .collect()
}

/// Root-mean-square difference of each sample (row) of `a` and `b`.
fn rms_change_per_sample(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let batch = a.dim(0)?;
    let diff = (a - b)?.reshape((batch, ()))?;
    let ms = diff.sqr()?.mean(D::Minus1)?.to_vec1::<f32>()?;
    Ok(ms.into_iter().map(|m| (m as f64).sqrt()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(t: &Tensor, expected: &[f64]) {
        let got = t.to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(expected) {
            assert!((*g as f64 - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn ddim_step_at_eta_zero_reproduces_the_closed_form() {
        // Reference values from numpy: x0 = (x − √(1−ᾱ)ε)/√ᾱ, x' = √ᾱ'x0 + √(1−ᾱ')ε.
        let x = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
        let out = Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
        let options = SampleOptions {
            guidance_scale: 1.0,
            eta: 0.0,
            clip_sample: None,
        };
        let (prev, x0) =
            ddim_step(&x, &out, 0.3, 0.8, Prediction::Epsilon, &options, None).unwrap();
        close(&x0, &[0.76011841, -2.1312469]);
        close(&prev, &[0.72459193, -1.81680246]);
        let (prev, x0) =
            ddim_step(&x, &out, 0.3, 0.8, Prediction::VPrediction, &options, None).unwrap();
        close(&x0, &[0.19019528, -0.71505456]);
        close(&prev, &[0.38169359, -0.96474019]);
        // The last step (ᾱ' = 1) lands on the prediction; clipping bounds it.
        let clipped = SampleOptions {
            clip_sample: Some(1.0),
            ..options.clone()
        };
        let (prev, x0) =
            ddim_step(&x, &out, 0.3, 1.0, Prediction::Epsilon, &clipped, None).unwrap();
        close(&x0, &[0.76011841, -1.0]);
        close(&prev, &[0.76011841, -1.0]);
        // η > 0 needs noise.
        let ddpm = SampleOptions {
            eta: 1.0,
            ..options
        };
        assert!(ddim_step(&x, &out, 0.3, 0.8, Prediction::Epsilon, &ddpm, None).is_err());
    }

    /// A denoiser whose ε prediction pulls every sample towards its context value.
    struct Toward;
    impl Denoiser for Toward {
        fn forward(&self, x_t: &Tensor, _t: usize, context: &Tensor) -> Result<Tensor> {
            Ok((x_t.broadcast_sub(&context.unsqueeze(2)?)? * 0.5)?)
        }
        fn prediction(&self) -> Prediction {
            Prediction::Epsilon
        }
    }

    fn run(seeds: &[u64], policy: &StepPolicy, eta: f64, guidance: f64) -> Sampled {
        let device = Device::Cpu;
        let n = seeds.len();
        let context = Conditioning {
            cond: Tensor::full(0.3f32, (n, 1), &device).unwrap(),
            uncond: Some(Tensor::zeros((n, 1), candle_core::DType::F32, &device).unwrap()),
        };
        let options = SampleOptions {
            guidance_scale: guidance,
            eta,
            clip_sample: Some(1.0),
        };
        sample(
            &Toward,
            &NoiseSchedule::ddpm_linear(),
            &context,
            &[2, 3],
            seeds,
            policy,
            &options,
            |_, _| {},
        )
        .unwrap()
    }

    #[test]
    fn a_seed_fixes_the_sample_whatever_its_batch() {
        for eta in [0.0, 1.0] {
            let a = run(&[1, 2], &StepPolicy::Fixed(10), eta, 2.0);
            let b = run(&[1, 2], &StepPolicy::Fixed(10), eta, 2.0);
            let c = run(&[2], &StepPolicy::Fixed(10), eta, 2.0);
            let rows = |s: &Sampled| s.samples.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(rows(&a), rows(&b), "η = {eta}: same seeds, same samples");
            assert_eq!(
                rows(&a)[1],
                rows(&c)[0],
                "η = {eta}: seed 2 alone = seed 2 in a batch"
            );
            assert_ne!(rows(&a)[0], rows(&a)[1]);
            assert_eq!(a.steps_used, vec![10, 10]);
        }
        // Guidance changes the result.
        let guided = run(&[1], &StepPolicy::Fixed(10), 0.0, 3.0).samples;
        let plain = run(&[1], &StepPolicy::Fixed(10), 0.0, 1.0).samples;
        let moved = (guided - plain).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 1e-4);
    }

    /// The exact noise prediction when all data sit at the context value: the predicted clean
    /// sample is right from the first step.
    struct PointMass(Vec<f64>);
    impl Denoiser for PointMass {
        fn forward(&self, x_t: &Tensor, t: usize, context: &Tensor) -> Result<Tensor> {
            let a = self.0[t];
            let target = (context.unsqueeze(2)? * a.sqrt())?;
            Ok((x_t.broadcast_sub(&target)? / (1.0 - a).sqrt())?)
        }
        fn prediction(&self) -> Prediction {
            Prediction::Epsilon
        }
    }

    #[test]
    fn converge_stops_early_once_the_prediction_settles() {
        let schedule = NoiseSchedule::ddpm_linear();
        let model = PointMass(schedule.alphas_cumprod());
        let device = Device::Cpu;
        let context = Conditioning {
            cond: Tensor::new(&[[0.3f32], [-0.6]], &device).unwrap(),
            uncond: None,
        };
        let options = SampleOptions {
            guidance_scale: 1.0,
            eta: 0.0,
            clip_sample: None,
        };
        let policy = StepPolicy::Converge {
            epsilon: 1e-3,
            max_steps: 50,
            min_steps: 3,
            finish_steps: 0,
        };
        let stopped = sample(
            &model,
            &schedule,
            &context,
            &[2, 3],
            &[1, 2],
            &policy,
            &options,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(stopped.steps_used, vec![3, 3]);
        let values = stopped
            .samples
            .flatten_from(1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            values[0].iter().all(|v| (v - 0.3).abs() < 1e-4),
            "{values:?}"
        );
        assert!(
            values[1].iter().all(|v| (v + 0.6).abs() < 1e-4),
            "{values:?}"
        );
        // Finishing steps run after the stop and land on the same clean sample.
        let finishing = StepPolicy::Converge {
            epsilon: 1e-3,
            max_steps: 50,
            min_steps: 3,
            finish_steps: 2,
        };
        let finished = sample(
            &model,
            &schedule,
            &context,
            &[2, 3],
            &[1, 2],
            &finishing,
            &options,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(finished.steps_used, vec![5, 5]);
        let gap = (finished.samples - stopped.samples).unwrap().abs().unwrap();
        assert!(gap.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
        assert_eq!(finishing_steps(&[40, 30, 20, 10, 0], 2), vec![20, 0]);
        assert_eq!(finishing_steps(&[40, 30, 20, 10, 0], 3), vec![30, 10, 0]);
        assert_eq!(finishing_steps(&[10, 0], 3), vec![10, 0]);
        // An impossible threshold runs every step; a bad one is refused.
        let never = StepPolicy::Converge {
            epsilon: 1e-30,
            max_steps: 20,
            min_steps: 3,
            finish_steps: 2,
        };
        let context = Conditioning {
            cond: Tensor::new(&[[0.3f32]], &device).unwrap(),
            uncond: None,
        };
        let ran = sample(
            &Toward,
            &schedule,
            &context,
            &[2, 3],
            &[1],
            &never,
            &options,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(ran.steps_used, vec![20]);
        let context = Conditioning {
            cond: Tensor::zeros((1, 1), candle_core::DType::F32, &device).unwrap(),
            uncond: None,
        };
        let bad = StepPolicy::Converge {
            epsilon: 0.0,
            max_steps: 20,
            min_steps: 3,
            finish_steps: 0,
        };
        let options = SampleOptions {
            guidance_scale: 1.0,
            eta: 0.0,
            clip_sample: None,
        };
        assert!(sample(
            &Toward,
            &NoiseSchedule::ddpm_linear(),
            &context,
            &[2, 3],
            &[1],
            &bad,
            &options,
            |_, _| {}
        )
        .is_err());
        assert!(sample(
            &Toward,
            &NoiseSchedule::ddpm_linear(),
            &context,
            &[2, 3],
            &[1, 2],
            &StepPolicy::Fixed(5),
            &options,
            |_, _| {}
        )
        .is_err());
    }
}
