//! Per-token early exit for decoders (CALM): each generated token may leave the model at an
//! exit layer when a confidence measure says the deeper layers would not change it.
//!
//! At an exit layer, a small adapter maps the hidden state into what the final norm and the
//! shared LM head expect (a residual low-rank map `h + up(down(h))`, trained by distillation
//! from the final layer on text the model generates). The skipped layers still get keys and
//! values for the token, so later tokens can attend to it there: by default they run later,
//! with the next token that goes deeper (exact), or at once from the exited hidden state
//! (CALM's state propagation, `:propagate`). Whether a token leaves is decided by a measure
//! ([`TokenExitPolicy`]): the exit's softmax confidence, the saturation of the hidden state,
//! or a learned classifier per exit ([`crate::exit_classifier`]) stored with the adapters.

use crate::exit_classifier::{ClassifierCard, ExitClassifiers};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};
use dynexec_core::card::read_card;
use dynexec_core::{Error, Result, Setting};
use dynexec_models::kv_cache::KvCache;
use dynexec_models::llama::Llama;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The adapters' weights, inside their folder.
pub const ADAPTERS_FILE: &str = "adapters.safetensors";
/// The adapters' card ([`AdapterCard`]), beside the weights.
pub const ADAPTERS_CARD: &str = "adapters.json";

/// What the adapters are and how they were made.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdapterCard {
    /// The decoder they belong to (manifest name).
    pub model: String,
    /// Exit layers: an exit after layer `l` (1-based) reads the residual stream there.
    pub layers: Vec<usize>,
    /// Inner size of each low-rank adapter.
    pub rank: usize,
    /// The decoder's hidden size (checked on load).
    pub hidden_size: usize,
    /// The decoder's vocabulary size (checked on load).
    pub vocab_size: usize,
    /// How the adapters were trained.
    pub training: AdapterTraining,
    /// Held-out positions where the exit's top token equals the final layer's, per exit:
    /// with the shared head alone (before training) and through the adapter.
    pub agreement_before: Vec<f64>,
    /// The same through the trained adapter.
    pub agreement_after: Vec<f64>,
    /// The exit classifiers stored with the adapters (`classifier:T`), if trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier: Option<ClassifierCard>,
}

/// How exit adapters were trained.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdapterTraining {
    /// Where the prompts came from and how the training text was generated from them.
    pub prompts: String,
    /// Token sequences the distillation data came from.
    pub sequences: usize,
    /// Positions trained on.
    pub positions: usize,
    /// Positions held out to measure agreement.
    pub held_out_positions: usize,
    /// Passes over the training positions.
    pub epochs: usize,
    /// Positions per optimizer step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// Seed of the shuffling.
    pub seed: u64,
    /// What the adapters were trained to match (empty in cards older than this field).
    #[serde(default)]
    pub objective: String,
    /// The command that reproduces these adapters.
    pub command: String,
}

/// `h + up(down(h))`, `down: hidden → rank`, `up: rank → hidden` (zero at initialisation, so
/// an untrained adapter is the identity).
#[derive(Debug, Clone)]
struct Adapter {
    down: candle_nn::Linear,
    up: candle_nn::Linear,
}

impl Adapter {
    fn load(vb: VarBuilder, hidden: usize, rank: usize) -> Result<Self> {
        let down = vb.pp("down").get_with_hints(
            (rank, hidden),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: (1.0 / hidden as f64).sqrt(),
            },
        )?;
        let up = vb
            .pp("up")
            .get_with_hints((hidden, rank), "weight", Init::Const(0.0))?;
        Ok(Self {
            down: candle_nn::Linear::new(down, None),
            up: candle_nn::Linear::new(up, None),
        })
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        Ok((h + self.up.forward(&self.down.forward(h)?)?)?)
    }
}

/// The exit adapters of one decoder.
#[derive(Debug, Clone)]
pub struct ExitAdapters {
    adapters: Vec<Adapter>,
    classifiers: Option<ExitClassifiers>,
    /// What the adapters are: exit layers, shapes, training record.
    pub card: AdapterCard,
}

