//! Dynamical similarity analysis (DSA; Ostrow et al., NeurIPS 2023) and its geometry
//! baselines, on plain arrays.
//!
//! DSA asks whether two systems compute with the *same dynamics*, regardless of how their
//! state is embedded. Each system's trajectories are delay-embedded ([`delay_embed`]), a
//! linear model is fitted in the Hankel matrix's eigen-time-delay coordinates ([`Dmd`]), and
//! the two dynamics matrices are compared up to an orthogonal change of basis:
//! `min_C ‖Â − C B̂ Cᵀ‖_F` over orthogonal C ([`align`]). Geometry metrics —
//! [`procrustes_angular`], [`cka_linear`], [`rsa`] — compare the point clouds instead, and
//! disagree with DSA exactly when geometry and dynamics part ways.
//!
//! Trajectories are `time × features` or `trials × time × features` ([`Trajectories`]);
//! [`read_npy`] loads them from NumPy files and [`write_npy_f32`] saves them.
//! [`distance_matrix`] compares many systems at once, in parallel. [`dmd_entropy`] and
//! [`weight_entropy`] summarise a spectrum's spread. [`layers`] pairs two models' layers and
//! compares each pair on every metric; [`groups`] asks whether two groups of inputs (drafts
//! the target accepted and rejected, inputs that exit early and late) differ in their dynamics. Everything is computed in f64 with faer;
//! no GPU, no candle.
//!
//! The alignment search (Riemannian L-BFGS from informed and seeded random starts, both
//! determinant components) is deterministic for a seed and finds the exact zero on
//! conjugate pairs where the reference's Adam run stops at up to 0.05.
//!
//! ```
//! use dynexec_dsa::{cka_linear, procrustes_angular, Dsa, DsaConfig, Rank, Trajectories};
//!
//! // A damped rotation observed in 2-D, and the same trajectory in a stretched basis.
//! let (c, s) = (0.3f64.cos() * 0.99, 0.3f64.sin() * 0.99);
//! let mut x = vec![1.0, 0.0];
//! for t in 1..200 {
//!     let (a, b) = (x[2 * (t - 1)], x[2 * (t - 1) + 1]);
//!     x.extend([c * a - s * b + 0.1 * (t as f64).sin(), s * a + c * b + 0.1 * (2.3 * t as f64).cos()]);
//! }
//! let y: Vec<f64> = x.chunks(2).flat_map(|p| [2.0 * p[0] + p[1], 0.5 * p[1]]).collect();
//! let x = Trajectories::from_2d(200, 2, x)?;
//! let y = Trajectories::from_2d(200, 2, y)?;
//!
//! let dsa = Dsa::new(DsaConfig { n_delays: 2, rank: Rank::Full, ..DsaConfig::default() });
//! let scores = dsa.compare(&x, &y)?;
//! assert!(scores.angular < 1e-3); // same dynamics...
//! assert!(procrustes_angular(&x, &y)? > 0.1); // ...different geometry
//! assert!(cka_linear(&x, &y)? < 0.99);
//! # Ok::<(), dynexec_dsa::Error>(())
//! ```

#![warn(missing_docs)]

mod assignment;
pub mod bench;
mod dmd;
mod dsa;
mod embedding;
mod entropy;
mod error;
mod geometry;
pub mod groups;
pub mod layers;
mod matrix;
mod npy;
mod optimizer;
mod similarity;
mod small;
mod trajectories;

pub use assignment::min_cost_assignment;
pub use dmd::{Dmd, DmdConfig, Rank};
pub use dsa::{Dsa, DsaConfig};
pub use embedding::{delay_embed, Hankel};
pub use entropy::{dmd_entropy, spectral_entropy, weight_entropy};
pub use error::{Error, Result};
pub use geometry::{cka_linear, procrustes_angular, rsa, RdmComparison, RdmDistance};
pub use matrix::{distance_matrix, DistanceMatrix, Metric};
pub use npy::{npy_bytes, parse_npy, read_npy, write_npy_f32, write_npy_f64, Dtype, NpyArray};
pub use optimizer::{align, Alignment, OptimizerConfig};
pub use similarity::{compare_matrices, eigenvalue_wasserstein, Scores};
pub use trajectories::Trajectories;

/// The faer version this crate's matrix types come from (`Mat`, `MatRef`, `c64`).
pub use faer;
