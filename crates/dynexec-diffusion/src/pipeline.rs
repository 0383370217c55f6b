//! The text-to-image pipeline every diffusion front-end shares: a loaded model (dynexec's
//! text-UNet or Stable Diffusion from the hub), its defaults, and the step policies as users
//! name them ([`StepsSpec`]) turned into the sampler's [`StepPolicy`].

use crate::predictor::StepPredictor;
use crate::stable_diffusion::{SdVersion, StableDiffusion};
use crate::text_unet::{to_pixels, TextUnet};
use crate::{sample, Conditioning, Denoiser, SampleOptions, Sampled, StepPolicy};
use candle_core::{DType, Device, Tensor};
use dynexec_core::files::Resolve;
use dynexec_core::{Error, Result, Setting};

/// A loaded text-to-image model.
pub enum Pipeline {
    /// dynexec's small text-conditioned UNet, sampling pixels.
    Unet(Box<TextUnet>),
    /// Stable Diffusion, sampling latents its VAE decodes.
    StableDiffusion(Box<StableDiffusion>, SdVersion),
}

impl Pipeline {
    /// Loads `reference`: `sd-v1-5`, `sd-v2-1` or `sd-turbo` from the Hugging Face hub (in
    /// `dtype`, default F32 on the CPU and F16 elsewhere), or a text-UNet by manifest name or
    /// folder.
    pub fn load(
        hub: &dyn Resolve,
        reference: &str,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<Self> {
        if let Ok(version) = reference.parse::<SdVersion>() {
            let dtype = dtype.unwrap_or(match device.is_cpu() {
                true => DType::F32,
                false => DType::F16,
            });
            let sd = StableDiffusion::from_hub(version, device, dtype)
                .map_err(|e| e.context(format!("loading {version} from the Hugging Face hub")))?;
            return Ok(Self::StableDiffusion(Box::new(sd), version));
        }
        Ok(Self::Unet(Box::new(TextUnet::load(
            hub, reference, device,
        )?)))
    }

    /// The network that predicts noise.
    pub fn denoiser(&self) -> &dyn Denoiser {
        match self {
            Pipeline::Unet(m) => m.as_ref(),
            Pipeline::StableDiffusion(m, _) => m.as_ref(),
        }
    }

    /// Steps a fixed schedule uses by default (and the converge policy schedules).
    pub fn default_steps(&self) -> usize {
        match self {
            Pipeline::Unet(_) => 50,
            Pipeline::StableDiffusion(_, v) => v.default_steps(),
        }
    }

    /// The RMS change between steps below which the converge policy finishes.
    pub fn default_converge_epsilon(&self) -> f64 {
        match self {
            Pipeline::Unet(m) => m.card.converge_epsilon,
            // Latents have unit variance, pixels span 2: the same relative change.
            Pipeline::StableDiffusion(..) => 0.01,
        }
    }

    /// Steps the converge policy takes after converging.
    pub fn default_finish_steps(&self) -> usize {
        match self {
            Pipeline::Unet(m) => m.card.converge_finish_steps,
            Pipeline::StableDiffusion(..) => 2,
        }
    }

    /// Sampling options: `guidance` (default the model's), and `ddpm` (η = 1) or DDIM.
    pub fn options(&self, guidance: Option<f64>, scheduler: &str) -> SampleOptions {
        let eta = if scheduler == "ddpm" { 1.0 } else { 0.0 };
        match self {
            Pipeline::Unet(m) => SampleOptions {
                guidance_scale: guidance.unwrap_or(m.card.guidance_scale),
                eta,
                clip_sample: Some(1.0),
            },
            Pipeline::StableDiffusion(_, v) => SampleOptions {
                guidance_scale: guidance.unwrap_or(v.default_guidance()),
                eta,
                clip_sample: None,
            },
        }
    }

    /// Conditioning with each prompt repeated `per_prompt` times.
    pub fn condition(&self, prompts: &[&str], per_prompt: usize) -> Result<Conditioning> {
        match self {
            Pipeline::Unet(m) => Ok(m.condition(prompts, per_prompt)?),
            Pipeline::StableDiffusion(m, _) => {
                Ok(m.encode_prompts(prompts)?.repeat_rows(per_prompt)?)
            }
        }
    }

    /// One sample's shape: pixels for the UNet, latents for Stable Diffusion.
    pub fn sample_dims(&self) -> Vec<usize> {
        match self {
            Pipeline::Unet(m) => m.sample_dims().to_vec(),
            Pipeline::StableDiffusion(m, _) => m.latent_dims().to_vec(),
        }
    }

    /// Samples one image per seed under `policy`, calling `on_step(done, scheduled)`.
    pub fn sample(
        &self,
        context: &Conditioning,
        seeds: &[u64],
        policy: &StepPolicy,
        options: &SampleOptions,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Sampled> {
        let schedule = match self {
            Pipeline::Unet(m) => &m.card.schedule,
            Pipeline::StableDiffusion(m, _) => m.schedule(),
        };
        Ok(sample(
            self.denoiser(),
            schedule,
            context,
            &self.sample_dims(),
            seeds,
            policy,
            options,
            on_step,
        )?)
    }

    /// Samples → RGB or grey u8 images `(batch, h, w, channels)`.
    pub fn to_images(&self, samples: &Tensor) -> Result<Tensor> {
        match self {
            Pipeline::Unet(_) => Ok(to_pixels(samples)?.unsqueeze(3)?),
            Pipeline::StableDiffusion(m, _) => {
                let rgb = m.decode(samples)?;
                Ok((rgb * 255.0)?
                    .round()?
                    .to_dtype(DType::U8)?
                    .permute((0, 2, 3, 1))?
                    .contiguous()?)
            }
        }
    }

    /// The step predictor of a dynexec model, loaded when one of `steps` asks for it; an
    /// error that says what to use instead for Stable Diffusion or a model without one.
    pub fn predictor_for(&self, steps: &[StepsSpec]) -> Result<Option<StepPredictor>> {
        if !steps.iter().any(|s| matches!(s, StepsSpec::Predicted(_))) {
            return Ok(None);
        }
        match self {
            Pipeline::Unet(m) => Ok(Some(StepPredictor::load(&m.dir, &m.device)?)),
            Pipeline::StableDiffusion(_, v) => Err(Error::setting(
                Setting::Steps,
                format!("predicted needs a step predictor, and {v} has none (dynexec trains predictors for its own models): use a step count or converge"),
            )),
        }
    }
}

/// A step policy as a user names it: `N`, `predicted[:Q]` or `converge[:EPS[:K]]`.
#[derive(Debug, Clone, PartialEq)]
pub enum StepsSpec {
    /// Always this many steps.
    Fixed(usize),
    /// As many as the step predictor says suffice with probability Q (default its own).
    Predicted(Option<f64>),
    /// Stop once the predicted sample changes by less than EPS RMS, after K more steps.
    Converge(Option<f64>, Option<usize>),
}

impl std::str::FromStr for StepsSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, value) = match s.split_once(':') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        let spec_error = |help: String| Error::BadSpec {
            setting: Setting::Steps,
            spec: s.to_string(),
            help,
        };
        let bad =
            || spec_error("use a step count (e.g. 50), predicted[:Q] or converge[:EPS[:K]]".into());
        let number = |v: Option<&str>| -> Result<Option<f64>> {
            v.map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| spec_error(format!("`{v}` is not a positive number")))
            })
            .transpose()
        };
        match name {
            "predicted" => Ok(Self::Predicted(number(value)?)),
            "converge" => {
                let (eps, finish) = match value.map(|v| v.split_once(':')) {
                    Some(Some((eps, k))) => {
                        (Some(eps), Some(k.parse::<usize>().map_err(|_| bad())?))
                    }
                    _ => (value, None),
                };
                Ok(Self::Converge(number(eps)?, finish))
            }
            n => match n.parse::<usize>() {
                Ok(n) if n > 0 && value.is_none() => Ok(Self::Fixed(n)),
                _ => Err(bad()),
            },
        }
    }
}

