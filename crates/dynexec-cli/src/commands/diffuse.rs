//! `dynexec diffuse`: text to image with a step policy, and the pipeline the diffusion
//! commands share (dynexec's text-UNet or Stable Diffusion from the hub).

use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use dynexec_diffusion::predictor::StepPredictor;
use dynexec_diffusion::stable_diffusion::{SdVersion, StableDiffusion};
use dynexec_diffusion::text_unet::{to_pixels, TextUnet};
use dynexec_diffusion::{sample, Conditioning, Denoiser, SampleOptions, Sampled, StepPolicy};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct DiffuseArgs {
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// dynexec's text-UNet (manifest name or folder), or Stable Diffusion from the Hugging Face
    /// hub: sd-v1-5, sd-v2-1 or sd-turbo.
    #[arg(long, default_value = "unet-fashion-mnist")]
    model: String,
    /// N (fixed), predicted[:Q] (the model's step predictor; Q = probability the count
    /// suffices, default the predictor's) or converge[:EPS[:K]] (once the predicted image
    /// changes by less than EPS RMS between steps, finish in K more steps; defaults: the
    /// model's).
    #[arg(long, default_value = "predicted")]
    steps: String,
    /// Steps the converge policy schedules (and stops within).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Images to draw, from seeds --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier-free guidance scale (default: the model's).
    #[arg(long)]
    guidance: Option<f64>,
    /// ddim (deterministic) or ddpm (ancestral sampling, DDIM with η = 1).
    #[arg(long, default_value = "ddim", value_parser = ["ddim", "ddpm"])]
    scheduler: String,
    /// PNG to write: the images side by side.
    #[arg(long, default_value = "diffuse.png")]
    out: PathBuf,
    /// Pixel scale of the PNG (default 4 for images under 128 pixels, else 1).
    #[arg(long)]
    scale: Option<u32>,
}

/// A loaded text-to-image model.
pub enum Pipeline {
    Unet(Box<TextUnet>),
    StableDiffusion(Box<StableDiffusion>, SdVersion),
}

impl Pipeline {
    pub fn load(global: &GlobalOptions, reference: &str) -> Result<Self> {
        let device = global.open_device()?;
        if let Ok(version) = reference.parse::<SdVersion>() {
            let dtype = global.dtype.unwrap_or(match device.is_cpu() {
                true => DType::F32,
                false => DType::F16,
            });
            let sd = StableDiffusion::from_hub(version, &device, dtype)
                .with_context(|| format!("loading {version} from the Hugging Face hub"))?;
            return Ok(Self::StableDiffusion(Box::new(sd), version));
        }
        Ok(Self::Unet(Box::new(TextUnet::load(
            &global.hub()?,
            reference,
            &device,
        )?)))
    }

    pub fn denoiser(&self) -> &dyn Denoiser {
        match self {
            Pipeline::Unet(m) => m.as_ref(),
            Pipeline::StableDiffusion(m, _) => m.as_ref(),
        }
    }

    pub fn default_steps(&self) -> usize {
        match self {
            Pipeline::Unet(_) => 50,
            Pipeline::StableDiffusion(_, v) => v.default_steps(),
        }
    }

    pub fn default_converge_epsilon(&self) -> f64 {
        match self {
            Pipeline::Unet(m) => m.card.converge_epsilon,
            // Latents have unit variance, pixels span 2: the same relative change.
            Pipeline::StableDiffusion(..) => 0.01,
        }
    }

    pub fn default_finish_steps(&self) -> usize {
        match self {
            Pipeline::Unet(m) => m.card.converge_finish_steps,
            Pipeline::StableDiffusion(..) => 2,
        }
    }

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

    pub fn sample_dims(&self) -> Vec<usize> {
        match self {
            Pipeline::Unet(m) => m.sample_dims().to_vec(),
            Pipeline::StableDiffusion(m, _) => m.latent_dims().to_vec(),
        }
    }

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
    pub fn predictor_for(&self, steps: &[StepsArg]) -> Result<Option<StepPredictor>> {
        if !steps.iter().any(|s| matches!(s, StepsArg::Predicted(_))) {
            return Ok(None);
        }
        match self {
            Pipeline::Unet(m) => Ok(Some(StepPredictor::load(&m.dir, &m.device)?)),
            Pipeline::StableDiffusion(_, v) => bail!(
                "{v} has no step predictor (dynexec trains predictors for its own models): use \
                 --steps N or --steps converge"
            ),
        }
    }
}

/// A parsed `--steps` value.
#[derive(Debug, Clone, PartialEq)]
pub enum StepsArg {
    Fixed(usize),
    Predicted(Option<f64>),
    Converge(Option<f64>, Option<usize>),
}

