//! CPU kernels for the products decoding makes: a few activation rows against a weight.
//!
//! Both kernels compute every output with the same arithmetic whatever the number of rows,
//! so speculative verification (several rows) reproduces one-token decoding to the bit.
//!
//! [`DenseSmallBatch`]: F32 weights, up to [`SMALL_BATCH`] rows. candle's GEMM packs the whole
//! weight matrix on every call, which for a handful of rows costs more than the product: a
//! 5-token verification of SmolLM2 in F32 took 1.7x a one-token step. Streaming each weight row
//! once against all activation rows keeps it close to one step.
//!
//! [`Q8F32MatMul`]: Q8_0 weights times F32 activations.
//!
//! candle's Q8_0 kernel first quantizes the activations to Q8_0 blocks too, and on small
//! models that costs more quality than the Q8_0 weights themselves (SmolLM2: last-position
//! logits at cosine 0.992 of f32 on some prompts, against 0.9996 for the weights alone). This
//! kernel keeps activations in F32: each weight row is expanded to F32 once and dotted with
//! every activation row, always in the same order, so batched and one-row products agree
//! to the bit.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use std::sync::Arc;

const BLOCK: usize = 32;
/// A Q8_0 block: an f16 scale then 32 signed bytes.
const BLOCK_BYTES: usize = 34;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;
/// Accumulators per dot product (a multiple of the 8-wide vectors; equal to the Q8_0 block).
const LANES: usize = 32;

/// Row counts up to which [`DenseSmallBatch`] beats candle's GEMM (decode and verification;
/// prefills are larger and stay on the GEMM).
pub const SMALL_BATCH: usize = 32;

/// `y = x W^T` for an F32 weight `W` (rows x cols) and a few F32 activation rows.
pub struct DenseSmallBatch;

impl candle_core::CustomOp2 for DenseSmallBatch {
    fn name(&self) -> &'static str {
        "f32-small-batch-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = wl.shape().dims2()?;
        let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("small-batch matmul: inputs must be contiguous");
        };
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (xs, ws) else {
            candle_core::bail!("small-batch matmul: f32 only");
        };
        let dims = xl.shape().dims();
        if dims.last() != Some(&cols) {
            candle_core::bail!(
                "small-batch matmul: input {:?} does not end in {cols}",
                dims
            );
        }
        let (x, w) = (&x[xa..xb], &w[wa..wb]);
        let m = x.len() / cols;
        let out_t = rows_times_activations(rows, m, |row, out| {
            let w_row = &w[row * cols..(row + 1) * cols];
            for (i, y) in out.iter_mut().enumerate() {
                *y = dot(w_row, &x[i * cols..(i + 1) * cols]);
            }
        });
        Ok(into_output(out_t, rows, m, dims))
    }
}

/// Runs `fill(row, outputs_of_that_row)` for every weight row on candle's worker pool (the
/// one its quantized kernels use, so no second set of threads competes for the cores);
/// returns the `(rows, m)` results.
fn rows_times_activations(
    rows: usize,
    m: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out_t = vec![0f32; rows * m];
    let out_ptr = out_t.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(ROWS_PER_TASK), |tasks| {
        for task in tasks {
            for row in task * ROWS_PER_TASK..rows.min((task + 1) * ROWS_PER_TASK) {
                // SAFETY: tasks cover disjoint rows, so each output row has one writer, and
                // `out_t` outlives the pool call.
                let out = unsafe {
                    std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(row * m), m)
                };
                fill(row, out);
            }
        }
    });
    out_t
}

thread_local! {
    /// A worker's scratch for one expanded Q8_0 row: values as F32 and one scale per block.
    static EXPANDED_ROW: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `y = x W^T` for a Q8_0 weight `W` (rows x cols) and F32 `x` (.., cols).
pub struct Q8F32MatMul(pub Arc<QTensor>);

impl Q8F32MatMul {
    /// Accepts Q8_0 weights whose input size is whole blocks.
    pub fn supports(weight: &QTensor) -> bool {
        weight.dtype() == GgmlDType::Q8_0
            && weight.shape().dims().len() == 2
            && weight.shape().dims()[1] % BLOCK == 0
    }
}

impl CustomOp1 for Q8F32MatMul {
    fn name(&self) -> &'static str {
        "q8_0-f32-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = self.0.shape().dims2()?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&cols) {
            candle_core::bail!("q8_0 matmul: input {:?} does not end in {cols}", dims);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q8_0 matmul: input must be contiguous");
        };
        let x = match storage {
            CpuStorage::F32(v) => &v[start..end],
            _ => candle_core::bail!("q8_0 matmul: activations must be f32"),
        };
        let m = x.len() / cols;
        let bytes = self.0.data()?;
        let row_bytes = (cols / BLOCK) * BLOCK_BYTES;
        let out_t = rows_times_activations(rows, m, |row, out| {
            let blocks = &bytes[row * row_bytes..(row + 1) * row_bytes];
            if m == 1 {
                // One activation row: the same arithmetic as below, without the scratch row.
                out[0] = row_dot_q8(blocks, x);
                return;
            }
            EXPANDED_ROW.with_borrow_mut(|(quants, scales)| {
                quants.resize(cols, 0.0);
                scales.resize(cols / BLOCK, 0.0);
                expand_row(blocks, quants, scales);
                for (i, y) in out.iter_mut().enumerate() {
                    *y = row_dot(quants, scales, &x[i * cols..(i + 1) * cols]);
                }
            })
        });
        Ok(into_output(out_t, rows, m, dims))
    }
}

