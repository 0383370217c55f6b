//! Choosing the next token: greedy, temperature, top-k, top-p, the repetition penalty,
//! OpenAI's frequency and presence penalties, and logit bias.
//!
//! Greedy decoding with no penalty takes the argmax on the device, so only one id crosses
//! to the host per token; every other mode copies the logits row once.

use crate::{Error, Result, Setting};
use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings, as the `generate` flags name them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 or `None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (`None` or 1.0: all).
    pub top_p: Option<f64>,
    /// Divides positive logits (multiplies negative ones) of recently seen tokens; 1.0 is off.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// OpenAI's: subtracted from a token's logit once per time it was generated so far.
    pub frequency_penalty: f32,
    /// OpenAI's: subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// Added to the logits of these tokens before sampling (OpenAI's `logit_bias`; -100
    /// bans a token, +100 forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the sampler's random generator; unused when greedy.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 299792458,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the setting at fault ([`Error::InvalidSetting`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |setting, requirement: &str| Err(Error::setting(setting, requirement));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                Setting::Temperature,
                "must be a finite number >= 0 (0 means greedy)",
            );
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(Setting::TopP, "must be in (0, 1]");
            }
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                Setting::RepetitionPenalty,
                "must be a finite number > 0 (1.0 disables it)",
            );
        }
        for (setting, value) in [
            (Setting::FrequencyPenalty, self.frequency_penalty),
            (Setting::PresencePenalty, self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return bad(setting, "must be between -2 and 2 (0 disables it)");
            }
        }
        if self
            .logit_bias
            .iter()
            .any(|(_, bias)| !(-100.0..=100.0).contains(bias))
        {
            return bad(Setting::LogitBias, "values must be between -100 and 100");
        }
        Ok(())
    }

    /// Whether sampling takes the argmax: temperature 0, or so close to it (below
    /// [`GREEDY_BELOW`]) that dividing by it would overflow, as vLLM treats it.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }

    /// Whether any penalty or bias changes the logits (they depend on the tokens so far).
    pub fn adjusts_logits(&self) -> bool {
        self.logit_adjustment().is_some()
    }

    /// The first setting that changes the logits, if any (for errors that name it).
    pub fn logit_adjustment(&self) -> Option<Setting> {
        [
            (self.repetition_penalty != 1.0, Setting::RepetitionPenalty),
            (self.frequency_penalty != 0.0, Setting::FrequencyPenalty),
            (self.presence_penalty != 0.0, Setting::PresencePenalty),
            (!self.logit_bias.is_empty(), Setting::LogitBias),
        ]
        .into_iter()
        .find_map(|(set, setting)| set.then_some(setting))
    }
}

/// Temperatures below this sample greedily.
pub const GREEDY_BELOW: f64 = 1e-5;

/// A seeded sampler: the same seed and logits give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the history that are the prompt: frequency and presence penalties count
    /// only what follows (as OpenAI and vLLM do).
    prompt_len: usize,
}

impl Sampler {
    /// A sampler seeded from `params.seed`; fails if `params` is out of range
    /// ([`SamplingParams::validate`]).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            prompt_len: 0,
        })
    }

    /// A sampler for a generation whose history (passed to [`Self::sample`]) starts with a
    /// prompt of `prompt_len` tokens.
    pub fn for_prompt(params: SamplingParams, prompt_len: usize) -> Result<Self> {
        Ok(Self {
            prompt_len,
            ..Self::new(params)?
        })
    }

    /// The settings it samples with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from a `(vocab,)` logits row, given the tokens so far.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let logits = logits.flatten_all()?;
        if self.params.is_greedy() && !self.params.adjusts_logits() {
            return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
        }
        let mut row: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        self.adjust(&mut row, history);
        if self.params.is_greedy() {
            return Ok(argmax(&row));
        }
        let probs = self.filtered_probabilities(&row);
        Ok(self.draw(&probs))
    }

    /// Applies the penalties and the bias to a logits row, given the tokens so far.
    fn adjust(&self, row: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            apply_repetition_penalty(row, &history[start..], p.repetition_penalty);
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let generated = &history[self.prompt_len.min(history.len())..];
            apply_openai_penalties(row, generated, p.frequency_penalty, p.presence_penalty);
        }
        for &(token, bias) in &p.logit_bias {
            if let Some(v) = row.get_mut(token as usize) {
                *v += bias;
            }
        }
    }

    /// The distribution this sampler draws from for a logits row: softmax at the
    /// temperature, then top-k and top-p filtering, renormalised (speculative sampling
    /// compares target and draft through it).
    pub fn distribution(&self, row: &[f32]) -> Vec<f32> {
        self.filtered_probabilities(row)
    }

    /// A uniform draw in [0, 1) from the seeded generator.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Draws an index from a probability vector with the seeded generator.
    pub fn draw_from(&mut self, probs: &[f32]) -> u32 {
        self.draw(probs)
    }

    /// Softmax at the temperature, then top-k and top-p filtering, renormalised.
    ///
    /// Only the candidates that can matter are ordered: sorting a whole 49k-token vocabulary
    /// per token cost more than a decoding step of a small model.
    fn filtered_probabilities(&self, row: &[f32]) -> Vec<f32> {
        let mut probs = softmax(row, self.params.temperature as f32);
        let top_k = self.params.top_k.filter(|&k| k > 0 && k < probs.len());
        let top_p = self.params.top_p.filter(|&p| p < 1.0);
        if top_k.is_none() && top_p.is_none() {
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
            return probs;
        }
        let descending = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]);
        let mut candidates: Vec<usize> = match (top_k, top_p) {
            (Some(k), _) => {
                let mut all: Vec<usize> = (0..probs.len()).collect();
                all.select_nth_unstable_by(k - 1, descending);
                all.truncate(k);
                all
            }
            // The nucleus lies among the tokens at or above (1 - p) / n: those below it hold
            // less than 1 - p together, so the ones above hold more than p.
            (None, Some(p)) => {
                let floor = ((1.0 - p) / probs.len() as f64) as f32;
                (0..probs.len()).filter(|&i| probs[i] >= floor).collect()
            }
            (None, None) => unreachable!("returned above"),
        };
        candidates.sort_unstable_by(descending);
        let mut keep = candidates.len();
        if let Some(p) = top_p {
            let mut cumulative = 0.0f64;
            for (rank, &i) in candidates.iter().enumerate() {
                cumulative += probs[i] as f64;
                if cumulative >= p {
                    keep = rank + 1;
                    break;
                }
            }
        }
        let mut filtered = vec![0f32; probs.len()];
        for &i in &candidates[..keep] {
            filtered[i] = probs[i];
        }
        let total: f32 = filtered.iter().sum();
        filtered.iter_mut().for_each(|p| *p /= total);
        filtered
    }

    fn draw(&mut self, probs: &[f32]) -> u32 {
        let mut target: f32 = self.rng.random::<f32>();
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                last_nonzero = i;
                if target < p {
                    return i as u32;
                }
                target -= p;
            }
        }
        // Rounding can leave a sliver of mass unassigned; it belongs to the last candidate.
        last_nonzero as u32
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Numerically stable softmax of `row / temperature`.
pub fn softmax(row: &[f32], temperature: f32) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<f32> = row
        .iter()
        .map(|v| ((v - max) / temperature).exp())
        .collect();
    let total: f32 = out.iter().sum();
    out.iter_mut().for_each(|v| *v /= total);
    out
}

/// The CTRL-paper penalty as transformers applies it: once per distinct recent token.
pub fn apply_repetition_penalty(row: &mut [f32], recent: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::new();
    for &token in recent {
        let i = token as usize;
        if i < row.len() && seen.insert(token) {
            row[i] = if row[i] >= 0.0 {
                row[i] / penalty
            } else {
                row[i] * penalty
            };
        }
    }
}

/// OpenAI's penalties: each generated token's logit loses `frequency` per occurrence and
/// `presence` once.
pub fn apply_openai_penalties(row: &mut [f32], generated: &[u32], frequency: f32, presence: f32) {
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &token in generated {
        *counts.entry(token).or_default() += 1;
    }
    for (token, count) in counts {
        if let Some(v) = row.get_mut(token as usize) {
            *v -= count as f32 * frequency + presence;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&logits(&[0.1, 3.0, -1.0, 2.9]), &[]).unwrap(), 1);
    }

    #[test]
    fn openai_penalties_count_generated_tokens_only_and_bias_can_force_or_ban() {
        // Token 1 leads by 0.5; generated twice it loses 2 x 0.3 + 0.1 = 0.7 and token 3 wins.
        // In the prompt (the first two tokens of the history) it is not penalized.
        let row = [0.0, 3.0, -1.0, 2.5];
        let params = SamplingParams {
            frequency_penalty: 0.3,
            presence_penalty: 0.1,
            ..Default::default()
        };
        let mut s = Sampler::for_prompt(params.clone(), 2).unwrap();
        assert_eq!(s.sample(&logits(&row), &[1, 1, 1, 1]).unwrap(), 3);
        let mut s = Sampler::for_prompt(params, 3).unwrap();
        assert_eq!(s.sample(&logits(&row), &[1, 1, 1, 1]).unwrap(), 1);
        let mut penalized = row;
        apply_openai_penalties(&mut penalized, &[1, 1, 3], 0.5, 1.0);
        assert_eq!(penalized, [0.0, 1.0, -1.0, 1.0]);
        // Bias, greedy or sampled: -100 bans the favourite, +100 forces an outsider.
        for temperature in [0.0, 1.0] {
            let params = |bias| SamplingParams {
                temperature,
                logit_bias: bias,
                ..Default::default()
            };
            let mut s = Sampler::new(params(vec![(1, -100.0), (3, -100.0)])).unwrap();
            assert_eq!(s.sample(&logits(&row), &[]).unwrap(), 0);
            let mut s = Sampler::new(params(vec![(2, 100.0)])).unwrap();
            assert_eq!(s.sample(&logits(&row), &[]).unwrap(), 2);
        }
        // A temperature too small to divide by is greedy, not empty or NaN.
        let tiny = SamplingParams {
            temperature: 1e-46,
            ..Default::default()
        };
        assert!(tiny.is_greedy());
        assert_eq!(
            Sampler::new(tiny)
                .unwrap()
                .sample(&logits(&row), &[])
                .unwrap(),
            1
        );
        for bad in [
            SamplingParams {
                frequency_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: -3.0,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(0, 101.0)],
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        assert_eq!(s.sample(&logits(&[0.1, 3.0, -1.0, 2.0]), &[1]).unwrap(), 3);
        let mut row = vec![2.0, -2.0];
        apply_repetition_penalty(&mut row, &[0, 1, 1], 2.0);
        assert_eq!(row, vec![1.0, -4.0]);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_another_seed_differs() {
        let row: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let params = SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            };
            let mut s = Sampler::new(params).unwrap();
            (0..40)
                .map(|_| s.sample(&logits(&row), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let row = [5.0, 4.0, 3.0, -10.0, 2.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        for _ in 0..200 {
            assert!(s.sample(&logits(&row), &[]).unwrap() < 2);
        }
        let params = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        // softmax puts ~0.66 on token 0, so top-p 0.5 keeps it alone.
        for _ in 0..200 {
            assert_eq!(s.sample(&logits(&row), &[]).unwrap(), 0);
        }
    }

    /// The filtering as first written: every token sorted, then cut.
    fn full_sort_reference(probs: &[f32], top_k: Option<usize>, top_p: Option<f64>) -> Vec<f32> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut keep = top_k
            .filter(|&k| k > 0)
            .map_or(order.len(), |k| k.min(order.len()));
        if let Some(p) = top_p.filter(|&p| p < 1.0) {
            let mut cumulative = 0.0f64;
            for (rank, &i) in order.iter().enumerate().take(keep) {
                cumulative += probs[i] as f64;
                if cumulative >= p {
                    keep = rank + 1;
                    break;
                }
            }
        }
        let mut out = vec![0f32; probs.len()];
        for &i in &order[..keep] {
            out[i] = probs[i];
        }
        let total: f32 = out.iter().sum();
        out.iter_mut().for_each(|p| *p /= total);
        out
    }

    #[test]
    fn partial_ordering_filters_like_a_full_sort() {
        // A vocabulary-sized row with distinct values (ties may be cut either way).
        let row: Vec<f32> = (0..5000)
            .map(|i| ((i as f32) * 0.7131).sin() * 6.0 + (i as f32) * 1e-5)
            .collect();
        for (top_k, top_p) in [
            (None, None),
            (Some(1), None),
            (Some(40), None),
            (None, Some(0.9)),
            (None, Some(0.3)),
            (Some(40), Some(0.8)),
            (Some(10_000), Some(0.95)),
        ] {
            for temperature in [0.7, 1.3] {
                let sampler = Sampler::new(SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    ..Default::default()
                })
                .unwrap();
                let probs = softmax(&row, temperature as f32);
                let expected = full_sort_reference(&probs, top_k, top_p);
                assert_eq!(
                    sampler.distribution(&row),
                    expected,
                    "top_k {top_k:?} top_p {top_p:?} t {temperature}"
                );
            }
        }
    }

    #[test]
    fn sampled_frequencies_follow_the_distribution() {
        let row = [0.0f32, (3.0f32).ln()]; // probabilities 0.25, 0.75
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        let ones = (0..4000)
            .filter(|_| s.sample(&logits(&row), &[]).unwrap() == 1)
            .count();
        let freq = ones as f64 / 4000.0;
        assert!((freq - 0.75).abs() < 0.03, "{freq}");
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        for (params, expected) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                Setting::Temperature,
            ),
            (
                SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                Setting::TopP,
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                Setting::RepetitionPenalty,
            ),
        ] {
            match Sampler::new(params).err() {
                Some(Error::InvalidSetting { setting, .. }) => assert_eq!(setting, expected),
                other => panic!("{other:?}"),
            }
        }
    }
}
