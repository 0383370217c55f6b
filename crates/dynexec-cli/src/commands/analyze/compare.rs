//! `dynexec analyze compare A.npy B.npy`: the metrics on anyone's recordings.

use super::settings::{expand, DsaArgs, MetricName};
use crate::options::{print_json, GlobalOptions};
use anyhow::{Context, Result};
use clap::Args;
use dynexec_dsa::{
    cka_linear, procrustes_angular, read_npy, rsa, Rank, RdmComparison, RdmDistance, Scores,
    Trajectories,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Args)]
#[command(
    after_help = "Example:\n  dynexec analyze compare A.npy B.npy --metric all --n-delays 10 --delay-interval 2 --rank 10 --json"
)]
pub struct CompareArgs {
    /// First recording: .npy, f32 or f64, time x features or trials x time x features.
    pub a: PathBuf,

    /// Second recording, in the same layout (the feature counts may differ).
    pub b: PathBuf,

    /// Metrics to compute (repeat or comma-separate): dsa, procrustes, cka, rsa or all.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub metric: Vec<MetricName>,

    /// Which DSA score the text output leads with (JSON always has all three).
    #[arg(long, value_enum, default_value = "angular")]
    pub score: Score,

    #[command(flatten)]
    pub dsa: DsaArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Score {
    Angular,
    Euclidean,
    Wasserstein,
}

#[derive(Serialize, Default)]
struct CompareReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    dsa: Option<DsaScores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    procrustes: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cka: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rsa: Option<f64>,
}

#[derive(Serialize)]
struct DsaScores {
    angular: f64,
    euclidean: f64,
    wasserstein: f64,
}

impl From<Scores> for DsaScores {
    fn from(s: Scores) -> Self {
        Self {
            angular: s.angular,
            euclidean: s.euclidean,
            wasserstein: s.wasserstein,
        }
    }
}

fn load(path: &Path) -> Result<Trajectories> {
    let array = read_npy(path).with_context(|| format!("reading {}", path.display()))?;
    Trajectories::from_npy(array).with_context(|| {
        format!(
            "{}: expected time x features or trials x time x features",
            path.display()
        )
    })
}

pub fn run(global: &GlobalOptions, args: CompareArgs) -> Result<()> {
    let dsa = args.dsa.dsa(Rank::Full)?;
    let (a, b) = (load(&args.a)?, load(&args.b)?);
    let metrics = expand(&args.metric);
    let mut report = CompareReport::default();
    for metric in &metrics {
        match metric {
            MetricName::Dsa => report.dsa = Some(dsa.compare(&a, &b).context("DSA")?.into()),
            MetricName::Procrustes => {
                report.procrustes = Some(procrustes_angular(&a, &b).context("Procrustes")?)
            }
            MetricName::Cka => report.cka = Some(cka_linear(&a, &b).context("CKA")?),
            MetricName::Rsa => {
                report.rsa = Some(
                    rsa(&a, &b, RdmDistance::Correlation, RdmComparison::Spearman)
                        .context("RSA")?,
                )
            }
            MetricName::All => {}
        }
    }
    if global.json {
        return print_json(&report);
    }
    if let Some(d) = &report.dsa {
        let lead = match args.score {
            Score::Angular => ("angular", d.angular),
            Score::Euclidean => ("euclidean", d.euclidean),
            Score::Wasserstein => ("wasserstein", d.wasserstein),
        };
        println!(
            "dsa {}: {:.6}  (angular {:.6}, euclidean {:.6}, wasserstein {:.6})",
            lead.0, lead.1, d.angular, d.euclidean, d.wasserstein
        );
    }
    if let Some(p) = report.procrustes {
        println!("procrustes angular: {p:.6}");
    }
    if let Some(c) = report.cka {
        println!("cka linear: {c:.6}");
    }
    if let Some(r) = report.rsa {
        println!("rsa (spearman, correlation distance): {r:.6}");
    }
    Ok(())
}
