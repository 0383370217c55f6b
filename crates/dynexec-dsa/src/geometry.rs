//! Geometry baselines on the raw samples (trials × time flattened to rows): they see the
//! point cloud, not the flow, which is exactly what DSA is contrasted with.

use crate::error::{Error, Result};
use crate::trajectories::Trajectories;
use faer::Mat;

/// Distance between samples that builds a representational dissimilarity matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RdmDistance {
    /// Euclidean distance between rows.
    Euclidean,
    /// 1 − Pearson correlation between rows (a constant row counts as uncorrelated).
    #[default]
    Correlation,
}

/// How two dissimilarity matrices are compared (over their upper triangles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RdmComparison {
    /// Spearman rank correlation (ties get average ranks).
    #[default]
    Spearman,
    /// Pearson correlation.
    Pearson,
}

/// Centred samples × features matrices of equal width (the narrower zero-padded).
fn centred_pair(x: &Trajectories, y: &Trajectories) -> Result<(Mat<f64>, Mat<f64>)> {
    if x.n_samples() != y.n_samples() {
        return Err(Error::Shape(format!(
            "geometry metrics need the same samples: {} vs {} (trials × time)",
            x.n_samples(),
            y.n_samples()
        )));
    }
    let width = x.features().max(y.features());
    Ok((centred(x, width), centred(y, width)))
}

fn centred(x: &Trajectories, width: usize) -> Mat<f64> {
    let (rows, n) = (x.n_samples(), x.features());
    let data = x.samples();
    let mut means = vec![0.0; n];
    for row in data.chunks_exact(n) {
        means.iter_mut().zip(row).for_each(|(m, v)| *m += v);
    }
    means.iter_mut().for_each(|m| *m /= rows as f64);
    Mat::from_fn(rows, width, |i, j| {
        if j < n {
            data[i * n + j] - means[j]
        } else {
            0.0
        }
    })
}

/// Angular Procrustes shape distance, arccos(‖XᵀY‖_* / (‖X‖_F ‖Y‖_F)) on centred data:
/// the angle left after the best rotation/reflection of one point cloud onto the other.
pub fn procrustes_angular(x: &Trajectories, y: &Trajectories) -> Result<f64> {
    let (x, y) = centred_pair(x, y)?;
    let (nx, ny) = (x.norm_l2(), y.norm_l2());
    if nx == 0.0 || ny == 0.0 {
        return Err(Error::Shape("constant data has no shape".into()));
    }
    let cross = x.transpose() * &y;
    let nuclear: f64 = cross
        .singular_values()
        .map_err(|e| Error::Numerical(format!("SVD: {e:?}")))?
        .iter()
        .sum();
    Ok((nuclear / (nx * ny)).clamp(-1.0, 1.0).acos())
}

/// Linear CKA on centred data: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F), 1 for identical geometry.
pub fn cka_linear(x: &Trajectories, y: &Trajectories) -> Result<f64> {
    let (x, y) = centred_pair(x, y)?;
    let xy = (y.transpose() * &x).norm_l2();
    let xx = (x.transpose() * &x).norm_l2();
    let yy = (y.transpose() * &y).norm_l2();
    if xx == 0.0 || yy == 0.0 {
        return Err(Error::Shape("constant data has no geometry".into()));
    }
    Ok(xy * xy / (xx * yy))
}

/// Representational similarity analysis: correlation between the two systems'
/// sample-by-sample dissimilarity matrices (upper triangles, diagonal excluded).
pub fn rsa(
    x: &Trajectories,
    y: &Trajectories,
    distance: RdmDistance,
    comparison: RdmComparison,
) -> Result<f64> {
    if x.n_samples() != y.n_samples() {
        return Err(Error::Shape(format!(
            "RSA needs the same samples: {} vs {}",
            x.n_samples(),
            y.n_samples()
        )));
    }
    if x.n_samples() < 3 {
        return Err(Error::Shape("RSA needs at least 3 samples".into()));
    }
    let (mut dx, mut dy) = (rdm(x, distance), rdm(y, distance));
    if comparison == RdmComparison::Spearman {
        dx = ranks(&dx);
        dy = ranks(&dy);
    }
    Ok(pearson(&dx, &dy))
}

/// Upper triangle (i < j, row-major) of the dissimilarity matrix.
fn rdm(x: &Trajectories, distance: RdmDistance) -> Vec<f64> {
    let (rows, n) = (x.n_samples(), x.features());
    let mut data = x.samples().to_vec();
    if distance == RdmDistance::Correlation {
        // Standardise each row once; the correlation is then a dot product / n.
        for row in data.chunks_exact_mut(n) {
            let mean = row.iter().sum::<f64>() / n as f64;
            row.iter_mut().for_each(|v| *v -= mean);
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
    }
    let mut out = Vec::with_capacity(rows * (rows - 1) / 2);
    for i in 0..rows {
        let a = &data[i * n..(i + 1) * n];
        for j in i + 1..rows {
            let b = &data[j * n..(j + 1) * n];
            out.push(match distance {
                RdmDistance::Euclidean => a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (p - q) * (p - q))
                    .sum::<f64>()
                    .sqrt(),
                RdmDistance::Correlation => 1.0 - a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>(),
            });
        }
    }
    out
}

/// Ranks starting at 1, ties averaged (as scipy's `rankdata`).
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_unstable_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let rank = (start + end + 1) as f64 / 2.0;
        order[start..end].iter().for_each(|&k| out[k] = rank);
        start = end;
    }
    out
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return 0.0;
    }
    sab / (saa * sbb).sqrt()
}
