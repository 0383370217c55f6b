//! The similarity-transform distance: min over orthogonal C of ‖Â − C B̂ Cᵀ‖_F for
//! unit-norm Â, B̂. Equivalently maximise f(C) = tr(Âᵀ C B̂ Cᵀ) = ⟨CᵀÂC, B̂⟩.
//!
//! The landscape is non-convex and O(n) has two components (det ±1), so one local method
//! is not enough. We run Riemannian L-BFGS (analytic gradient in the Lie algebra, Cayley
//! retraction, which keeps the determinant) from several starts, each in both components:
//! Schur bases with matched eigenvalues (the start that finds the global optimum of
//! non-conjugate pairs with similar spectra), bases aligned from the SVDs and from the
//! symmetric parts' eigenvectors (exact on generic conjugate pairs), identity, a reflection,
//! and seeded random rotations. Each start gets a coarse pass; the best is polished.

use crate::assignment::min_cost_assignment;
use crate::error::{Error, Result};
use crate::small::{dot, gram_schmidt_columns, mul_into, mult_into, tmul_into, SplitMix64, Square};
use faer::{c64, Mat, MatRef, Side};

/// Settings of the alignment search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptimizerConfig {
    /// Seed of the random starts; the result is a pure function of inputs and seed.
    pub seed: u64,
    /// Random orthogonal starts, alternating det +1 and det −1, after the informed ones.
    pub random_starts: usize,
    /// L-BFGS iterations per start.
    pub max_iters: usize,
    /// Stop the search once this many starts have come within 1e-4 rad of the best angle:
    /// more starts would only re-find it. 0 runs every start.
    pub agreeing_starts: usize,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            random_starts: 8,
            max_iters: 500,
            agreeing_starts: 3,
        }
    }
}

/// The best orthogonal alignment found.
#[derive(Debug, Clone)]
pub struct Alignment {
    /// The orthogonal C (size of the larger matrix; the smaller one is zero-padded).
    pub transform: Mat<f64>,
    /// arccos of tr(Âᵀ C B̂ Cᵀ), in radians, within [0, π].
    pub angular: f64,
    /// ‖Â − C B̂ Cᵀ‖_F = 2 sin(angular / 2).
    pub euclidean: f64,
    /// Starts run before the search stopped.
    pub starts_run: usize,
}

