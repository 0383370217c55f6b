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
//! [`Q8MatMul`]: Q8_0 weights times F32 activations.
//!
//! candle's Q8_0 kernel first quantizes the activations to Q8_0 blocks too, and on small
//! models that costs more quality than the Q8_0 weights themselves (SmolLM2: last-position
//! logits at cosine 0.992 of f32 on some prompts, against 0.9996 for the weights alone). This
//! kernel quantizes activations to 16 bits instead ([`I16Blocks`]), fine enough to keep the
//! accuracy of the weights alone, and multiplies on integer multiply-adds: the weights are read
//! as bytes, not expanded to F32, which is what makes Q8_0 decoding faster than F32 and not
//! merely smaller.

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

/// `y = x W^T` for a Q8_0 weight `W` (rows x cols) and F32 `x` (.., cols).
pub struct Q8MatMul(pub Arc<QTensor>);

impl Q8MatMul {
    /// Accepts Q8_0 weights whose input size is whole blocks.
    pub fn supports(weight: &QTensor) -> bool {
        weight.dtype() == GgmlDType::Q8_0
            && weight.shape().dims().len() == 2
            && weight.shape().dims()[1] % BLOCK == 0
    }
}

impl CustomOp1 for Q8MatMul {
    fn name(&self) -> &'static str {
        "q8_0-i16-matmul"
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
        let activations = I16Blocks::quantize(x);
        let bytes = self.0.data()?;
        let row_bytes = (cols / BLOCK) * BLOCK_BYTES;
        let blocks_per_row = cols / BLOCK;
        let out_t = rows_times_activations(rows, m, |row, out| {
            let weight_row = &bytes[row * row_bytes..(row + 1) * row_bytes];
            dot_q8_i16_all_rows(weight_row, &activations, blocks_per_row, out);
        });
        Ok(into_output(out_t, rows, m, dims))
    }
}

/// Activations quantized to 16 bits per value with one F32 scale per 32-value block.
///
/// The rounding error is at most 1/65534 of a block's largest magnitude, 256 times finer than
/// the Q8_0 weights, so products keep the accuracy of the weights alone; in exchange the dot
/// products run on integer multiply-adds (16 products per instruction). Each row is quantized
/// on its own, so a row gets the same values alone or in a batch.
struct I16Blocks {
    values: Vec<i16>,
    scales: Vec<f32>,
}

impl I16Blocks {
    fn quantize(x: &[f32]) -> Self {
        let mut values = vec![0i16; x.len()];
        let mut scales = vec![0f32; x.len() / BLOCK];
        for ((block, q), d) in x
            .chunks_exact(BLOCK)
            .zip(values.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
        {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max == 0.0 || !max.is_finite() {
                // Zeros stay zero; a non-finite block is left to the F32 result as NaN.
                *d = if max == 0.0 { 0.0 } else { f32::NAN };
                continue;
            }
            *d = max / I16_MAX;
            let inverse = I16_MAX / max;
            for (o, v) in q.iter_mut().zip(block) {
                *o = (v * inverse).round().clamp(-I16_MAX, I16_MAX) as i16;
            }
        }
        Self { values, scales }
    }
}

const I16_MAX: f32 = i16::MAX as f32;

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

dispatch!(dot, dot_avx2, dot_lanes, (a: &[f32], b: &[f32]) -> f32);

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

/// One Q8_0 weight row times one row of [`I16Blocks`].
fn dot_q8_i16(weight: &[u8], values: &[i16], scales: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the features the function is compiled for were just detected.
            return unsafe { dot_q8_i16_avx2(weight, values, scales) };
        }
    }
    dot_q8_i16_portable(weight, values, scales)
}