/// `(rows, m)` results → the op's output: the input's shape with `rows` as the last size.
fn into_output(
    out_t: Vec<f32>,
    rows: usize,
    m: usize,
    input_dims: &[usize],
) -> (CpuStorage, Shape) {
    let out = if m == 1 {
        out_t
    } else {
        transpose(&out_t, rows, m)
    };
    let mut shape = input_dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = rows;
    }
    (CpuStorage::F32(out), Shape::from(shape))
}

fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
    dst
}

/// Whether the AVX2 + FMA builds of the loops below can run here.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Compiles a loop twice: for AVX2 + FMA (chosen at run time when the CPU has them) and for
/// the baseline target. The loops are written so the compiler vectorizes them.
macro_rules! dispatch {
    ($name:ident, $avx:ident, $portable:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if has_avx2_fma() {
                    // SAFETY: the features the function is compiled for were just detected.
                    return unsafe { $avx($($arg),*) };
                }
            }
            $portable($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $avx($($arg: $ty),*) -> $ret {
            $portable($($arg),*)
        }
    };
}

dispatch!(expand_row, expand_row_avx2, expand_row_lanes, (blocks: &[u8], quants: &mut [f32], scales: &mut [f32]) -> ());
dispatch!(row_dot, row_dot_avx2, row_dot_lanes, (quants: &[f32], scales: &[f32], x: &[f32]) -> f32);
dispatch!(dot, dot_avx2, dot_lanes, (a: &[f32], b: &[f32]) -> f32);
dispatch!(row_dot_q8, row_dot_q8_avx2, row_dot_q8_lanes, (blocks: &[u8], x: &[f32]) -> f32);

/// [`row_dot_lanes`] reading the Q8_0 blocks directly: converting an i8 to f32 is exact, so
/// the result is the same to the bit.
#[inline(always)]
fn row_dot_q8_lanes(blocks: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (block, x) in blocks.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let q = &block[2..BLOCK_BYTES];
        for l in 0..LANES {
            acc[l] = d.mul_add((q[l] as i8) as f32 * x[l], acc[l]);
        }
    }
    acc.iter().sum()
}

/// Thirty-two independent accumulators: four vector registers, so four FMA chains run at once
/// instead of one chain waiting on its own latency.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Splits Q8_0 blocks into their values as F32 (unscaled) and one scale per block.
#[inline(always)]
fn expand_row_lanes(blocks: &[u8], quants: &mut [f32], scales: &mut [f32]) {
    for ((block, q), d) in blocks
        .chunks_exact(BLOCK_BYTES)
        .zip(quants.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        *d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (o, &b) in q.iter_mut().zip(&block[2..BLOCK_BYTES]) {
            *o = (b as i8) as f32;
        }
    }
}

/// One expanded Q8_0 row times one F32 vector.
#[inline(always)]
fn row_dot_lanes(quants: &[f32], scales: &[f32], x: &[f32]) -> f32 {
    // A block's 32 products land in 32 lanes (four independent vector chains), then are
    // scaled into 32 accumulators.
    let mut acc = [0f32; LANES];
    for ((q, x), &d) in quants
        .chunks_exact(BLOCK)
        .zip(x.chunks_exact(BLOCK))
        .zip(scales)
    {
        for l in 0..LANES {
            acc[l] = d.mul_add(q[l] * x[l], acc[l]);
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_a_dense_matmul_with_the_dequantized_weight() {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 + seed) * 12.9898).sin())
                .collect()
        };
        let w = Tensor::from_vec(values(40 * 96, 0.5), (40, 96), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let dense_w = q.dequantize(&Device::Cpu).unwrap();
        for shape in [vec![1, 96], vec![3, 96], vec![2, 5, 96]] {
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(values(n, 3.0), shape.as_slice(), &Device::Cpu).unwrap();
            let ours = x.apply_op1_no_bwd(&Q8F32MatMul(q.clone())).unwrap();
            let reference = x.broadcast_matmul(&dense_w.t().unwrap()).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{shape:?}: {diff}");
        }
    }

    #[test]
    fn dense_small_batches_match_the_gemm_and_are_batch_invariant() {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + seed) * 3.7).sin()).collect()
        };
        let w = Tensor::from_vec(values(24 * 40, 0.5), (24, 40), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(values(2 * 3 * 40, 2.0), (2, 3, 40), &Device::Cpu).unwrap();
        let ours = x.apply_op2_no_bwd(&w, &DenseSmallBatch).unwrap();
        let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let diff = (&ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        let flat = x.reshape((6, 40)).unwrap();
        for i in 0..6 {
            let alone = flat
                .narrow(0, i, 1)
                .unwrap()
                .apply_op2_no_bwd(&w, &DenseSmallBatch)
                .unwrap();
            let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = ours
                .reshape((6, 24))
                .unwrap()
                .get(i)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "row {i}");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + seed) * 7.31).sin()).collect()
        };
        let w = Tensor::from_vec(values(24 * 64, 0.25), (24, 64), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let batch = Tensor::from_vec(values(5 * 64, 1.5), (5, 64), &Device::Cpu).unwrap();
        let batched = batch.apply_op1_no_bwd(&Q8F32MatMul(q.clone())).unwrap();
        for i in 0..5 {
            let alone = batch
                .narrow(0, i, 1)
                .unwrap()
                .apply_op1_no_bwd(&Q8F32MatMul(q.clone()))
                .unwrap();
            let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = batched.get(i).unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "row {i}");
        }
    }
}
