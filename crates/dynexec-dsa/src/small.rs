//! Small dense square matrices for the optimiser's inner loop. At n ≤ 50 a plain row-major
//! triple loop beats a general-purpose library call's setup cost, and the loop stays readable.

use faer::{Mat, MatRef};

/// A row-major n × n matrix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Square {
    pub n: usize,
    pub data: Vec<f64>,
}

impl Square {
    pub fn zeros(n: usize) -> Self {
        Self {
            n,
            data: vec![0.0; n * n],
        }
    }

    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// Copies `m` into the top-left corner of an `n × n` zero matrix (zero padding).
    pub fn padded(m: MatRef<'_, f64>, n: usize) -> Self {
        let mut out = Self::zeros(n);
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                out.data[i * n + j] = m[(i, j)];
            }
        }
        out
    }

    pub fn from_mat(m: MatRef<'_, f64>) -> Self {
        Self::padded(m, m.nrows())
    }

    pub fn to_mat(&self) -> Mat<f64> {
        Mat::from_fn(self.n, self.n, |i, j| self.get(i, j))
    }

    #[inline]
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    #[inline]
    pub fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.n + j] = v;
    }

    pub fn scale(&mut self, s: f64) {
        self.data.iter_mut().for_each(|v| *v *= s);
    }

    pub fn norm(&self) -> f64 {
        dot(&self.data, &self.data).sqrt()
    }

    /// `self · other`.
    pub fn mul(&self, other: &Self) -> Self {
        let n = self.n;
        let mut out = Self::zeros(n);
        for i in 0..n {
            let row = &mut out.data[i * n..(i + 1) * n];
            for k in 0..n {
                let a = self.data[i * n + k];
                if a == 0.0 {
                    continue;
                }
                let b = &other.data[k * n..(k + 1) * n];
                for (r, &bv) in row.iter_mut().zip(b) {
                    *r += a * bv;
                }
            }
        }
        out
    }

    /// `selfᵀ · other`.
    pub fn tmul(&self, other: &Self) -> Self {
        let n = self.n;
        let mut out = Self::zeros(n);
        for k in 0..n {
            let b = &other.data[k * n..(k + 1) * n];
            for i in 0..n {
                let a = self.data[k * n + i];
                if a == 0.0 {
                    continue;
                }
                let row = &mut out.data[i * n..(i + 1) * n];
                for (r, &bv) in row.iter_mut().zip(b) {
                    *r += a * bv;
                }
            }
        }
        out
    }

    /// `self · otherᵀ`.
    pub fn mult(&self, other: &Self) -> Self {
        let n = self.n;
        let mut out = Self::zeros(n);
        for i in 0..n {
            let a = &self.data[i * n..(i + 1) * n];
            for j in 0..n {
                out.data[i * n + j] = dot(a, &other.data[j * n..(j + 1) * n]);
            }
        }
        out
    }

    /// Solves `self · X = rhs` by LU with partial pivoting; `None` if singular.
    pub fn solve(&self, rhs: &Self) -> Option<Self> {
        let n = self.n;
        let mut lu = self.data.clone();
        let mut x = rhs.data.clone();
        for col in 0..n {
            let pivot = (col..n)
                .max_by(|&a, &b| lu[a * n + col].abs().total_cmp(&lu[b * n + col].abs()))?;
            if lu[pivot * n + col] == 0.0 {
                return None;
            }
            if pivot != col {
                for j in 0..n {
                    lu.swap(pivot * n + j, col * n + j);
                    x.swap(pivot * n + j, col * n + j);
                }
            }
            let d = lu[col * n + col];
            for r in col + 1..n {
                let factor = lu[r * n + col] / d;
                if factor == 0.0 {
                    continue;
                }
                for j in col..n {
                    lu[r * n + j] -= factor * lu[col * n + j];
                }
                for j in 0..n {
                    x[r * n + j] -= factor * x[col * n + j];
                }
            }
        }
        for col in (0..n).rev() {
            let d = lu[col * n + col];
            for j in 0..n {
                x[col * n + j] /= d;
            }
            for r in 0..col {
                let factor = lu[r * n + col];
                if factor == 0.0 {
                    continue;
                }
                for j in 0..n {
                    x[r * n + j] -= factor * x[col * n + j];
                }
            }
        }
        Some(Self { n, data: x })
    }

    /// Sign of the determinant (+1 or −1; +1 for a singular matrix).
    pub fn det_sign(&self) -> f64 {
        let n = self.n;
        let mut lu = self.data.clone();
        let mut sign = 1.0;
        for col in 0..n {
            let Some(pivot) =
                (col..n).max_by(|&a, &b| lu[a * n + col].abs().total_cmp(&lu[b * n + col].abs()))
            else {
                return 1.0;
            };
            if lu[pivot * n + col] == 0.0 {
                return 1.0;
            }
            if pivot != col {
                sign = -sign;
                for j in 0..n {
                    lu.swap(pivot * n + j, col * n + j);
                }
            }
            let d = lu[col * n + col];
            if d < 0.0 {
                sign = -sign;
            }
            for r in col + 1..n {
                let factor = lu[r * n + col] / d;
                for j in col..n {
                    lu[r * n + j] -= factor * lu[col * n + j];
                }
            }
        }
        sign
    }
}