/// The arithmetic both builds follow, so they agree to the bit: in block `b`, integer lane `j`
/// sums the products of values `2j, 2j+1, 16+2j, 17+2j` (exactly); the lane goes to F32 and is
/// added, times the two scales' product, into accumulator set `b % 2`; the sets are added and
/// the eight lanes summed pairwise (`j` with `j+4`, then `j+2`, then `j+1`).
fn dot_q8_i16_portable(weight: &[u8], values: &[i16], scales: &[f32]) -> f32 {
    let mut acc = [[0f32; 8]; 2];
    for (b, ((block, x), &dx)) in weight
        .chunks_exact(BLOCK_BYTES)
        .zip(values.chunks_exact(BLOCK))
        .zip(scales)
        .enumerate()
    {
        let dw = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
        let scale = dw * dx;
        let w = &block[2..];
        for (j, lane) in acc[b % 2].iter_mut().enumerate() {
            let sum: i32 = [2 * j, 2 * j + 1, 16 + 2 * j, 17 + 2 * j]
                .iter()
                .map(|&e| (w[e] as i8) as i32 * x[e] as i32)
                .sum();
            *lane = (sum as f32).mul_add(scale, *lane);
        }
    }
    let t: [f32; 8] = std::array::from_fn(|j| acc[0][j] + acc[1][j]);
    let u: [f32; 4] = std::array::from_fn(|j| t[j] + t[j + 4]);
    let v: [f32; 2] = std::array::from_fn(|j| u[j] + u[j + 2]);
    v[0] + v[1]
}

/// An f16 (as bits) to f32, exactly, in scalar registers. The F16C instruction would do, but
/// the compiler feeds it from whatever register it likes, and in the loop below that made
/// every block wait on the accumulator (a false dependency that cost 3x).
#[inline(always)]
fn f16_to_f32(bits: u16) -> f32 {
    if bits & 0x7c00 == 0x7c00 {
        return half::f16::from_bits(bits).to_f32(); // infinities and NaNs
    }
    // The magnitude's bits moved into an f32's place are the value times 2^-112, subnormals
    // included; scaling back by 2^112 is exact.
    const TWO_POW_112: f32 = f32::from_bits((112 + 127) << 23);
    let magnitude = f32::from_bits(((bits & 0x7fff) as u32) << 13) * TWO_POW_112;
    f32::from_bits(magnitude.to_bits() | ((bits & 0x8000) as u32) << 16)
}

/// How far ahead of the block being multiplied the weight is prefetched, in bytes.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 1024;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_i16_avx2(weight: &[u8], values: &[i16], scales: &[f32]) -> f32 {
    dot_q8_i16_rows_avx2::<1>(weight, [values], [scales])[0]
}

/// `N` activation rows against one Q8_0 weight row. Each weight block is loaded and widened
/// once for all `N` rows (verification and prefill multiply several rows); each row's
/// arithmetic is exactly the one-row kernel's, so batching never changes a bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_i16_rows_avx2<const N: usize>(
    weight: &[u8],
    values: [&[i16]; N],
    scales: [&[f32]; N],
) -> [f32; N] {
    use std::arch::x86_64::*;
    let blocks = scales[0].len();
    assert!(weight.len() >= blocks * BLOCK_BYTES);
    for r in 0..N {
        assert!(values[r].len() >= blocks * BLOCK && scales[r].len() >= blocks);
    }
    // Adds block `b`'s products into `acc` (a macro, not a closure: a closure would not be
    // compiled with this function's target features, and every intrinsic would become a call).
    // SAFETY: the asserts above keep every load of a block `b < blocks` inside the slices;
    // the prefetch is only a hint and may point past the end.
    macro_rules! add_block {
        ($b:expr, $acc:expr) => {{
            let b = $b;
            let block = weight.as_ptr().add(b * BLOCK_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_AHEAD) as *const i8);
            let dw = f16_to_f32(u16::from_le_bytes([*block, *block.add(1)]));
            let w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(2) as *const __m128i));
            let w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(18) as *const __m128i));
            for r in 0..N {
                let x = values[r].as_ptr().add(b * BLOCK);
                let x_lo = _mm256_loadu_si256(x as *const __m256i);
                let x_hi = _mm256_loadu_si256(x.add(16) as *const __m256i);
                let sums = _mm256_add_epi32(
                    _mm256_madd_epi16(w_lo, x_lo),
                    _mm256_madd_epi16(w_hi, x_hi),
                );
                let scale = _mm256_set1_ps(dw * *scales[r].get_unchecked(b));
                $acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, $acc[r]);
            }
        }};
    }
    let (mut even, mut odd) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let mut b = 0;
    while b + 1 < blocks {
        add_block!(b, even);
        add_block!(b + 1, odd);
        b += 2;
    }
    if b < blocks {
        add_block!(b, even);
    }
    let mut out = [0f32; N];
    for r in 0..N {
        let t = _mm256_add_ps(even[r], odd[r]);
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        let v = _mm_add_ps(u, _mm_movehl_ps(u, u));
        out[r] = _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)));
    }
    out
}

