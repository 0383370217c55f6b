//! 3×3 convolution (padding 1) on channels-last tensors as one matrix product.
//!
//! The input's nine shifted views are concatenated along channels and multiplied by one
//! `(9·in, out)` matrix: a single GEMM forward and backward. candle's own `conv2d` backward
//! goes through a naive `conv_transpose2d` on the CPU, which made training several times
//! slower.

use crate::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// A 3×3 convolution's weights, stored `(out, in, 3, 3)` (PyTorch layout) with a bias.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// Rearranged at every forward pass, not once at load, so that a trainable variable
    /// stays the tensor the forward pass reads.
    weight: Tensor,
    bias: Tensor,
}

impl Conv3x3 {
    /// `weight` `(out, in, 3, 3)` and `bias` `(out)` under `vb`; a `VarBuilder` over a
    /// `VarMap` creates them, He-initialised.
    pub fn load(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Self> {
        let fan_in = (inputs * 9) as f64;
        let weight = vb.get_with_hints(
            (outputs, inputs, 3, 3),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_in).sqrt(),
            },
        )?;
        let bias = vb.get_with_hints(outputs, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }

    /// Output channels (the weight's first dimension).
    pub fn out_channels(&self) -> Result<usize> {
        Ok(self.weight.dim(0)?)
    }

    /// `(9·in, out)`: row `(dy·3 + dx)·in + c` holds the weights of input channel `c` at
    /// kernel offset `(dy, dx)`.
    fn matrix(&self) -> Result<Tensor> {
        let (outputs, inputs, _, _) = self.weight.dims4()?;
        Ok(self
            .weight
            .permute((2, 3, 1, 0))?
            .reshape((9 * inputs, outputs))?)
    }

    /// `(batch, h, w, in)` → `(batch, h, w, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, h, w, _) = x.dims4()?;
        let columns = im2col(x)?;
        let out = columns.matmul(&self.matrix()?)?.broadcast_add(&self.bias)?;
        Ok(out.reshape((batch, h, w, self.out_channels()?))?)
    }
}

/// The 3×3 neighbourhoods (zero padded) of a channels-last `(b, h, w, c)` tensor as rows of a
/// `(b·h·w, 9·c)` matrix: column `(dy·3 + dx)·c + ch` holds pixel `(y + dy − 1, x + dx − 1)`.
pub fn im2col(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(Im2Col { b, h, w, c })?);
    }
    // Other devices: nine shifted views, each made contiguous so that `cat` is a block copy
    // (candle concatenates strided tensors along the last dimension element by element).
    let padded = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let mut shifted = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            shifted.push(padded.narrow(1, dy, h)?.narrow(2, dx, w)?.contiguous()?);
        }
    }
    Ok(Tensor::cat(&shifted, 3)?.reshape((b * h * w, 9 * c))?)
}

/// For each output pixel and kernel offset, the input pixel it reads, if inside the image.
fn neighbours(h: usize, w: usize) -> impl Iterator<Item = (usize, usize, Option<usize>)> {
    (0..h * w).flat_map(move |p| {
        let (y, x) = (p / w, p % w);
        (0..9).map(move |k| {
            let (sy, sx) = ((y + k / 3) as isize - 1, (x + k % 3) as isize - 1);
            let inside = sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w;
            (p, k, inside.then(|| sy as usize * w + sx as usize))
        })
    })
}

/// CPU im2col with a col2im backward: candle's composed version back-propagates through nine
/// padded copies of the input, which made training several times slower.
struct Im2Col {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Im2Col { b, h, w, c } = *self;
        let input = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; b * h * w * 9 * c];
        for image in 0..b {
            let src = &input[image * h * w * c..(image + 1) * h * w * c];
            let dst = &mut out[image * h * w * 9 * c..(image + 1) * h * w * 9 * c];
            for (p, k, from) in neighbours(h, w) {
                if let Some(q) = from {
                    let at = (p * 9 + k) * c;
                    dst[at..at + c].copy_from_slice(&src[q * c..(q + 1) * c]);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b * h * w, 9 * c))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Im2Col { b, h, w, c } = *self;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im {
            b,
            h,
            w,
            c,
        })?))
    }
}

/// The adjoint of [`Im2Col`]: sums each column block back onto the pixel it came from.
struct Col2Im {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im-3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Col2Im { b, h, w, c } = *self;
        let columns = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; b * h * w * c];
        for image in 0..b {
            let src = &columns[image * h * w * 9 * c..(image + 1) * h * w * 9 * c];
            let dst = &mut out[image * h * w * c..(image + 1) * h * w * c];
            for (p, k, to) in neighbours(h, w) {
                if let Some(q) = to {
                    let at = (p * 9 + k) * c;
                    for (d, s) in dst[q * c..(q + 1) * c].iter_mut().zip(&src[at..at + c]) {
                        *d += s;
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, c))))
    }
}

fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} needs a contiguous input"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn im2col_and_its_gradient_match_the_composed_version() {
        let x = Var::randn(0f32, 1.0, (2, 5, 4, 3), &Device::Cpu).unwrap();
        let fast = im2col(x.as_tensor()).unwrap();
        let padded = x
            .pad_with_zeros(1, 1, 1)
            .unwrap()
            .pad_with_zeros(2, 1, 1)
            .unwrap();
        let mut views = Vec::new();
        for dy in 0..3 {
            for dx in 0..3 {
                views.push(padded.narrow(1, dy, 5).unwrap().narrow(2, dx, 4).unwrap());
            }
        }
        let slow = Tensor::cat(&views, 3).unwrap().reshape((40, 27)).unwrap();
        assert_eq!(
            fast.to_vec2::<f32>().unwrap(),
            slow.to_vec2::<f32>().unwrap()
        );
        let weights = Tensor::randn(0f32, 1.0, (40, 27), &Device::Cpu).unwrap();
        let grad = |t: &Tensor| {
            let g = (t * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (grad(&fast), grad(&slow));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{diff}");
    }
}