/// Aligns two square matrices (scaled to unit Frobenius norm, the smaller zero-padded).
pub fn align(
    a: MatRef<'_, f64>,
    b: MatRef<'_, f64>,
    config: &OptimizerConfig,
) -> Result<Alignment> {
    for (name, m) in [("first", a), ("second", b)] {
        if m.nrows() != m.ncols() || m.nrows() == 0 {
            return Err(Error::Shape(format!(
                "{name} matrix must be square and non-empty, got {}×{}",
                m.nrows(),
                m.ncols()
            )));
        }
        if (0..m.nrows()).any(|i| (0..m.ncols()).any(|j| !m[(i, j)].is_finite())) {
            return Err(Error::NonFinite(format!("{name} matrix")));
        }
    }
    let n = a.nrows().max(b.nrows());
    let (a, b) = (Square::padded(a, n), Square::padded(b, n));
    let (norm_a, norm_b) = (a.norm(), b.norm());
    if norm_a == 0.0 || norm_b == 0.0 {
        // No scale to normalise away: two zero matrices are identical, a zero matrix is
        // orthogonal (f = 0) to any other.
        let angular = if norm_a == norm_b {
            0.0
        } else {
            std::f64::consts::FRAC_PI_2
        };
        return Ok(Alignment {
            transform: Mat::identity(n, n),
            angular,
            euclidean: 2.0 * (0.5 * angular).sin(),
            starts_run: 0,
        });
    }
    let problem = Problem {
        a: scaled(a, 1.0 / norm_a),
        b: scaled(b, 1.0 / norm_b),
    };

    let mut rng = SplitMix64::new(config.seed);
    let mut starts = informed_starts(&problem.a, &problem.b);
    for k in 0..config.random_starts {
        starts.push(rng.orthogonal(n, if k % 2 == 0 { 1.0 } else { -1.0 }));
    }

    // Every start runs to a coarse tolerance and only the winner is polished: the local maxima
    // of this problem are separated by far more than the coarse error, and the last digits cost
    // most of the iterations (the landscape is flat wherever Â is close to a multiple of I).
    let mut best: Option<(f64, Square)> = None;
    let mut angles = Vec::new();
    for start in starts {
        let (mut value, mut c) =
            problem.maximise(start, COARSE_ITERS.min(config.max_iters), COARSE_TOLERANCE);
        if value > 1.0 - 1e-8 {
            // Possibly an exact conjugate: polish now so that it can end the search.
            (value, c) = problem.maximise(c, config.max_iters, FINE_TOLERANCE);
        }
        angles.push(value.clamp(-1.0, 1.0).acos());
        if best.as_ref().is_none_or(|(b, _)| value > *b) {
            best = Some((value, c));
        }
        let (best_value, best_c) = best.as_ref().expect("set above");
        let best_angle = best_value.clamp(-1.0, 1.0).acos();
        let agreeing = angles
            .iter()
            .filter(|&&t| t <= best_angle + AGREEMENT)
            .count();
        // Zero distance cannot be improved on.
        let exact = problem.residual_norm(best_c) < 1e-7;
        if exact || (config.agreeing_starts > 0 && agreeing >= config.agreeing_starts) {
            break;
        }
    }
    let starts_run = angles.len();
    let (_, c) = best.ok_or_else(|| Error::Numerical("no optimiser start ran".into()))?;
    let (_, c) = problem.maximise(c, config.max_iters, FINE_TOLERANCE);
    // The residual norm gives a far more accurate small angle than arccos(1 − ε).
    let euclidean = problem.residual_norm(&c);
    let angular = 2.0 * (0.5 * euclidean).min(1.0).asin();
    Ok(Alignment {
        transform: c.to_mat(),
        angular,
        euclidean,
        starts_run,
    })
}

/// Iteration cap and gradient norm of the coarse pass every start gets. At 50 iterations the
/// ranking of near-equal local maxima goes wrong on a reference pair; 100 is safe on all.
const COARSE_ITERS: usize = 100;
const COARSE_TOLERANCE: f64 = 1e-6;
/// Gradient norm of the final polish; f's error is O(‖Γ‖²).
const FINE_TOLERANCE: f64 = 1e-9;
/// Starts whose angle is within this of the best count as having found it (radians).
const AGREEMENT: f64 = 1e-4;

fn scaled(mut m: Square, factor: f64) -> Square {
    m.scale(factor);
    m
}

struct Problem {
    a: Square,
    b: Square,
}

/// Buffers for one start's inner loop, so iterations allocate nothing.
struct Workspace {
    n: usize,
    ac: Vec<f64>,
    m: Vec<f64>,
    p: Vec<f64>,
    q: Vec<f64>,
    lhs: Vec<f64>,
    rotation: Vec<f64>,
}

impl Workspace {
    fn new(n: usize) -> Self {
        let z = || vec![0.0; n * n];
        Self {
            n,
            ac: z(),
            m: z(),
            p: z(),
            q: z(),
            lhs: z(),
            rotation: z(),
        }
    }

    /// `out = c · cay(omega)` with cay(Ω) = (I − Ω/2)⁻¹ (I + Ω/2), orthogonal with det +1.
    fn cayley_step(&mut self, c: &[f64], omega: &[f64], out: &mut [f64]) -> bool {
        let n = self.n;
        let cells = self.lhs.iter_mut().zip(self.rotation.iter_mut()).zip(omega);
        for (k, ((lhs, rhs), w)) in cells.enumerate() {
            let id = if k % (n + 1) == 0 { 1.0 } else { 0.0 };
            *lhs = id - 0.5 * w;
            *rhs = id + 0.5 * w;
        }
        if !crate::small::solve_in_place(&mut self.lhs, &mut self.rotation, n) {
            return false;
        }
        mul_into(out, c, &self.rotation, n);
        true
    }
}

