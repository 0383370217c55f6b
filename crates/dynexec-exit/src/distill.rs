//! Training exit adapters by distillation: the decoder answers prompts, every exit layer's
//! hidden state is tapped over that text, and each exit's adapter learns to make the shared
//! head predict the final layer's token. Agreement with the final layer is measured on
//! held-out sequences before and after. Then each exit's classifier
//! ([`crate::exit_classifier`]) learns, on the same positions, where its adapted exit agrees.

use crate::assemble::save_varmaps;
use crate::exit_classifier::{
    self, accuracy_and_auc, fold_platt, platt_scaling, ClassifierCard, ClassifierPlan,
};
use crate::token_exit::{
    collect_distillation_data, exit_agreement, exit_outcomes, train_adapters, AdapterCard,
    AdapterTraining, ExitAdapters, ADAPTERS_CARD, ADAPTERS_FILE,
};
use candle_nn::VarMap;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_models::generation::{generate, GenerateOptions};
use dynexec_models::llama::Llama;
use std::path::Path;

/// How the adapters are trained.
#[derive(Debug, Clone)]
pub struct DistillPlan {
    /// Exit layers, 1-based, increasing, below the model's depth.
    pub layers: Vec<usize>,
    /// Inner size of each adapter.
    pub rank: usize,
    /// Greedy tokens generated per prompt.
    pub gen_tokens: usize,
    /// Passes over the training positions.
    pub epochs: usize,
    /// Positions per optimizer step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// Seed of the initialisation and the shuffling.
    pub seed: u64,
    /// Share of the sequences held out to measure agreement, in [0, 1).
    pub held_out: f64,
    /// How the exit classifiers are fitted.
    pub classifier: ClassifierPlan,
}

/// Progress of [`distill`].
pub enum DistillEvent {
    /// Prompts answered so far.
    Generated(usize),
    /// Sequences tapped so far.
    Tapped(usize),
    /// An optimizer step: epoch, step, steps per epoch, loss.
    Step(usize, usize, usize, f32),
    /// The exit classifiers are being fitted.
    Classifiers,
}

/// Trained adapters, their variables and their card.
pub struct Distilled {
    /// The adapters.
    pub adapters: ExitAdapters,
    /// Their variables, the classifiers' included (what is saved).
    pub vars: Vec<VarMap>,
    /// Their card, agreement before and after included.
    pub card: AdapterCard,
}

impl Distilled {
    /// Writes `adapters.safetensors` and `adapters.json` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let maps: Vec<Option<&VarMap>> = self.vars.iter().map(Some).collect();
        save_varmaps(&maps, &dir.join(ADAPTERS_FILE))?;
        dynexec_core::card::write_card(&dir.join(ADAPTERS_CARD), &self.card)
    }
}

/// What [`distill`] trains adapters to match, as their card records it.
pub const DISTILLATION_OBJECTIVE: &str =
    "cross-entropy against the final layer's whole distribution";

/// Adapters already trained, to which [`distill`] adds classifiers only.
pub struct KeptAdapters {
    adapters: ExitAdapters,
    vars: VarMap,
}

impl KeptAdapters {
    /// Reads adapters (`adapters.json`, `adapters.safetensors`) from `dir` into variables
    /// that can be saved again; any classifiers they carried are dropped, to be retrained.
    pub fn load(dir: &Path, model: &Llama) -> Result<Self> {
        let mut card: AdapterCard =
            dynexec_core::card::read_card(&dir.join(ADAPTERS_CARD), "an exit-adapter card")?;
        card.classifier = None;
        let (adapters, mut vars) = ExitAdapters::untrained(card, 0, model.device())?;
        adapters.check(model)?;
        let weights = dir.join(ADAPTERS_FILE);
        vars.load(&weights).map_err(|e| Error::InvalidModel {
            path: weights.clone(),
            message: format!("{e} (corrupt adapters? train them again)"),
        })?;
        Ok(Self { adapters, vars })
    }

    /// Their exit layers.
    pub fn layers(&self) -> &[usize] {
        &self.adapters.card.layers
    }
}