#[inline]
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The Cayley transform `(I − Ω/2)⁻¹ (I + Ω/2)`: orthogonal with det +1 for skew Ω.
pub(crate) fn cayley(omega: &Square) -> Option<Square> {
    let n = omega.n;
    let mut minus = Square::identity(n);
    let mut plus = Square::identity(n);
    for k in 0..n * n {
        minus.data[k] -= 0.5 * omega.data[k];
        plus.data[k] += 0.5 * omega.data[k];
    }
    minus.solve(&plus)
}

/// splitmix64: a tiny, well-mixed generator; enough for reproducible random starts.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// A Haar-random orthogonal matrix with the requested determinant sign.
    pub fn orthogonal(&mut self, n: usize, det: f64) -> Square {
        let mut g = Square::zeros(n);
        g.data.iter_mut().for_each(|v| *v = self.normal());
        let mut q = gram_schmidt_columns(&g);
        if q.det_sign() != det.signum() {
            for i in 0..n {
                q.data[i * n] = -q.data[i * n];
            }
        }
        q
    }
}

/// Orthonormalises the columns (modified Gram–Schmidt, twice for stability).
pub(crate) fn gram_schmidt_columns(m: &Square) -> Square {
    let n = m.n;
    let mut cols: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..n).map(|i| m.get(i, j)).collect())
        .collect();
    for j in 0..n {
        for _ in 0..2 {
            for k in 0..j {
                let p = dot(&cols[j], &cols[k]);
                let (head, tail) = cols.split_at_mut(j);
                tail[0]
                    .iter_mut()
                    .zip(&head[k])
                    .for_each(|(a, b)| *a -= p * b);
            }
        }
        let norm = dot(&cols[j], &cols[j]).sqrt();
        if norm > 1e-300 {
            cols[j].iter_mut().for_each(|v| *v /= norm);
        } else {
            // Degenerate column: any unit vector orthogonal to the previous ones.
            let mut e = vec![0.0; n];
            for cand in 0..n {
                e.iter_mut().for_each(|v| *v = 0.0);
                e[cand] = 1.0;
                for k in 0..j {
                    let p = dot(&e, &cols[k]);
                    e.iter_mut().zip(&cols[k]).for_each(|(a, b)| *a -= p * b);
                }
                let en = dot(&e, &e).sqrt();
                if en > 1e-6 {
                    e.iter_mut().for_each(|v| *v /= en);
                    break;
                }
            }
            cols[j] = e.clone();
        }
    }
    let mut q = Square::zeros(n);
    for (j, col) in cols.iter().enumerate() {
        for (i, &v) in col.iter().enumerate() {
            q.set(i, j, v);
        }
    }
    q
}
