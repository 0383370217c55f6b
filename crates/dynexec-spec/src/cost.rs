//! What a speculative step costs: the target's forward over K+1 rows against one decoding
//! step. Speculation pays when the tokens a step yields outweigh
//! `K · draft cost + verification cost(K + 1)`, both in decoding steps; this module measures
//! the second term, which the kernels decide.

use dynexec_core::{Error, Result};
use dynexec_models::llama::Llama;
use serde::Serialize;
use std::time::Instant;

/// The measured cost of verifying `rows` tokens in one target forward.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct VerifyCost {
    /// Tokens fed in the forward (the last accepted token plus the drafts).
    pub rows: usize,
    /// Median seconds of the forward.
    pub secs: f64,
    /// Over the median one-row forward (a plain decoding step).
    pub fraction_of_step: f64,
}

/// Times the target's forward over 1..=`max_rows` new tokens after `context` (its cache
/// holding `context`, as during decoding), each `repeats` times with the row counts
/// interleaved, and reports the medians. The cache is rolled back after every forward.
pub fn verification_costs(
    target: &Llama,
    context: &[u32],
    max_rows: usize,
    repeats: usize,
) -> Result<Vec<VerifyCost>> {
    if context.is_empty() || max_rows == 0 || repeats == 0 {
        return Err(Error::InvalidArgument(
            "measuring verification needs a context, at least one row and one repeat".to_string(),
        ));
    }
    let mut cache = target.new_cache();
    target.forward_last(context, &mut cache, None)?;
    let base = cache.len();
    // Rows are context tokens in order: realistic ids, any would do.
    let rows_of = |n: usize| -> Vec<u32> { (0..n).map(|i| context[i % context.len()]).collect() };
    let mut samples = vec![Vec::with_capacity(repeats); max_rows];
    for _ in 0..repeats {
        for n in 1..=max_rows {
            let ids = rows_of(n);
            let start = Instant::now();
            let logits = target.forward(&ids, &mut cache, None)?;
            // The verdict reads every row's argmax: count that too.
            Llama::argmax_rows(&logits)?;
            samples[n - 1].push(start.elapsed().as_secs_f64());
            cache.truncate(base)?;
        }
    }
    let medians: Vec<f64> = samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect();
    let step = medians[0];
    Ok(medians
        .iter()
        .enumerate()
        .map(|(i, &secs)| VerifyCost {
            rows: i + 1,
            secs,
            fraction_of_step: secs / step,
        })
        .collect())
}