impl Problem {
    /// f(C) and, into `gradient`, the Riemannian gradient Γ = skew(M B̂ᵀ + Mᵀ B̂) with
    /// M = CᵀÂC, so that f(C·exp(tΩ)) = f(C) + t⟨Γ, Ω⟩ + O(t²).
    fn value_and_gradient(&self, c: &[f64], ws: &mut Workspace, gradient: &mut [f64]) -> f64 {
        let n = ws.n;
        mul_into(&mut ws.ac, &self.a.data, c, n);
        tmul_into(&mut ws.m, c, &ws.ac, n);
        let value = dot(&ws.m, &self.b.data);
        mult_into(&mut ws.p, &ws.m, &self.b.data, n);
        tmul_into(&mut ws.q, &ws.m, &self.b.data, n);
        for i in 0..n {
            for j in 0..n {
                let s = ws.p[i * n + j] + ws.q[i * n + j];
                let t = ws.p[j * n + i] + ws.q[j * n + i];
                gradient[i * n + j] = 0.5 * (s - t);
            }
        }
        value
    }

    fn value(&self, c: &Square) -> f64 {
        let mut ws = Workspace::new(c.n);
        let mut g = vec![0.0; c.n * c.n];
        self.value_and_gradient(&c.data, &mut ws, &mut g)
    }

    fn residual_norm(&self, c: &Square) -> f64 {
        let rotated = c.mul(&self.b).mult(c);
        self.a
            .data
            .iter()
            .zip(&rotated.data)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt()
    }

    /// Riemannian L-BFGS on −f, in Lie-algebra coordinates with identity transport, Armijo
    /// backtracking along the Cayley curve C·cay(tΩ).
    fn maximise(&self, start: Square, max_iters: usize, tolerance: f64) -> (f64, Square) {
        const MEMORY: usize = 12;
        let n = start.n;
        let mut ws = Workspace::new(n);
        let mut c = start.data;
        let mut trial = vec![0.0; n * n];
        let mut gamma = vec![0.0; n * n];
        let mut gamma_trial = vec![0.0; n * n];
        let mut f = self.value_and_gradient(&c, &mut ws, &mut gamma);
        let mut history = History::new(MEMORY, n * n);
        let mut d = vec![0.0; n * n];
        let mut step = vec![0.0; n * n];
        let mut stalled = 0;
        for _ in 0..max_iters {
            // Ascent on f: the gradient of −f is −Γ.
            let gnorm = dot(&gamma, &gamma).sqrt();
            if gnorm < tolerance {
                break;
            }
            history.direction(&gamma, &mut d);
            let mut slope = dot(&d, &gamma);
            if slope <= 0.0 || !slope.is_finite() {
                history.clear();
                d.copy_from_slice(&gamma);
                slope = gnorm * gnorm;
            }
            // Without curvature information, take a small first step.
            let mut t = if history.is_empty() {
                (0.1 / gnorm).min(1.0)
            } else {
                1.0
            };
            let mut accepted = None;
            for _ in 0..40 {
                step.iter_mut().zip(&d).for_each(|(s, v)| *s = t * v);
                if ws.cayley_step(&c, &step, &mut trial) {
                    let f_trial = self.value_and_gradient(&trial, &mut ws, &mut gamma_trial);
                    if f_trial >= f + 1e-4 * t * slope {
                        accepted = Some(f_trial);
                        break;
                    }
                }
                t *= 0.5;
            }
            let Some(f_trial) = accepted else {
                break;
            };
            history.push(&step, &gamma, &gamma_trial);
            let gain = f_trial - f;
            std::mem::swap(&mut c, &mut trial);
            std::mem::swap(&mut gamma, &mut gamma_trial);
            f = f_trial;
            stalled = if gain <= 1e-15 * f.abs().max(1e-3) {
                stalled + 1
            } else {
                0
            };
            if stalled >= 3 {
                break;
            }
        }
        // Cayley products drift from orthogonality only at rounding level; re-orthonormalise so
        // the reported distance is for an exactly orthogonal C.
        let c = gram_schmidt_columns(&Square { n, data: c });
        (self.value(&c), c)
    }
}

