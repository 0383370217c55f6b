//! CALM's learned exit classifier (Schuster et al. 2022, §3.5): at each exit of a decoder, a
//! linear probe reads the hidden state and predicts whether the exit's top token equals the
//! final layer's. Asking it costs one dot product of the hidden size, where asking the
//! softmax confidence costs a full LM head (about eight layers of SmolLM2-135M), so a token
//! can try every exit and pay for the head only at the one it leaves at.
//!
//! The probe's input is the exit's adapted hidden state (what the final norm and the shared
//! head will read), RMS-normalised without a gain: the residual stream's scale grows with
//! depth, and normalising lets one probe shape serve every exit. Training is logistic
//! regression on positions of the adapters' distillation data, labelled by whether the
//! adapted exit agrees with the final layer there.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use dynexec_exit::exit_classifier::ExitClassifiers;
//! // One exit over a hidden size of 2 whose probe trusts states pointing along +x.
//! let weight = Tensor::new(&[[3f32, 0.0]], &Device::Cpu)?;
//! let bias = Tensor::new(&[0f32], &Device::Cpu)?;
//! let probes = ExitClassifiers::from_parts(vec![(weight, bias)])?;
//! let sure = probes.probability(0, &Tensor::new(&[[[5f32, 0.0]]], &Device::Cpu)?)?;
//! let unsure = probes.probability(0, &Tensor::new(&[[[-5f32, 0.0]]], &Device::Cpu)?)?;
//! assert!(sure > 0.95 && unsure < 0.05);
//! # Ok::<(), dynexec_core::Error>(())
//! ```

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, Optimizer, VarBuilder, VarMap};
use dynexec_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the exit classifiers were trained and how well they predict on held-out positions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClassifierCard {
    /// Where the prompts of its training text came from.
    pub prompts: String,
    /// Positions trained on, per exit.
    pub positions: usize,
    /// Positions held out to measure it.
    pub held_out_positions: usize,
    /// Full-batch AdamW steps of logistic regression.
    pub steps: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Per exit, the share of held-out positions where the exit agrees with the final layer
    /// (the rate a classifier that always says "exit" would be right at).
    pub held_out_agreement: Vec<f64>,
    /// Per exit, the share of held-out positions the classifier labels right at 0.5, after
    /// the Platt scaling fitted on those same positions (two parameters per exit).
    pub held_out_accuracy: Vec<f64>,
    /// Per exit, the area under the ROC curve on held-out positions: the chance that a
    /// position where the exit agrees scores above one where it does not (0.5 is chance).
    pub held_out_auc: Vec<f64>,
    /// Per exit, the Platt scaling `(scale, shift)` fitted on the held-out positions and
    /// folded into the probe, so that its probabilities mean what they say there (a probe
    /// fitted on a few thousand positions of a wide hidden state is overconfident).
    #[serde(default)]
    pub platt: Vec<(f64, f64)>,
    /// The command that trained them.
    pub command: String,
}

/// One linear probe per exit, `sigmoid(w · rmsnorm(h) + b)`.
#[derive(Debug, Clone)]
pub struct ExitClassifiers {
    probes: Vec<candle_nn::Linear>,
}