impl ExitAdapters {
    /// Creates (over a `VarMap`) or loads adapters named `adapters.{layer}.{down,up}.weight`,
    /// and the exit classifiers (`classifiers.{layer}.{weight,bias}`) when the card has them.
    pub fn new(vb: VarBuilder, card: AdapterCard) -> Result<Self> {
        let adapters = card
            .layers
            .iter()
            .map(|l| Adapter::load(vb.pp(format!("adapters.{l}")), card.hidden_size, card.rank))
            .collect::<Result<_>>()?;
        let classifiers = match card.classifier {
            Some(_) => Some(ExitClassifiers::new(vb, &card.layers, card.hidden_size)?),
            None => None,
        };
        Ok(Self {
            adapters,
            classifiers,
            card,
        })
    }

    /// Adds trained exit classifiers and their record.
    pub fn set_classifiers(&mut self, classifiers: ExitClassifiers, card: ClassifierCard) {
        self.classifiers = Some(classifiers);
        self.card.classifier = Some(card);
    }

    /// The exit classifiers, if these adapters carry them.
    pub fn classifiers(&self) -> Option<&ExitClassifiers> {
        self.classifiers.as_ref()
    }

    /// Fresh adapters for training, over the returned variables: the down projections drawn
    /// from `seed`, the up projections zero, so an untrained adapter is the identity.
    pub fn untrained(card: AdapterCard, seed: u64, device: &Device) -> Result<(Self, VarMap)> {
        let vars = VarMap::new();
        let adapters = Self::new(VarBuilder::from_varmap(&vars, DType::F32, device), card)?;
        crate::train::seeded_init(&vars, seed)?;
        let data = vars
            .data()
            .lock()
            .map_err(|_| Error::InvalidArgument("a variable map was poisoned by a panic".into()))?;
        for (name, var) in data.iter() {
            if name.ends_with("up.weight") {
                var.set(&var.zeros_like()?)?;
            }
        }
        drop(data);
        Ok((adapters, vars))
    }

    /// Reads `adapters.json` and `adapters.safetensors` from a folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let card_path = dir.join(ADAPTERS_CARD);
        let card: AdapterCard = read_card(&card_path, "an exit-adapter card")?;
        let weights = dir.join(ADAPTERS_FILE);
        if !weights.exists() {
            return Err(Error::MissingFile(weights));
        }
        // SAFETY: read-only mapping of a file dynexec does not modify while it is open.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }?;
        Self::new(vb, card).map_err(|e| Error::InvalidModel {
            path: weights,
            message: format!("{e} (corrupt adapters? train them again)"),
        })
    }

    /// Checks the adapters were made for a model of this shape.
    pub fn check(&self, model: &Llama) -> Result<()> {
        let c = &self.card;
        let layers = model.num_layers();
        if c.hidden_size != model.config().hidden_size
            || c.vocab_size != model.vocab_size()
            || c.layers.iter().any(|&l| l == 0 || l >= layers)
            || c.layers.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(Error::InvalidArgument(format!(
                "these exit adapters were trained for `{}` (hidden {}, vocabulary {}, exits after increasing layers {:?}), not for this model (hidden {}, vocabulary {}, {layers} layers)",
                c.model,
                c.hidden_size,
                c.vocab_size,
                c.layers,
                model.config().hidden_size,
                model.vocab_size()
            )));
        }
        Ok(())
    }

    /// Logits `(vocab,)` of exit `index` for a last-position hidden state `(1, 1, hidden)`.
    pub fn exit_logits(&self, model: &Llama, index: usize, hidden: &Tensor) -> Result<Tensor> {
        Ok(model.head(&self.adapt(index, hidden)?)?.flatten_all()?)
    }

    /// Exit `index`'s adapter applied to a hidden state.
    pub fn adapt(&self, index: usize, hidden: &Tensor) -> Result<Tensor> {
        self.adapters[index].forward(hidden)
    }

    /// The index of the exit after layer `layer` (1-based), if there is one.
    pub fn exit_index(&self, layer: usize) -> Option<usize> {
        self.card.layers.iter().position(|&l| l == layer)
    }
}

/// What decides whether a token leaves at an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitMeasure {
    /// The exit's top-1 minus top-2 softmax probability (0–1; costs one LM head per exit
    /// tried).
    Confidence,
    /// The cosine similarity of the hidden state before and after the exit layer (-1–1;
    /// costs almost nothing).
    Saturation,
    /// The exit's learned classifier ([`crate::exit_classifier`]): its probability that the
    /// exit's top token is the final layer's (0–1; costs one dot product).
    Classifier,
}

