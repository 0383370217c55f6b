//! The JSON card saved next to trained exit weights: what the model is, how it was trained,
//! how accurate each exit is, and the calibrated exit policy.

use crate::policy::ExitPolicy;
use dynexec_core::card::{read_card, write_card};
use dynexec_core::{Error, Result};
use dynexec_models::cnn::CnnConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File names inside an exit model's folder.
pub const CARD_FILE: &str = "card.json";
/// The heads' weights (and the backbone's, when `backbone_in_weights`).
pub const WEIGHTS_FILE: &str = "exits.safetensors";

/// What an exit model classifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// Sentences, through a BERT-family encoder.
    Text,
    /// Images, through the small CNN.
    Image,
}

/// How the exits were trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// Heads only; the backbone keeps its pretrained weights.
    Frozen,
    /// Heads and backbone together.
    Joint,
}

impl TrainMode {
    /// What a task trains by default: a CNN (images) jointly from scratch, an encoder's
    /// heads alone.
    pub fn default_for(images: bool) -> Self {
        if images {
            Self::Joint
        } else {
            Self::Frozen
        }
    }

    /// AdamW's default learning rate: 3e-5 to fine-tune an encoder, 1e-3 for heads alone
    /// and for a CNN.
    pub fn default_learning_rate(self, images: bool) -> f64 {
        match (images, self) {
            (false, Self::Joint) => 3e-5,
            _ => 1e-3,
        }
    }
}

/// An exit model's card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitCard {
    /// Name of the task (by default, the data folder's name).
    pub task: String,
    /// Text or image inputs; decides which backbone fields must be set.
    pub kind: InputKind,
    /// Text: the encoder the heads sit on (a manifest name, `hf:` reference or path), whose
    /// config and tokenizer are used; its weights too unless `backbone_in_weights`.
    #[serde(default)]
    pub backbone: Option<String>,
    /// The weights file holds the backbone as well as the heads (joint training, the CNN).
    pub backbone_in_weights: bool,
    /// Image models: the CNN's shape.
    #[serde(default)]
    pub cnn: Option<CnnConfig>,
    /// Class names; output `i` of every head is `labels[i]`.
    pub labels: Vec<String>,
    /// Layers (or blocks) of the backbone; there is one exit after each.
    pub layers: usize,
    /// Hidden size of each exit head.
    pub head_hidden: usize,
    /// How the weights were trained.
    pub training: TrainingRecord,
    /// The data they were trained and tested on.
    pub data: DataRecord,
    /// Accuracy of each exit on the validation and test splits.
    pub accuracy: AccuracyRecord,
    /// The policy `dynexec exits calibrate` chose, used by `classify` unless told otherwise.
    #[serde(default)]
    pub calibration: Option<CalibrationRecord>,
}

/// The training settings of an exit model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// Heads only, or heads and backbone.
    pub mode: TrainMode,
    /// Passes over the training split.
    pub epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// Weight of each exit's cross-entropy in the loss.
    pub loss_weights: Vec<f32>,
    /// The command that reproduces these weights.
    pub command: String,
}

/// The data an exit model was trained and evaluated on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataRecord {
    /// Where the data came from and how it was split.
    pub source: String,
    /// Examples in the training split.
    pub train: usize,
    /// Examples in the validation split.
    pub val: usize,
    /// Examples in the test split.
    pub test: usize,
}

/// Per-exit accuracy of an exit model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccuracyRecord {
    /// Accuracy of each exit on its own.
    pub val_per_exit: Vec<f64>,
    /// The same on the test split.
    pub test_per_exit: Vec<f64>,
}

/// The calibrated exit policy and how it did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrationRecord {
    /// The chosen policy.
    pub policy: ExitPolicy,
    /// The accuracy it was allowed to lose against full depth, as a fraction.
    pub max_accuracy_drop: f64,
    /// Full-depth accuracy on the validation split, where it was calibrated.
    pub val_full_accuracy: f64,
    /// The policy's accuracy on the validation split.
    pub val_accuracy: f64,
    /// Mean 1-based exit on the validation split.
    pub val_mean_exit: f64,
    /// The same policy on the test split, for the record.
    pub test_full_accuracy: f64,
    /// The policy's accuracy on the test split.
    pub test_accuracy: f64,
    /// Mean 1-based exit on the test split.
    pub test_mean_exit: f64,
}

impl ExitCard {
    /// The policy `text` names for this model: `calibrated` is the card's own (full depth
    /// when it has none), anything else is parsed and checked against the model's exits.
    pub fn policy(&self, text: &str) -> Result<ExitPolicy> {
        if text == "calibrated" {
            return Ok(self
                .calibration
                .as_ref()
                .map_or(ExitPolicy::Full, |c| c.policy.clone()));
        }
        let policy = ExitPolicy::parse(text)?;
        policy.check(self.layers)?;
        Ok(policy)
    }

    /// The card of a classifier about to be trained: what [`crate::assemble::Untrained`]
    /// completes (layers, head size, loss weights) and training fills in (accuracy).
    pub fn for_training(
        task: String,
        kind: InputKind,
        backbone: Option<String>,
        labels: Vec<String>,
        training: TrainingRecord,
        data: DataRecord,
    ) -> Self {
        Self {
            task,
            kind,
            backbone,
            backbone_in_weights: training.mode == TrainMode::Joint,
            cnn: None,
            labels,
            layers: 0,
            head_hidden: 0,
            training,
            data,
            accuracy: AccuracyRecord::default(),
            calibration: None,
        }
    }

    /// Reads a card, checking it is complete for its kind (labels, layers, backbone or CNN
    /// shape); an incomplete card is [`Error::InvalidModel`].
    pub fn read(path: &Path) -> Result<Self> {
        let card: Self = read_card(path, "an exit-model card")?;
        let invalid = |message: String| Error::InvalidModel {
            path: path.to_path_buf(),
            message,
        };
        if card.labels.len() < 2 || card.layers == 0 {
            return Err(invalid(
                "a card needs two or more labels and one or more layers".into(),
            ));
        }
        match card.kind {
            InputKind::Text if card.backbone.is_none() => Err(invalid(
                "a text model's card must name its backbone encoder".into(),
            )),
            InputKind::Image if card.cnn.is_none() => Err(invalid(
                "an image model's card must give its `cnn` shape".into(),
            )),
            _ => Ok(card),
        }
    }

    /// Writes the card as JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_card(path, self)
    }

    /// The index of a label name.
    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }
}