/// L-BFGS memory for ascent on f: pairs (s, y) with y = −(Γ_new − Γ_old) (the change of −f's
/// gradient), in a ring buffer.
struct History {
    capacity: usize,
    pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)>,
    alphas: Vec<f64>,
    len: usize,
}

impl History {
    fn new(capacity: usize, len: usize) -> Self {
        Self {
            capacity,
            pairs: std::collections::VecDeque::with_capacity(capacity),
            alphas: vec![0.0; capacity],
            len,
        }
    }

    fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    fn clear(&mut self) {
        self.pairs.clear();
    }

    fn push(&mut self, s: &[f64], gamma_old: &[f64], gamma_new: &[f64]) {
        let (mut s_buf, mut y_buf) = if self.pairs.len() == self.capacity {
            let (s, y, _) = self.pairs.pop_front().unwrap_or_default();
            (s, y)
        } else {
            (vec![0.0; self.len], vec![0.0; self.len])
        };
        s_buf.copy_from_slice(s);
        y_buf
            .iter_mut()
            .zip(gamma_old.iter().zip(gamma_new))
            .for_each(|(y, (o, n))| *y = o - n);
        let sy = dot(&s_buf, &y_buf);
        // Only curvature-positive pairs keep the inverse-Hessian model positive definite.
        if sy > 1e-12 * dot(&s_buf, &s_buf).sqrt() * dot(&y_buf, &y_buf).sqrt() {
            self.pairs.push_back((s_buf, y_buf, 1.0 / sy));
        }
    }

    /// Two-loop recursion: `d = H · Γ`, an ascent direction.
    fn direction(&mut self, gamma: &[f64], d: &mut [f64]) {
        d.copy_from_slice(gamma);
        for (k, (s, y, rho)) in self.pairs.iter().enumerate().rev() {
            let alpha = rho * dot(s, d);
            self.alphas[k] = alpha;
            d.iter_mut().zip(y).for_each(|(q, yi)| *q -= alpha * yi);
        }
        if let Some((s, y, _)) = self.pairs.back() {
            let scale = dot(s, y) / dot(y, y);
            d.iter_mut().for_each(|v| *v *= scale);
        }
        for (k, (s, y, rho)) in self.pairs.iter().enumerate() {
            let beta = rho * dot(y, d);
            let coef = self.alphas[k] - beta;
            d.iter_mut().zip(s).for_each(|(q, si)| *q += coef * si);
        }
    }
}

/// Identity, a reflection, and bases aligned from decompositions of Â and B̂ (each in both
/// determinant components).
fn informed_starts(a: &Square, b: &Square) -> Vec<Square> {
    let n = a.n;
    let mut starts = Vec::new();
    if n >= 2 {
        // Most informative first: the search may stop early once starts agree.
        for pair in [
            eigen_matched(a, b),
            svd_aligned(a, b),
            symmetric_aligned(a, b),
        ]
        .into_iter()
        .flatten()
        {
            starts.extend(pair);
        }
    }
    starts.push(Square::identity(n));
    if n >= 2 {
        let mut swap = Square::identity(n);
        swap.set(0, 0, 0.0);
        swap.set(1, 1, 0.0);
        swap.set(0, 1, 1.0);
        swap.set(1, 0, 1.0);
        starts.push(swap);
    }
    starts
}