impl ExitMeasure {
    fn name(self) -> &'static str {
        match self {
            Self::Confidence => "confidence",
            Self::Saturation => "saturation",
            Self::Classifier => "classifier",
        }
    }
}

/// How the layers a token skipped get its keys and values, which later tokens attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SkippedLayers {
    /// At once, from the exit's hidden state (CALM's state propagation): nothing more is
    /// computed, but later tokens attend to approximate keys and values there, and the
    /// error compounds as more tokens exit.
    Propagate,
    /// Later: the next token that runs those layers runs them for the exited positions too,
    /// in the same forward (a few rows more through weights read once), so every key and
    /// value is the full-depth one and only the exited tokens' own predictions change.
    Defer,
}

/// When a token may stop at an exit, and what happens to the layers it skips.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenExitPolicy {
    /// The measure.
    pub measure: ExitMeasure,
    /// The least score that exits; above the measure's range (above 1) never exits early.
    pub threshold: f32,
    /// How skipped layers get the token's keys and values.
    pub skipped: SkippedLayers,
}

impl TokenExitPolicy {
    /// Parses `MEASURE:T[:defer|:propagate]`, MEASURE one of `confidence`, `saturation` and
    /// `classifier` (skipped layers default to `defer`).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            Error::BadSpec {
                setting: Setting::EarlyExit,
                spec: text.to_string(),
                help: "write confidence:T (top-1 minus top-2 probability, 0–1), saturation:T (cosine of consecutive hidden states, -1–1) or classifier:T (the exit classifier's probability that the exit agrees with the last layer, 0–1), optionally followed by :defer (skipped layers run later with the next deeper token; the default) or :propagate (their keys and values come from the exit state); above 1 never exits early".into(),
            }
        };
        let mut parts = text.split(':');
        let (kind, value) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
        let skipped = match parts.next() {
            None | Some("defer") => SkippedLayers::Defer,
            Some("propagate") => SkippedLayers::Propagate,
            Some(_) => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        let threshold: f32 = value.trim().parse().map_err(|_| bad())?;
        // Below a measure's range a threshold means nothing more than its floor (0 for a
        // probability, -1 for a cosine, both: always exit): refuse it as a likely typo.
        let (measure, floor) = match kind {
            "confidence" => (ExitMeasure::Confidence, 0.0),
            "saturation" => (ExitMeasure::Saturation, -1.0),
            "classifier" => (ExitMeasure::Classifier, 0.0),
            _ => return Err(bad()),
        };
        if !threshold.is_finite() || threshold < floor {
            return Err(bad());
        }
        Ok(Self {
            measure,
            threshold,
            skipped,
        })
    }

    /// Whether a token whose measure scored `score` leaves at this exit.
    pub fn exits_at(&self, score: f32) -> bool {
        score >= self.threshold
    }
}

impl std::fmt::Display for TokenExitPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.measure.name(), self.threshold)?;
        match self.skipped {
            SkippedLayers::Defer => Ok(()),
            SkippedLayers::Propagate => write!(f, ":propagate"),
        }
    }
}

/// A token that left early and whose skipped layers have not run yet.
struct Deferred {
    /// Its residual stream after `done` layers, `(1, 1, hidden)`.
    hidden: Tensor,
    /// Layers it has run.
    done: usize,
}

/// A decoder stepping with per-token early exit. Every step records the layer it left at.
pub struct TokenExit<'a> {
    /// The decoder.
    pub model: &'a Llama,
    /// Its exit adapters, checked against it.
    pub adapters: &'a ExitAdapters,
    /// When a token may stop at an exit.
    pub policy: TokenExitPolicy,
    /// Layers each decoded token ran (1-based exit layer, or the model's depth).
    pub exit_layers: Vec<usize>,
    /// Exited positions whose skipped layers wait for the next deeper token, in position
    /// order. Their `done` never increases along the list (a later position that ran a
    /// layer took every earlier waiting one through it), so the positions waiting for any
    /// layer are a suffix.
    deferred: Vec<Deferred>,
    /// The cache's length after the last step: deferred positions belong to that cache.
    cache_len: Option<usize>,
}

