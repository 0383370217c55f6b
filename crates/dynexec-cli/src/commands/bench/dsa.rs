//! `dynexec bench dsa`: seconds per end-to-end DSA comparison on the reference cases (two DMD
//! fits and the alignment search), next to the reference implementation's recorded time, and
//! one 10 x 10 distance matrix.

use crate::options::{print_json, GlobalOptions};
use anyhow::{Context, Result};
use clap::Args;
use dynexec_dsa::bench::bench_cases;
use std::path::PathBuf;

#[derive(Args)]
#[command(after_help = "Example:\n  dynexec bench dsa --runs 5")]
pub struct BenchDsaArgs {
    /// Folder of reference cases (each a case.json plus .npy arrays).
    #[arg(long, default_value = "tests/data/dsa-cases")]
    pub cases: PathBuf,

    /// Timed runs per comparison (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

pub fn run(global: &GlobalOptions, args: BenchDsaArgs) -> Result<()> {
    let report = bench_cases(&args.cases, args.runs, global.threads).with_context(|| {
        format!(
            "benchmarking the cases in --cases {} (the repository's tests/data/dsa-cases; run from the repository root or pass --cases)",
            args.cases.display()
        )
    })?;
    let threads = report.threads;
    if global.json {
        return print_json(&report);
    }
    println!(
        "{:<22} {:<10} {:<14} {:>10} {:>12} {:>9} {:>9}",
        "case", "a", "b", "ours s", "reference s", "speedup", "angular"
    );
    for r in &report.rows {
        println!(
            "{:<22} {:<10} {:<14} {:>10.4} {:>12} {:>9} {:>9.4}",
            r.case,
            r.a,
            r.b,
            r.seconds,
            r.reference_seconds
                .map_or("-".into(), |s| format!("{s:.2}")),
            r.speedup.map_or("-".into(), |s| format!("{s:.0}x")),
            r.angular
        );
    }
    println!(
        "{0} x {0} DSA distance matrix ({1} pairs, {2} threads): {3:.3} s",
        report.matrix_systems,
        report.matrix_systems * (report.matrix_systems - 1) / 2,
        threads,
        report.matrix_seconds
    );
    Ok(())
}
