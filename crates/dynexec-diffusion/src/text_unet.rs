//! dynexec's own text-to-image model: the small [`Unet`] conditioned on a sentence embedding
//! of the prompt (all-MiniLM-L6-v2), with its card.

use crate::sampler::{Conditioning, Denoiser};
use crate::schedule::{NoiseSchedule, Prediction};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dynexec_core::card::{read_card, write_card};
use dynexec_core::files::Resolve;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_models::bert::{Bert, EncoderFiles};
use dynexec_models::unet::{Unet, UnetConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File names inside a text-UNet model's folder.
pub const CARD_FILE: &str = "card.json";
/// The UNet's weights (the moving average, after training).
pub const WEIGHTS_FILE: &str = "unet.safetensors";
/// The prompts the UNet was trained on; the step predictor's labels are made from them.
pub const TRAIN_PROMPTS_FILE: &str = "prompts-train.jsonl";
/// Held-out prompts the step policies are benchmarked on.
pub const TEST_PROMPTS_FILE: &str = "prompts-test.jsonl";

/// A text-UNet's card: architecture, schedule, conditioning and how it was trained.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffusionCard {
    /// The sentence encoder whose embeddings condition the UNet (a manifest name or path).
    pub text_encoder: String,
    /// Pixels are scaled to [-1, 1]; predicted clean images are clamped to it.
    pub unet: UnetConfig,
    /// The noise schedule it was trained with.
    pub schedule: NoiseSchedule,
    /// Default classifier-free guidance scale.
    pub guidance_scale: f64,
    /// The classes the training prompts describe, in label order.
    pub labels: Vec<String>,
    /// Default threshold of the `converge` policy (RMS change of the predicted image).
    pub converge_epsilon: f64,
    /// Default steps the `converge` policy finishes with once it has converged.
    #[serde(default = "default_finish_steps")]
    pub converge_finish_steps: usize,
    /// How it was trained.
    pub training: DiffusionTraining,
}

/// How the UNet was trained.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DiffusionTraining {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW's peak learning rate.
    pub learning_rate: f64,
    /// Probability of dropping the prompt (training the unconditional model for guidance).
    pub prompt_dropout: f64,
    /// Decay of the weights' exponential moving average, which is what is saved.
    pub ema_decay: f64,
    /// Seed of initialisation, batches and noise.
    pub seed: u64,
    /// Mean loss over the last 100 steps.
    pub final_loss: f32,
    /// Where the images and prompts came from.
    pub data: String,
    /// The command (or commands) that reproduce the weights.
    pub command: String,
}

fn default_finish_steps() -> usize {
    3
}

impl DiffusionCard {
    /// Reads a card, checking its noise schedule.
    pub fn read(path: &Path) -> Result<Self> {
        let card: Self = read_card(path, "a diffusion-model card")?;
        card.schedule.check()?;
        Ok(card)
    }

    /// Writes the card as JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_card(path, self)
    }
}

/// Sentence embeddings of prompts, the conditioning the text-UNet is trained on.
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: TextTokenizer,
}

impl SentenceEncoder {
    /// Loads the encoder `reference` names (manifest name, `hf:` reference or path), pulling
    /// it when needed.
    pub fn load(hub: &dyn Resolve, reference: &str, device: &Device) -> Result<Self> {
        let (bert, tokenizer) = EncoderFiles::find(&hub.resolve(reference)?, None)?.load(device)?;
        Ok(Self { bert, tokenizer })
    }

    /// `(prompts, hidden)` L2-normalised mean-pooled embeddings.
    pub fn embed(&self, prompts: &[&str]) -> Result<Tensor> {
        self.bert.sentence_embeddings(&self.tokenizer, prompts, 32)
    }

    /// Size of an embedding.
    pub fn dim(&self) -> usize {
        self.bert.config().hidden_size
    }
}

/// A trained text-UNet with its prompt encoder.
pub struct TextUnet {
    /// The denoiser.
    pub unet: Unet,
    /// Its card.
    pub card: DiffusionCard,
    /// Embeds prompts into the UNet's conditioning.
    pub encoder: SentenceEncoder,
    /// The model's folder (its prompt sets and step predictor live there).
    pub dir: PathBuf,
    /// Where the UNet and encoder live.
    pub device: Device,
}