impl<'a> TokenExit<'a> {
    /// A stepper over `model`; fails if `adapters` were made for a model of another shape,
    /// or carry no classifiers for a `classifier:T` policy.
    pub fn new(
        model: &'a Llama,
        adapters: &'a ExitAdapters,
        policy: TokenExitPolicy,
    ) -> Result<Self> {
        adapters.check(model)?;
        if policy.measure == ExitMeasure::Classifier && adapters.classifiers.is_none() {
            return Err(Error::InvalidArgument(format!(
                "these exit adapters for `{}` carry no exit classifiers, which {policy} needs: train them with `dynexec exits train-adapters` (--keep-adapters DIR adds classifiers to trained adapters), or use confidence:T or saturation:T",
                adapters.card.model
            )));
        }
        Ok(Self {
            model,
            adapters,
            policy,
            exit_layers: Vec::new(),
            deferred: Vec::new(),
            cache_len: None,
        })
    }

    /// Runs `layers` on `hidden`, first taking the deferred positions waiting for each layer
    /// through it in the same forward.
    fn run_layers(
        &mut self,
        hidden: &Tensor,
        layers: std::ops::Range<usize>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if self.deferred.is_empty() {
            return self.model.forward_layers(hidden, layers, cache, None);
        }
        let mut x = hidden.clone();
        for l in layers {
            let waiting = self
                .deferred
                .iter()
                .rev()
                .take_while(|d| d.done == l)
                .count();
            if waiting == 0 {
                x = self.model.forward_layers(&x, l..l + 1, cache, None)?;
                continue;
            }
            let from = self.deferred.len() - waiting;
            let mut rows: Vec<Tensor> = self.deferred[from..]
                .iter()
                .map(|d| d.hidden.clone())
                .collect();
            rows.push(x.clone());
            let out = self
                .model
                .forward_layers(&Tensor::cat(&rows, 1)?, l..l + 1, cache, None)?;
            for (i, d) in self.deferred[from..].iter_mut().enumerate() {
                d.hidden = out.narrow(1, i, 1)?;
                d.done = l + 1;
            }
            x = out.narrow(1, waiting, x.dim(1)?)?;
        }
        let depth = self.model.num_layers();
        self.deferred.retain(|d| d.done < depth);
        Ok(x)
    }

    /// Next-token logits `(vocab,)` after `ids`. Several ids (a prompt) run at full depth;
    /// one id may exit early, leaving its skipped layers to the policy's [`SkippedLayers`].
    /// A stepper serves one sequence: `cache` must be the one its earlier steps filled (under
    /// `:defer` its deep layers may hold fewer positions than its first, so it is not a cache
    /// to reuse for another prompt).
    pub fn step(&mut self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if !self.deferred.is_empty() && self.cache_len != Some(cache.len()) {
            return Err(Error::InvalidArgument(
                "an early-exit stepper with deferred layers was given another sequence's cache: make one TokenExit per sequence".into(),
            ));
        }
        let logits = self.step_on(ids, cache)?;
        self.cache_len = Some(cache.len());
        Ok(logits)
    }

    fn step_on(&mut self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let depth = self.model.num_layers();
        let input = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let mut hidden = self.model.embed(&input)?;
        if ids.len() != 1 {
            hidden = self.run_layers(&hidden, 0..depth, cache)?;
            let last = hidden.narrow(1, ids.len().saturating_sub(1), 1)?;
            return Ok(self.model.head(&last)?.flatten_all()?);
        }
        let mut done = 0;
        for (index, &layer) in self.adapters.card.layers.iter().enumerate() {
            let exit_logits = match self.policy.measure {
                ExitMeasure::Confidence => {
                    hidden = self.run_layers(&hidden, done..layer, cache)?;
                    let logits = self.adapters.exit_logits(self.model, index, &hidden)?;
                    let exits = self.policy.exits_at(top2_margin(&logits)?);
                    exits.then_some(logits)
                }
                ExitMeasure::Saturation => {
                    let before = self.run_layers(&hidden, done..layer - 1, cache)?;
                    hidden = self.run_layers(&before, layer - 1..layer, cache)?;
                    match self.policy.exits_at(cosine(&before, &hidden)?) {
                        true => Some(self.adapters.exit_logits(self.model, index, &hidden)?),
                        false => None,
                    }
                }
                ExitMeasure::Classifier => {
                    hidden = self.run_layers(&hidden, done..layer, cache)?;
                    let adapted = self.adapters.adapt(index, &hidden)?;
                    let classifiers = self.adapters.classifiers.as_ref().ok_or_else(|| {
                        Error::InvalidArgument("these exit adapters carry no classifiers".into())
                    })?;
                    // The head runs only at the exit the token leaves at.
                    match self
                        .policy
                        .exits_at(classifiers.probability(index, &adapted)?)
                    {
                        true => Some(self.model.head(&adapted)?.flatten_all()?),
                        false => None,
                    }
                }
            };
            done = layer;
            if let Some(logits) = exit_logits {
                match self.policy.skipped {
                    SkippedLayers::Propagate => self.model.fill_kv(&hidden, layer..depth, cache)?,
                    SkippedLayers::Defer => self.deferred.push(Deferred {
                        hidden,
                        done: layer,
                    }),
                }
                self.exit_layers.push(layer);
                return Ok(logits);
            }
        }
        hidden = self.run_layers(&hidden, done..depth, cache)?;
        self.exit_layers.push(depth);
        Ok(self.model.head(&hidden)?.flatten_all()?)
    }
}