/// Matches the eigenvalues of Â and B̂ (Hungarian), then maps B̂'s invariant subspaces onto
/// Â's in that order. Orthonormalising real eigenvector bases in a common order yields Schur
/// vectors of both matrices with matched diagonals, so C = Q_A Q_Bᵀ brings the two real Schur
/// forms together: the right start for non-conjugate pairs with similar spectra, where the
/// optimiser otherwise often settles on a local maximum that pairs the wrong modes.
fn eigen_matched(a: &Square, b: &Square) -> Option<[Square; 2]> {
    let n = a.n;
    let ea = a.to_mat().eigen().ok()?;
    let eb = b.to_mat().eigen().ok()?;
    let la: Vec<c64> = (0..n).map(|i| ea.S()[i]).collect();
    let lb: Vec<c64> = (0..n).map(|i| eb.S()[i]).collect();
    let cost: Vec<f64> = (0..n * n)
        .map(|k| (la[k / n] - lb[k % n]).norm_sqr())
        .collect();
    let (matching, _) = min_cost_assignment(&cost, n);
    // Â's modes by decreasing modulus: the dominant subspaces are aligned exactly, later ones
    // only after orthogonalisation against them.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| la[j].norm().total_cmp(&la[i].norm()).then(i.cmp(&j)));
    let (mut cols_a, mut cols_b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut used_a, mut used_b) = (vec![false; n], vec![false; n]);
    for &i in &order {
        let j = matching[i];
        if used_a[i] || used_b[j] {
            continue;
        }
        used_a[i] = true;
        used_b[j] = true;
        let complex = la[i].im.abs() > 1e-12 && lb[j].im.abs() > 1e-12;
        let (va, vb) = (ea.U().col(i), eb.U().col(j));
        if complex {
            // (Re v, Im v) spans the rotation plane; conjugating B's vector when the matched
            // eigenvalues sit in opposite half-planes keeps the two rotations in the same sense.
            let flip = if (la[i].im > 0.0) == (lb[j].im > 0.0) {
                1.0
            } else {
                -1.0
            };
            cols_a.push((0..n).map(|r| va[r].re).collect::<Vec<f64>>());
            cols_a.push((0..n).map(|r| va[r].im).collect::<Vec<f64>>());
            cols_b.push((0..n).map(|r| vb[r].re).collect::<Vec<f64>>());
            cols_b.push((0..n).map(|r| flip * vb[r].im).collect::<Vec<f64>>());
            // The conjugate partners belong to the same planes.
            if let Some(k) = (0..n).find(|&k| {
                !used_a[k] && (la[k] - la[i].conj()).norm() < 1e-9 * (1.0 + la[i].norm())
            }) {
                used_a[k] = true;
            }
            if let Some(k) = (0..n).find(|&k| {
                !used_b[k] && (lb[k] - lb[j].conj()).norm() < 1e-9 * (1.0 + lb[j].norm())
            }) {
                used_b[k] = true;
            }
        } else {
            let real_part = |v: faer::ColRef<'_, c64>| -> Vec<f64> {
                let re: Vec<f64> = (0..n).map(|r| v[r].re).collect();
                let im: Vec<f64> = (0..n).map(|r| v[r].im).collect();
                if dot(&re, &re) >= dot(&im, &im) {
                    re
                } else {
                    im
                }
            };
            cols_a.push(real_part(va));
            cols_b.push(real_part(vb));
        }
    }
    cols_a.truncate(n);
    cols_b.truncate(n);
    let basis = |cols: &[Vec<f64>]| {
        let mut m = Square::zeros(n);
        for (j, col) in cols.iter().enumerate() {
            for (i, &v) in col.iter().enumerate() {
                m.set(i, j, v);
            }
        }
        gram_schmidt_columns(&m)
    };
    let (qa, qb) = (basis(&cols_a), basis(&cols_b));
    let c = qa.mult(&qb);
    let mut reflected = qb.clone();
    for i in 0..n {
        reflected.data[i * n + n - 1] = -reflected.data[i * n + n - 1];
    }
    Some([c, qa.mult(&reflected)])
}

