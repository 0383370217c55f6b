//! A backbone with an exit head after every layer, run layer by layer until a policy stops.

use crate::calibrate::ExitPredictions;
use crate::card::{ExitCard, InputKind, CARD_FILE, WEIGHTS_FILE};
use crate::data::Examples;
use crate::heads::ExitHeads;
use crate::policy::{softmax, ExitDecision, ExitPolicy};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dynexec_core::files::Resolve;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_models::bert::{mean_pool, pad_batch, Bert, EncoderFiles};
use dynexec_models::cnn::Cnn;
use std::path::Path;

/// The network the exits read from.
pub enum Backbone {
    /// A BERT-family encoder and its tokenizer; exits read mean-pooled hidden states.
    Text {
        /// The encoder whose layers the exits follow.
        bert: Bert,
        /// Turns input text into the encoder's token ids.
        tokenizer: TextTokenizer,
    },
    /// The small CNN; exits read each block's output, flattened ([`image_features`]).
    Image {
        /// The CNN whose blocks the exits follow.
        cnn: Cnn,
    },
}

/// A batch part-way through the backbone.
enum State {
    Text {
        hidden: Tensor,
        attention_bias: Tensor,
        mask: Tensor,
    },
    Image {
        activation: Tensor,
    },
}

impl State {
    /// Keeps only the batch rows `rows` (inputs that have not exited yet).
    fn keep(&self, rows: &Tensor) -> Result<Self> {
        Ok(match self {
            State::Text {
                hidden,
                attention_bias,
                mask,
            } => State::Text {
                hidden: hidden.index_select(rows, 0)?,
                attention_bias: attention_bias.index_select(rows, 0)?,
                mask: mask.index_select(rows, 0)?,
            },
            State::Image { activation } => State::Image {
                activation: activation.index_select(rows, 0)?,
            },
        })
    }
}

impl Backbone {
    /// Encoder layers, or CNN blocks: one exit follows each.
    pub fn num_layers(&self) -> usize {
        match self {
            Backbone::Text { bert, .. } => bert.num_layers(),
            Backbone::Image { cnn } => cnn.num_blocks(),
        }
    }

    /// Size of the features each exit head reads.
    pub fn feature_dims(&self) -> Vec<usize> {
        match self {
            Backbone::Text { bert, .. } => vec![bert.config().hidden_size; bert.num_layers()],
            Backbone::Image { cnn } => (0..cnn.num_blocks())
                .map(|b| {
                    let (h, w, c) = cnn.config().block_output(b);
                    let f = image_pool_factor(h);
                    (h / f) * (w / f) * c
                })
                .collect(),
        }
    }

    fn begin(&self, inputs: &Examples, device: &Device) -> Result<State> {
        match (self, inputs) {
            (Backbone::Text { bert, tokenizer }, Examples::Text(texts)) => {
                let encoded = texts
                    .iter()
                    .map(|t| tokenizer.encode(t))
                    .collect::<Result<Vec<_>>>()?;
                let (ids, mask) = pad_batch(&encoded, device)?;
                Ok(State::Text {
                    hidden: bert.embed(&ids)?,
                    attention_bias: bert.attention_bias(&mask)?,
                    mask,
                })
            }
            (Backbone::Image { cnn }, Examples::Images(pixels)) => Ok(State::Image {
                activation: cnn.prepare(&pixels.to_device(device)?)?,
            }),
            (Backbone::Text { .. }, _) => Err(Error::InvalidArgument(
                "this is a text classifier: give it sentences, not images".into(),
            )),
            (Backbone::Image { .. }, _) => Err(Error::InvalidArgument(
                "this is an image classifier: give it image files, not text".into(),
            )),
        }
    }

    /// Runs layer `layer` and returns the exit features after it, `(batch, dim)`.
    fn advance(&self, state: &mut State, layer: usize) -> Result<Tensor> {
        match (self, state) {
            (
                Backbone::Text { bert, .. },
                State::Text {
                    hidden,
                    attention_bias,
                    mask,
                },
            ) => {
                *hidden = bert.forward_layers(hidden, attention_bias, layer..layer + 1)?;
                mean_pool(hidden, mask)
            }
            (Backbone::Image { cnn }, State::Image { activation }) => {
                *activation = cnn.forward_blocks(activation, layer..layer + 1)?;
                image_features(activation)
            }
            _ => Err(Error::InvalidArgument(
                "input and backbone kinds differ".into(),
            )),
        }
    }
}

