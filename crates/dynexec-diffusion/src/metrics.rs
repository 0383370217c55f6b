//! Image quality metrics: SSIM (Wang et al. 2004), which labels how many steps a prompt needs
//! and scores early stops against the full-step image, and the Fréchet distance (FID) between
//! two sets of feature vectors.

use dynexec_core::{Error, Result};

/// Gaussian window of SSIM: 11×11, σ = 1.5, as in the paper and scikit-image.
const WINDOW_RADIUS: usize = 5;
const WINDOW_SIGMA: f64 = 1.5;

/// Mean SSIM of two grey images `height × width` (row-major) whose values span `data_range`,
/// over the positions where the whole window fits.
pub fn ssim(a: &[f64], b: &[f64], height: usize, width: usize, data_range: f64) -> Result<f64> {
    let side = 2 * WINDOW_RADIUS + 1;
    if a.len() != height * width || b.len() != a.len() {
        return Err(Error::InvalidArgument(format!(
            "SSIM needs two {height}×{width} images, got {} and {} values",
            a.len(),
            b.len()
        )));
    }
    if height < side || width < side {
        return Err(Error::InvalidArgument(format!(
            "SSIM's {side}×{side} window does not fit a {height}×{width} image"
        )));
    }
    let kernel: Vec<f64> = (0..side)
        .map(|i| {
            (-((i as f64 - WINDOW_RADIUS as f64).powi(2)) / (2.0 * WINDOW_SIGMA.powi(2))).exp()
        })
        .collect();
    let total: f64 = kernel.iter().sum();
    let kernel: Vec<f64> = kernel.iter().map(|k| k / total).collect();
    let c1 = (0.01 * data_range).powi(2);
    let c2 = (0.03 * data_range).powi(2);
    let (mut sum, mut count) = (0.0, 0usize);
    for y in 0..=height - side {
        for x in 0..=width - side {
            let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for (dy, ky) in kernel.iter().enumerate() {
                for (dx, kx) in kernel.iter().enumerate() {
                    let k = ky * kx;
                    let i = (y + dy) * width + x + dx;
                    let (p, q) = (a[i], b[i]);
                    ma += k * p;
                    mb += k * q;
                    saa += k * p * p;
                    sbb += k * q * q;
                    sab += k * p * q;
                }
            }
            let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
            sum += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            count += 1;
        }
    }
    Ok(sum / count as f64)
}

/// [`ssim`] of two 8-bit grey images (row-major), as fractions of full scale.
pub fn ssim_u8(a: &[u8], b: &[u8], height: usize, width: usize) -> Result<f64> {
    let unit = |p: &[u8]| p.iter().map(|&v| v as f64 / 255.0).collect::<Vec<_>>();
    ssim(&unit(a), &unit(b), height, width, 1.0)
}

/// Fréchet distance between Gaussians fitted to two sets of feature vectors:
/// |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (Heusel et al. 2017), with population covariances.
pub fn frechet_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    let dim = a.first().map_or(0, Vec::len);
    if a.len() < 2 || b.len() < 2 || dim == 0 {
        return Err(Error::InvalidArgument(
            "the Fréchet distance needs at least two feature vectors on each side".into(),
        ));
    }
    if a.iter().chain(b).any(|v| v.len() != dim) {
        return Err(Error::InvalidArgument(
            "feature vectors of different lengths".into(),
        ));
    }
    let (mean_a, cov_a) = moments(a, dim);
    let (mean_b, cov_b) = moments(b, dim);
    let mean_term: f64 = mean_a
        .iter()
        .zip(&mean_b)
        .map(|(p, q)| (p - q).powi(2))
        .sum();
    // tr (Σ₁Σ₂)^½ = Σ √λ over the eigenvalues of the symmetric Σ₁^½ Σ₂ Σ₁^½.
    let sqrt_a = symmetric_sqrt(&cov_a, dim);
    let product = matmul(&matmul(&sqrt_a, &cov_b, dim), &sqrt_a, dim);
    let (values, _) = symmetric_eigen(&product, dim);
    let cross: f64 = values.iter().map(|v| v.max(0.0).sqrt()).sum();
    let trace = |m: &[f64]| (0..dim).map(|i| m[i * dim + i]).sum::<f64>();
    Ok((mean_term + trace(&cov_a) + trace(&cov_b) - 2.0 * cross).max(0.0))
}

fn moments(rows: &[Vec<f64>], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len() as f64;
    let mut mean = vec![0.0; dim];
    for r in rows {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / n;
        }
    }
    let mut cov = vec![0.0; dim * dim];
    for r in rows {
        for i in 0..dim {
            let di = r[i] - mean[i];
            for j in 0..dim {
                cov[i * dim + j] += di * (r[j] - mean[j]) / n;
            }
        }
    }
    (mean, cov)
}

fn matmul(a: &[f64], b: &[f64], dim: usize) -> Vec<f64> {
    let mut out = vec![0.0; dim * dim];
    for i in 0..dim {
        for k in 0..dim {
            let aik = a[i * dim + k];
            for j in 0..dim {
                out[i * dim + j] += aik * b[k * dim + j];
            }
        }
    }
    out
}

