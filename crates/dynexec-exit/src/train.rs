//! Training exit heads (and optionally the backbone) with AdamW on a weighted multi-exit loss.
//!
//! Frozen mode computes every exit's features for the training and validation splits once and
//! then trains only the heads on them, so an epoch costs no backbone passes. Joint mode runs
//! the backbone on every batch and back-propagates through it.

use crate::calibrate::ExitPredictions;
use crate::card::{TrainMode, TrainingRecord};
use crate::data::Dataset;
use crate::model::ExitClassifier;
use crate::policy::softmax;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use dynexec_core::{Error, Result, Setting};
use dynexec_models::optim::FusedAdamW;
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub use dynexec_models::init::seeded_init;

/// Loss weights growing with depth: exit `i` (1-based) weighs `i`, as in DeeBERT/SDN-style
/// multi-exit training, so the final exit is not sacrificed to the early ones.
pub fn depth_weights(exits: usize) -> Vec<f32> {
    (1..=exits).map(|i| i as f32).collect()
}

/// What training reports as it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Frozen mode: `done` of `total` inputs have had their features computed.
    Features {
        /// Inputs whose features have been computed so far, training split then validation split.
        done: usize,
        /// Inputs in the training and validation splits together.
        total: usize,
    },
    /// One optimiser step.
    Step {
        /// The epoch this step belongs to, counting from 1.
        epoch: usize,
        /// Steps finished in this epoch, counting this one.
        done: usize,
        /// Steps per epoch: the training split's batches.
        total: usize,
        /// This batch's loss: the exits' cross-entropies averaged with the loss weights.
        loss: f32,
    },
    /// An epoch ended; validation accuracy of each exit.
    Epoch {
        /// The epoch that ended, counting from 1.
        epoch: usize,
        /// Mean of the epoch's per-step losses.
        mean_loss: f32,
        /// Per exit, in order, the fraction (0–1) of validation inputs it classifies correctly.
        val_accuracy: Vec<f64>,
        /// Training inputs per second over the epoch's steps (forward, backward and update;
        /// validation not included).
        examples_per_sec: f64,
    },
}

/// Trains `trainable` (the heads' variables, plus the backbone's in joint mode) as `options`
/// say (empty loss weights mean [`depth_weights`]) and returns the last epoch's validation
/// predictions.
pub fn train(
    classifier: &ExitClassifier,
    trainable: Vec<Var>,
    train_data: &Dataset,
    val_data: &Dataset,
    options: &TrainingRecord,
    mut on_event: impl FnMut(TrainEvent),
) -> Result<ExitPredictions> {
    let exits = classifier.num_exits();
    let weights = match options.loss_weights.is_empty() {
        true => depth_weights(exits),
        false => options.loss_weights.clone(),
    };
    if weights.len() != exits || weights.iter().any(|w| w.is_nan() || *w < 0.0) {
        return Err(Error::setting(
            Setting::LossWeights,
            format!("must be {exits} non-negative numbers, one per exit"),
        ));
    }
    if options.epochs == 0 {
        return Err(Error::setting(Setting::Epochs, "must be at least 1"));
    }
    if options.batch_size == 0 {
        return Err(Error::setting(Setting::BatchSize, "must be at least 1"));
    }
    let weight_sum: f32 = weights.iter().sum();
    let labels = classifier.card.labels.clone();
    let train_labels = train_data.label_indices(&labels)?;
    let mut optimizer = FusedAdamW::new(
        trainable,
        ParamsAdamW {
            lr: options.learning_rate,
            weight_decay: options.weight_decay,
            ..Default::default()
        },
    )?;
    // Frozen: features of every split, once.
    let cached = match options.mode {
        TrainMode::Frozen => {
            let total = train_data.len() + val_data.len();
            let mut done = 0;
            let mut features = |data: &Dataset| -> Result<Vec<Tensor>> {
                let mut per_exit: Vec<Vec<Tensor>> = vec![Vec::new(); exits];
                let all: Vec<usize> = (0..data.len()).collect();
                for chunk in all.chunks(options.batch_size) {
                    let f = classifier.all_exit_features(&data.select(chunk)?)?;
                    for (exit, t) in f.into_iter().enumerate() {
                        per_exit[exit].push(t.detach());
                    }
                    done += chunk.len();
                    on_event(TrainEvent::Features { done, total });
                }
                per_exit
                    .iter()
                    .map(|parts| Ok(Tensor::cat(parts, 0)?))
                    .collect()
            };
            Some((features(train_data)?, features(val_data)?))
        }
        TrainMode::Joint => None,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut order: Vec<usize> = (0..train_data.len()).collect();
    let steps = train_data.len().div_ceil(options.batch_size);
    // Joint text training pads each batch to its longest input: batches of similar lengths
    // waste less of the backbone's work on padding.
    let lengths = match (&cached, &train_data.inputs) {
        (None, crate::data::Examples::Text(texts)) => {
            Some(texts.iter().map(String::len).collect::<Vec<_>>())
        }
        _ => None,
    };
    let mut val_predictions = None;
    for epoch in 1..=options.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let epoch_started = std::time::Instant::now();
        let batches = batches_of(&order, lengths.as_deref(), options.batch_size, &mut rng);
        for (step, batch) in batches.iter().map(Vec::as_slice).enumerate() {
            let logits = match &cached {
                Some((train_features, _)) => {
                    let rows = index_tensor(batch, classifier)?;
                    (0..exits)
                        .map(|e| {
                            classifier
                                .heads
                                .logits(e, &train_features[e].index_select(&rows, 0)?)
                        })
                        .collect::<Result<Vec<_>>>()?
                }
                None => classifier.all_exit_logits(&train_data.select(batch)?)?,
            };
            let targets: Vec<u32> = batch.iter().map(|&i| train_labels[i] as u32).collect();
            let targets = Tensor::from_vec(targets, batch.len(), &classifier.device)?;
            let mut loss = Tensor::zeros((), candle_core::DType::F32, &classifier.device)?;
            for (l, &w) in logits.iter().zip(&weights) {
                let ce = candle_nn::loss::cross_entropy(l, &targets)?;
                loss = (loss + (ce * f64::from(w / weight_sum))?)?;
            }
            optimizer.backward_step(&loss)?;
            let loss = loss.to_scalar::<f32>()?;
            if !loss.is_finite() {
                return Err(Error::setting(
                    Setting::LearningRate,
                    format!(
                        "is too high: training diverged (loss {loss}) in epoch {epoch}; lower it"
                    ),
                ));
            }
            loss_sum += loss;
            on_event(TrainEvent::Step {
                epoch,
                done: step + 1,
                total: steps,
                loss,
            });
        }
        let examples_per_sec = train_data.len() as f64 / epoch_started.elapsed().as_secs_f64();
        let predictions = match &cached {
            Some((_, val_features)) => {
                cached_predictions(classifier, val_features, val_data.label_indices(&labels)?)?
            }
            None => classifier.predict(val_data, options.batch_size, |_| {})?,
        };
        on_event(TrainEvent::Epoch {
            epoch,
            mean_loss: loss_sum / steps as f32,
            val_accuracy: predictions.accuracy_per_exit(),
            examples_per_sec,
        });
        val_predictions = Some(predictions);
    }
    val_predictions.ok_or_else(|| Error::InvalidArgument("no epochs ran".into()))
}

