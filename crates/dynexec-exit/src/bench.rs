//! The early-exit classifier benchmark: every policy next to full depth on one split —
//! accuracy, layers used, batch-1 latency and batched throughput, timed interleaved input by
//! input so machine noise falls on all policies alike.

use crate::calibrate::ExitPredictions;
use crate::data::Dataset;
use crate::model::ExitClassifier;
use crate::policy::ExitPolicy;
use dynexec_core::Result;
use serde::Serialize;
use std::time::{Duration, Instant};

/// One policy's accuracy and speed.
#[derive(Debug, Clone, Serialize)]
pub struct ExitBenchRow {
    /// The card's task.
    pub task: String,
    /// The policy's name as asked for.
    pub policy: String,
    /// Its setting: threshold(s), patience or exit.
    pub threshold: String,
    /// Accuracy on the evaluated split.
    pub accuracy: f64,
    /// Mean layer inputs left at.
    pub mean_exit_layer: f64,
    /// Share of layers skipped, in percent.
    pub layers_saved_pct: f64,
    /// Milliseconds per input at batch 1.
    pub batch1_ms: f64,
    /// Over the first policy's batch-1 time.
    pub batch1_speedup: f64,
    /// Inputs per second in batches.
    pub throughput_per_s: f64,
    /// Over the first policy's batched time.
    pub throughput_speedup: f64,
}

/// How the timing runs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Passes over the timed inputs.
    pub runs: usize,
    /// Batch size of the throughput measurement.
    pub batch_size: usize,
}

/// Scores each named policy on `evaluated` (every exit's predictions on a split) and times it
/// on `timed`; the first policy is the baseline of the speedups. `on_input` hears every
/// batch-1 input timed.
pub fn bench_policies(
    classifier: &ExitClassifier,
    evaluated: &ExitPredictions,
    timed: &Dataset,
    policies: &[(String, ExitPolicy)],
    timing: Timing,
    on_input: impl FnMut(),
) -> Result<Vec<ExitBenchRow>> {
    let (batch1, batched) = time_policies(classifier, timed, policies, timing, on_input)?;
    let layers = classifier.card.layers as f64;
    let timed_total = (timed.len() * timing.runs) as f64;
    Ok(policies
        .iter()
        .enumerate()
        .map(|(i, (name, policy))| {
            let e = evaluated.evaluate(policy);
            ExitBenchRow {
                task: classifier.card.task.clone(),
                policy: name.clone(),
                threshold: threshold_of(policy),
                accuracy: e.accuracy,
                mean_exit_layer: e.mean_exit,
                layers_saved_pct: 100.0 * (1.0 - e.mean_exit / layers),
                batch1_ms: batch1[i].as_secs_f64() / timed_total * 1e3,
                batch1_speedup: batch1[0].as_secs_f64() / batch1[i].as_secs_f64(),
                throughput_per_s: timed_total / batched[i].as_secs_f64(),
                throughput_speedup: batched[0].as_secs_f64() / batched[i].as_secs_f64(),
            }
        })
        .collect())
}

/// Total time of each policy at batch 1 and in batches, interleaving policies input by input
/// (and batch by batch) so machine noise falls on all of them alike.
fn time_policies(
    classifier: &ExitClassifier,
    timed: &Dataset,
    policies: &[(String, ExitPolicy)],
    timing: Timing,
    mut on_input: impl FnMut(),
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let n = timed.len();
    let mut batch1 = vec![Duration::ZERO; policies.len()];
    let mut batched = vec![Duration::ZERO; policies.len()];
    // One untimed pass warms caches and allocators.
    classifier.classify(&timed.select(&[0])?, &ExitPolicy::Full)?;
    for _ in 0..timing.runs {
        for i in 0..n {
            let one = timed.select(&[i])?;
            for (p, (_, policy)) in policies.iter().enumerate() {
                let start = Instant::now();
                classifier.classify(&one, policy)?;
                batch1[p] += start.elapsed();
            }
            on_input();
        }
        let all: Vec<usize> = (0..n).collect();
        for chunk in all.chunks(timing.batch_size.max(1)) {
            let batch = timed.select(chunk)?;
            for (p, (_, policy)) in policies.iter().enumerate() {
                let start = Instant::now();
                classifier.classify(&batch, policy)?;
                batched[p] += start.elapsed();
            }
        }
    }
    Ok((batch1, batched))
}

/// The policy's setting: its threshold(s), patience or exit.
pub fn threshold_of(policy: &ExitPolicy) -> String {
    let text = policy.to_string();
    text.split_once(':')
        .map_or(String::new(), |(_, v)| v.to_string())
}
