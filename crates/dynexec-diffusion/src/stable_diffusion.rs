//! Stable Diffusion (v1.5, v2.1, SD-Turbo) as a [`Denoiser`], built from candle-transformers'
//! CLIP text encoder, UNet and VAE.
//!
//! candle's UNet predicts ε or v for a latent batch; everything around it (the noise schedule,
//! DDIM steps, guidance, seeded noise, step policies) is dynexec's own [`sample`], so Stable
//! Diffusion runs under the same step policies as dynexec's small denoisers. The sampler works
//! in f32 whatever the weights' dtype: [`Denoiser::forward`] casts at the UNet's boundary.

use crate::sampler::{sample, Conditioning, Denoiser, SampleOptions, Sampled, StepPolicy};
use crate::schedule::{BetaSchedule, NoiseSchedule, Prediction, Spacing};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::stable_diffusion::clip::{self, ClipTextTransformer};
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use candle_transformers::models::stable_diffusion::{
    build_clip_transformer, StableDiffusionConfig,
};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_hub::HfHub;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Latents are the VAE's posterior scaled by this so they have roughly unit variance
/// (the constant of SD 1.x/2.x's VAE, which SD-Turbo shares).
pub const VAE_SCALE: f64 = 0.18215;

/// The Stable Diffusion checkpoints dynexec knows how to fetch and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SdVersion {
    /// Stable Diffusion 1.5: ε-prediction, 512×512.
    V1_5,
    /// Stable Diffusion 2.1: v-prediction, 768×768.
    V2_1,
    /// SD-Turbo: SD 2.1 distilled for 1–4 steps without guidance, at 512×512.
    Turbo,
}

impl SdVersion {
    /// Every version dynexec knows.
    pub const ALL: [SdVersion; 3] = [SdVersion::V1_5, SdVersion::V2_1, SdVersion::Turbo];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            SdVersion::V1_5 => "sd-v1-5",
            SdVersion::V2_1 => "sd-v2-1",
            SdVersion::Turbo => "sd-turbo",
        }
    }

    /// The Hugging Face repository holding the UNet, VAE and text encoder weights.
    pub fn repo(self) -> &'static str {
        match self {
            SdVersion::V1_5 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            SdVersion::V2_1 => "stabilityai/stable-diffusion-2-1",
            SdVersion::Turbo => "stabilityai/sd-turbo",
        }
    }

    /// Repository and file of the tokenizer: the diffusers repos ship only vocab.json +
    /// merges.txt, so this is the `tokenizer.json` candle's example uses for SD 1.5/2.1
    /// (the same CLIP BPE vocabulary; SD-Turbo inherits 2.1's).
    pub fn tokenizer_file(self) -> (&'static str, &'static str) {
        ("openai/clip-vit-base-patch32", "tokenizer.json")
    }

    /// UNet weights in the repo; f16/bf16 runs fetch the half-size fp16 variant.
    pub fn unet_file(self, dtype: DType) -> &'static str {
        match dtype {
            DType::F32 | DType::F64 => "unet/diffusion_pytorch_model.safetensors",
            _ => "unet/diffusion_pytorch_model.fp16.safetensors",
        }
    }

    /// VAE weights in the repo; f16/bf16 runs fetch the fp16 variant.
    pub fn vae_file(self, dtype: DType) -> &'static str {
        match dtype {
            DType::F32 | DType::F64 => "vae/diffusion_pytorch_model.safetensors",
            _ => "vae/diffusion_pytorch_model.fp16.safetensors",
        }
    }

    /// Text encoder weights: always the f32 file, since the text encoder always runs in f32
    /// (as in candle's example); it runs once per prompt, so f32 costs nothing measurable.
    pub fn clip_file(self) -> &'static str {
        "text_encoder/model.safetensors"
    }

    /// candle's model geometry (CLIP, UNet, VAE) at the version's native resolution.
    pub fn config(self) -> StableDiffusionConfig {
        match self {
            SdVersion::V1_5 => StableDiffusionConfig::v1_5(None, None, None),
            SdVersion::V2_1 => StableDiffusionConfig::v2_1(None, None, None),
            // SD-Turbo has SD 2.1's architecture but was distilled at 512×512.
            SdVersion::Turbo => StableDiffusionConfig::v2_1(None, Some(512), Some(512)),
        }
    }

    /// The training noise schedule and prediction target, from each repo's
    /// `scheduler/scheduler_config.json`.
    pub fn schedule(self) -> NoiseSchedule {
        let (spacing, prediction) = match self {
            SdVersion::V1_5 => (Spacing::Leading { offset: 1 }, Prediction::Epsilon),
            SdVersion::V2_1 => (Spacing::Leading { offset: 1 }, Prediction::VPrediction),
            // One step must start from pure noise, so turbo samples with trailing spacing.
            SdVersion::Turbo => (Spacing::Trailing, Prediction::Epsilon),
        };
        NoiseSchedule {
            beta_schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            train_steps: 1000,
            spacing,
            prediction,
        }
    }

    /// The step count each version is usually run with.
    pub fn default_steps(self) -> usize {
        match self {
            SdVersion::V1_5 | SdVersion::V2_1 => 30,
            SdVersion::Turbo => 1,
        }
    }

    /// The usual guidance scale. Turbo is trained without guidance: 1 here (the sampler's
    /// "no guidance"), which is what diffusers' and candle's 0.0 means for it.
    pub fn default_guidance(self) -> f64 {
        match self {
            SdVersion::V1_5 | SdVersion::V2_1 => 7.5,
            SdVersion::Turbo => 1.0,
        }
    }

    /// Deterministic DDIM at the default guidance, on latents (no clamping).
    pub fn default_options(self) -> SampleOptions {
        SampleOptions {
            guidance_scale: self.default_guidance(),
            eta: 0.0,
            clip_sample: None,
        }
    }

    /// Downloads (or finds in the hub cache) every file [`StableDiffusion::load`] needs.
    pub fn download(self, hub: &HfHub, dtype: DType, progress: bool) -> Result<SdFiles> {
        // The weights first: a failure then names the model's own repo.
        let unet = hub.get(self.repo(), "main", self.unet_file(dtype), progress)?;
        let vae = hub.get(self.repo(), "main", self.vae_file(dtype), progress)?;
        let clip = hub.get(self.repo(), "main", self.clip_file(), progress)?;
        let (repo, file) = self.tokenizer_file();
        let tokenizer = hub.get(repo, "main", file, progress)?;
        Ok(SdFiles {
            tokenizer,
            clip,
            unet,
            vae,
        })
    }
}