impl ExitClassifiers {
    /// Creates (over a `VarMap`, zero-initialised: every probe starts at 0.5) or loads probes
    /// named `classifiers.{layer}.{weight,bias}` for the exit `layers`.
    pub fn new(vb: VarBuilder, layers: &[usize], hidden: usize) -> Result<Self> {
        let probes = layers
            .iter()
            .map(|l| {
                let vb = vb.pp(format!("classifiers.{l}"));
                let weight = vb.get_with_hints((1, hidden), "weight", Init::Const(0.0))?;
                let bias = vb.get_with_hints(1, "bias", Init::Const(0.0))?;
                Ok(candle_nn::Linear::new(weight, Some(bias)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { probes })
    }

    /// Probes from `(weight (1, hidden), bias (1,))` pairs, one per exit in order.
    pub fn from_parts(parts: Vec<(Tensor, Tensor)>) -> Result<Self> {
        let probes = parts
            .into_iter()
            .map(|(weight, bias)| {
                if weight.dims().len() != 2 || weight.dim(0)? != 1 || bias.dims() != [1] {
                    return Err(Error::InvalidArgument(format!(
                        "an exit classifier needs a (1, hidden) weight and a (1,) bias, not {:?} and {:?}",
                        weight.dims(),
                        bias.dims()
                    )));
                }
                Ok(candle_nn::Linear::new(weight, Some(bias)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { probes })
    }

    /// Exits covered.
    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Whether there are no probes.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// Exit `index`'s logits (before the sigmoid) for hidden states `(..., hidden)`, one per
    /// row `(...)`.
    pub fn logits(&self, index: usize, hidden: &Tensor) -> Result<Tensor> {
        let probe = self.probe(index)?;
        let features = rms_normalise(&hidden.to_dtype(DType::F32)?)?;
        Ok(candle_nn::Module::forward(probe, &features)?.squeeze(D::Minus1)?)
    }

    fn probe(&self, index: usize) -> Result<&candle_nn::Linear> {
        self.probes.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "exit {index} has no classifier ({} exits)",
                self.probes.len()
            ))
        })
    }

    /// [`Self::probability`] for each row of hidden states `(rows, hidden)`.
    pub fn probabilities(&self, index: usize, hidden: &Tensor) -> Result<Vec<f32>> {
        let logits: Vec<f32> = self.logits(index, hidden)?.to_vec1()?;
        Ok(logits.into_iter().map(sigmoid).collect())
    }

    /// The probability that exit `index`'s top token equals the final layer's, for one
    /// hidden state (any shape holding `hidden` values).
    pub fn probability(&self, index: usize, hidden: &Tensor) -> Result<f32> {
        let hidden = hidden.flatten_all()?.unsqueeze(0)?;
        let logit: Vec<f32> = self.logits(index, &hidden)?.to_vec1()?;
        Ok(sigmoid(logit[0]))
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `x / rms(x)` over the last dimension.
fn rms_normalise(x: &Tensor) -> Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?)
}

/// How the probes are fitted.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierPlan {
    /// Full-batch AdamW steps.
    pub steps: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for ClassifierPlan {
    fn default() -> Self {
        Self {
            steps: 300,
            learning_rate: 0.01,
            weight_decay: 0.01,
        }
    }
}

/// Fits every probe (variables `vars`) by logistic regression: exit `i`'s probe on
/// `hidden[i]` `(positions, hidden)` against `labels[i]` (true where the exit agreed). The
/// probes share nothing, and AdamW scales each parameter's step on its own, so one
/// optimizer over the summed losses fits each as if alone.
pub fn fit(
    classifiers: &ExitClassifiers,
    vars: &VarMap,
    hidden: &[Tensor],
    labels: &[Vec<bool>],
    plan: &ClassifierPlan,
) -> Result<()> {
    if hidden.len() != classifiers.len() || labels.len() != classifiers.len() {
        return Err(Error::InvalidArgument(format!(
            "{} exit classifiers, but hidden states for {} exits and labels for {}",
            classifiers.len(),
            hidden.len(),
            labels.len()
        )));
    }
    let targets = labels
        .iter()
        .zip(hidden)
        .map(|(labels, h)| {
            let t: Vec<f32> = labels.iter().map(|&l| f32::from(u8::from(l))).collect();
            Ok(Tensor::from_vec(t, labels.len(), h.device())?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut optimizer = candle_nn::AdamW::new(
        vars.all_vars(),
        candle_nn::ParamsAdamW {
            lr: plan.learning_rate,
            weight_decay: plan.weight_decay,
            ..Default::default()
        },
    )?;
    for _ in 0..plan.steps {
        let mut loss: Option<Tensor> = None;
        for (index, (h, t)) in hidden.iter().zip(&targets).enumerate() {
            let term = binary_cross_entropy(&classifiers.logits(index, h)?, t)?;
            loss = Some(match loss {
                Some(sum) => (sum + term)?,
                None => term,
            });
        }
        if let Some(loss) = loss {
            optimizer.backward_step(&loss)?;
        }
    }
    Ok(())
}

/// Platt scaling: the `(scale, shift)` minimising the binary cross-entropy of
/// `sigmoid(scale * logit + shift)` against `labels`, by Newton's method (a two-parameter
/// logistic regression, convex). With one class only there is nothing to fit: `(1, 0)`.
pub fn platt_scaling(logits: &[f32], labels: &[bool]) -> (f64, f64) {
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 || positives == labels.len() {
        return (1.0, 0.0);
    }
    // A small ridge keeps the problem strictly convex when the classes separate.
    const RIDGE: f64 = 1e-3;
    let loss = |a: f64, b: f64| -> f64 {
        let data: f64 = logits
            .iter()
            .zip(labels)
            .map(|(&z, &y)| {
                let t = a * f64::from(z) + b;
                // log(1 + e^t) - y t, computed stably.
                t.max(0.0) + (-t.abs()).exp().ln_1p() - if y { t } else { 0.0 }
            })
            .sum();
        data + 0.5 * RIDGE * (a * a + b * b)
    };
    // Damped Newton from (0, 0), where every probability is 1/2: full steps can overshoot
    // on sharp logits, so a step is halved until the loss falls.
    let (mut a, mut b) = (0.0f64, 0.0f64);
    let mut current = loss(a, b);
    for _ in 0..100 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (RIDGE * a, RIDGE * b, RIDGE, 0.0, RIDGE);
        for (&z, &y) in logits.iter().zip(labels) {
            let z = f64::from(z);
            let p = 1.0 / (1.0 + (-(a * z + b)).exp());
            let r = p - f64::from(u8::from(y));
            let w = p * (1.0 - p);
            ga += r * z;
            gb += r;
            haa += w * z * z;
            hab += w * z;
            hbb += w;
        }
        let det = haa * hbb - hab * hab;
        if det <= 0.0 {
            break;
        }
        let (da, db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
        let mut step = 1.0;
        let mut improved = false;
        for _ in 0..30 {
            let next = loss(a - step * da, b - step * db);
            if next <= current {
                (a, b, current) = (a - step * da, b - step * db, next);
                improved = true;
                break;
            }
            step *= 0.5;
        }
        if !improved || (step * (da.abs() + db.abs())) < 1e-10 {
            break;
        }
    }
    (a, b)
}

/// Folds Platt scaling into probe `index` (variables `vars`): `w ← scale w`,
/// `b ← scale b + shift`.
pub fn fold_platt(
    classifiers: &ExitClassifiers,
    index: usize,
    vars: &VarMap,
    (scale, shift): (f64, f64),
) -> Result<()> {
    let probe = classifiers.probe(index)?;
    let data = vars
        .data()
        .lock()
        .map_err(|_| Error::InvalidArgument("a variable map was poisoned by a panic".into()))?;
    let find = |t: &Tensor| {
        data.values()
            .find(|v| v.as_tensor().id() == t.id())
            .cloned()
    };
    let weight = find(probe.weight());
    let bias = probe.bias().and_then(find);
    let (Some(weight), Some(bias)) = (weight, bias) else {
        return Err(Error::InvalidArgument(
            "the exit classifier's variables are not in this variable map".into(),
        ));
    };
    weight.set(&weight.as_tensor().affine(scale, 0.0)?)?;
    bias.set(&bias.as_tensor().affine(scale, shift)?)?;
    Ok(())
}

/// Mean binary cross-entropy of logits `z` against 0/1 `targets`, in the stable form
/// `max(z, 0) - z t + log(1 + exp(-|z|))`.
fn binary_cross_entropy(z: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus_tail = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((z.relu()? - (z * targets)?)? + softplus_tail)?.mean_all()?)
}

/// Accuracy at 0.5 and ROC AUC of `scores` against `labels`.
pub fn accuracy_and_auc(scores: &[f32], labels: &[bool]) -> (f64, f64) {
    let n = scores.len().max(1) as f64;
    let right = scores
        .iter()
        .zip(labels)
        .filter(|(&s, &l)| (s >= 0.5) == l)
        .count();
    // AUC by ranks (Mann–Whitney), ties sharing their mean rank.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            ranks[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    let auc = if positives == 0.0 || negatives == 0.0 {
        0.5
    } else {
        let rank_sum: f64 = ranks
            .iter()
            .zip(labels)
            .filter(|(_, &l)| l)
            .map(|(r, _)| r)
            .sum();
        (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
    };
    (right as f64 / n, auc)
}

/// Fresh probes for `layers` over a new variable map.
pub fn untrained(
    layers: &[usize],
    hidden: usize,
    device: &Device,
) -> Result<(ExitClassifiers, VarMap)> {
    let vars = VarMap::new();
    let classifiers = ExitClassifiers::new(
        VarBuilder::from_varmap(&vars, DType::F32, device),
        layers,
        hidden,
    )?;
    Ok((classifiers, vars))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(weight: &[f32], bias: f32) -> ExitClassifiers {
        let w = Tensor::new(weight, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let b = Tensor::new(&[bias], &Device::Cpu).unwrap();
        ExitClassifiers::from_parts(vec![(w, b)]).unwrap()
    }

    #[test]
    fn decisions_on_hand_made_hidden_states() {
        // Hidden size 4; the probe trusts states along +e0 and distrusts states along +e1.
        let probes = probe(&[2.0, -2.0, 0.0, 0.0], -0.5);
        let p = |h: [f32; 4]| {
            probes
                .probability(0, &Tensor::new(&h, &Device::Cpu).unwrap())
                .unwrap()
        };
        // rmsnorm(a e0) = 2 e0 for hidden 4, so the logit is 2 * 2 - 0.5.
        let along = p([3.0, 0.0, 0.0, 0.0]);
        assert!((along - sigmoid(3.5)).abs() < 1e-5, "{along}");
        // Scale does not matter (the residual stream grows with depth).
        assert!((p([300.0, 0.0, 0.0, 0.0]) - along).abs() < 1e-5);
        let against = p([0.0, 3.0, 0.0, 0.0]);
        assert!((against - sigmoid(-4.5)).abs() < 1e-5, "{against}");
        // Orthogonal to the probe: only the bias speaks.
        assert!((p([0.0, 0.0, 1.0, -1.0]) - sigmoid(-0.5)).abs() < 1e-5);
        // Zero state: defined, the bias again.
        assert!((p([0.0; 4]) - sigmoid(-0.5)).abs() < 1e-5);
        let policy = crate::token_exit::TokenExitPolicy::parse("classifier:0.9").unwrap();
        assert!(policy.exits_at(along) && !policy.exits_at(against));
        let never = crate::token_exit::TokenExitPolicy::parse("classifier:1.5").unwrap();
        assert!(!never.exits_at(1.0));
    }

    #[test]
    fn fitting_separates_a_learnable_rule_and_scores_held_out_rows() {
        // Label: the first coordinate exceeds the second; rows of mixed scales.
        let n = 400;
        let rows: Vec<[f32; 3]> = (0..n)
            .map(|i| {
                let t = i as f32 * 0.73;
                let scale = 1.0 + (i % 7) as f32;
                [
                    t.sin() * scale,
                    (t * 1.3).cos() * scale,
                    (t * 0.37).sin() * scale,
                ]
            })
            .collect();
        let labels: Vec<bool> = rows.iter().map(|r| r[0] > r[1]).collect();
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let hidden = Tensor::from_vec(flat, (n, 3), &Device::Cpu).unwrap();
        let (probes, vars) = untrained(&[4], 3, &Device::Cpu).unwrap();
        let (train, held) = (
            hidden.narrow(0, 0, 300).unwrap(),
            hidden.narrow(0, 300, 100).unwrap(),
        );
        fit(
            &probes,
            &vars,
            &[train],
            &[labels[..300].to_vec()],
            &ClassifierPlan::default(),
        )
        .unwrap();
        let scores = probes.probabilities(0, &held).unwrap();
        let (accuracy, auc) = accuracy_and_auc(&scores, &labels[300..]);
        assert!(accuracy > 0.9 && auc > 0.95, "{accuracy} {auc}");
    }

    #[test]
    fn platt_scaling_tempers_an_overconfident_probe() {
        // Logits five times too sharp: the labels follow sigmoid(z / 5).
        let logits: Vec<f32> = (0..2000).map(|i| (i as f32 / 100.0) - 10.0).collect();
        let labels: Vec<bool> = logits
            .iter()
            .enumerate()
            .map(|(i, z)| {
                let p = 1.0 / (1.0 + (-z / 5.0).exp());
                // A deterministic, well-spread draw per row.
                ((i as f32 * 0.618_034).fract()) < p
            })
            .collect();
        let (scale, shift) = platt_scaling(&logits, &labels);
        assert!(
            (scale - 0.2).abs() < 0.04 && shift.abs() < 0.15,
            "{scale} {shift}"
        );
        assert_eq!(platt_scaling(&[1.0, 2.0], &[true, true]), (1.0, 0.0));

        let (probes, vars) = untrained(&[3], 2, &Device::Cpu).unwrap();
        fold_platt(&probes, 0, &vars, (2.0, 0.5)).unwrap();
        let logit: Vec<f32> = probes
            .logits(0, &Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (logit[0] - 0.5).abs() < 1e-6,
            "zero weights: only the shift: {logit:?}"
        );
    }

    #[test]
    fn auc_counts_ties_as_half() {
        assert_eq!(accuracy_and_auc(&[0.1, 0.9], &[false, true]), (1.0, 1.0));
        assert_eq!(accuracy_and_auc(&[0.9, 0.1], &[false, true]).1, 0.0);
        assert_eq!(accuracy_and_auc(&[0.5, 0.5], &[false, true]).1, 0.5);
        assert_eq!(accuracy_and_auc(&[0.2, 0.7], &[true, true]).1, 0.5);
    }
}
