//! Behaviour the DSA paper (Ostrow et al. 2023) establishes, on systems generated here:
//! invariance to orthogonal and (at full rank) invertible linear maps, graceful growth with
//! observation noise, and the cases where geometry and dynamics disagree.

use dynexec_dsa::{
    cka_linear, distance_matrix, procrustes_angular, Dsa, DsaConfig, Metric, OptimizerConfig, Rank,
    Trajectories,
};

/// splitmix64 + Box–Muller: reproducible Gaussian noise without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next(), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Block-diagonal damped rotations; `(radius, angle)` per 2-D block, a real eigenvalue for a
/// trailing odd dimension given as (value, 0).
fn rotation_blocks(blocks: &[(f64, f64)], dim: usize) -> Vec<f64> {
    let mut a = vec![0.0; dim * dim];
    let mut k = 0;
    for &(r, theta) in blocks {
        if k + 1 < dim {
            let (c, s) = (r * theta.cos(), r * theta.sin());
            a[k * dim + k] = c;
            a[k * dim + k + 1] = -s;
            a[(k + 1) * dim + k] = s;
            a[(k + 1) * dim + k + 1] = c;
            k += 2;
        } else {
            a[k * dim + k] = r;
            k += 1;
        }
    }
    a
}

/// `trials × time` steps of x_{t+1} = A x_t + σ_p ε, started from N(0, I).
fn simulate(a: &[f64], dim: usize, trials: usize, time: usize, noise: f64, seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(trials * time * dim);
    for _ in 0..trials {
        let mut x: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
        for _ in 0..time {
            out.extend_from_slice(&x);
            x = (0..dim)
                .map(|i| {
                    (0..dim).map(|j| a[i * dim + j] * x[j]).sum::<f64>() + noise * rng.normal()
                })
                .collect();
        }
    }
    out
}

/// Each sample multiplied by `m` (rows: output features).
fn map_features(data: &[f64], m: &[f64], dim: usize) -> Vec<f64> {
    data.chunks(dim)
        .flat_map(|x| (0..dim).map(move |i| (0..dim).map(|j| m[i * dim + j] * x[j]).sum::<f64>()))
        .collect()
}

fn random_orthogonal(dim: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed);
    let mut cols: Vec<Vec<f64>> = Vec::new();
    while cols.len() < dim {
        let mut v: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
        for c in &cols {
            let p: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(c).for_each(|(a, b)| *a -= p * b);
        }
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        cols.push(v.into_iter().map(|a| a / n).collect());
    }
    (0..dim * dim).map(|k| cols[k % dim][k / dim]).collect()
}

const DIM: usize = 4;
const TRIALS: usize = 8;
const TIME: usize = 150;

fn base_system() -> Vec<f64> {
    let a = rotation_blocks(&[(0.97, 0.25), (0.85, 0.6)], DIM);
    simulate(&a, DIM, TRIALS, TIME, 0.1, 11)
}

fn trajectories(data: Vec<f64>) -> Trajectories {
    Trajectories::from_3d(TRIALS, TIME, DIM, data).expect("shape")
}

fn full_rank_dsa() -> Dsa {
    Dsa::new(DsaConfig {
        n_delays: 2,
        rank: Rank::Full,
        ..DsaConfig::default()
    })
}

#[test]
fn orthogonal_copy_has_zero_distance() {
    let x = base_system();
    let y = map_features(&x, &random_orthogonal(DIM, 5), DIM);
    let (x, y) = (trajectories(x), trajectories(y));
    let scores = full_rank_dsa().compare(&x, &y).unwrap();
    assert!(scores.angular < 1e-3, "DSA {}", scores.angular);
    assert!(scores.wasserstein < 1e-8);
    assert!(procrustes_angular(&x, &y).unwrap() < 1e-6);
    assert!((cka_linear(&x, &y).unwrap() - 1.0).abs() < 1e-9);
}

#[test]
fn invertible_map_changes_geometry_not_dynamics() {
    let x = base_system();
    // Shear and stretch: far from orthogonal (condition number ≈ 10).
    let m = [
        3.0, 1.5, 0.0, 0.2, //
        0.0, 0.5, 0.3, 0.0, //
        0.4, 0.0, 1.0, -0.8, //
        0.0, 0.0, 0.0, 0.4,
    ];
    let y = map_features(&x, &m, DIM);
    let (x, y) = (trajectories(x), trajectories(y));
    let scores = full_rank_dsa().compare(&x, &y).unwrap();
    let procrustes = procrustes_angular(&x, &y).unwrap();
    eprintln!(
        "invertible map: Procrustes {procrustes:.4}, DSA {:.2e}",
        scores.angular
    );
    assert!(scores.angular < 1e-3, "DSA {}", scores.angular);
    assert!(procrustes > 0.3, "Procrustes {procrustes}");
    assert!(cka_linear(&x, &y).unwrap() < 0.95);
}