/// If A = Q B Qᵀ, the SVDs satisfy U_A = Q U_B D and V_A = Q V_B D for a sign matrix D,
/// and D is readable from U_AᵀV_A = D (U_BᵀV_B) D. Returns Q and Q with the last sign flipped
/// (the other determinant).
fn svd_aligned(a: &Square, b: &Square) -> Option<[Square; 2]> {
    let sa = a.to_mat().svd().ok()?;
    let sb = b.to_mat().svd().ok()?;
    let (ua, va) = (Square::from_mat(sa.U()), Square::from_mat(sa.V()));
    let (ub, vb) = (Square::from_mat(sb.U()), Square::from_mat(sb.V()));
    let signs = resolve_signs(&ua.tmul(&va), &ub.tmul(&vb));
    Some([false, true].map(|flip| {
        let d = flipped(&signs, flip);
        // Q ≈ (U_A D U_Bᵀ + V_A D V_Bᵀ)/2, made exactly orthogonal by its polar factor.
        let mut m = with_signs(&ua, &d).mult(&ub);
        let m2 = with_signs(&va, &d).mult(&vb);
        m.data.iter_mut().zip(&m2.data).for_each(|(x, y)| *x += y);
        polar(&m)
    }))
}

/// Same idea with the eigenvectors of the symmetric parts: E_Aᵀ Â E_A = D (E_Bᵀ B̂ E_B) D.
fn symmetric_aligned(a: &Square, b: &Square) -> Option<[Square; 2]> {
    let sym = |m: &Square| Mat::from_fn(m.n, m.n, |i, j| 0.5 * (m.get(i, j) + m.get(j, i)));
    let ea = sym(a).self_adjoint_eigen(Side::Lower).ok()?;
    let eb = sym(b).self_adjoint_eigen(Side::Lower).ok()?;
    let (ea, eb) = (Square::from_mat(ea.U()), Square::from_mat(eb.U()));
    let signs = resolve_signs(&ea.tmul(&a.mul(&ea)), &eb.tmul(&b.mul(&eb)));
    Some([false, true].map(|flip| with_signs(&ea, &flipped(&signs, flip)).mult(&eb)))
}

fn flipped(signs: &[f64], flip: bool) -> Vec<f64> {
    let mut d = signs.to_vec();
    if flip {
        if let Some(last) = d.last_mut() {
            *last = -*last;
        }
    }
    d
}

/// Columns of `m` multiplied by `signs`.
fn with_signs(m: &Square, signs: &[f64]) -> Square {
    let mut out = m.clone();
    for i in 0..m.n {
        for (j, s) in signs.iter().enumerate() {
            out.data[i * m.n + j] *= s;
        }
    }
    out
}

/// Signs d maximising Σ_{i≠j} d_i d_j M_A[i,j] M_B[i,j] (M_A ≈ D M_B D): a maximum spanning
/// tree fixes each sign from its strongest link, then single flips polish.
fn resolve_signs(ma: &Square, mb: &Square) -> Vec<f64> {
    let n = ma.n;
    let w = |i: usize, j: usize| ma.get(i, j) * mb.get(i, j) + ma.get(j, i) * mb.get(j, i);
    let mut signs = vec![0.0; n];
    signs[0] = 1.0;
    for _ in 1..n {
        let mut best = (0.0, usize::MAX, usize::MAX);
        for i in (0..n).filter(|&i| signs[i] != 0.0) {
            for j in (0..n).filter(|&j| signs[j] == 0.0) {
                if best.1 == usize::MAX || w(i, j).abs() > best.0 {
                    best = (w(i, j).abs(), i, j);
                }
            }
        }
        let (_, i, j) = best;
        signs[j] = if w(i, j) >= 0.0 { signs[i] } else { -signs[i] };
    }
    for _ in 0..n {
        let mut changed = false;
        for i in 0..n {
            let pull: f64 = (0..n).filter(|&j| j != i).map(|j| w(i, j) * signs[j]).sum();
            if pull * signs[i] < 0.0 {
                signs[i] = -signs[i];
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    signs
}

/// The orthogonal polar factor U Vᵀ of m = U S Vᵀ.
fn polar(m: &Square) -> Square {
    match m.to_mat().svd() {
        Ok(svd) => Square::from_mat(svd.U()).mult(&Square::from_mat(svd.V())),
        Err(_) => Square::identity(m.n),
    }
}