impl fmt::Display for SdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SdVersion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SdVersion::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let known: Vec<_> = SdVersion::ALL.iter().map(|v| v.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown Stable Diffusion version `{s}`: use one of {}",
                    known.join(", ")
                ))
            })
    }
}

/// Local paths of one version's files.
#[derive(Debug, Clone, PartialEq)]
pub struct SdFiles {
    /// CLIP's `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// The text encoder's weights (f32).
    pub clip: PathBuf,
    /// The UNet's weights.
    pub unet: PathBuf,
    /// The VAE's weights.
    pub vae: PathBuf,
}

/// Turns prompts into the UNet's cross-attention context. A trait rather than CLIP itself
/// because candle's `clip::Config` cannot be built at any size but the released ones, and
/// tests need a tiny pipeline.
pub trait PromptEncoder: Send + Sync {
    /// `(prompts.len(), tokens, dim)` hidden states, one row per prompt.
    fn encode(&self, prompts: &[&str]) -> Result<Tensor>;
}

/// Stable Diffusion's text encoder: CLIP's last hidden states over prompts padded to the
/// model's full 77 positions, as the UNet was trained on.
pub struct ClipPromptEncoder {
    model: ClipTextTransformer,
    tokenizer: TextTokenizer,
    pad_id: u32,
    max_tokens: usize,
    device: Device,
}

impl ClipPromptEncoder {
    /// `config` must be the one `model` was built with: it says how long sequences are and
    /// which token pads them.
    pub fn new(
        model: ClipTextTransformer,
        tokenizer: TextTokenizer,
        config: &clip::Config,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            pad_id: clip_pad_id(&tokenizer, config)?,
            max_tokens: config.max_position_embeddings,
            model,
            tokenizer,
            device: device.clone(),
        })
    }

    /// The ids CLIP reads for `prompt`: its tokens, then padding up to the full length.
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        clip_token_ids(&self.tokenizer, prompt, self.pad_id, self.max_tokens)
    }
}