/// Top-1 minus top-2 softmax probability of a logit vector (0 when the top is tied), computed
/// where the logits are, with one copy of three numbers to the host instead of the vocabulary.
fn top2_margin(logits: &Tensor) -> Result<f32> {
    let probs = candle_nn::ops::softmax_last_dim(&logits.flatten_all()?.unsqueeze(0)?)?;
    let first = probs.max_keepdim(D::Minus1)?;
    let at_first = probs.broadcast_ge(&first)?.to_dtype(probs.dtype())?;
    let ties = at_first.sum_keepdim(D::Minus1)?;
    let second = (&probs * at_first.affine(-1.0, 1.0)?)?.max_keepdim(D::Minus1)?;
    let stats: Vec<f32> = Tensor::cat(&[&first, &second, &ties], D::Minus1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    Ok(if stats[2] > 1.0 {
        0.0
    } else {
        stats[0] - stats[1]
    })
}

/// Cosine similarity of two hidden states, reduced where they are, with one copy of three
/// numbers to the host.
fn cosine(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.flatten_all()?, b.flatten_all()?);
    let sums = Tensor::stack(
        &[
            (&a * &b)?.sum_all()?,
            a.sqr()?.sum_all()?.sqrt()?,
            b.sqr()?.sum_all()?.sqrt()?,
        ],
        0,
    )?;
    let sums: Vec<f32> = sums.to_dtype(DType::F32)?.to_vec1()?;
    Ok(sums[0] / (sums[1] * sums[2]).max(1e-12))
}

/// Hidden states at each exit layer and at the final layer, for every position of some
/// token sequences: the distillation data of the adapters.
pub struct DistillationData {
    /// Per exit, `(positions, hidden)`.
    pub hidden: Vec<Tensor>,
    /// The final layer's output before the final norm, `(positions, hidden)`: the teacher's
    /// full distribution is recomputed from it batch by batch, which costs one head per
    /// batch but no `positions × vocabulary` table.
    pub final_hidden: Tensor,
    /// The final layer's top token at each position.
    pub targets: Vec<u32>,
}

/// Runs each sequence through the model once, tapping the exit layers.
pub fn collect_distillation_data(
    model: &Llama,
    sequences: &[Vec<u32>],
    layers: &[usize],
    mut progress: impl FnMut(usize),
) -> Result<DistillationData> {
    let mut hidden: Vec<Vec<Tensor>> = vec![Vec::new(); layers.len()];
    let mut final_hidden = Vec::new();
    let mut targets = Vec::new();
    for (n, ids) in sequences.iter().enumerate() {
        let mut cache = model.new_cache();
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let mut h = model.embed(&input)?;
        let mut done = 0;
        for (i, &layer) in layers.iter().enumerate() {
            h = model.forward_layers(&h, done..layer, &mut cache, None)?;
            hidden[i].push(h.squeeze(0)?.to_dtype(DType::F32)?);
            done = layer;
        }
        h = model.forward_layers(&h, done..model.num_layers(), &mut cache, None)?;
        final_hidden.push(h.squeeze(0)?.to_dtype(DType::F32)?);
        targets.extend(Llama::argmax_rows(&model.head(&h)?.squeeze(0)?)?);
        progress(n + 1);
    }
    Ok(DistillationData {
        hidden: hidden
            .iter()
            .map(|parts| Ok(Tensor::cat(parts, 0)?))
            .collect::<Result<_>>()?,
        final_hidden: Tensor::cat(&final_hidden, 0)?,
        targets,
    })
}