/// Turns a steps spec into the sampler's policy for one prompt, given its conditioning (whose
/// first row, the prompt's embedding, is what the step predictor reads; `predictor` comes
/// from [`Pipeline::predictor_for`]); returns the policy and its name.
pub fn resolve_policy(
    pipeline: &Pipeline,
    steps: &StepsSpec,
    predictor: Option<&StepPredictor>,
    context: &Conditioning,
    max_steps: Option<usize>,
) -> Result<(StepPolicy, String)> {
    Ok(match steps {
        StepsSpec::Fixed(n) => (StepPolicy::Fixed(*n), format!("fixed:{n}")),
        StepsSpec::Predicted(q) => {
            let predictor = predictor.ok_or_else(|| {
                Error::InvalidArgument(
                    "the predicted step policy needs the step predictor: load it with Pipeline::predictor_for".into(),
                )
            })?;
            let q = q.unwrap_or(predictor.card.quantile);
            let n = predictor.predict(&context.cond.narrow(0, 0, 1)?, q)?[0];
            (StepPolicy::Fixed(n), format!("predicted:{q}"))
        }
        StepsSpec::Converge(eps, finish) => {
            let epsilon = eps.unwrap_or(pipeline.default_converge_epsilon());
            let finish_steps = finish.unwrap_or(pipeline.default_finish_steps());
            let max_steps = max_steps.unwrap_or(pipeline.default_steps());
            (
                StepPolicy::Converge {
                    epsilon,
                    max_steps,
                    min_steps: MIN_CONVERGE_STEPS.min(max_steps),
                    finish_steps,
                },
                format!("converge:{epsilon}:{finish_steps}"),
            )
        }
    })
}

/// The converge policy never stops before this many steps: the first predictions from pure
/// noise can agree by chance.
pub const MIN_CONVERGE_STEPS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_specs_parse_and_bad_ones_say_what_works() {
        assert_eq!("30".parse::<StepsSpec>().unwrap(), StepsSpec::Fixed(30));
        assert_eq!(
            "predicted".parse::<StepsSpec>().unwrap(),
            StepsSpec::Predicted(None)
        );
        assert_eq!(
            "predicted:0.8".parse::<StepsSpec>().unwrap(),
            StepsSpec::Predicted(Some(0.8))
        );
        assert_eq!(
            "converge:0.02".parse::<StepsSpec>().unwrap(),
            StepsSpec::Converge(Some(0.02), None)
        );
        assert_eq!(
            "converge:0.02:4".parse::<StepsSpec>().unwrap(),
            StepsSpec::Converge(Some(0.02), Some(4))
        );
        for bad in [
            "0",
            "fast",
            "converge:x",
            "converge:-1",
            "12:3",
            "converge:0.1:x",
        ] {
            match bad.parse::<StepsSpec>() {
                Err(Error::BadSpec {
                    setting: Setting::Steps,
                    spec,
                    help,
                }) => {
                    assert_eq!(spec, bad);
                    assert!(
                        help.contains("use a step count") || help.contains("not a positive number"),
                        "{bad}: {help}"
                    );
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