/// Batches per group sorted by length, as transformers' `group_by_length` does: random
/// groups, similar lengths inside a batch.
const LENGTH_GROUP_BATCHES: usize = 50;

/// The epoch's batches from the shuffled `order`: with `lengths`, each group of
/// [`LENGTH_GROUP_BATCHES`] batches is sorted by length before it is cut, and the batches
/// are shuffled again, so a batch holds inputs of similar length in a random place.
fn batches_of(
    order: &[usize],
    lengths: Option<&[usize]>,
    batch_size: usize,
    rng: &mut rand::rngs::StdRng,
) -> Vec<Vec<usize>> {
    let Some(lengths) = lengths else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    let mut batches = Vec::new();
    for group in order.chunks(batch_size * LENGTH_GROUP_BATCHES) {
        let mut group = group.to_vec();
        group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(group.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

fn index_tensor(rows: &[usize], classifier: &ExitClassifier) -> Result<Tensor> {
    let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Ok(Tensor::from_vec(
        rows.clone(),
        rows.len(),
        &classifier.device,
    )?)
}

/// Validation predictions from cached features (frozen mode).
fn cached_predictions(
    classifier: &ExitClassifier,
    features: &[Tensor],
    labels: Vec<usize>,
) -> Result<ExitPredictions> {
    let per_exit = features
        .iter()
        .enumerate()
        .map(|(e, f)| Ok(classifier.heads.logits(e, f)?.to_vec2::<f32>()?))
        .collect::<Result<Vec<_>>>()?;
    let probs = (0..labels.len())
        .map(|row| per_exit.iter().map(|e| softmax(&e[row])).collect())
        .collect();
    Ok(ExitPredictions { probs, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_grouped_batches_cover_every_input_once_with_similar_lengths() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 200).collect();
        let mut order: Vec<usize> = (0..1000).collect();
        order.shuffle(&mut rng);
        let batches = batches_of(&order, Some(&lengths), 10, &mut rng);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        // Padding waste: each batch's spread of lengths is far below a random batch's.
        let spread = |b: &Vec<usize>| {
            let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
            l.iter().max().unwrap() - l.iter().min().unwrap()
        };
        let grouped: usize = batches.iter().map(spread).sum();
        let plain: usize = batches_of(&order, None, 10, &mut rng)
            .iter()
            .map(spread)
            .sum();
        assert!(grouped * 5 < plain, "{grouped} vs {plain}");
    }
}
