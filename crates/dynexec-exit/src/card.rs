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
pub const WEIGHTS_FILE: &str = "exits.safetensors";

/// What an exit model classifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    Text,
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

/// An exit model's card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitCard {
    pub task: String,
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
    pub labels: Vec<String>,
    /// Layers (or blocks) of the backbone; there is one exit after each.
    pub layers: usize,
    /// Hidden size of each exit head.
    pub head_hidden: usize,
    pub training: TrainingRecord,
    pub data: DataRecord,
    pub accuracy: AccuracyRecord,
    /// The policy `dynexec exits calibrate` chose, used by `classify` unless told otherwise.
    #[serde(default)]
    pub calibration: Option<CalibrationRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub mode: TrainMode,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Weight of each exit's cross-entropy in the loss.
    pub loss_weights: Vec<f32>,
    /// The command that reproduces these weights.
    pub command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataRecord {
    /// Where the data came from and how it was split.
    pub source: String,
    pub train: usize,
    pub val: usize,
    pub test: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccuracyRecord {
    /// Accuracy of each exit on its own.
    pub val_per_exit: Vec<f64>,
    pub test_per_exit: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrationRecord {
    pub policy: ExitPolicy,
    pub max_accuracy_drop: f64,
    pub val_full_accuracy: f64,
    pub val_accuracy: f64,
    pub val_mean_exit: f64,
    /// The same policy on the test split, for the record.
    pub test_full_accuracy: f64,
    pub test_accuracy: f64,
    pub test_mean_exit: f64,
}

impl ExitCard {
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

    pub fn write(&self, path: &Path) -> Result<()> {
        write_card(path, self)
    }

    /// The index of a label name.
    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }
}