/// Early blocks' maps are average-pooled down to at most 13 pixels a side before the head, so
/// every head stays small.
fn image_pool_factor(side: usize) -> usize {
    side.div_ceil(13).max(1)
}

/// An image exit's features: a block's channels-last output, average-pooled while larger than
/// 13 pixels a side, flattened to `(batch, dim)`.
pub fn image_features(activation: &Tensor) -> Result<Tensor> {
    let (batch, h, w, c) = activation.dims4()?;
    let f = image_pool_factor(h);
    let x = if f > 1 {
        let (h2, w2) = (h / f, w / f);
        activation
            .narrow(1, 0, h2 * f)?
            .narrow(2, 0, w2 * f)?
            .reshape((batch, h2, f, w2, f, c))?
            .mean(4)?
            .mean(2)?
    } else {
        activation.clone()
    };
    Ok(x.flatten_from(1)?)
}

/// A backbone, its exit heads and their card.
pub struct ExitClassifier {
    /// The network the heads read from.
    pub backbone: Backbone,
    /// One head per layer of the backbone.
    pub heads: ExitHeads,
    /// Labels, training record and calibrated policy.
    pub card: ExitCard,
    /// Where the backbone and heads live.
    pub device: Device,
}

/// One input's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    /// The predicted class's name.
    pub label: String,
    /// The predicted class's index into the card's labels.
    pub class: usize,
    /// The exit's probability of that class.
    pub confidence: f32,
    /// 1-based layer the input exited after.
    pub exit_layer: usize,
}

impl ExitClassifier {
    /// Converts the encoder's linear layers to `format`; a CNN has none to convert (its
    /// convolutions stay f32), which is an error.
    pub fn quantize(&mut self, format: dynexec_models::linear::WeightFormat) -> Result<()> {
        match &mut self.backbone {
            Backbone::Text { bert, .. } => {
                dynexec_models::quantize::quantize_in_place(bert, format)?;
                Ok(())
            }
            Backbone::Image { .. } => Err(Error::InvalidArgument(
                "quantization applies to encoders' linear layers; the CNN has none (its convolutions stay f32)".into(),
            )),
        }
    }

    /// Builds the heads for `backbone` from `vb` (a file, or a `VarMap` to train them).
    pub fn new(
        backbone: Backbone,
        vb: VarBuilder,
        card: ExitCard,
        device: &Device,
    ) -> Result<Self> {
        let dims = backbone.feature_dims();
        if dims.len() != card.layers {
            return Err(Error::InvalidArgument(format!(
                "the card describes {} layers but the backbone has {}",
                card.layers,
                dims.len()
            )));
        }
        let heads = ExitHeads::load(vb, &dims, card.head_hidden, card.labels.len())?;
        Ok(Self {
            backbone,
            heads,
            card,
            device: device.clone(),
        })
    }