impl TextUnet {
    /// Loads a text-UNet by manifest name or folder, pulling it and its encoder when needed.
    pub fn load(hub: &dyn Resolve, reference: &str, device: &Device) -> Result<Self> {
        let files = hub.resolve(reference)?;
        let card_path = files.find(CARD_FILE).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "`{reference}` is not a dynexec diffusion model: it has no {CARD_FILE} (train \
                 one with `dynexec diffusion train`)"
            ))
        })?;
        let dir = card_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let card = DiffusionCard::read(card_path)?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.exists() {
            return Err(Error::MissingFile(weights));
        }
        // SAFETY: read-only mapping of a file dynexec does not modify while it is open.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| Error::InvalidModel {
                path: weights.clone(),
                message: format!("{e} (corrupt weights? pull the model again)"),
            })?;
        let unet = Unet::load(vb, &card.unet).map_err(|e| Error::InvalidModel {
            path: weights.clone(),
            message: format!("{e} (weights and card.json disagree)"),
        })?;
        let encoder = SentenceEncoder::load(hub, &card.text_encoder, device)?;
        check_context_dim(&encoder, &card.unet)?;
        Ok(Self {
            unet,
            card,
            encoder,
            dir,
            device: device.clone(),
        })
    }

    /// Conditioning for `prompts`, each repeated `per_prompt` times (one row per sample).
    pub fn condition(&self, prompts: &[&str], per_prompt: usize) -> Result<Conditioning> {
        let cond = self.encoder.embed(prompts)?;
        Conditioning {
            uncond: Some(cond.zeros_like()?),
            cond,
        }
        .repeat_rows(per_prompt)
    }

    /// `(height, width, channels)` of one sample.
    pub fn sample_dims(&self) -> [usize; 3] {
        let c = &self.card.unet;
        [c.image_size, c.image_size, c.in_channels]
    }
}

/// The encoder's width must be the UNet's conditioning width.
pub fn check_context_dim(encoder: &SentenceEncoder, config: &UnetConfig) -> Result<()> {
    match encoder.dim() == config.context_dim {
        true => Ok(()),
        false => Err(Error::InvalidArgument(format!(
            "the text encoder gives {}-d embeddings but the UNet takes {}-d conditioning: use \
             the encoder the UNet was trained with",
            encoder.dim(),
            config.context_dim
        ))),
    }
}

impl Denoiser for TextUnet {
    fn forward(&self, x_t: &Tensor, timestep: usize, context: &Tensor) -> Result<Tensor> {
        self.unet
            .forward(x_t, &vec![timestep; x_t.dim(0)?], context)
    }

    fn prediction(&self) -> Prediction {
        self.card.schedule.prediction
    }
}

/// Samples in [-1, 1] `(batch, h, w, 1)` → u8 grey pixels `(batch, h, w)`.
pub fn to_pixels(samples: &Tensor) -> Result<Tensor> {
    let x = samples.squeeze(3)?.clamp(-1.0, 1.0)?;
    Ok(((x + 1.0)? * 127.5)?.round()?.to_dtype(DType::U8)?)
}

/// u8 grey pixels `(batch, h, w)` → channels-last samples in [-1, 1].
pub fn from_pixels(pixels: &Tensor) -> Result<Tensor> {
    Ok(((pixels.to_dtype(DType::F32)? / 127.5)? - 1.0)?.unsqueeze(3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_round_trip_through_the_model_range() {
        let pixels = Tensor::new(&[[[0u8, 1, 127], [128, 254, 255]]], &Device::Cpu).unwrap();
        let samples = from_pixels(&pixels).unwrap();
        assert_eq!(samples.dims(), &[1, 2, 3, 1]);
        let range = samples.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((range[0], range[5]), (-1.0, 1.0));
        assert_eq!(
            to_pixels(&samples).unwrap().to_vec3::<u8>().unwrap(),
            pixels.to_vec3::<u8>().unwrap()
        );
        // Out-of-range predictions are clamped, not wrapped.
        let wild = Tensor::new(&[[[[-3f32], [3.0]]]], &Device::Cpu).unwrap();
        assert_eq!(
            to_pixels(&wild)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap(),
            vec![0, 255]
        );
    }
}