/// Activation rows taken together by [`dot_q8_i16_rows_avx2`].
const ROWS_TOGETHER: usize = 4;

/// One Q8_0 weight row times every row of `activations` (`blocks_per_row` blocks each),
/// into `out`.
fn dot_q8_i16_all_rows(
    weight: &[u8],
    activations: &I16Blocks,
    blocks_per_row: usize,
    out: &mut [f32],
) {
    let row = |i: usize| {
        let blocks = i * blocks_per_row..(i + 1) * blocks_per_row;
        (
            &activations.values[blocks.start * BLOCK..blocks.end * BLOCK],
            &activations.scales[blocks],
        )
    };
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        while i + ROWS_TOGETHER <= out.len() {
            let rows: [(&[i16], &[f32]); ROWS_TOGETHER] = std::array::from_fn(|k| row(i + k));
            // SAFETY: the features the function is compiled for were just detected.
            let ys = unsafe {
                dot_q8_i16_rows_avx2::<ROWS_TOGETHER>(
                    weight,
                    rows.map(|(v, _)| v),
                    rows.map(|(_, s)| s),
                )
            };
            out[i..i + ROWS_TOGETHER].copy_from_slice(&ys);
            i += ROWS_TOGETHER;
        }
    }
    for (k, y) in out.iter_mut().enumerate().skip(i) {
        let (values, scales) = row(k);
        *y = dot_q8_i16(weight, values, scales);
    }
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
            let ours = x.apply_op1_no_bwd(&Q8MatMul(q.clone())).unwrap();
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
            // The 16-bit activations err by up to 1/65534 of a block's largest value each;
            // over 96 products of weights below 1 that bounds the difference by about 1e-3.
            assert!(diff < 1e-3, "{shape:?}: {diff}");
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
        let batched = batch.apply_op1_no_bwd(&Q8MatMul(q.clone())).unwrap();
        for i in 0..5 {
            let alone = batch
                .narrow(0, i, 1)
                .unwrap()
                .apply_op1_no_bwd(&Q8MatMul(q.clone()))
                .unwrap();
            let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = batched.get(i).unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "row {i}");
        }
    }

    #[test]
    fn the_avx2_and_portable_q8_dots_agree_to_the_bit() {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 + seed) * 5.17).sin() * 3.0)
                .collect()
        };
        // 7 blocks: an odd count exercises the last, unpaired block.
        let cols = 7 * BLOCK;
        let w = Tensor::from_vec(values(3 * cols, 0.1), (3, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let bytes = q.data().unwrap();
        let row_bytes = 7 * BLOCK_BYTES;
        let x = I16Blocks::quantize(&values(cols, 2.0));
        for row in 0..3 {
            let weight = &bytes[row * row_bytes..(row + 1) * row_bytes];
            let portable = dot_q8_i16_portable(weight, &x.values, &x.scales);
            assert_eq!(dot_q8_i16(weight, &x.values, &x.scales), portable);
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                let avx2 = unsafe { dot_q8_i16_avx2(weight, &x.values, &x.scales) };
                assert_eq!(avx2.to_bits(), portable.to_bits(), "row {row}");
            }
        }
    }

    #[test]
    fn f16_scales_convert_exactly() {
        for bits in 0..=u16::MAX {
            let ours = f16_to_f32(bits);
            let reference = half::f16::from_bits(bits).to_f32();
            if reference.is_nan() {
                assert!(ours.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(ours.to_bits(), reference.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn sixteen_bit_activations_lose_almost_nothing() {
        let x: Vec<f32> = (0..4 * BLOCK)
            .map(|i| ((i as f32) * 0.731).sin() * 10.0)
            .collect();
        let q = I16Blocks::quantize(&x);
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (e, v) in block.iter().enumerate() {
                let back = q.values[b * BLOCK + e] as f32 * q.scales[b];
                assert!((back - v).abs() <= max / 65534.0 * 1.01, "{v} vs {back}");
            }
        }
        let zeros = I16Blocks::quantize(&[0.0; BLOCK]);
        assert_eq!(zeros.scales, vec![0.0]);
    }
}
