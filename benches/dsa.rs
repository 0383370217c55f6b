//! Dynamical similarity analysis on the reference cases (tests/data/dsa-cases): one end-to-end
//! comparison (two DMD fits + the alignment search) and a 10 × 10 distance matrix.
//! Run: `cargo bench --profile dev --bench dsa` (the dev profile reuses the test build).
//! The reference implementation (dsa-metric 2.0.2, torch on one thread) takes a median 5.9 s
//! per comparison on a 2-core machine.

use criterion::{criterion_group, criterion_main, Criterion};
use dynexec_dsa::{distance_matrix, read_npy, Dsa, DsaConfig, Metric, Rank, Trajectories};
use std::path::PathBuf;

fn load(case: &str, name: &str) -> Trajectories {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/dsa-cases")
        .join(case)
        .join(format!("{name}.npy"));
    Trajectories::from_npy(read_npy(path).expect("reference array")).expect("trajectories")
}

/// Case 04's settings: n_delays 10, delay_interval 2, rank 10.
fn lorenz_dsa() -> Dsa {
    Dsa::new(DsaConfig {
        n_delays: 10,
        delay_interval: 2,
        rank: Rank::Count(10),
        ..DsaConfig::default()
    })
}

/// Case 02's settings: n_delays 2, full rank.
fn lds_dsa() -> Dsa {
    Dsa::new(DsaConfig {
        n_delays: 2,
        rank: Rank::Full,
        ..DsaConfig::default()
    })
}

fn comparison(c: &mut Criterion) {
    let mut group = c.benchmark_group("dsa_compare");
    group.sample_size(20);
    let lorenz = lorenz_dsa();
    let (clean, noisy) = (
        load("04_lorenz_noise_sweep", "clean"),
        load("04_lorenz_noise_sweep", "noise0.1"),
    );
    group.bench_function("04_clean_vs_noise0.1", |b| {
        b.iter(|| lorenz.compare(&clean, &noisy).expect("compare"))
    });
    let rossler = load("04_lorenz_noise_sweep", "rossler");
    group.bench_function("04_clean_vs_rossler", |b| {
        b.iter(|| lorenz.compare(&clean, &rossler).expect("compare"))
    });
    let lds = lds_dsa();
    let (x, y_lin, z) = (
        load("02_lds_invariance", "X"),
        load("02_lds_invariance", "Y_lin"),
        load("02_lds_invariance", "Z_swapped"),
    );
    group.bench_function("02_X_vs_Y_lin", |b| {
        b.iter(|| lds.compare(&x, &y_lin).expect("compare"))
    });
    group.bench_function("02_X_vs_Z_swapped", |b| {
        b.iter(|| lds.compare(&x, &z).expect("compare"))
    });
    group.finish();
}

fn matrix(c: &mut Criterion) {
    // Ten reference-sized systems: case 04's eight plus case 03's base and a deformation
    // would mix shapes, so take case 04's eight and two time-reversed copies.
    let names = [
        "clean",
        "noise0.01",
        "noise0.05",
        "noise0.1",
        "noise0.25",
        "noise0.5",
        "noise1",
        "rossler",
    ];
    let mut systems: Vec<Trajectories> = names
        .iter()
        .map(|n| load("04_lorenz_noise_sweep", n))
        .collect();
    for base in [0, 7] {
        let x = &systems[base];
        let (t, f) = (x.time(), x.features());
        let reversed: Vec<f64> = (0..t).rev().flat_map(|i| x.at(0, i).to_vec()).collect();
        systems.push(Trajectories::from_2d(t, f, reversed).expect("shape"));
    }
    let dsa = lorenz_dsa();
    let mut group = c.benchmark_group("dsa_distance_matrix");
    group.sample_size(10);
    group.bench_function("10x10_dsa_angular_wasserstein", |b| {
        b.iter(|| {
            distance_matrix(
                &systems,
                &dsa,
                &[Metric::DsaAngular, Metric::DsaWasserstein],
                None,
            )
            .expect("matrix")
        })
    });
    group.finish();
}

criterion_group!(benches, comparison, matrix);
criterion_main!(benches);
