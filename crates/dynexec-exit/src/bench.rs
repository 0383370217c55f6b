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

/// Each policy kind's accuracy (%) against the share of layers it saves (%) on `predictions`
/// as its setting moves from stopping nothing early to stopping everything at the first exit:
/// confidence and entropy thresholds in steps of 0.01 and 0.02, every patience, every fixed
/// exit. Points are sorted by layers saved; what a trade-off plot draws.
pub fn tradeoff(predictions: &ExitPredictions, layers: usize) -> Vec<(String, Vec<(f64, f64)>)> {
    let point = |policy: ExitPolicy| {
        let e = predictions.evaluate(&policy);
        (
            100.0 * (1.0 - e.mean_exit / layers.max(1) as f64),
            100.0 * e.accuracy,
        )
    };
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![
        (
            "confidence".into(),
            (0..=101)
                .map(|i| {
                    point(ExitPolicy::Confidence {
                        thresholds: vec![i as f32 / 100.0],
                    })
                })
                .collect(),
        ),
        (
            "entropy".into(),
            (-1..=50)
                .map(|i| {
                    point(ExitPolicy::Entropy {
                        thresholds: vec![i as f32 / 50.0],
                    })
                })
                .collect(),
        ),
        (
            "patience".into(),
            (0..layers)
                .map(|p| point(ExitPolicy::Patience { patience: p }))
                .collect(),
        ),
        (
            "fixed".into(),
            (1..=layers)
                .map(|exit| point(ExitPolicy::Fixed { exit }))
                .collect(),
        ),
    ];
    for (_, points) in &mut series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        points.dedup_by(|a, b| (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9);
    }
    series
}

/// The policy's setting: its threshold(s), patience or exit.
pub fn threshold_of(policy: &ExitPolicy) -> String {
    let text = policy.to_string();
    text.split_once(':')
        .map_or(String::new(), |(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three exits, four inputs: the fixed policy's ends are full depth (nothing saved) and
    /// the first exit (two thirds saved), with those exits' accuracies.
    #[test]
    fn the_tradeoff_runs_from_full_depth_to_the_first_exit() {
        let confident = vec![0.9f32, 0.1];
        let unsure = vec![0.4f32, 0.6];
        let predictions = ExitPredictions {
            probs: vec![
                vec![confident.clone(), confident.clone(), confident.clone()],
                vec![unsure.clone(), confident.clone(), confident.clone()],
                vec![unsure.clone(), unsure.clone(), confident.clone()],
                vec![confident.clone(), unsure.clone(), unsure.clone()],
            ],
            labels: vec![0, 0, 0, 1],
        };
        let series = tradeoff(&predictions, 3);
        let fixed = &series.iter().find(|(n, _)| n == "fixed").unwrap().1;
        assert_eq!(fixed.first().unwrap().0, 0.0);
        let last = fixed.last().unwrap();
        assert!((last.0 - 200.0 / 3.0).abs() < 1e-9, "{fixed:?}");
        assert_eq!(last.1, 25.0);
        assert_eq!(fixed.first().unwrap().1, 100.0);
        assert!(series
            .iter()
            .all(|(_, p)| p.windows(2).all(|w| w[0].0 <= w[1].0)));
    }
}
