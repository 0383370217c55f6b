//! `dynexec bench exits`: every exit policy next to full depth on a task's test split, in one
//! process — accuracy, layers used, batch-1 latency and batched throughput.

use crate::commands::common::{
    load_classifier, predict_split, read_task_splits, resolve_exit_policy,
};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::Result;
use clap::Args;
use dynexec_exit::calibrate::calibrate;
use dynexec_exit::data::Dataset;
use dynexec_exit::model::ExitClassifier;
use dynexec_exit::policy::ExitPolicy;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchExitsArgs {
    /// Exit model: manifest name or folder.
    #[arg(long, short, default_value = "minilm-l6-reviews")]
    model: String,
    /// Folder with the task's splits (default: $DYNEXEC_CACHE/data/TASK, where the fetch
    /// scripts put them, TASK being the card's task).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Policies to compare besides full depth (always measured). `calibrated` is the card's
    /// policy; `confidence`, `entropy`, `patience` and `fixed` without a value are calibrated on
    /// the validation split in this run with --max-accuracy-drop.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "calibrated,confidence,entropy,patience,fixed"
    )]
    policies: Vec<String>,
    /// For policies calibrated in this run.
    #[arg(long, default_value_t = 0.01)]
    max_accuracy_drop: f64,
    /// Test inputs timed one at a time (batch 1) and in batches, per policy.
    #[arg(long, default_value_t = 200)]
    timed_inputs: usize,
    /// Batch size of the throughput measurement.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Timed passes over the timed inputs (policies interleaved input by input).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    #[arg(long, default_value_t = 5000)]
    val_size: usize,
}

#[derive(Serialize)]
struct Row {
    task: String,
    policy: String,
    threshold: String,
    accuracy: f64,
    mean_exit_layer: f64,
    layers_saved_pct: f64,
    batch1_ms: f64,
    batch1_speedup: f64,
    throughput_per_s: f64,
    throughput_speedup: f64,
}

pub fn run(global: &GlobalOptions, args: BenchExitsArgs) -> Result<()> {
    let classifier = load_classifier(global, &args.model)?;
    let card = classifier.card.clone();
    let splits = read_task_splits(global, args.data.as_deref(), &card, args.val_size)?;
    let test = predict_split(global, &classifier, &splits.test, args.batch_size, "test")?;
    const CALIBRATED_HERE: [&str; 4] = ["confidence", "entropy", "patience", "fixed"];
    let val = match args
        .policies
        .iter()
        .any(|p| CALIBRATED_HERE.contains(&p.as_str()))
    {
        true => Some(predict_split(
            global,
            &classifier,
            &splits.val,
            args.batch_size,
            "val",
        )?),
        false => None,
    };
    let mut policies = vec![("full".to_string(), ExitPolicy::Full)];
    for name in &args.policies {
        let policy = match (&val, name.as_str()) {
            (Some(val), kind) if CALIBRATED_HERE.contains(&kind) => {
                calibrate(val, kind, args.max_accuracy_drop)?.policy
            }
            (_, other) => resolve_exit_policy(other, &card)?,
        };
        policies.push((name.clone(), policy));
    }
    let timed = splits.test.take(args.timed_inputs.max(1))?;
    let (batch1, batched) = time_policies(global, &classifier, &timed, &policies, &args)?;
    let layers = card.layers as f64;
    let rows: Vec<Row> = policies
        .iter()
        .enumerate()
        .map(|(i, (name, policy))| {
            let e = test.evaluate(policy);
            let per_input = batch1[i].as_secs_f64() / (timed.len() * args.runs) as f64;
            let throughput = (timed.len() * args.runs) as f64 / batched[i].as_secs_f64();
            Row {
                task: card.task.clone(),
                policy: name.clone(),
                threshold: threshold_of(policy),
                accuracy: e.accuracy,
                mean_exit_layer: e.mean_exit,
                layers_saved_pct: 100.0 * (1.0 - e.mean_exit / layers),
                batch1_ms: per_input * 1e3,
                batch1_speedup: batch1[0].as_secs_f64() / batch1[i].as_secs_f64(),
                throughput_per_s: throughput,
                throughput_speedup: batched[0].as_secs_f64() / batched[i].as_secs_f64(),
            }
        })
        .collect();
    if global.json {
        return print_json(&serde_json::json!({
            "model": args.model,
            "split": "test",
            "inputs": test.len(),
            "timed_inputs": timed.len(),
            "batch_size": args.batch_size,
            "threads": global.threads,
            "rows": rows,
        }));
    }
    println!(
        "{} on {} test inputs (timing: {} inputs x {} runs; batch {} for throughput)",
        card.task,
        test.len(),
        timed.len(),
        args.runs,
        args.batch_size
    );
    println!(
        "{:<11} {:<28} {:>8} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7}",
        "policy",
        "setting",
        "accuracy",
        "mean exit",
        "saved",
        "batch1 ms",
        "speedup",
        "items/s",
        "speedup"
    );
    for r in &rows {
        println!(
            "{:<11} {:<28} {:>7.2}% {:>9.2} {:>6.1}% {:>9.2} {:>6.2}x {:>9.1} {:>6.2}x",
            r.policy,
            truncate(&r.threshold, 28),
            r.accuracy * 100.0,
            r.mean_exit_layer,
            r.layers_saved_pct,
            r.batch1_ms,
            r.batch1_speedup,
            r.throughput_per_s,
            r.throughput_speedup
        );
    }
    Ok(())
}

/// Total time of each policy at batch 1 and in batches, interleaving policies input by input
/// (and batch by batch) so machine noise falls on all of them alike.
fn time_policies(
    global: &GlobalOptions,
    classifier: &ExitClassifier,
    timed: &Dataset,
    policies: &[(String, ExitPolicy)],
    args: &BenchExitsArgs,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let n = timed.len();
    let mut batch1 = vec![Duration::ZERO; policies.len()];
    let mut batched = vec![Duration::ZERO; policies.len()];
    let bar = progress_bar(
        global,
        (args.runs * n) as u64,
        "timing {bar:40} {pos}/{len} [{elapsed}<{eta}]",
    );
    // One untimed pass warms caches and allocators.
    classifier.classify(&timed.select(&[0])?, &ExitPolicy::Full)?;
    for _ in 0..args.runs {
        for i in 0..n {
            let one = timed.select(&[i])?;
            for (p, (_, policy)) in policies.iter().enumerate() {
                let start = Instant::now();
                classifier.classify(&one, policy)?;
                batch1[p] += start.elapsed();
            }
            bar.inc(1);
        }
        let all: Vec<usize> = (0..n).collect();
        for chunk in all.chunks(args.batch_size.max(1)) {
            let batch = timed.select(chunk)?;
            for (p, (_, policy)) in policies.iter().enumerate() {
                let start = Instant::now();
                classifier.classify(&batch, policy)?;
                batched[p] += start.elapsed();
            }
        }
    }
    bar.finish_and_clear();
    Ok((batch1, batched))
}

/// The policy's setting: its threshold(s), patience or exit.
fn threshold_of(policy: &ExitPolicy) -> String {
    let text = policy.to_string();
    text.split_once(':')
        .map_or(String::new(), |(_, v)| v.to_string())
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut t: String = text.chars().take(width - 1).collect();
    t.push('…');
    t
}
