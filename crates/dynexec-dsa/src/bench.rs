//! The DSA benchmark: seconds per end-to-end comparison (two DMD fits and the alignment
//! search) on reference cases, next to the reference implementation's recorded time, and one
//! 10 × 10 distance matrix.
//!
//! A case is a folder with `case.json` (its DSA settings and pairs of array names, with the
//! reference's expected values) and the arrays as `.npy` files.

use crate::{
    distance_matrix, read_npy, Dsa, DsaConfig, Error, Metric, OptimizerConfig, Rank, Result,
    Trajectories,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// One pair of a case, compared end to end.
#[derive(Debug, Clone, Serialize)]
pub struct DsaRow {
    /// The case's name.
    pub case: String,
    /// The first array's name.
    pub a: String,
    /// The second array's name.
    pub b: String,
    /// Median seconds per comparison.
    pub seconds: f64,
    /// The reference implementation's recorded seconds, when the case has them.
    pub reference_seconds: Option<f64>,
    /// `reference_seconds / seconds`.
    pub speedup: Option<f64>,
    /// The DSA angular distance found.
    pub angular: f64,
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DsaBenchReport {
    /// Every pair of every case with DSA settings.
    pub rows: Vec<DsaRow>,
    /// Systems in the distance matrix.
    pub matrix_systems: usize,
    /// Median seconds for the matrix.
    pub matrix_seconds: f64,
    /// Threads the matrix used.
    pub threads: usize,
}

fn load(dir: &Path, name: &str) -> Result<Trajectories> {
    Trajectories::from_npy(read_npy(dir.join(format!("{name}.npy")))?)
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
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    Ok((median, value))
}

/// Times every pair of every case in `cases` (`runs` timed runs each, the median kept), then
/// a 10 × 10 distance matrix of the largest case's systems on `threads` (default: all).
pub fn bench_cases(cases: &Path, runs: usize, threads: Option<usize>) -> Result<DsaBenchReport> {
    let mut case_dirs: Vec<PathBuf> = std::fs::read_dir(cases)
        .map_err(|source| Error::Io {
            path: cases.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    case_dirs.sort();
    let mut rows = Vec::new();
    // The distance matrix reuses the largest end-to-end case's systems and settings.
    let mut matrix_input: Option<(Vec<Trajectories>, CaseConfig)> = None;
    for dir in &case_dirs {
        let path = dir.join("case.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let case: Case = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let Some(config) = case.dsa_config else {
            continue; // matrices only, or the DMD stage alone
        };
        let dsa = dsa_for(&config);
        for pair in &case.pairs {
            let (a, b) = (load(dir, &pair.a)?, load(dir, &pair.b)?);
            let (seconds, angular) = median_seconds(runs, || Ok(dsa.compare(&a, &b)?.angular))?;
            let reference_seconds = pair
                .expected
                .get("e2e_DSA_angular_seconds")
                .and_then(|v| v.as_f64());
            rows.push(DsaRow {
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
        return Err(Error::Config(format!(
            "no DSA cases under {}",
            cases.display()
        )));
    };
    // Ten systems: the case's own, repeated as needed (the timing depends on sizes only).
    let originals = systems.clone();
    systems = (0..10)
        .map(|i| originals[i % originals.len()].clone())
        .collect();
    let dsa = dsa_for(&config);
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (matrix_seconds, _) = median_seconds(runs, || {
        distance_matrix(&systems, &dsa, &[Metric::DsaAngular], Some(threads))?;
        Ok(0.0)
    })?;
    Ok(DsaBenchReport {
        rows,
        matrix_systems: systems.len(),
        matrix_seconds,
        threads,
    })
}