impl std::str::FromStr for StepsArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, value) = match s.split_once(':') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        let bad = || {
            anyhow::anyhow!(
                "--steps {s}: use a step count (e.g. 50), predicted[:Q] or converge[:EPS[:K]]"
            )
        };
        let number = |v: Option<&str>| -> Result<Option<f64>> {
            v.map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .with_context(|| format!("`{v}` in --steps {s} is not a positive number"))
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

/// Turns `--steps` into the sampler's policy for one prompt, given its conditioning (whose
/// first row, the prompt's embedding, is what the step predictor reads; `predictor` comes
/// from [`Pipeline::predictor_for`]); returns the policy and its name.
pub fn resolve_policy(
    pipeline: &Pipeline,
    steps: &StepsArg,
    predictor: Option<&StepPredictor>,
    context: &Conditioning,
    max_steps: Option<usize>,
) -> Result<(StepPolicy, String)> {
    Ok(match steps {
        StepsArg::Fixed(n) => (StepPolicy::Fixed(*n), format!("fixed:{n}")),
        StepsArg::Predicted(q) => {
            let predictor = predictor
                .context("internal: the step predictor was not loaded for --steps predicted")?;
            let q = q.unwrap_or(predictor.card.quantile);
            let n = predictor.predict(&context.cond.narrow(0, 0, 1)?, q)?[0];
            (StepPolicy::Fixed(n), format!("predicted:{q}"))
        }
        StepsArg::Converge(eps, finish) => {
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

pub fn run(global: &GlobalOptions, args: DiffuseArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let steps: StepsArg = args.steps.parse()?;
    let pipeline = Pipeline::load(global, &args.model)?;
    let predictor = pipeline.predictor_for(std::slice::from_ref(&steps))?;
    let started = Instant::now();
    let context = pipeline.condition(&[args.prompt.as_str()], args.n)?;
    let (policy, policy_name) = resolve_policy(
        &pipeline,
        &steps,
        predictor.as_ref(),
        &context,
        args.max_steps,
    )?;
    let options = pipeline.options(args.guidance, &args.scheduler);
    let seeds: Vec<u64> = (0..args.n as u64).map(|i| args.seed + i).collect();
    let bar = progress_bar(
        global,
        policy.scheduled_steps() as u64,
        "denoising [{bar:30}] {pos}/{len} steps ({elapsed})",
    );
    let sampled = pipeline.sample(&context, &seeds, &policy, &options, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let images = pipeline.to_images(&sampled.samples)?;
    let seconds = started.elapsed().as_secs_f64();
    write_grid(&images, &args.out, args.scale)?;
    if global.json {
        print_json(&serde_json::json!({
            "prompt": args.prompt,
            "steps_policy": policy_name,
            "steps_used": sampled.steps_used,
            "seconds": seconds,
            "outputs": [args.out],
        }))?;
    } else {
        println!(
            "{}: {} image(s), steps used {:?} ({policy_name}), {seconds:.2} s → {}",
            args.prompt,
            args.n,
            sampled.steps_used,
            args.out.display()
        );
    }
    Ok(())
}

/// Writes u8 images `(batch, h, w, 1 or 3)` side by side (2-pixel gaps) as one PNG.
pub fn write_grid(images: &Tensor, path: &Path, scale: Option<u32>) -> Result<()> {
    let (batch, h, w, c) = images.dims4()?;
    let scale = scale.unwrap_or(if h < 128 { 4 } else { 1 }).max(1);
    let (h, w) = (h as u32, w as u32);
    let gap = 2;
    let width = batch as u32 * (w * scale + gap) - gap;
    let mut canvas = image::RgbImage::from_pixel(width, h * scale, image::Rgb([255, 255, 255]));
    let pixels = images.flatten_all()?.to_vec1::<u8>()?;
    for b in 0..batch as u32 {
        for y in 0..h * scale {
            for x in 0..w * scale {
                let i = (((b * h + y / scale) * w + x / scale) as usize) * c;
                let rgb = match c {
                    1 => [pixels[i]; 3],
                    _ => [pixels[i], pixels[i + 1], pixels[i + 2]],
                };
                canvas.put_pixel(b * (w * scale + gap) + x, y, image::Rgb(rgb));
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    canvas
        .save(path)
        .with_context(|| format!("writing {} (use a .png name)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_flags_parse_and_bad_ones_say_what_works() {
        assert_eq!("30".parse::<StepsArg>().unwrap(), StepsArg::Fixed(30));
        assert_eq!(
            "predicted".parse::<StepsArg>().unwrap(),
            StepsArg::Predicted(None)
        );
        assert_eq!(
            "predicted:0.8".parse::<StepsArg>().unwrap(),
            StepsArg::Predicted(Some(0.8))
        );
        assert_eq!(
            "converge:0.02".parse::<StepsArg>().unwrap(),
            StepsArg::Converge(Some(0.02), None)
        );
        assert_eq!(
            "converge:0.02:4".parse::<StepsArg>().unwrap(),
            StepsArg::Converge(Some(0.02), Some(4))
        );
        for bad in [
            "0",
            "fast",
            "converge:x",
            "converge:-1",
            "12:3",
            "converge:0.1:x",
        ] {
            let err = bad.parse::<StepsArg>().unwrap_err().to_string();
            assert!(err.contains("--steps"), "{bad}: {err}");
        }
    }
}