/// Trains every adapter by distillation from the final layer, with AdamW: the loss is the
/// cross-entropy of the exit's distribution against the final layer's whole distribution.
/// Soft targets keep the exits' probabilities calibrated, which hard labels make
/// overconfident; the whole vocabulary (not only the teacher's top tokens) keeps the tail
/// calibrated too, where the tokens of text the model did not write often lie.
#[allow(clippy::too_many_arguments)]
pub fn train_adapters(
    model: &Llama,
    adapters: &ExitAdapters,
    vars: &VarMap,
    data: &DistillationData,
    train_positions: &[usize],
    epochs: usize,
    batch_size: usize,
    learning_rate: f64,
    seed: u64,
    mut on_step: impl FnMut(usize, usize, usize, f32),
) -> Result<()> {
    use candle_nn::Optimizer;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let (norm_weight, eps, head) = model.head_parts()?;
    let mut optimizer = candle_nn::AdamW::new(
        vars.all_vars(),
        candle_nn::ParamsAdamW {
            lr: learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let device = model.device();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order = train_positions.to_vec();
    let steps = order.len().div_ceil(batch_size.max(1));
    for epoch in 1..=epochs {
        order.shuffle(&mut rng);
        for (step, batch) in order.chunks(batch_size.max(1)).enumerate() {
            let rows: Vec<u32> = batch.iter().map(|&r| r as u32).collect();
            let rows = Tensor::from_vec(rows, batch.len(), device)?;
            let logits = |h: &Tensor| -> Result<Tensor> {
                let normed = candle_nn::ops::rms_norm_slow(h, &norm_weight, eps)?;
                Ok(normed.matmul(&head.t()?)?)
            };
            let teacher = candle_nn::ops::softmax_last_dim(&logits(
                &data.final_hidden.index_select(&rows, 0)?,
            )?)?
            .detach();
            let mut loss = Tensor::zeros((), DType::F32, device)?;
            for (i, adapter) in adapters.adapters.iter().enumerate() {
                let h = adapter.forward(&data.hidden[i].index_select(&rows, 0)?)?;
                let log_q = candle_nn::ops::log_softmax(&logits(&h)?, D::Minus1)?;
                let cross_entropy = (log_q * &teacher)?.sum(1)?.mean(0)?.neg()?;
                loss = (loss + cross_entropy)?;
            }
            optimizer.backward_step(&loss)?;
            let loss = loss.to_scalar::<f32>()? / adapters.adapters.len() as f32;
            on_step(epoch, step + 1, steps, loss);
        }
    }
    Ok(())
}

/// What one exit makes of some positions of the distillation data.
pub struct ExitOutcomes {
    /// The adapted hidden states `(positions, hidden)`, what the head reads.
    pub adapted: Tensor,
    /// Whether the exit's top token equals the final layer's, per position.
    pub agrees: Vec<bool>,
}

/// Every exit's adapted hidden states at `positions`, and whether its top token there
/// equals the final layer's.
pub fn exit_outcomes(
    model: &Llama,
    adapters: &ExitAdapters,
    data: &DistillationData,
    positions: &[usize],
) -> Result<Vec<ExitOutcomes>> {
    const CHUNK: usize = 64;
    let rows: Vec<u32> = positions.iter().map(|&r| r as u32).collect();
    let rows = Tensor::from_vec(rows, positions.len(), model.device())?;
    (0..adapters.adapters.len())
        .map(|i| {
            let adapted = adapters.adapt(i, &data.hidden[i].index_select(&rows, 0)?)?;
            let mut agrees = Vec::with_capacity(positions.len());
            for (k, part) in positions.chunks(CHUNK).enumerate() {
                let h = adapted.narrow(0, k * CHUNK, part.len())?;
                let top = model
                    .head(&h.unsqueeze(0)?)?
                    .squeeze(0)?
                    .argmax(D::Minus1)?;
                let top: Vec<u32> = top.to_vec1()?;
                agrees.extend(part.iter().zip(top).map(|(&p, t)| data.targets[p] == t));
            }
            Ok(ExitOutcomes { adapted, agrees })
        })
        .collect()
}

/// Share of `positions` where each exit's top token equals the final layer's.
pub fn exit_agreement(
    model: &Llama,
    adapters: &ExitAdapters,
    data: &DistillationData,
    positions: &[usize],
) -> Result<Vec<f64>> {
    Ok(exit_outcomes(model, adapters, data, positions)?
        .iter()
        .map(|o| o.agrees.iter().filter(|&&a| a).count() as f64 / o.agrees.len().max(1) as f64)
        .collect())
}

#[cfg(test)]
mod device_reduction_tests {
    use super::*;

    /// The host loop the on-device margin replaced.
    fn host_margin(logits: &[f32]) -> f32 {
        let probs = dynexec_core::sampling::softmax(logits, 1.0);
        let (mut first, mut second) = (0f32, 0f32);
        for p in probs {
            if p > first {
                second = first;
                first = p;
            } else if p > second {
                second = p;
            }
        }
        first - second
    }

    #[test]
    fn margins_match_the_host_computation_ties_included() {
        let rows: Vec<Vec<f32>> = vec![
            (0..500).map(|i| ((i as f32) * 0.37).sin() * 4.0).collect(),
            vec![2.0, 5.0, 5.0, 1.0],
            vec![7.0, 1.0, 3.0],
            vec![0.5],
        ];
        for row in rows {
            let logits = Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
            let ours = top2_margin(&logits).unwrap();
            let host = host_margin(&row);
            assert!((ours - host).abs() < 1e-6, "{row:?}: {ours} vs {host}");
        }
    }

    #[test]
    fn cosine_of_hidden_states() {
        let a = Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[2f32, 4.0, 6.0]], &Device::Cpu).unwrap();
        let c = Tensor::new(&[[-3f32, 0.0, 1.0]], &Device::Cpu).unwrap();
        assert!((cosine(&a, &b).unwrap() - 1.0).abs() < 1e-6);
        assert!(cosine(&a, &c).unwrap().abs() < 1e-6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_measures_behave() {
        assert_eq!(
            TokenExitPolicy::parse("confidence:0.5").unwrap(),
            TokenExitPolicy {
                measure: ExitMeasure::Confidence,
                threshold: 0.5,
                skipped: SkippedLayers::Defer
            }
        );
        let propagate = TokenExitPolicy::parse("saturation:0.9:propagate").unwrap();
        assert_eq!(propagate.skipped, SkippedLayers::Propagate);
        assert_eq!(propagate.to_string(), "saturation:0.9:propagate");
        assert_eq!(
            TokenExitPolicy::parse("saturation:0.9:defer")
                .unwrap()
                .to_string(),
            "saturation:0.9"
        );
        assert_eq!(
            TokenExitPolicy::parse("saturation:0.99")
                .unwrap()
                .to_string(),
            "saturation:0.99"
        );
        let classifier = TokenExitPolicy::parse("classifier:0.9").unwrap();
        assert_eq!(classifier.measure, ExitMeasure::Classifier);
        assert_eq!(classifier.to_string(), "classifier:0.9");
        assert!(classifier.exits_at(0.9) && !classifier.exits_at(0.89));
        for bad in [
            "confidence",
            "confidence:x",
            "softmax:0.5",
            "saturation:inf",
            "confidence:-5",
            "saturation:-1.5",
            "classifier:-0.1",
            "classifier:nan",
            "classifier:0.9:later",
            "classifier:0.9:defer:x",
        ] {
            let err = TokenExitPolicy::parse(bad).unwrap_err().to_string();
            assert!(err.contains("confidence:T"), "{err}");
        }
        let logits = Tensor::new(&[2.0f32, 1.0, 0.0], &Device::Cpu).unwrap();
        let p: Vec<f32> = [2.0f32, 1.0, 0.0].iter().map(|x| x.exp()).collect();
        let sum: f32 = p.iter().sum();
        let expected = (p[0] - p[1]) / sum;
        assert!((top2_margin(&logits).unwrap() - expected).abs() < 1e-6);
        let a = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        assert!((cosine(&a, &b).unwrap() - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }
}
