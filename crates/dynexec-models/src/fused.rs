//! Fused training ops for the CPU: row normalization, softmax over the last dimension and
//! exact (erf) GELU, each one pass forward and one pass backward.
//!
//! Composed from candle's primitives, each of these is 5–12 tensor ops forward and twice as
//! many backward, every one a fresh allocation and a pass over memory; training an encoder
//! spends most of its time there, not in the matmuls. Each op here gives the composed
//! version's values and gradients (tests check both); f32 on the CPU only, so callers keep
//! the composed ops for other devices and types ([`fusable`]).
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 1.]], &Device::Cpu)?;
//! let probs = dynexec_models::fused::softmax_last_dim(&x)?;
//! let sums = probs.sum(1)?.to_vec1::<f32>()?;
//! assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
//! # Ok(()) }
//! ```

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Whether the fused ops can run on `x`: f32 on the CPU.
pub fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The contiguous f32 data of a CPU tensor's storage under `layout`.
fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input")
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// A tensor's values as a vector, row-major.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

fn last_dim(layout: &Layout) -> Result<usize> {
    layout
        .dims()
        .last()
        .copied()
        .filter(|&d| d > 0)
        .ok_or_else(|| {
            candle_core::Error::Msg("a fused op needs a non-empty last dimension".into())
        })
}

/// Each row (last dimension) shifted to mean 0 and scaled to variance 1: layer norm without
/// its affine part, `x̂ = (x − mean) / sqrt(var + eps)`.
pub fn normalize_rows(x: &Tensor, eps: f32) -> Result<Tensor> {
    x.apply_op1(NormalizeRows { eps })
}

struct NormalizeRows {
    eps: f32,
}

impl NormalizeRows {
    /// A row's mean and reciprocal standard deviation.
    fn statistics(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl CustomOp1 for NormalizeRows {
    fn name(&self) -> &'static str {
        "normalize-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous(storage, layout, self.name())?;
        let dim = last_dim(layout)?;
        let mut out = Vec::with_capacity(input.len());
        for row in input.chunks_exact(dim) {
            let (mean, rstd) = self.statistics(row);
            out.extend(row.iter().map(|v| (v - mean) * rstd));
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)), means over the row.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dim = arg.dims().last().copied().unwrap_or(1).max(1);
        let (x, normed, g) = (values(arg)?, values(res)?, values(grad)?);
        let n = dim as f32;
        let mut dx = Vec::with_capacity(x.len());
        for ((row, xhat), g) in x
            .chunks_exact(dim)
            .zip(normed.chunks_exact(dim))
            .zip(g.chunks_exact(dim))
        {
            let (_, rstd) = self.statistics(row);
            let mean_g = g.iter().sum::<f32>() / n;
            let mean_gx = g.iter().zip(xhat).map(|(g, x)| g * x).sum::<f32>() / n;
            dx.extend(
                g.iter()
                    .zip(xhat)
                    .map(|(g, x)| rstd * (g - mean_g - x * mean_gx)),
            );
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Layer norm over the last dimension with its affine part: the fused normalization, then
/// the fused `x̂ · weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    normalize_rows(x, eps)?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, ScaleShiftRows)
}

/// `x + bias`, the bias added to every row (last dimension). Its backward sums the rows for
/// the bias's gradient in one pass, where a broadcast add's reduces over strided dimensions.
pub fn add_row_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op2(&bias.contiguous()?, AddRowBias)
}

/// Column sums of `g` viewed as rows of `dim`, and optionally of `g · other` alongside.
fn column_sums(g: &[f32], other: Option<&[f32]>, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut plain = vec![0f32; dim];
    let mut weighted = vec![0f32; if other.is_some() { dim } else { 0 }];
    for (r, row) in g.chunks_exact(dim).enumerate() {
        plain.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        if let Some(other) = other {
            let o = &other[r * dim..(r + 1) * dim];
            for ((s, v), w) in weighted.iter_mut().zip(row).zip(o) {
                *s += v * w;
            }
        }
    }
    (plain, weighted)
}

fn row_vector(storage: &CpuStorage, layout: &Layout, dim: usize, what: &str) -> Result<Vec<f32>> {
    let v = contiguous(storage, layout, what)?;
    if v.len() != dim {
        candle_core::bail!(
            "{what}: a per-row vector of {} values for rows of {dim}",
            v.len()
        )
    }
    Ok(v.to_vec())
}

struct AddRowBias;

impl candle_core::CustomOp2 for AddRowBias {
    fn name(&self) -> &'static str {
        "add-row-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let dim = last_dim(l1)?;
        let bias = row_vector(s2, l2, dim, self.name())?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(dim) {
            out.extend(row.iter().zip(&bias).map(|(v, b)| v + b));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dim = arg2.elem_count().max(1);
        let (db, _) = column_sums(&values(grad)?, None, dim);
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(db, arg2.shape(), arg2.device())?),
        ))
    }
}

/// `x · weight + bias` per row.
struct ScaleShiftRows;

