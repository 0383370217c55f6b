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

/// `out = a · b` for row-major n × n slices.
pub(crate) fn mul_into(out: &mut [f64], a: &[f64], b: &[f64], n: usize) {
    out.iter_mut().for_each(|v| *v = 0.0);
    for (row, a_row) in out.chunks_exact_mut(n).zip(a.chunks_exact(n)) {
        for (&x, b_row) in a_row.iter().zip(b.chunks_exact(n)) {
            for (r, &y) in row.iter_mut().zip(b_row) {
                *r += x * y;
            }
        }
    }
}

/// `out = aᵀ · b`.
pub(crate) fn tmul_into(out: &mut [f64], a: &[f64], b: &[f64], n: usize) {
    out.iter_mut().for_each(|v| *v = 0.0);
    for (a_row, b_row) in a.chunks_exact(n).zip(b.chunks_exact(n)) {
        for (&x, row) in a_row.iter().zip(out.chunks_exact_mut(n)) {
            for (r, &y) in row.iter_mut().zip(b_row) {
                *r += x * y;
            }
        }
    }
}

/// `out = a · bᵀ`.
pub(crate) fn mult_into(out: &mut [f64], a: &[f64], b: &[f64], n: usize) {
    for (row, a_row) in out.chunks_exact_mut(n).zip(a.chunks_exact(n)) {
        for (r, b_row) in row.iter_mut().zip(b.chunks_exact(n)) {
            *r = dot(a_row, b_row);
        }
    }
}

/// Solves `m · x = rhs` in place (`m` is overwritten by its LU factors, `rhs` by x).
/// Returns false if `m` is singular.
pub(crate) fn solve_in_place(m: &mut [f64], rhs: &mut [f64], n: usize) -> bool {
    for col in 0..n {
        let mut pivot = col;
        for r in col + 1..n {
            if m[r * n + col].abs() > m[pivot * n + col].abs() {
                pivot = r;
            }
        }
        if m[pivot * n + col] == 0.0 {
            return false;
        }
        if pivot != col {
            for j in 0..n {
                m.swap(pivot * n + j, col * n + j);
                rhs.swap(pivot * n + j, col * n + j);
            }
        }
        let d = m[col * n + col];
        for r in col + 1..n {
            let factor = m[r * n + col] / d;
            if factor == 0.0 {
                continue;
            }
            for j in col..n {
                m[r * n + j] -= factor * m[col * n + j];
            }
            let (top, bottom) = rhs.split_at_mut(r * n);
            for (x, &y) in bottom[..n].iter_mut().zip(&top[col * n..col * n + n]) {
                *x -= factor * y;
            }
        }
    }
    for col in (0..n).rev() {
        let d = m[col * n + col];
        rhs[col * n..col * n + n].iter_mut().for_each(|x| *x /= d);
        for r in 0..col {
            let factor = m[r * n + col];
            if factor == 0.0 {
                continue;
            }
            let (top, bottom) = rhs.split_at_mut(col * n);
            for (x, &y) in top[r * n..r * n + n].iter_mut().zip(&bottom[..n]) {
                *x -= factor * y;
            }
        }
    }
    true
}

#[inline]
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
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
                for col in &cols[..j] {
                    let p = dot(&e, col);
                    e.iter_mut().zip(col).for_each(|(a, b)| *a -= p * b);
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
