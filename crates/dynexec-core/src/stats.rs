//! Timing shared by every engine: prefill, time to first token, decode.

use serde::Serialize;
use std::time::Duration;

/// What one generation cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated, the first one included.
    pub generated_tokens: usize,
    /// Forward pass over the prompt.
    pub prefill_secs: f64,
    /// From the start until the first generated token was sampled.
    pub ttft_secs: f64,
    /// From the first generated token to the last: the tokens after the first.
    pub decode_secs: f64,
}

impl GenerationStats {
    /// Prompt tokens per second of prefill (0 when no time was measured).
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }

    /// Tokens per second after the first one (the first comes from the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_secs)
    }
}

fn rate(count: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Median, spread and range of repeated measurements.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    /// Middle value (mean of the two middle ones for an even count).
    pub median: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1 denominator; 0 for one run).
    pub stddev: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub runs: usize,
}

impl Summary {
    /// Summarises samples; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Self {
            median,
            mean,
            stddev: var.sqrt(),
            min: sorted[0],
            max: sorted[n - 1],
            runs: n,
        })
    }
}

/// Seconds as f64, for stats.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs every contestant `warmup + runs` times, round by round (each round runs them all in
/// turn), so drift in the machine's load hits all of them alike. `run(i)` runs contestant `i`
/// once; the results of the measured rounds come back per contestant, in order.
pub fn interleave<T, E>(
    contestants: usize,
    warmup: usize,
    runs: usize,
    mut run: impl FnMut(usize) -> std::result::Result<T, E>,
) -> std::result::Result<Vec<Vec<T>>, E> {
    let mut measured: Vec<Vec<T>> = (0..contestants).map(|_| Vec::with_capacity(runs)).collect();
    for round in 0..warmup + runs {
        for (i, samples) in measured.iter_mut().enumerate() {
            let result = run(i)?;
            if round >= warmup {
                samples.push(result);
            }
        }
    }
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_runs_round_by_round_and_keeps_measured_rounds() {
        let mut order = Vec::new();
        let kept = interleave::<_, ()>(2, 1, 2, |i| {
            order.push(i);
            Ok(order.len())
        })
        .unwrap();
        assert_eq!(order, [0, 1, 0, 1, 0, 1]);
        assert_eq!(kept, [vec![3, 5], vec![4, 6]]);
    }

    #[test]
    fn summary_of_odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        assert!((s.stddev - 1.0).abs() < 1e-12);
        assert_eq!(Summary::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn decode_rate_excludes_the_first_token() {
        let stats = GenerationStats {
            prompt_tokens: 10,
            generated_tokens: 11,
            prefill_secs: 0.5,
            ttft_secs: 0.6,
            decode_secs: 2.0,
        };
        assert_eq!(stats.prefill_tokens_per_s(), 20.0);
        assert_eq!(stats.decode_tokens_per_s(), 5.0);
    }
}