#[test]
fn same_geometry_different_dynamics() {
    // Two systems share their dominant, high-variance rotation sample for sample; a
    // low-variance mode relaxes smoothly in one (λ = 0.9) and flips sign every step in the
    // other (λ = −0.9). The point clouds nearly coincide; the dynamics do not.
    let dim = 3;
    let mut rng = Rng(3);
    let (trials, time) = (6, 200);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..trials {
        let (mut p, mut q) = (rng.normal() * 3.0, rng.normal() * 3.0);
        let (mut slow, mut flip) = (0.0, 0.0);
        for _ in 0..time {
            let e = 0.05 * rng.normal();
            x.extend([p, q, slow]);
            y.extend([p, q, flip]);
            let (c, s) = (0.98 * 0.2f64.cos(), 0.98 * 0.2f64.sin());
            (p, q) = (
                c * p - s * q + 0.3 * rng.normal(),
                s * p + c * q + 0.3 * rng.normal(),
            );
            slow = 0.9 * slow + e;
            flip = -0.9 * flip + e;
        }
    }
    let x = Trajectories::from_3d(trials, time, dim, x).unwrap();
    let y = Trajectories::from_3d(trials, time, dim, y).unwrap();
    let dsa = Dsa::new(DsaConfig {
        n_delays: 1,
        ..DsaConfig::default()
    });
    let scores = dsa.compare(&x, &y).unwrap();
    let procrustes = procrustes_angular(&x, &y).unwrap();
    eprintln!(
        "same geometry: Procrustes {procrustes:.4}, DSA {:.4}",
        scores.angular
    );
    assert!(procrustes < 0.1, "Procrustes {procrustes}");
    assert!(
        scores.angular > 5.0 * procrustes && scores.angular > 0.3,
        "DSA {} vs Procrustes {procrustes}",
        scores.angular
    );
}

#[test]
fn distance_grows_with_observation_noise() {
    let clean = base_system();
    let dsa = Dsa::new(DsaConfig {
        n_delays: 3,
        rank: Rank::Count(6),
        ..DsaConfig::default()
    });
    let x = trajectories(clean.clone());
    let mut rng = Rng(99);
    let mut distances = Vec::new();
    for sigma in [0.0, 0.05, 0.2, 0.5, 1.0, 2.0] {
        let noisy: Vec<f64> = clean.iter().map(|v| v + sigma * rng.normal()).collect();
        distances.push(dsa.compare(&x, &trajectories(noisy)).unwrap().angular);
    }
    eprintln!("DSA angular vs observation noise σ = 0, 0.05, 0.2, 0.5, 1, 2: {distances:.4?}");
    assert!(distances[0] < 1e-6, "no noise: {}", distances[0]);
    // Monotone up to a small slack (finite samples), and clearly larger at the end.
    for w in distances.windows(2) {
        assert!(w[1] >= w[0] - 0.01, "not monotone: {distances:?}");
    }
    assert!(distances[5] > distances[1] + 0.1, "{distances:?}");
}

#[test]
fn deterministic_for_a_seed_and_thread_count() {
    let systems: Vec<Trajectories> = (0..4)
        .map(|k| {
            let a = rotation_blocks(&[(0.95, 0.2 + 0.1 * k as f64), (0.8, 0.7)], DIM);
            trajectories(simulate(&a, DIM, TRIALS, TIME, 0.1, 100 + k))
        })
        .collect();
    let dsa = Dsa::new(DsaConfig {
        n_delays: 2,
        rank: Rank::Count(6),
        optimizer: OptimizerConfig {
            seed: 42,
            ..OptimizerConfig::default()
        },
        ..DsaConfig::default()
    });
    let metrics = [
        Metric::DsaAngular,
        Metric::DsaWasserstein,
        Metric::ProcrustesAngular,
    ];
    let one = distance_matrix(&systems, &dsa, &metrics, Some(1)).unwrap();
    let two = distance_matrix(&systems, &dsa, &metrics, Some(2)).unwrap();
    assert_eq!(one, two);
    let again = distance_matrix(&systems, &dsa, &metrics, Some(2)).unwrap();
    assert_eq!(one, again);
    // Symmetric, zero diagonal, and each entry equal to the pairwise call.
    let m = &one[0];
    for i in 0..4 {
        assert_eq!(m.get(i, i), 0.0);
        for j in 0..4 {
            assert_eq!(m.get(i, j), m.get(j, i));
        }
    }
    let direct = dsa.compare(&systems[1], &systems[3]).unwrap();
    assert_eq!(direct.angular, m.get(1, 3));
    assert_eq!(direct.wasserstein, one[1].get(1, 3));
}

#[test]
fn invariance_survives_ill_conditioned_data() {
    // One feature carries a 1e-8-scale signal: the kept singular values span 8+ decades, so
    // the fit must take the SVD path; the exact invariance to invertible maps still holds.
    let mut x = base_system();
    x.iter_mut().skip(3).step_by(DIM).for_each(|v| *v *= 1e-8);
    let m = [
        1.0, 0.5, 0.0, 0.0, //
        0.0, 2.0, 0.3, 0.0, //
        0.0, 0.0, 1.0, 0.0, //
        0.2, 0.0, 0.0, 1.0,
    ];
    let y = map_features(&x, &m, DIM);
    let (x, y) = (trajectories(x), trajectories(y));
    let dsa = full_rank_dsa();
    let fit = dsa.fit(&x).unwrap();
    let s = fit.singular_values();
    assert!(s[s.len() - 1] < 1e-7 * s[0], "not ill-conditioned: {s:?}");
    let scores = dsa.compare(&x, &y).unwrap();
    assert!(scores.angular < 1e-3, "DSA {}", scores.angular);
}