impl PromptEncoder for ClipPromptEncoder {
    fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        // One prompt per forward: candle's SD CLIP broadcasts its (batch, seq, seq) causal
        // mask against (batch, heads, seq, seq) scores, which only lines up for batch 1.
        let mut states = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let ids = Tensor::new(self.token_ids(prompt)?.as_slice(), &self.device)?;
            states.push(self.model.forward(&ids.unsqueeze(0)?)?);
        }
        Ok(Tensor::cat(&states, 0)?)
    }
}

/// The token CLIP sequences are padded with: the config's `pad_with` (SD 2.x pads with `!`),
/// else end-of-text (SD 1.x).
pub fn clip_pad_id(tokenizer: &TextTokenizer, config: &clip::Config) -> Result<u32> {
    let pad = config.pad_with.as_deref().unwrap_or("<|endoftext|>");
    tokenizer.token_to_id(pad).ok_or_else(|| {
        Error::Tokenizer(format!(
            "the tokenizer has no `{pad}` token to pad CLIP prompts with: use the CLIP \
             tokenizer.json this Stable Diffusion version was trained with"
        ))
    })
}

/// `prompt`'s ids padded with `pad_id` to exactly `max_tokens`.
pub fn clip_token_ids(
    tokenizer: &TextTokenizer,
    prompt: &str,
    pad_id: u32,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.len() > max_tokens {
        return Err(Error::InvalidArgument(format!(
            "the prompt has {} tokens but Stable Diffusion's text encoder reads at most \
             {max_tokens}: shorten it",
            ids.len()
        )));
    }
    ids.resize(max_tokens, pad_id);
    Ok(ids)
}

/// A Stable Diffusion pipeline: text encoder, UNet (the [`Denoiser`]) and VAE decoder.
pub struct StableDiffusion {
    text: Box<dyn PromptEncoder>,
    unet: UNet2DConditionModel,
    vae: AutoEncoderKL,
    schedule: NoiseSchedule,
    /// `(channels, height, width)` of one latent.
    latent_dims: [usize; 3],
    device: Device,
    dtype: DType,
}

impl StableDiffusion {
    /// Downloads `version` from the Hugging Face hub (`HF_HOME`, `HF_ENDPOINT`) unless it is
    /// cached, then loads it.
    pub fn from_hub(version: SdVersion, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_hub_with(&HfHub::from_env(), version, device, dtype)
    }

    /// [`StableDiffusion::from_hub`] through a given hub cache and endpoint.
    pub fn from_hub_with(
        hub: &HfHub,
        version: SdVersion,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let files = version.download(hub, dtype, true)?;
        Self::load(version, &files, device, dtype)
    }

    /// Loads `version` from local files; the UNet and VAE in `dtype`, CLIP in f32.
    pub fn load(
        version: SdVersion,
        files: &SdFiles,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        for path in [&files.clip, &files.unet, &files.vae] {
            if !path.exists() {
                return Err(Error::MissingFile(path.clone()));
            }
        }
        // candle's builders know the UNet and VAE geometry (their configs are private to
        // StableDiffusionConfig); their errors are wrapped to name the file.
        let config = version.config();
        let tokenizer = TextTokenizer::from_file(&files.tokenizer)?;
        let clip = build_clip_transformer(&config.clip, &files.clip, device, DType::F32)
            .map_err(|e| not_loadable(&files.clip, "text encoder", version, e))?;
        let text = ClipPromptEncoder::new(clip, tokenizer, &config.clip, device)?;
        let unet = config
            .build_unet(&files.unet, device, 4, false, dtype)
            .map_err(|e| not_loadable(&files.unet, "UNet", version, e))?;
        let vae = config
            .build_vae(&files.vae, device, dtype)
            .map_err(|e| not_loadable(&files.vae, "VAE", version, e))?;
        Self::from_parts(
            Box::new(text),
            unet,
            vae,
            version.schedule(),
            (config.height, config.width),
            device,
            dtype,
        )
    }

    /// Assembles a pipeline from built modules. `image_size` is `(height, width)` in pixels
    /// and must be a multiple of the VAE's downsampling factor (8 for every released SD VAE).
    pub fn from_parts(
        text: Box<dyn PromptEncoder>,
        unet: UNet2DConditionModel,
        vae: AutoEncoderKL,
        schedule: NoiseSchedule,
        image_size: (usize, usize),
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        schedule.check()?;
        // Every VAE block but the last halves the resolution.
        let blocks = vae.config.block_out_channels.len();
        let factor = 1usize << blocks.saturating_sub(1);
        let (height, width) = image_size;
        if height == 0 || width == 0 || height % factor != 0 || width % factor != 0 {
            return Err(Error::InvalidArgument(format!(
                "image size {height}×{width}: both sides must be positive multiples of the \
                 VAE's downsampling factor {factor}"
            )));
        }
        Ok(Self {
            text,
            latent_dims: [vae.config.latent_channels, height / factor, width / factor],
            unet,
            vae,
            schedule,
            device: device.clone(),
            dtype,
        })
    }