/// Square root of a symmetric positive semi-definite matrix (negative eigenvalues from
/// rounding are treated as zero).
fn symmetric_sqrt(m: &[f64], dim: usize) -> Vec<f64> {
    let (values, vectors) = symmetric_eigen(m, dim);
    let mut out = vec![0.0; dim * dim];
    for (k, value) in values.iter().enumerate() {
        let s = value.max(0.0).sqrt();
        for i in 0..dim {
            for j in 0..dim {
                out[i * dim + j] += s * vectors[i * dim + k] * vectors[j * dim + k];
            }
        }
    }
    out
}

/// Eigenvalues and eigenvectors (columns) of a symmetric matrix by cyclic Jacobi rotations:
/// plenty for the few-hundred-wide feature covariances FID uses here.
fn symmetric_eigen(m: &[f64], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; dim * dim];
    for i in 0..dim {
        v[i * dim + i] = 1.0;
    }
    let norm: f64 = a
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..dim)
            .flat_map(|i| (0..dim).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * dim + j].powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-14 * norm {
            break;
        }
        for p in 0..dim {
            for q in p + 1..dim {
                let apq = a[p * dim + q];
                if apq.abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (a[q * dim + q] - a[p * dim + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..dim {
                    let (akp, akq) = (a[k * dim + p], a[k * dim + q]);
                    a[k * dim + p] = c * akp - s * akq;
                    a[k * dim + q] = s * akp + c * akq;
                }
                for k in 0..dim {
                    let (apk, aqk) = (a[p * dim + k], a[q * dim + k]);
                    a[p * dim + k] = c * apk - s * aqk;
                    a[q * dim + k] = s * apk + c * aqk;
                }
                for k in 0..dim {
                    let (vkp, vkq) = (v[k * dim + p], v[k * dim + q]);
                    v[k * dim + p] = c * vkp - s * vkq;
                    v[k * dim + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..dim).map(|i| a[i * dim + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
        (0..28 * 28)
            .map(|k| f((k / 28) as f64, (k % 28) as f64))
            .collect()
    }

    #[test]
    fn ssim_matches_scikit_image() {
        // Reference: skimage.metrics.structural_similarity(x, y, gaussian_weights=True,
        // sigma=1.5, use_sample_covariance=False, data_range=1.0), scikit-image 0.26.
        let a = pattern(|i, j| ((i * 7.0 + j * 13.0) % 29.0) / 28.0);
        let b = pattern(|i, j| {
            (((i * 7.0 + j * 13.0) % 29.0) / 28.0 + 0.1 * (i + j).sin()).clamp(0.0, 1.0)
        });
        let c = pattern(|i, j| ((i * j) % 17.0) / 16.0);
        let inverted: Vec<f64> = a.iter().map(|v| 1.0 - v).collect();
        let contrast: Vec<f64> = a.iter().map(|v| 0.5 * v + 0.25).collect();
        let cases = [
            (&b, 0.9745397782283791),
            (&c, -0.07648914791832888),
            (&a, 1.0),
            (&inverted, -0.9888437143714189),
            (&contrast, 0.801546294032092),
        ];
        for (other, expected) in cases {
            let got = ssim(&a, other, 28, 28, 1.0).unwrap();
            assert!((got - expected).abs() < 1e-9, "{got} vs {expected}");
        }
        assert!(ssim(&a, &a[..100], 28, 28, 1.0).is_err());
        assert!(ssim(&a[..100], &a[..100], 10, 10, 1.0).is_err());
    }

    #[test]
    fn frechet_distance_of_known_gaussians() {
        // Samples (±1, ±2) in all four combinations: mean 0, covariance diag(1, 4).
        let square = |s: f64, shift: f64| -> Vec<Vec<f64>> {
            [(1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)]
                .iter()
                .map(|(x, y)| vec![x * s + shift, y * 2.0 * s])
                .collect()
        };
        let a = square(1.0, 0.0);
        assert!(frechet_distance(&a, &a).unwrap() < 1e-9);
        // Same covariance, mean shifted by 3: 9.
        let shifted = square(1.0, 3.0);
        assert!((frechet_distance(&a, &shifted).unwrap() - 9.0).abs() < 1e-9);
        // Diagonal covariances: Σ (σ₁ − σ₂)² = (1 − 2)² + (2 − 4)² = 5.
        let wider = square(2.0, 0.0);
        assert!((frechet_distance(&a, &wider).unwrap() - 5.0).abs() < 1e-9);
        // A rotated copy has the same distance (the trace term sees no basis).
        let rotate = |v: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            let (c, s) = (0.6, 0.8);
            v.iter()
                .map(|p| vec![c * p[0] - s * p[1], s * p[0] + c * p[1]])
                .collect()
        };
        let d = frechet_distance(&rotate(&a), &rotate(&wider)).unwrap();
        assert!((d - 5.0).abs() < 1e-9, "{d}");
        assert!(frechet_distance(&a[..1], &a).is_err());
    }
}
