//! `dynexec bench exits`: every exit policy next to full depth on a task's test split, in one
//! process — accuracy, layers used, batch-1 latency and batched throughput.

use crate::commands::common::{
    load_classifier, predict_split, read_task_splits, resolve_exit_policy,
};
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::Result;
use clap::Args;
use dynexec_exit::bench::{bench_policies, Timing};
use dynexec_exit::calibrate::calibrate;
use dynexec_exit::policy::ExitPolicy;
use std::path::PathBuf;

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
    /// Also draw each policy's accuracy against the layers it saves on the test split, as its
    /// setting moves, into this PNG.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
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
    if let Some(path) = &args.plot {
        let series = dynexec_exit::bench::tradeoff(&test, card.layers);
        let title = format!("{}: accuracy against layers saved (test split)", card.task);
        let chart = dynexec_plot::curves::LineChart {
            title: &title,
            x_desc: "layers saved (%)",
            y_desc: "accuracy (%)",
            series: &series,
        };
        crate::commands::common::write_curves(global, path, &chart)?;
    }
    let timed = splits.test.take(args.timed_inputs.max(1))?;
    let bar = progress_bar(
        global,
        (args.runs * timed.len()) as u64,
        "timing {bar:40} {pos}/{len} [{elapsed}<{eta}]",
    );
    let timing = Timing {
        runs: args.runs,
        batch_size: args.batch_size,
    };
    let rows = bench_policies(&classifier, &test, &timed, &policies, timing, || bar.inc(1))?;
    bar.finish_and_clear();
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
    println!("policy      setting                      accuracy mean exit   saved batch1 ms speedup   items/s speedup");
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

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut t: String = text.chars().take(width - 1).collect();
    t.push('…');
    t
}
