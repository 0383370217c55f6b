//! Training a text-UNet end to end: each training image's class gets the embeddings of the
//! prompts describing it, the UNet is built (or resumed from a saved model), trained, and
//! described by a card. `dynexec diffusion train` is this plus file handling.

use crate::schedule::NoiseSchedule;
use crate::text_unet::{
    check_context_dim, DiffusionCard, DiffusionTraining, SentenceEncoder, CARD_FILE, WEIGHTS_FILE,
};
use crate::train::{train, TrainEvent, TrainingSet};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dynexec_core::files::Resolve;
use dynexec_core::{Error, Result};
use dynexec_models::init::seeded_init;
use dynexec_models::unet::{Unet, UnetConfig};
use std::path::{Path, PathBuf};

/// What to train.
#[derive(Debug, Clone)]
pub struct UnetRecipe {
    /// Names of the image classes 0, 1, ..., as the prompts' labels spell them.
    pub labels: Vec<String>,
    /// The sentence encoder that embeds prompts (manifest name or folder).
    pub text_encoder: String,
    /// UNet channels per resolution (full resolution first).
    pub channels: Vec<usize>,
    /// Time and context embedding size.
    pub embed_dim: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Optimizer settings and the provenance recorded in the card (`final_loss` is filled in).
    pub training: DiffusionTraining,
    /// The default guidance scale recorded in the card.
    pub guidance_scale: f64,
    /// The converge policy's defaults recorded in the card.
    pub converge_epsilon: f64,
    /// Steps the converge policy finishes with.
    pub converge_finish_steps: usize,
    /// A saved model to continue training (its architecture and weights).
    pub resume: Option<PathBuf>,
}

/// A trained text-UNet: its card and weights.
pub struct TrainedUnet {
    /// What it is and how it was trained (both commands and the total steps when resumed).
    pub card: DiffusionCard,
    varmap: VarMap,
}

impl TrainedUnet {
    /// Writes `unet.safetensors` and `card.json` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.varmap.save(dir.join(WEIGHTS_FILE))?;
        self.card.write(&dir.join(CARD_FILE))
    }
}

/// Trains on u8 grey `images` `(n, h, w)` whose classes are `image_labels` (idx numbers as
/// text), conditioned on `prompts` (`(text, class name)`): every class needs a prompt and
/// every prompt a class of `recipe.labels`.
pub fn train_text_unet(
    hub: &dyn Resolve,
    device: &Device,
    images: &Tensor,
    image_labels: &[String],
    prompts: &[(String, String)],
    recipe: &UnetRecipe,
    on_event: impl FnMut(TrainEvent),
) -> Result<TrainedUnet> {
    let names = &recipe.labels;
    let labels = image_labels
        .iter()
        .map(|l| match l.parse::<usize>() {
            Ok(i) if i < names.len() => Ok(i),
            _ => Err(Error::InvalidArgument(format!(
                "image label {l} has no class name ({} names given)",
                names.len()
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    let encoder = SentenceEncoder::load(hub, &recipe.text_encoder, device)?;
    let mut class_prompts = Vec::with_capacity(names.len());
    for name in names {
        let texts: Vec<&str> = prompts
            .iter()
            .filter(|(_, l)| l == name)
            .map(|(t, _)| t.as_str())
            .collect();
        if texts.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no prompt is labelled `{name}`: every class needs prompts"
            )));
        }
        class_prompts.push(encoder.embed(&texts)?);
    }
    if let Some((_, l)) = prompts.iter().find(|(_, l)| !names.contains(l)) {
        return Err(Error::InvalidArgument(format!(
            "prompt label `{l}` is not one of the class names"
        )));
    }
    let previous = match &recipe.resume {
        Some(dir) => Some(DiffusionCard::read(&dir.join(CARD_FILE))?),
        None => None,
    };
    let config = match &previous {
        Some(card) => card.unet.clone(),
        None => UnetConfig {
            image_size: images.dim(1)?,
            in_channels: 1,
            channels: recipe.channels.clone(),
            context_dim: encoder.dim(),
            embed_dim: recipe.embed_dim,
            groups: recipe.groups,
        },
    };
    let mut varmap = VarMap::new();
    let unet = Unet::load(
        VarBuilder::from_varmap(&varmap, DType::F32, device),
        &config,
    )?;
    check_context_dim(&encoder, &config)?;
    seeded_init(&varmap, recipe.training.seed)?;
    if let Some(dir) = &recipe.resume {
        let weights = dir.join(WEIGHTS_FILE);
        varmap.load(&weights).map_err(|e| {
            Error::from(e).context(format!("loading {} to resume from", weights.display()))
        })?;
    }
    let schedule = NoiseSchedule::ddpm_linear();
    let mut record = recipe.training.clone();
    let set = TrainingSet {
        images,
        labels: &labels,
        class_prompts: &class_prompts,
    };
    record.final_loss = train(&unet, &varmap, &set, &schedule, &record, on_event)?;
    if let Some(card) = &previous {
        record.steps += card.training.steps;
        record.command = format!("{} && {}", card.training.command, record.command);
    }
    Ok(TrainedUnet {
        card: DiffusionCard {
            text_encoder: recipe.text_encoder.clone(),
            unet: config,
            schedule,
            guidance_scale: recipe.guidance_scale,
            labels: names.clone(),
            converge_epsilon: recipe.converge_epsilon,
            converge_finish_steps: recipe.converge_finish_steps,
            training: record,
        },
        varmap,
    })
}
