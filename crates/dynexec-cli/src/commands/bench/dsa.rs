//! `dynexec bench dsa`: seconds per end-to-end DSA comparison on the reference cases (two DMD
//! fits and the alignment search), next to the reference implementation's recorded time, and
//! one 10 x 10 distance matrix.

use crate::options::{print_json, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_core::stats::Summary;
use dynexec_dsa::{
    distance_matrix, read_npy, Dsa, DsaConfig, Metric, OptimizerConfig, Rank, Trajectories,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

#[derive(Deserialize)]
struct Case {
    case: String,
    dsa_config: Option<CaseConfig>,
    #[serde(default)]
    pairs: Vec<CasePair>,
}

#[derive(Deserialize)]
struct CaseConfig {
    n_delays: usize,
    delay_interval: usize,
    rank: Option<usize>,
    lamb: f64,
}

#[derive(Deserialize)]
struct CasePair {
    a: String,
    b: String,
    expected: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize)]
struct Row {
    case: String,
    a: String,
    b: String,
    seconds: f64,
    reference_seconds: Option<f64>,
    speedup: Option<f64>,
    angular: f64,
}

#[derive(Serialize)]
struct Report {
    rows: Vec<Row>,
    matrix_systems: usize,
    matrix_seconds: f64,
    threads: usize,
}

fn load(dir: &Path, name: &str) -> Result<Trajectories> {
    let path = dir.join(format!("{name}.npy"));
    Ok(Trajectories::from_npy(
        read_npy(&path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

fn dsa_for(config: &CaseConfig) -> Dsa {
    Dsa::new(DsaConfig {
        n_delays: config.n_delays,
        delay_interval: config.delay_interval,
        rank: config.rank.map_or(Rank::Full, Rank::Count),
        lamb: config.lamb,
        reduced_rank_reg: false,
        optimizer: OptimizerConfig::default(),
    })
}

fn median_seconds(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<(f64, f64)> {
    let mut times = Vec::with_capacity(runs);
    let mut value = f64::NAN;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        value = f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let median = Summary::of(&times).map_or(f64::NAN, |s| s.median);
    Ok((median, value))
}

pub fn run(global: &GlobalOptions, args: BenchDsaArgs) -> Result<()> {
    let mut case_dirs: Vec<PathBuf> = std::fs::read_dir(&args.cases)
        .with_context(|| {
            format!(
                "reading --cases {} (the repository's tests/data/dsa-cases; run from the repository root or pass --cases)",
                args.cases.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    case_dirs.sort();
    let mut rows = Vec::new();
    // The distance matrix reuses the largest end-to-end case's systems and settings.
    let mut matrix_input: Option<(Vec<Trajectories>, CaseConfig)> = None;
    for dir in &case_dirs {
        let text = std::fs::read_to_string(dir.join("case.json"))?;
        let case: Case = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}/case.json", dir.display()))?;
        let Some(config) = case.dsa_config else {
            continue; // matrices only, or the DMD stage alone
        };
        let dsa = dsa_for(&config);
        for pair in &case.pairs {
            let (a, b) = (load(dir, &pair.a)?, load(dir, &pair.b)?);
            let (seconds, angular) =
                median_seconds(args.runs, || Ok(dsa.compare(&a, &b)?.angular))?;
            let reference_seconds = pair
                .expected
                .get("e2e_DSA_angular_seconds")
                .and_then(|v| v.as_f64());
            rows.push(Row {
                case: case.case.clone(),
                a: pair.a.clone(),
                b: pair.b.clone(),
                seconds,
                reference_seconds,
                speedup: reference_seconds.map(|r| r / seconds),
                angular,
            });
        }
        let names: Vec<&String> = case.pairs.iter().flat_map(|p| [&p.a, &p.b]).collect();
        let mut systems = Vec::new();
        for name in names {
            systems.push(load(dir, name)?);
        }
        if matrix_input
            .as_ref()
            .is_none_or(|(s, _)| s[0].n_samples() < systems[0].n_samples())
        {
            matrix_input = Some((systems, config));
        }
    }
    let Some((mut systems, config)) = matrix_input else {
        bail!("no DSA cases under {}", args.cases.display());
    };
    // Ten systems: the case's own, repeated as needed (the timing depends on sizes only).
    let originals = systems.clone();
    systems = (0..10)
        .map(|i| originals[i % originals.len()].clone())
        .collect();
    let dsa = dsa_for(&config);
    let threads = global
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (matrix_seconds, _) = median_seconds(args.runs, || {
        distance_matrix(&systems, &dsa, &[Metric::DsaAngular], Some(threads))?;
        Ok(0.0)
    })?;
    let report = Report {
        rows,
        matrix_systems: systems.len(),
        matrix_seconds,
        threads,
    };
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
        matrix_seconds
    );
    Ok(())
}