impl candle_core::CustomOp3 for ScaleShiftRows {
    fn name(&self) -> &'static str {
        "scale-shift-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let dim = last_dim(l1)?;
        let weight = row_vector(s2, l2, dim, self.name())?;
        let bias = row_vector(s3, l3, dim, self.name())?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(dim) {
            out.extend(
                row.iter()
                    .zip(&weight)
                    .zip(&bias)
                    .map(|((v, w), b)| v * w + b),
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// dx = g · w; dw = Σ_rows g · x; db = Σ_rows g.
    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        arg3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dim = arg2.elem_count().max(1);
        let (x, w, g) = (values(arg1)?, values(arg2)?, values(grad)?);
        let (db, dw) = column_sums(&g, Some(&x), dim);
        let mut dx = Vec::with_capacity(g.len());
        for row in g.chunks_exact(dim) {
            dx.extend(row.iter().zip(&w).map(|(g, w)| g * w));
        }
        Ok((
            Some(Tensor::from_vec(dx, arg1.shape(), arg1.device())?),
            Some(Tensor::from_vec(dw, arg2.shape(), arg2.device())?),
            Some(Tensor::from_vec(db, arg3.shape(), arg3.device())?),
        ))
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(SoftmaxLastDim)
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous(storage, layout, self.name())?;
        let dim = last_dim(layout)?;
        let mut out = Vec::with_capacity(input.len());
        for row in input.chunks_exact(dim) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let start = out.len();
            let mut sum = 0f32;
            for &v in row {
                let e = (v - max).exp();
                sum += e;
                out.push(e);
            }
            out[start..].iter_mut().for_each(|e| *e /= sum);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// dx = y · (g − Σ g·y), the sum over the row.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dim = arg.dims().last().copied().unwrap_or(1).max(1);
        let (y, g) = (values(res)?, values(grad)?);
        let mut dx = Vec::with_capacity(y.len());
        for (y, g) in y.chunks_exact(dim).zip(g.chunks_exact(dim)) {
            let dot = y.iter().zip(g).map(|(y, g)| y * g).sum::<f32>();
            dx.extend(y.iter().zip(g).map(|(y, g)| y * (g - dot)));
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// GELU with the exact normal CDF, `x · Φ(x)`, as BERT's `gelu`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(GeluErf)
}

struct GeluErf;

/// Φ(x), the standard normal CDF, as candle's `gelu_erf` computes it.
fn normal_cdf(x: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous(storage, layout, self.name())?;
        let out = input.iter().map(|&x| normal_cdf(x) * x).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// d/dx x·Φ(x) = Φ(x) + x·φ(x), with Φ(x) read back from the output (y / x) rather than
    /// a second erf, except near 0 where that division loses precision.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, y, g) = (values(arg)?, values(res)?, values(grad)?);
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        let dx = x
            .iter()
            .zip(&y)
            .zip(&g)
            .map(|((&x, &y), &g)| {
                let cdf = if x.abs() > 1e-2 { y / x } else { normal_cdf(x) };
                g * (cdf + x * inv_sqrt_2pi * (-0.5 * x * x).exp())
            })
            .collect();
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The largest absolute difference between two tensors (shared with `optim`'s tests).
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fused op and the composed one on the same input: values, and the gradient of a
    /// weighted sum of the output (weights random, so every element's gradient counts).
    fn check(
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        composed: impl Fn(&Tensor) -> Result<Tensor>,
        shape: (usize, usize, usize),
        tolerance: f32,
    ) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap())).unwrap();
        let weights = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (a, b) = (
            fused(x.as_tensor()).unwrap(),
            composed(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(&a, &b) < tolerance,
            "values differ by {}",
            max_diff(&a, &b)
        );
        let grad = |y: &Tensor| {
            let loss = (y * &weights).unwrap().sum_all().unwrap();
            loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
        };
        let (ga, gb) = (grad(&a), grad(&b));
        assert!(
            max_diff(&ga, &gb) < tolerance,
            "gradients differ by {}",
            max_diff(&ga, &gb)
        );
    }

    #[test]
    fn normalization_matches_candles_composed_layer_norm() {
        let dev = Device::Cpu;
        let w = Tensor::randn(1f32, 0.5, 48, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 48, &dev).unwrap();
        check(
            |x| layer_norm(x, &w, &b, 1e-12),
            |x| candle_nn::ops::layer_norm_slow(x, &w, &b, 1e-12),
            (3, 7, 48),
            1e-4,
        );
    }

    /// The affine parts' own gradients (weight, bias) equal the broadcast ops'.
    #[test]
    fn row_affine_ops_give_the_broadcast_ops_parameter_gradients() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 24, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 24, &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap();
        let grads = |y: Tensor| {
            let g = (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (
                g.get(w.as_tensor()).unwrap().clone(),
                g.get(b.as_tensor()).unwrap().clone(),
            )
        };
        let fused = grads(layer_norm(&x, &w, &b, 1e-5).unwrap());
        let composed = grads(candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap());
        assert!(max_diff(&fused.0, &composed.0) < 1e-4 && max_diff(&fused.1, &composed.1) < 1e-4);
        let bias_grad = |y: Tensor| {
            let g = (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(b.as_tensor()).unwrap().clone()
        };
        let fused = bias_grad(add_row_bias(&x, &b).unwrap());
        let composed = bias_grad(x.broadcast_add(&b).unwrap());
        assert!(max_diff(&fused, &composed) < 1e-4, "bias gradients differ");
        let bias = Tensor::randn(0f32, 1.0, 24, &dev).unwrap();
        check(
            |x| add_row_bias(x, &bias),
            |x| x.broadcast_add(&bias),
            (2, 5, 24),
            1e-6,
        );
    }

    #[test]
    fn softmax_matches_candles_composed_softmax() {
        check(
            softmax_last_dim,
            |x| candle_nn::ops::softmax(x, D::Minus1),
            (2, 5, 33),
            1e-5,
        );
    }

    #[test]
    fn gelu_matches_candles_gelu_erf() {
        check(gelu_erf, |x| x.gelu_erf(), (4, 6, 40), 1e-5);
    }
}