/// Trains adapters for `model` on its own answers to `questions` (each a user turn in the
/// chat template), then their exit classifiers. `card_base` names the model and says where
/// the prompts came from and which command reproduces the run; the rest of the card is
/// filled in here. With `kept` adapters, only the classifiers are trained (on `plan`'s data)
/// and the adapters' card keeps its own training record.
pub fn distill(
    model: &Llama,
    tokenizer: &TextTokenizer,
    questions: &[String],
    plan: &DistillPlan,
    card_base: AdapterCard,
    kept: Option<KeptAdapters>,
    mut on_event: impl FnMut(DistillEvent),
) -> Result<Distilled> {
    let depth = model.num_layers();
    let layers = match &kept {
        Some(kept) => kept.layers().to_vec(),
        None => plan.layers.clone(),
    };
    let layers = &layers;
    if layers.is_empty()
        || layers.iter().any(|&l| l == 0 || l >= depth)
        || layers.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(Error::InvalidArgument(format!(
            "exit layers must be increasing layer numbers between 1 and {}",
            depth - 1
        )));
    }
    if !(0.0..1.0).contains(&plan.held_out) {
        return Err(Error::InvalidArgument(
            "the held-out share must be at least 0 and below 1".into(),
        ));
    }
    if questions.len() < 2 {
        return Err(Error::InvalidArgument(
            "adapter training needs at least two prompts".into(),
        ));
    }
    let options = GenerateOptions::greedy(plan.gen_tokens);
    let mut sequences = Vec::with_capacity(questions.len());
    for q in questions {
        let mut ids = tokenizer.encode(&tokenizer.chat_prompt(None, q)?)?;
        let out = generate(model, tokenizer, &ids, &options, None, |_| Ok(()))?;
        ids.extend(out.token_ids);
        sequences.push(ids);
        on_event(DistillEvent::Generated(sequences.len()));
    }
    let data = collect_distillation_data(model, &sequences, layers, |n| {
        on_event(DistillEvent::Tapped(n))
    })?;

    // Whole sequences are held out, so no held-out position shares a context with training.
    let held_sequences =
        ((sequences.len() as f64 * plan.held_out).round() as usize).clamp(1, sequences.len() - 1);
    let held_from: usize = sequences[..sequences.len() - held_sequences]
        .iter()
        .map(Vec::len)
        .sum();
    let train_positions: Vec<usize> = (0..held_from).collect();
    let held_positions: Vec<usize> = (held_from..data.targets.len()).collect();

    let classifier_record = ClassifierCard {
        steps: plan.classifier.steps,
        learning_rate: plan.classifier.learning_rate,
        weight_decay: plan.classifier.weight_decay,
        command: card_base.training.command.clone(),
        prompts: card_base.training.prompts.clone(),
        positions: train_positions.len(),
        held_out_positions: held_positions.len(),
        ..Default::default()
    };
    let trains_adapters = kept.is_none();
    let (mut adapters, vars) = match kept {
        Some(kept) => (kept.adapters, kept.vars),
        None => {
            let mut card = AdapterCard {
                layers: layers.to_vec(),
                rank: plan.rank,
                hidden_size: model.config().hidden_size,
                vocab_size: model.vocab_size(),
                training: AdapterTraining {
                    sequences: sequences.len(),
                    positions: train_positions.len(),
                    held_out_positions: held_positions.len(),
                    epochs: plan.epochs,
                    batch_size: plan.batch_size,
                    learning_rate: plan.learning_rate,
                    seed: plan.seed,
                    objective: DISTILLATION_OBJECTIVE.into(),
                    ..card_base.training
                },
                agreement_before: Vec::new(),
                agreement_after: Vec::new(),
                classifier: None,
                ..card_base
            };
            let (mut adapters, vars) =
                ExitAdapters::untrained(card.clone(), plan.seed, model.device())?;
            card.agreement_before = exit_agreement(model, &adapters, &data, &held_positions)?;
            train_adapters(
                model,
                &adapters,
                &vars,
                &data,
                &train_positions,
                plan.epochs,
                plan.batch_size,
                plan.learning_rate,
                plan.seed,
                |epoch, step, steps, loss| on_event(DistillEvent::Step(epoch, step, steps, loss)),
            )?;
            adapters.card = card;
            (adapters, vars)
        }
    };

    // The classifiers learn where the trained exits agree with the final layer.
    on_event(DistillEvent::Classifiers);
    let train = exit_outcomes(model, &adapters, &data, &train_positions)?;
    let held = exit_outcomes(model, &adapters, &data, &held_positions)?;
    if trains_adapters {
        // The adapters' held-out agreement after training is these outcomes'.
        adapters.card.agreement_after = held.iter().map(|o| share(&o.agrees)).collect();
    }
    let (classifiers, classifier_vars) =
        exit_classifier::untrained(layers, model.config().hidden_size, model.device())?;
    let hidden: Vec<_> = train.iter().map(|o| o.adapted.clone()).collect();
    let labels: Vec<_> = train.iter().map(|o| o.agrees.clone()).collect();
    exit_classifier::fit(
        &classifiers,
        &classifier_vars,
        &hidden,
        &labels,
        &plan.classifier,
    )?;
    let mut record = classifier_record;
    for (index, outcome) in held.iter().enumerate() {
        let logits: Vec<f32> = classifiers.logits(index, &outcome.adapted)?.to_vec1()?;
        let platt = platt_scaling(&logits, &outcome.agrees);
        fold_platt(&classifiers, index, &classifier_vars, platt)?;
        record.platt.push(platt);
        let scores = classifiers.probabilities(index, &outcome.adapted)?;
        let (accuracy, auc) = accuracy_and_auc(&scores, &outcome.agrees);
        record.held_out_agreement.push(share(&outcome.agrees));
        record.held_out_accuracy.push(accuracy);
        record.held_out_auc.push(auc);
    }
    adapters.set_classifiers(classifiers, record);
    let card = adapters.card.clone();
    Ok(Distilled {
        adapters,
        vars: vec![vars, classifier_vars],
        card,
    })
}

fn share(flags: &[bool]) -> f64 {
    flags.iter().filter(|&&f| f).count() as f64 / flags.len().max(1) as f64
}