    /// The noise schedule the UNet was trained with.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// `(channels, height, width)` of one latent: what [`sample`] draws noise for.
    pub fn latent_dims(&self) -> [usize; 3] {
        self.latent_dims
    }

    /// The device the pipeline runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The UNet's and VAE's dtype (the text encoder runs in f32).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The prompts' text-encoder states, and the empty prompt's (repeated per prompt) for
    /// classifier-free guidance.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Conditioning> {
        if prompts.is_empty() {
            return Err(Error::InvalidArgument(
                "no prompts: give at least one".into(),
            ));
        }
        let cond = self.text.encode(prompts)?.to_device(&self.device)?;
        let empty = self.text.encode(&[""])?.to_device(&self.device)?;
        let uncond = empty.repeat((prompts.len(), 1, 1))?;
        Ok(Conditioning {
            cond,
            uncond: Some(uncond),
        })
    }

    /// Decodes latents `(batch, 4, h, w)` to images `(batch, 3, H, W)`, f32 in [0, 1] on the
    /// pipeline's device (× 255 and cast to u8 for 8-bit pixels).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut images = Vec::with_capacity(latents.dim(0)?);
        // One image at a time: at 512² and up the VAE decoder's activations take gigabytes
        // per image, so this bounds the peak at one image's worth.
        for b in 0..latents.dim(0)? {
            let latent = (latents.narrow(0, b, 1)?.to_dtype(self.dtype)? / VAE_SCALE)?;
            let image = self.vae.decode(&latent)?.to_dtype(DType::F32)?;
            images.push(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?);
        }
        Ok(Tensor::cat(&images, 0)?)
    }

    /// Text to images: one sample per prompt, each from its own seed. Returns the decoded
    /// images (as [`StableDiffusion::decode`]) and the sampler's result (latents, steps).
    pub fn generate(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        policy: &StepPolicy,
        options: &SampleOptions,
    ) -> Result<(Tensor, Sampled)> {
        if prompts.len() != seeds.len() {
            return Err(Error::InvalidArgument(format!(
                "{} prompt(s) but {} seed(s): give one seed per prompt",
                prompts.len(),
                seeds.len()
            )));
        }
        let context = self.encode_prompts(prompts)?;
        let sampled = sample(
            self,
            &self.schedule,
            &context,
            &self.latent_dims,
            seeds,
            policy,
            options,
            |_, _| {},
        )?;
        Ok((self.decode(&sampled.samples)?, sampled))
    }
}

impl Denoiser for StableDiffusion {
    fn forward(&self, x_t: &Tensor, timestep: usize, context: &Tensor) -> Result<Tensor> {
        let x = x_t.to_dtype(self.dtype)?;
        let context = context.to_dtype(self.dtype)?;
        let out = self.unet.forward(&x, timestep as f64, &context)?;
        Ok(out.to_dtype(DType::F32)?)
    }

    fn prediction(&self) -> Prediction {
        self.schedule.prediction
    }
}

