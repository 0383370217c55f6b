//! A new exit classifier, assembled, trained and saved: a backbone (a CNN from scratch, or an
//! encoder frozen or trainable), an exit head after every layer, the variables to train, the
//! accuracy of every exit recorded in its card. `dynexec exits train` is this plus data
//! loading and output.

use crate::card::{AccuracyRecord, ExitCard, TrainMode, CARD_FILE, WEIGHTS_FILE};
use crate::data::Splits;
use crate::model::{Backbone, ExitClassifier};
use crate::train::{depth_weights, seeded_init, train, TrainEvent};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_models::bert::{Bert, EncoderFiles};
use dynexec_models::cnn::{Cnn, CnnConfig};
use std::collections::HashMap;
use std::path::Path;

/// What a new classifier's backbone is.
pub enum NewBackbone {
    /// A CNN trained from scratch with the heads (only [`TrainMode::Joint`]).
    Cnn(CnnConfig),
    /// A pretrained encoder, frozen or fine-tuned with the heads per the card's mode.
    Encoder(EncoderFiles),
}

/// An exit classifier with freshly initialised heads, ready for [`crate::train::train`].
pub struct Untrained {
    /// The classifier; its card is complete but for accuracy and calibration.
    pub classifier: ExitClassifier,
    heads: VarMap,
    /// The backbone's variables when it trains too.
    backbone: Option<VarMap>,
}

impl Untrained {
    /// Builds the classifier `card` describes on `backbone`, filling in the card's `cnn`,
    /// `layers`, `head_hidden` (default: the encoder's hidden size, 64 for the CNN) and loss
    /// weights (default growing with depth). Heads are drawn from `card.training.seed`.
    pub fn build(
        backbone: NewBackbone,
        mut card: ExitCard,
        head_hidden: Option<usize>,
        loss_weights: Option<Vec<f32>>,
        device: &Device,
    ) -> Result<Self> {
        let heads = VarMap::new();
        let (backbone, backbone_vars) = match backbone {
            NewBackbone::Cnn(config) => {
                if card.training.mode == TrainMode::Frozen {
                    return Err(Error::InvalidArgument(
                        "the CNN is trained from scratch, so its backbone cannot be frozen: train it jointly".into(),
                    ));
                }
                let cnn = Cnn::load(VarBuilder::from_varmap(&heads, DType::F32, device), &config)?;
                card.cnn = Some(config);
                card.head_hidden = head_hidden.unwrap_or(64);
                (Backbone::Image { cnn }, None)
            }
            NewBackbone::Encoder(encoder) => {
                let (bert, tokenizer, vars) = match card.training.mode {
                    TrainMode::Frozen => {
                        let (bert, tokenizer) = encoder.load(device)?;
                        (bert, tokenizer, None)
                    }
                    TrainMode::Joint => {
                        let (bert, vars) =
                            Bert::load_trainable(&encoder.config, &encoder.weights, device)?;
                        (
                            bert,
                            TextTokenizer::from_file(&encoder.tokenizer)?,
                            Some(vars),
                        )
                    }
                };
                card.head_hidden = head_hidden.unwrap_or(bert.config().hidden_size);
                (Backbone::Text { bert, tokenizer }, vars)
            }
        };
        // candle's CPU random numbers cannot be seeded: draw the fresh weights ourselves.
        seeded_init(&heads, card.training.seed)?;
        card.layers = backbone.num_layers();
        card.training.loss_weights = loss_weights.unwrap_or_else(|| depth_weights(card.layers));
        let classifier = ExitClassifier::new(
            backbone,
            VarBuilder::from_varmap(&heads, DType::F32, device),
            card,
            device,
        )?;
        Ok(Self {
            classifier,
            heads,
            backbone: backbone_vars,
        })
    }

    /// The variables training updates: the heads, and the backbone's when it trains.
    pub fn trainable(&self) -> Vec<Var> {
        let mut vars = self.heads.all_vars();
        if let Some(backbone) = &self.backbone {
            vars.extend(backbone.all_vars());
        }
        vars
    }

    /// Writes every trained variable into one safetensors file.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        save_varmaps(&[Some(&self.heads), self.backbone.as_ref()], path)
    }

    /// Trains on `splits.train` (reporting every epoch on `splits.val`), then measures every
    /// exit on `splits.test` in batches of `batch_size`; the card records both accuracies.
    /// `on_tested` hears how many test inputs are done.
    pub fn train(
        mut self,
        splits: &Splits,
        batch_size: usize,
        on_event: impl FnMut(TrainEvent),
        on_tested: impl FnMut(usize),
    ) -> Result<Self> {
        let record = self.classifier.card.training.clone();
        let val = train(
            &self.classifier,
            self.trainable(),
            &splits.train,
            &splits.val,
            &record,
            on_event,
        )?;
        let test = self
            .classifier
            .predict(&splits.test, batch_size, on_tested)?;
        self.classifier.card.accuracy = AccuracyRecord {
            val_per_exit: val.accuracy_per_exit(),
            test_per_exit: test.accuracy_per_exit(),
        };
        Ok(self)
    }

    /// Writes the weights and the card into `dir` (created if needed): what
    /// `ExitClassifier::load` reads back.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.save_weights(&dir.join(WEIGHTS_FILE))?;
        self.classifier.card.write(&dir.join(CARD_FILE))
    }
}

/// Every variable of the maps, in one safetensors file.
pub fn save_varmaps(maps: &[Option<&VarMap>], path: &Path) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for map in maps.iter().flatten() {
        let data = map
            .data()
            .lock()
            .map_err(|_| Error::InvalidArgument("a variable map was poisoned by a panic".into()))?;
        for (name, var) in data.iter() {
            tensors.insert(name.clone(), var.as_tensor().detach());
        }
    }
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| Error::from(e).context(format!("writing {}", path.display())))
}
