//! Adaptive-step diffusion.
//!
//! One sampling engine ([`sampler`]: DDIM, DDPM as DDIM with η = 1, classifier-free guidance,
//! seeded noise) runs any [`sampler::Denoiser`]: dynexec's small text-conditioned UNet
//! ([`text_unet`]) or Stable Diffusion through candle-transformers ([`stable_diffusion`]).
//! Three step policies decide how much compute a prompt gets: a fixed count, a count
//! predicted from the prompt before sampling ([`predictor`], Step Saver, Yu & Barad 2024),
//! or finishing early once the predicted clean sample stops changing. [`metrics`] holds SSIM and
//! FID, which label the predictor's training data and score the policies. [`pipeline`] is
//! what front-ends load and sample through.

#![warn(missing_docs)]

pub mod bench;
pub mod labels;
pub mod metrics;
pub mod noise;
pub mod pipeline;
pub mod predictor;
pub mod recipe;
pub mod sampler;
pub mod schedule;
pub mod stable_diffusion;
pub mod text_unet;
pub mod train;

pub use sampler::{sample, Conditioning, Denoiser, SampleOptions, Sampled, StepPolicy};
pub use schedule::{NoiseSchedule, Prediction};