fn not_loadable(path: &Path, what: &str, version: SdVersion, e: candle_core::Error) -> Error {
    // The error goes inside a sentence: leave out the backtrace candle attaches under
    // RUST_BACKTRACE.
    let mut e = &e;
    while let candle_core::Error::WithBacktrace { inner, .. } = e {
        e = inner;
    }
    Error::InvalidModel {
        path: path.to_path_buf(),
        message: format!(
            "not {version}'s {what} weights ({e}): a partial or wrong download? delete it from \
             the Hugging Face cache and run again to fetch it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Shape;
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::{Init, VarBuilder};
    use candle_transformers::models::stable_diffusion::unet_2d::{
        BlockConfig, UNet2DConditionModelConfig,
    };
    use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Weights drawn from a generator seeded by the run's seed and the tensor's name, with
    /// the variance candle's initializers would give: deterministic, unlike candle's CPU RNG,
    /// and independent of the order modules are built in.
    struct SeededWeights(u64);

    impl SimpleBackend for SeededWeights {
        fn get(
            &self,
            shape: Shape,
            name: &str,
            init: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let count = shape.elem_count();
            let (center, half_width) = match init {
                Init::Const(c) => {
                    return Tensor::full(c as f32, shape, dev)?.to_dtype(dtype);
                }
                Init::Uniform { lo, up } => ((lo + up) / 2.0, (up - lo) / 2.0),
                // Uniform with the same variance as the normal: √3·σ.
                Init::Randn { mean, stdev } => (mean, 3f64.sqrt() * stdev),
                Init::Kaiming { .. } => {
                    let fan_in: usize = shape.dims().iter().skip(1).product();
                    (0.0, (3.0 / fan_in.max(1) as f64).sqrt())
                }
            };
            let name_hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            });
            let mut rng = StdRng::seed_from_u64(self.0 ^ name_hash);
            let (c, w) = (center as f32, half_width as f32);
            let values: Vec<f32> = (0..count)
                .map(|_| c + w * (2.0 * rng.random::<f32>() - 1.0))
                .collect();
            Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("seeded weights need a shape for {name}")
        }

        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    fn seeded(seed: u64, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SeededWeights(seed)), dtype, Device::Cpu)
    }

    const CONTEXT_DIM: usize = 32;
    const CONTEXT_TOKENS: usize = 6;

    /// A stand-in text encoder: each prompt's states come from a generator seeded by its text,
    /// so equal prompts give equal context and the empty prompt its own.
    struct HashedPrompts;

    impl PromptEncoder for HashedPrompts {
        fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
            let mut values = Vec::new();
            for prompt in prompts {
                let seed = prompt
                    .bytes()
                    .fold(7u64, |h, b| h.wrapping_mul(31) ^ b as u64);
                let mut rng = StdRng::seed_from_u64(seed);
                values.extend(crate::noise::normal_values(
                    &mut rng,
                    CONTEXT_TOKENS * CONTEXT_DIM,
                ));
            }
            let dims = (prompts.len(), CONTEXT_TOKENS, CONTEXT_DIM);
            Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
        }
    }

    /// SD's structure at toy width: a two-level UNet with cross-attention in its first
    /// level and the middle, and a four-block (×8) VAE, as in the released models.
    fn tiny_modules(dtype: DType) -> (UNet2DConditionModel, AutoEncoderKL) {
        let bc = |out_channels, use_cross_attn, attention_head_dim| BlockConfig {
            out_channels,
            use_cross_attn,
            attention_head_dim,
        };
        let unet_config = UNet2DConditionModelConfig {
            blocks: vec![bc(32, Some(1), 4), bc(64, None, 4)],
            center_input_sample: false,
            cross_attention_dim: CONTEXT_DIM,
            downsample_padding: 1,
            flip_sin_to_cos: true,
            freq_shift: 0.,
            layers_per_block: 1,
            mid_block_scale_factor: 1.,
            norm_eps: 1e-5,
            norm_num_groups: 8,
            sliced_attention_size: None,
            use_linear_projection: true,
        };
        let unet = UNet2DConditionModel::new(seeded(1, dtype), 4, 4, false, unet_config).unwrap();
        let vae_config = AutoEncoderKLConfig {
            block_out_channels: vec![8, 16, 16, 32],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 8,
            use_quant_conv: true,
            use_post_quant_conv: true,
        };
        let vae = AutoEncoderKL::new(seeded(2, dtype), 3, 3, vae_config).unwrap();
        (unet, vae)
    }

    fn tiny_pipeline(
        schedule: NoiseSchedule,
        image_size: (usize, usize),
        dtype: DType,
    ) -> Result<StableDiffusion> {
        let (unet, vae) = tiny_modules(dtype);
        let text = Box::new(HashedPrompts);
        StableDiffusion::from_parts(text, unet, vae, schedule, image_size, &Device::Cpu, dtype)
    }

    #[test]
    fn a_tiny_pipeline_generates_seeded_images_end_to_end() {
        let sd = tiny_pipeline(SdVersion::V1_5.schedule(), (128, 128), DType::F32).unwrap();
        assert_eq!(sd.latent_dims(), [4, 16, 16]);
        let options = SampleOptions {
            guidance_scale: 7.5,
            eta: 0.0,
            clip_sample: None,
        };
        let prompts = ["a red cube", "a blue sphere"];
        let policy = StepPolicy::Fixed(3);
        let (images, sampled) = sd.generate(&prompts, &[1, 2], &policy, &options).unwrap();
        assert_eq!(images.dims(), &[2, 3, 128, 128]);
        assert_eq!(images.dtype(), DType::F32);
        assert_eq!(sampled.samples.dims(), &[2, 4, 16, 16]);
        assert_eq!(sampled.steps_used, vec![3, 3]);
        let pixels = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            pixels.iter().all(|p| (0.0..=1.0).contains(p)),
            "pixels outside [0, 1]"
        );
        let latents = sampled
            .samples
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(latents.iter().all(|x| x.is_finite()));
        // Not a constant image: the decoder really ran on varying latents.
        let (lo, hi) = pixels
            .iter()
            .fold((1f32, 0f32), |(l, h), &p| (l.min(p), h.max(p)));
        assert!(hi - lo > 1e-3, "flat image: {lo}..{hi}");

        let row = |t: &Tensor, i: usize| t.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>();
        let (again, _) = sd.generate(&prompts, &[1, 2], &policy, &options).unwrap();
        assert_eq!(row(&images, 0).unwrap(), row(&again, 0).unwrap());
        assert_eq!(row(&images, 1).unwrap(), row(&again, 1).unwrap());
        // A sample depends on its own seed only: changing the second seed leaves the first
        // image as it was and changes the second.
        let (other, _) = sd.generate(&prompts, &[1, 3], &policy, &options).unwrap();
        assert_eq!(row(&images, 0).unwrap(), row(&other, 0).unwrap());
        assert_ne!(row(&images, 1).unwrap(), row(&other, 1).unwrap());
        // Guidance is live: without it the same seeds give other latents.
        let unguided = SampleOptions {
            guidance_scale: 1.0,
            ..options
        };
        let (_, plain) = sd.generate(&prompts, &[1, 2], &policy, &unguided).unwrap();
        assert_ne!(
            row(&sampled.samples, 0).unwrap(),
            row(&plain.samples, 0).unwrap()
        );

        assert!(sd.generate(&prompts, &[1], &policy, &options).is_err());
    }

    #[test]
    fn a_tiny_v_prediction_pipeline_runs_under_the_converge_policy() {
        let sd = tiny_pipeline(SdVersion::V2_1.schedule(), (128, 128), DType::F32).unwrap();
        assert_eq!(sd.prediction(), Prediction::VPrediction);
        let policy = StepPolicy::Converge {
            epsilon: 1e9,
            max_steps: 4,
            min_steps: 2,
            finish_steps: 0,
        };
        let (images, sampled) = sd
            .generate(
                &["a cube"],
                &[5],
                &policy,
                &SdVersion::V2_1.default_options(),
            )
            .unwrap();
        assert_eq!(images.dims(), &[1, 3, 128, 128]);
        // Any change is below a threshold of 1e9: it stops at the minimum.
        assert_eq!(sampled.steps_used, vec![2]);
    }

    #[test]
    fn half_precision_weights_still_sample_in_f32() {
        let options = SdVersion::V1_5.default_options();
        let policy = StepPolicy::Fixed(2);
        let run = |dtype| {
            let sd = tiny_pipeline(SdVersion::V1_5.schedule(), (64, 64), dtype).unwrap();
            sd.generate(&["a red cube"], &[9], &policy, &options)
                .unwrap()
        };
        let (full, full_latents) = run(DType::F32);
        let (half, half_latents) = run(DType::F16);
        assert_eq!(half.dtype(), DType::F32);
        assert_eq!(half_latents.samples.dtype(), DType::F32);
        let gap = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        let (latent_gap, pixel_gap) = (
            gap(&full_latents.samples, &half_latents.samples),
            gap(&full, &half),
        );
        // f16 rounding only (measured: 0.055 and 0.0066), nothing structural.
        assert!(
            latent_gap < 0.25 && pixel_gap < 0.05,
            "{latent_gap} {pixel_gap}"
        );
    }

    #[test]
    fn image_sizes_must_fit_the_vae() {
        let err = tiny_pipeline(SdVersion::Turbo.schedule(), (100, 128), DType::F32)
            .err()
            .unwrap();
        let message = err.to_string();
        assert!(
            message.contains("multiples of the VAE's downsampling factor 8"),
            "{message}"
        );
    }

    #[test]
    fn versions_parse_print_and_carry_their_schedules() {
        for version in SdVersion::ALL {
            assert_eq!(version.to_string().parse::<SdVersion>().unwrap(), version);
            version.schedule().check().unwrap();
        }
        assert_eq!("sd-turbo".parse::<SdVersion>().unwrap(), SdVersion::Turbo);
        let err = "sd-xl".parse::<SdVersion>().unwrap_err().to_string();
        assert!(err.contains("sd-v1-5, sd-v2-1, sd-turbo"), "{err}");

        let v15 = SdVersion::V1_5.schedule();
        assert_eq!(v15.prediction, Prediction::Epsilon);
        assert_eq!(v15.timesteps(30).unwrap().last(), Some(&1));
        assert_eq!(
            SdVersion::V2_1.schedule().prediction,
            Prediction::VPrediction
        );
        let turbo = SdVersion::Turbo.schedule();
        assert_eq!(turbo.prediction, Prediction::Epsilon);
        assert_eq!(turbo.spacing, Spacing::Trailing);
        assert_eq!(turbo.timesteps(1).unwrap(), vec![999]);

        assert_eq!(SdVersion::V1_5.default_steps(), 30);
        assert_eq!(SdVersion::Turbo.default_steps(), 1);
        assert_eq!(SdVersion::V2_1.default_guidance(), 7.5);
        assert_eq!(SdVersion::Turbo.default_guidance(), 1.0);

        let sizes: Vec<_> = SdVersion::ALL
            .iter()
            .map(|v| (v.config().height, v.config().width))
            .collect();
        assert_eq!(sizes, vec![(512, 512), (768, 768), (512, 512)]);
        assert_eq!(SdVersion::V1_5.config().clip.pad_with, None);
        assert_eq!(
            SdVersion::Turbo.config().clip.pad_with.as_deref(),
            Some("!")
        );

        let v = SdVersion::V1_5;
        assert_eq!(
            v.unet_file(DType::F32),
            "unet/diffusion_pytorch_model.safetensors"
        );
        assert_eq!(
            v.vae_file(DType::F16),
            "vae/diffusion_pytorch_model.fp16.safetensors"
        );
        assert_eq!(v.clip_file(), "text_encoder/model.safetensors");
    }

    /// A word-level stand-in for CLIP's BPE tokenizer, with CLIP's specials around every
    /// sequence and `!` (SD 2.x's pad token).
    fn tiny_clip_tokenizer(dir: &Path) -> TextTokenizer {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let piece = |id: &str| serde_json::json!({"SpecialToken": {"id": id, "type_id": 0}});
        let seq = |id: &str| serde_json::json!({"Sequence": {"id": id, "type_id": 0}});
        let (bos, eos) = ("<|startoftext|>", "<|endoftext|>");
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, bos), special(1, eos)],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [piece(bos), seq("A"), piece(eos)],
                "pair": [piece(bos), seq("A"), piece(eos), seq("B"), piece(eos)],
                "special_tokens": {
                    bos: {"id": bos, "ids": [0], "tokens": [bos]},
                    eos: {"id": eos, "ids": [1], "tokens": [eos]},
                },
            },
            "decoder": null,
            "model": {
                "type": "WordLevel",
                "vocab": {bos: 0, eos: 1, "!": 2, "a": 3, "red": 4, "cube": 5, "blue": 6},
                "unk_token": eos,
            },
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        TextTokenizer::from_file(&path).unwrap()
    }

    #[test]
    fn clip_prompts_are_padded_as_each_version_expects() {
        let tmp = tempfile::tempdir().unwrap();
        let tokenizer = tiny_clip_tokenizer(tmp.path());
        let v15 = clip_pad_id(&tokenizer, &clip::Config::v1_5()).unwrap();
        let v21 = clip_pad_id(&tokenizer, &clip::Config::v2_1()).unwrap();
        assert_eq!((v15, v21), (1, 2));
        let ids = clip_token_ids(&tokenizer, "a red cube", v21, 77).unwrap();
        assert_eq!(&ids[..6], &[0, 3, 4, 5, 1, 2]);
        assert_eq!(ids.len(), 77);
        assert!(ids[5..].iter().all(|&id| id == 2));
        assert_eq!(
            &clip_token_ids(&tokenizer, "", v15, 77).unwrap()[..3],
            &[0, 1, 1]
        );
        let long = "a ".repeat(80);
        let err = clip_token_ids(&tokenizer, &long, v15, 77)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("82 tokens") && err.contains("at most 77"),
            "{err}"
        );
    }

    #[test]
    fn the_real_sd_1_5_text_encoder_runs_on_seeded_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let config = clip::Config::v1_5();
        let model = ClipTextTransformer::new(seeded(3, DType::F32), &config).unwrap();
        let tokenizer = tiny_clip_tokenizer(tmp.path());
        let encoder = ClipPromptEncoder::new(model, tokenizer, &config, &Device::Cpu).unwrap();
        let states = encoder
            .encode(&["a red cube", "a blue cube", "a red cube"])
            .unwrap();
        assert_eq!(states.dims(), &[3, 77, 768]);
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                states
                    .get(i)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        assert!(rows[0].iter().all(|x| x.is_finite()));
        assert_eq!(rows[0], rows[2]);
        assert_ne!(rows[0], rows[1]);
    }

    /// An offline hub: the endpoint is a closed local port, so any download fails fast.
    fn offline_hub(cache_dir: &Path) -> HfHub {
        HfHub {
            cache_dir: cache_dir.to_path_buf(),
            endpoint: Some("http://127.0.0.1:9".to_string()),
        }
    }

    #[test]
    fn an_unreachable_hub_is_an_error_naming_the_repo() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = offline_hub(tmp.path());
        let result =
            StableDiffusion::from_hub_with(&hub, SdVersion::Turbo, &Device::Cpu, DType::F32);
        let err = result.err().expect("no hub, no model").to_string();
        assert!(err.contains("stabilityai/sd-turbo"), "{err}");
        assert!(
            err.contains("unet/diffusion_pytorch_model.safetensors"),
            "{err}"
        );
    }

    /// Writes `file` into the hub cache layout hf-hub reads (`models--ORG--NAME/refs/main`
    /// naming a snapshot folder that holds the file), as a download would have left it.
    fn cache_file(cache: &Path, repo: &str, file: &str, bytes: &[u8]) -> PathBuf {
        let root = cache.join(format!("models--{}", repo.replace('/', "--")));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(root.join("refs")).unwrap();
        // hf-hub reads the ref verbatim: no trailing newline.
        std::fs::write(root.join("refs").join("main"), commit).unwrap();
        let path = root.join("snapshots").join(commit).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn cached_files_are_found_offline_and_a_wrong_one_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let version = SdVersion::Turbo;
        // A valid safetensors file that holds none of the model's tensors.
        let placeholder = tmp.path().join("placeholder.safetensors");
        Tensor::zeros(1, DType::F32, &Device::Cpu)
            .unwrap()
            .save_safetensors("placeholder", &placeholder)
            .unwrap();
        let bytes = std::fs::read(&placeholder).unwrap();
        let cache = tmp.path().join("hub");
        let mut expected = Vec::new();
        for file in [
            version.unet_file(DType::F16),
            version.vae_file(DType::F16),
            version.clip_file(),
        ] {
            expected.push(cache_file(&cache, version.repo(), file, &bytes));
        }
        let tokenizer_dir = tempfile::tempdir().unwrap();
        tiny_clip_tokenizer(tokenizer_dir.path());
        let tokenizer_json = std::fs::read(tokenizer_dir.path().join("tokenizer.json")).unwrap();
        let (repo, file) = version.tokenizer_file();
        expected.push(cache_file(&cache, repo, file, &tokenizer_json));

        let hub = offline_hub(&cache);
        let files = version.download(&hub, DType::F16, false).unwrap();
        let found = vec![files.unet, files.vae, files.clip, files.tokenizer];
        assert_eq!(found, expected);

        let err = StableDiffusion::from_hub_with(&hub, version, &Device::Cpu, DType::F16)
            .err()
            .expect("placeholder weights cannot load");
        match &err {
            Error::InvalidModel { path, message } => {
                assert_eq!(path, &expected[2], "{err}");
                assert!(message.contains("sd-turbo's text encoder"), "{err}");
                assert!(message.contains("cannot find tensor text_model."), "{err}");
                assert!(!message.contains('\n'), "one line, no backtrace: {err}");
            }
            other => panic!("expected InvalidModel, got {other}"),
        }
    }
}
