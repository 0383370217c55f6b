//! The default alignment search against an exhaustive one (40 more random starts, no early
//! stop) on every reference pair, under four seeds: the default must already find the best
//! value. Run with `--nocapture` for per-pair timings.

use dynexec_dsa::faer::Mat;
use dynexec_dsa::{align, read_npy, Dsa, DsaConfig, OptimizerConfig, Rank, Trajectories};
use std::time::Instant;

fn dir(case: &str) -> String {
    format!(
        "{}/../../tests/data/dsa-cases/{case}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn load(case: &str, name: &str) -> Trajectories {
    Trajectories::from_npy(read_npy(format!("{}/{name}.npy", dir(case))).unwrap()).unwrap()
}

fn load_matrix(case: &str, name: &str) -> Mat<f64> {
    let a = read_npy(format!("{}/{name}.npy", dir(case))).unwrap();
    let c = a.shape[1];
    Mat::from_fn(a.shape[0], c, |i, j| a.data[i * c + j])
}

/// (label, Â, B̂) for every reference pair: case 01's matrices, the other cases' A_v.
fn reference_pairs() -> Vec<(String, Mat<f64>, Mat<f64>)> {
    let mut out = Vec::new();
    for case in [
        "01_simdist_matrices",
        "02_lds_invariance",
        "03_ring_deformation",
        "04_lorenz_noise_sweep",
    ] {
        let text = std::fs::read_to_string(format!("{}/case.json", dir(case))).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cfg = &json["dsa_config"];
        for pair in json["pairs"].as_array().unwrap() {
            let (a, b) = (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap());
            let (ma, mb) = if cfg.is_null() {
                (load_matrix(case, a), load_matrix(case, b))
            } else {
                let dsa = Dsa::new(DsaConfig {
                    n_delays: cfg["n_delays"].as_u64().unwrap() as usize,
                    delay_interval: cfg["delay_interval"].as_u64().unwrap() as usize,
                    rank: cfg["rank"]
                        .as_u64()
                        .map_or(Rank::Full, |r| Rank::Count(r as usize)),
                    ..DsaConfig::default()
                });
                let fit = |n| dsa.fit(&load(case, n)).unwrap().a_v().to_owned();
                (fit(a), fit(b))
            };
            out.push((format!("{case} {a}/{b}"), ma, mb));
        }
    }
    out
}

#[test]
fn default_search_finds_the_exhaustive_optimum() {
    let mut total = 0.0;
    for (label, a, b) in reference_pairs() {
        let exhaustive = OptimizerConfig {
            random_starts: 40,
            agreeing_starts: 0,
            ..OptimizerConfig::default()
        };
        let best = align(a.as_ref(), b.as_ref(), &exhaustive).unwrap().angular;
        for seed in 0..4 {
            let start = Instant::now();
            let config = OptimizerConfig {
                seed,
                ..OptimizerConfig::default()
            };
            let found = align(a.as_ref(), b.as_ref(), &config).unwrap();
            let seconds = start.elapsed().as_secs_f64();
            if seed == 0 {
                total += seconds;
                eprintln!(
                    "{label:<44} {:.6} ({} starts, {:.2} ms); exhaustive {best:.6}",
                    found.angular,
                    found.starts_run,
                    seconds * 1e3
                );
            }
            assert!(
                found.angular <= best + 1e-5,
                "{label} seed {seed}: {} but {best} exists",
                found.angular
            );
        }
    }
    eprintln!("all pairs, seed 0: {:.1} ms", total * 1e3);
}