    /// Loads an exit model by manifest name or folder (holding card.json), pulling it — and,
    /// for text, the encoder its card names — when needed.
    pub fn load(hub: &dyn Resolve, reference: &str, device: &Device) -> Result<Self> {
        let files = hub.resolve(reference)?;
        let card_path = files.find(CARD_FILE).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "`{reference}` is not an exit model: it has no {CARD_FILE} (train one with `dynexec exits train`)"
            ))
        })?;
        let dir = card_path.parent().unwrap_or(Path::new("."));
        let card = ExitCard::read(card_path)?;
        if card.kind == InputKind::Image {
            return Self::load_image(dir, card, device);
        }
        let backbone = card.backbone.clone().unwrap_or_default();
        let encoder = EncoderFiles::find(&hub.resolve(&backbone)?, None)?;
        // A jointly trained encoder's weights are in the exit model's own file.
        let weights = match card.backbone_in_weights {
            true => vec![dir.join(WEIGHTS_FILE)],
            false => encoder.weights.clone(),
        };
        let bert = Bert::load(&encoder.config, &weights, DType::F32, device)?;
        let tokenizer = TextTokenizer::from_file(&encoder.tokenizer)?;
        let vb = open_weights(dir, device)?;
        Self::new(Backbone::Text { bert, tokenizer }, vb, card, device)
    }

    /// Loads an image classifier (CNN and heads) from its folder.
    fn load_image(dir: &Path, card: ExitCard, device: &Device) -> Result<Self> {
        let vb = open_weights(dir, device)?;
        let config = card.cnn.clone().unwrap_or_default();
        let cnn = Cnn::load(vb.clone(), &config)?;
        Self::new(Backbone::Image { cnn }, vb, card, device)
    }

    /// Exit heads: one per backbone layer.
    pub fn num_exits(&self) -> usize {
        self.heads.len()
    }

    /// Logits of every exit for a batch: `(batch, classes)` per exit.
    pub fn all_exit_logits(&self, inputs: &Examples) -> Result<Vec<Tensor>> {
        let mut state = self.backbone.begin(inputs, &self.device)?;
        (0..self.num_exits())
            .map(|layer| {
                let features = self.backbone.advance(&mut state, layer)?;
                self.heads.logits(layer, &features)
            })
            .collect()
    }

    /// Exit features of every layer (no head): the frozen-backbone training inputs.
    pub fn all_exit_features(&self, inputs: &Examples) -> Result<Vec<Tensor>> {
        let mut state = self.backbone.begin(inputs, &self.device)?;
        (0..self.num_exits())
            .map(|layer| self.backbone.advance(&mut state, layer))
            .collect()
    }

    /// Classifies a batch, running each input only until `policy` stops it: inputs that exit
    /// leave the batch, the rest go on to the next layer.
    pub fn classify(&self, inputs: &Examples, policy: &ExitPolicy) -> Result<Vec<Classified>> {
        policy.check(self.num_exits())?;
        let total = match inputs {
            Examples::Text(t) => t.len(),
            Examples::Images(p) => p.dim(0)?,
        };
        if total == 0 {
            return Ok(Vec::new());
        }
        let mut state = self.backbone.begin(inputs, &self.device)?;
        let mut runs: Vec<_> = (0..total).map(|_| policy.start(self.num_exits())).collect();
        let mut running: Vec<usize> = (0..total).collect();
        let mut answers: Vec<Option<ExitDecision>> = vec![None; total];
        for layer in 0..self.num_exits() {
            let features = self.backbone.advance(&mut state, layer)?;
            let logits = self.heads.logits(layer, &features)?.to_vec2::<f32>()?;
            let mut keep = Vec::with_capacity(running.len());
            for (row, (&input, logits)) in running.iter().zip(&logits).enumerate() {
                match runs[input].observe(layer, &softmax(logits)) {
                    Some(decision) => answers[input] = Some(decision),
                    None => keep.push(row),
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() < running.len() {
                let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
                state = state.keep(&Tensor::from_vec(rows, keep.len(), &self.device)?)?;
                running = keep.iter().map(|&r| running[r]).collect();
            }
        }
        answers
            .into_iter()
            .map(|d| {
                let d = d.ok_or_else(|| {
                    Error::InvalidArgument("an input never reached an exit".into())
                })?;
                Ok(Classified {
                    label: self.card.labels[d.class].clone(),
                    class: d.class,
                    confidence: d.confidence,
                    exit_layer: d.exit + 1,
                })
            })
            .collect()
    }

    /// Every exit's class probabilities for a labelled data set, in batches.
    pub fn predict(
        &self,
        data: &crate::data::Dataset,
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<ExitPredictions> {
        let labels = data.label_indices(&self.card.labels)?;
        let mut probs = Vec::with_capacity(data.len());
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(batch_size.max(1)) {
            let logits = self.all_exit_logits(&data.select(chunk)?)?;
            let per_exit = logits
                .iter()
                .map(|l| l.to_vec2::<f32>())
                .collect::<candle_core::Result<Vec<_>>>()?;
            for row in 0..chunk.len() {
                probs.push(per_exit.iter().map(|e| softmax(&e[row])).collect());
            }
            progress(chunk.len());
        }
        Ok(ExitPredictions { probs, labels })
    }
}

fn open_weights(dir: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() {
        return Err(Error::MissingFile(path));
    }
    // SAFETY: read-only mapping of a file dynexec does not modify while it is open.
    unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device) }.map_err(|e| {
        Error::InvalidModel {
            path,
            message: format!("{e} (corrupt exit weights? retrain or pull the model again)"),
        }
    })
}
