//! Quantized weights (Q8_0, Q4_0, Q4_1, Q5_0; Q4_K and Q6_K through [`super::kquants`]) times F32
//! activations, one weight row at a time. On AVX2, weights that have a repacked
//! copy ([`super::interleaved`]) go there instead (all six formats); these kernels serve NEON and
//! CPUs without AVX2.
//!
//! candle's kernels first quantize the activations to 8 bits (Q8_0/Q8_1 blocks), and on small
//! models that costs more quality than the weights' own quantization (SmolLM2 with Q8_0
//! weights: last-position logits at cosine 0.992 of f32 on some prompts, against 0.9996 for
//! the weights alone). These kernels quantize activations to 16 bits instead
//! ([`I16Blocks`]), fine enough to keep the accuracy of the weights alone, and multiply on
//! integer multiply-adds: weights are read as bytes or nibbles, never expanded to F32, which
//! is what makes quantized decoding faster than F32 and not merely smaller.
//!
//! Every output has the same arithmetic whatever the number of rows (speculative verification
//! reproduces one-token decoding to the bit), and the AVX2 build and the portable one agree
//! to the bit.

#[cfg(target_arch = "x86_64")]
use super::has_avx2_fma;
use super::interleaved::PackedWeight;
use super::kquants::{self, Q4K_BYTES, Q6K_BYTES, SUPER};
use super::{f32_rows, into_output, output_shape, rows_times_activations, BLOCK};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use std::sync::Arc;

/// The block formats these kernels read, as const-generic tags.
pub(super) const Q8_0: u8 = 0;
pub(super) const Q4_0: u8 = 1;
pub(super) const Q4_1: u8 = 2;
pub(super) const Q4_K: u8 = 3;
pub(super) const Q6_K: u8 = 4;
pub(super) const Q5_0: u8 = 5;

/// Bytes per 32-value block: Q8_0 = f16 scale + 32 i8; Q4_0 = f16 scale + 16 bytes of nibbles
/// (value = scale · (q − 8)); Q4_1 = f16 scale + f16 minimum + 16 bytes (scale · q + min);
/// Q5_0 = f16 scale + 32 fifth bits (a little-endian u32, bit `j` for value `j`) + 16 bytes
/// of nibbles (value = scale · (q − 16)). A byte's low nibble is value `j`, its high nibble
/// value `j + 16`. (K-quants: per 256-value super-block, see [`super::kquants`].)
pub(crate) const fn block_bytes(format: u8) -> usize {
    match format {
        Q8_0 => 34,
        Q4_0 => 18,
        Q5_0 => 22,
        Q4_K => Q4K_BYTES,
        Q6_K => Q6K_BYTES,
        _ => 20,
    }
}

/// Weights per block of a format: 32, or 256 for the K-quants' super-blocks.
pub(super) const fn block_values(format: u8) -> usize {
    match format {
        Q4_K | Q6_K => SUPER,
        _ => BLOCK,
    }
}

/// How far ahead of the block being multiplied the weight is prefetched, in bytes.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 1024;

/// Activation rows taken together by the AVX2 kernel (each weight block is loaded once for
/// all of them).
const ROWS_TOGETHER: usize = 4;

/// `y = x W^T` for a quantized weight `W` (rows x cols) and F32 `x` (.., cols): row by row
/// over the weight as stored, or through a repacked copy.
pub struct QuantizedMatMul(Kernel);

enum Kernel {
    RowByRow(Arc<QTensor>),
    Packed(Arc<PackedWeight>),
}

impl QuantizedMatMul {
    /// Row by row over a weight as stored (see [`Self::supports`]).
    pub fn row_by_row(weight: Arc<QTensor>) -> Self {
        Self(Kernel::RowByRow(weight))
    }

    /// Through a repacked weight, where [`PackedWeight::available`] holds.
    pub fn packed(weight: Arc<PackedWeight>) -> Self {
        Self(Kernel::Packed(weight))
    }

    /// Accepts Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K weights whose input size is whole blocks.
    pub fn supports(weight: &QTensor) -> bool {
        format_of(weight.dtype()).is_some_and(|f| {
            weight.shape().dims().len() == 2 && weight.shape().dims()[1] % block_values(f) == 0
        })
    }
}

fn format_of(dtype: GgmlDType) -> Option<u8> {
    match dtype {
        GgmlDType::Q8_0 => Some(Q8_0),
        GgmlDType::Q4_0 => Some(Q4_0),
        GgmlDType::Q4_1 => Some(Q4_1),
        GgmlDType::Q5_0 => Some(Q5_0),
        GgmlDType::Q4K => Some(Q4_K),
        GgmlDType::Q6K => Some(Q6_K),
        _ => None,
    }
}

impl CustomOp1 for QuantizedMatMul {
    fn name(&self) -> &'static str {
        "dynexec-quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let weight = match &self.0 {
            Kernel::RowByRow(weight) => weight,
            Kernel::Packed(packed) => {
                let (rows, cols) = packed.dims();
                let x = f32_rows(self.name(), storage, layout, cols)?;
                let shape = output_shape(layout.shape().dims(), rows);
                return Ok((CpuStorage::F32(packed.matmul(x)), shape));
            }
        };
        let (rows, cols) = weight.shape().dims2()?;
        let x = f32_rows(self.name(), storage, layout, cols)?;
        let dims = layout.shape().dims();
        let Some(format) = format_of(weight.dtype()) else {
            candle_core::bail!("quantized matmul: unsupported {:?}", weight.dtype());
        };
        let m = x.len() / cols;
        let activations = I16Blocks::quantize(x);
        let bytes = weight.data()?;
        if cols % block_values(format) != 0 {
            candle_core::bail!("quantized matmul: {cols} inputs are not whole blocks");
        }
        let blocks_per_row = cols / BLOCK;
        let row_bytes = cols / block_values(format) * block_bytes(format);
        let out_t = rows_times_activations(rows, m, |row, out| {
            let weight_row = &bytes[row * row_bytes..(row + 1) * row_bytes];
            match format {
                Q8_0 => all_rows::<Blocks<Q8_0>>(weight_row, &activations, blocks_per_row, out),
                Q4_0 => all_rows::<Blocks<Q4_0>>(weight_row, &activations, blocks_per_row, out),
                Q4_1 => all_rows::<Blocks<Q4_1>>(weight_row, &activations, blocks_per_row, out),
                Q5_0 => all_rows::<Blocks<Q5_0>>(weight_row, &activations, blocks_per_row, out),
                Q4_K => all_rows::<KQuant<false>>(weight_row, &activations, blocks_per_row, out),
                _ => all_rows::<KQuant<true>>(weight_row, &activations, blocks_per_row, out),
            }
        });
        Ok(into_output(out_t, rows, m, dims))
    }
}

/// Activations quantized to 16 bits per value with one F32 scale per 32-value block.
///
/// The rounding error is at most 1/65534 of a block's largest magnitude, 256 times finer than
/// Q8_0 weights, so products keep the accuracy of the weights alone; in exchange the dot
/// products run on integer multiply-adds (16 products per instruction). Each row is quantized
/// on its own, so a row gets the same values alone or in a batch.
pub(super) struct I16Blocks {
    values: Vec<i16>,
    scales: Vec<f32>,
    /// Per block, the sum of its 16-bit values (exact in f32: at most 32 · 32767): the Q4_1
    /// minimum multiplies it.
    sums: Vec<f32>,
}

const I16_MAX: f32 = i16::MAX as f32;

impl I16Blocks {
    pub(super) fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i16; x.len()];
        let (mut scales, mut sums) = (vec![0f32; blocks], vec![0f32; blocks]);
        for (((block, q), d), sum) in x
            .chunks_exact(BLOCK)
            .zip(values.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
            .zip(sums.iter_mut())
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
            *sum = q.iter().map(|&v| v as i32).sum::<i32>() as f32;
        }
        Self {
            values,
            scales,
            sums,
        }
    }

    /// Row `i`'s values, scales and sums, for rows of `blocks` blocks.
    fn row(&self, i: usize, blocks: usize) -> ActivationRow<'_> {
        let range = i * blocks..(i + 1) * blocks;
        ActivationRow {
            values: &self.values[range.start * BLOCK..range.end * BLOCK],
            scales: &self.scales[range.clone()],
            sums: &self.sums[range],
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct ActivationRow<'a> {
    pub(super) values: &'a [i16],
    pub(super) scales: &'a [f32],
    pub(super) sums: &'a [f32],
}

impl ActivationRow<'_> {
    /// Whether the row holds `blocks` 32-value blocks: what the SIMD kernels' unchecked loads
    /// rely on.
    pub(super) fn covers(&self, blocks: usize) -> bool {
        self.values.len() >= blocks * BLOCK
            && self.scales.len() >= blocks
            && self.sums.len() >= blocks
    }
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

#[inline(always)]
pub(super) fn f16_at(block: &[u8], offset: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([block[offset], block[offset + 1]]))
}

/// A weight format's row kernels: the SIMD one for `N` activation rows at once (AVX2 when
/// the CPU has it, NEON on aarch64), and the portable reference both follow to the bit.
trait RowKernel {
    /// `None` where no SIMD build can run.
    fn simd<const N: usize>(weight: &[u8], x: [ActivationRow; N]) -> Option<[f32; N]>;
    fn portable(weight: &[u8], x: ActivationRow) -> f32;
}

/// Q8_0, Q4_0 or Q4_1 (32-value blocks).
struct Blocks<const F: u8>;
/// Q4_K, or Q6_K with `Q6` (256-value super-blocks).
struct KQuant<const Q6: bool>;

impl<const F: u8> RowKernel for Blocks<F> {
    fn simd<const N: usize>(weight: &[u8], x: [ActivationRow; N]) -> Option<[f32; N]> {
        // Q5_0 has no row-by-row SIMD build: on AVX2 it is repacked, elsewhere the portable
        // loop runs (the compiler vectorizes it).
        if F == Q5_0 {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the features the function is compiled for were just detected.
            return Some(unsafe { dot_rows_avx2::<F, N>(weight, x) });
        }
        // SAFETY: NEON is part of every aarch64 target; the kernel checks the row lengths.
        #[cfg(target_arch = "aarch64")]
        let ys = Some(unsafe { super::neon::dot_rows::<F, N>(weight, x) });
        #[cfg(not(target_arch = "aarch64"))]
        let ys = None;
        ys
    }

    fn portable(weight: &[u8], x: ActivationRow) -> f32 {
        dot_portable::<F>(weight, x)
    }
}

impl<const Q6: bool> RowKernel for KQuant<Q6> {
    fn simd<const N: usize>(weight: &[u8], x: [ActivationRow; N]) -> Option<[f32; N]> {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the features the function is compiled for were just detected.
            return Some(unsafe { kquants::dot_rows_avx2::<Q6, N>(weight, x) });
        }
        // SAFETY: NEON is part of every aarch64 target; the kernel checks the row lengths.
        #[cfg(target_arch = "aarch64")]
        let ys = Some(unsafe { super::neon::dot_rows_k::<Q6, N>(weight, x) });
        #[cfg(not(target_arch = "aarch64"))]
        let ys = None;
        ys
    }

    fn portable(weight: &[u8], x: ActivationRow) -> f32 {
        let unpack = if Q6 {
            kquants::unpack_q6k
        } else {
            kquants::unpack_q4k
        };
        kquants::dot_portable(weight, kquants::super_bytes(Q6), unpack, x)
    }
}

/// One weight row times every activation row, into `out`: rows in SIMD groups of
/// [`ROWS_TOGETHER`], the rest one by one.
fn all_rows<K: RowKernel>(weight: &[u8], x: &I16Blocks, blocks: usize, out: &mut [f32]) {
    let mut i = 0;
    while i + ROWS_TOGETHER <= out.len() {
        let rows: [ActivationRow; ROWS_TOGETHER] = std::array::from_fn(|k| x.row(i + k, blocks));
        let Some(ys) = K::simd(weight, rows) else {
            break;
        };
        out[i..i + ROWS_TOGETHER].copy_from_slice(&ys);
        i += ROWS_TOGETHER;
    }
    for (k, y) in out.iter_mut().enumerate().skip(i) {
        *y = dot::<K>(weight, x.row(k, blocks));
    }
}

/// One weight row times one activation row.
fn dot<K: RowKernel>(weight: &[u8], x: ActivationRow) -> f32 {
    match K::simd(weight, [x]) {
        Some([y]) => y,
        None => K::portable(weight, x),
    }
}

/// A block's 32 weights as integers (before the scale), its scale and its minimum (Q4_1).
pub(super) fn unpack<const F: u8>(block: &[u8]) -> ([i32; BLOCK], f32, f32) {
    let mut w = [0i32; BLOCK];
    match F {
        Q5_0 => {
            let fifth = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            for (j, &b) in block[6..22].iter().enumerate() {
                let bit = |e: usize| (((fifth >> e) & 1) << 4) as i32;
                w[j] = ((b & 0x0f) as i32 | bit(j)) - 16;
                w[j + 16] = ((b >> 4) as i32 | bit(j + 16)) - 16;
            }
            (w, f16_at(block, 0), 0.0)
        }
        Q8_0 => {
            for (o, &b) in w.iter_mut().zip(&block[2..34]) {
                *o = (b as i8) as i32;
            }
            (w, f16_at(block, 0), 0.0)
        }
        _ => {
            let (nibbles, offset, minimum) = match F {
                Q4_0 => (&block[2..18], 8, 0.0),
                _ => (&block[4..20], 0, f16_at(block, 2)),
            };
            for (j, &b) in nibbles.iter().enumerate() {
                w[j] = (b & 0x0f) as i32 - offset;
                w[j + 16] = (b >> 4) as i32 - offset;
            }
            (w, f16_at(block, 0), minimum)
        }
    }
}

/// The arithmetic both builds follow, so they agree to the bit: in block `b`, integer lane `j`
/// sums the products of values `2j, 2j+1, 16+2j, 17+2j` (exactly); the lane goes to F32 and is
/// added, times the two scales' product, into accumulator set `b % 2`; the sets are added and
/// the eight lanes summed pairwise (`j` with `j+4`, then `j+2`, then `j+1`). Q4_1's minimum
/// adds `min · scale_x · Σx` per block into a scalar, added last.
fn dot_portable<const F: u8>(weight: &[u8], x: ActivationRow) -> f32 {
    let mut acc = [[0f32; 8]; 2];
    let mut minimum_terms = 0f32;
    for (b, block) in weight.chunks_exact(block_bytes(F)).enumerate() {
        let (w, dw, minimum) = unpack::<F>(block);
        let dx = x.scales[b];
        let values = &x.values[b * BLOCK..(b + 1) * BLOCK];
        let scale = dw * dx;
        for (j, lane) in acc[b % 2].iter_mut().enumerate() {
            let sum: i32 = [2 * j, 2 * j + 1, 16 + 2 * j, 17 + 2 * j]
                .iter()
                .map(|&e| w[e] * values[e] as i32)
                .sum();
            *lane = (sum as f32).mul_add(scale, *lane);
        }
        if F == Q4_1 {
            minimum_terms = (minimum * dx).mul_add(x.sums[b], minimum_terms);
        }
    }
    let t: [f32; 8] = std::array::from_fn(|j| acc[0][j] + acc[1][j]);
    let u: [f32; 4] = std::array::from_fn(|j| t[j] + t[j + 4]);
    let v: [f32; 2] = std::array::from_fn(|j| u[j] + u[j + 2]);
    let total = v[0] + v[1];
    if F == Q4_1 {
        total + minimum_terms
    } else {
        total
    }
}

/// `N` activation rows against one weight row. Each weight block is loaded and widened once
/// for all `N` rows (verification and prefill multiply several rows); each row's arithmetic
/// is exactly [`dot_portable`]'s, so batching never changes a bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2<const F: u8, const N: usize>(
    weight: &[u8],
    x: [ActivationRow; N],
) -> [f32; N] {
    use std::arch::x86_64::*;
    let bytes = block_bytes(F);
    let blocks = weight.len() / bytes;
    assert!(x.iter().all(|row| row.covers(blocks)));
    let (mut even, mut odd) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let mut minimum_terms = [0f32; N];
    // Adds block `b`'s products into `acc` (a macro, not a closure: a closure would not be
    // compiled with this function's target features, and every intrinsic would become a call).
    // SAFETY: the assert above keeps every load of a block `b < blocks` inside the slices;
    // the prefetch is only a hint and may point past the end.
    macro_rules! add_block {
        ($b:expr, $acc:expr) => {{
            let b = $b;
            let block = weight.as_ptr().add(b * bytes);
            _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_AHEAD) as *const i8);
            let dw = f16_to_f32(u16::from_le_bytes([*block, *block.add(1)]));
            let (w_lo, w_hi) = if F == Q8_0 {
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(2) as *const __m128i)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(18) as *const __m128i)),
                )
            } else {
                let offset = if F == Q4_0 { 2 } else { 4 };
                let q = _mm_loadu_si128(block.add(offset) as *const __m128i);
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm256_cvtepu8_epi16(_mm_and_si128(q, mask));
                let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
                if F == Q4_0 {
                    let eight = _mm256_set1_epi16(8);
                    (_mm256_sub_epi16(lo, eight), _mm256_sub_epi16(hi, eight))
                } else {
                    (lo, hi)
                }
            };
            let minimum = if F == Q4_1 {
                f16_to_f32(u16::from_le_bytes([*block.add(2), *block.add(3)]))
            } else {
                0.0
            };
            for r in 0..N {
                let values = x[r].values.as_ptr().add(b * BLOCK);
                let x_lo = _mm256_loadu_si256(values as *const __m256i);
                let x_hi = _mm256_loadu_si256(values.add(16) as *const __m256i);
                let sums =
                    _mm256_add_epi32(_mm256_madd_epi16(w_lo, x_lo), _mm256_madd_epi16(w_hi, x_hi));
                let dx = *x[r].scales.get_unchecked(b);
                let scale = _mm256_set1_ps(dw * dx);
                $acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, $acc[r]);
                if F == Q4_1 {
                    minimum_terms[r] =
                        (minimum * dx).mul_add(*x[r].sums.get_unchecked(b), minimum_terms[r]);
                }
            }
        }};
    }
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
        let total = _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)));
        out[r] = if F == Q4_1 {
            total + minimum_terms[r]
        } else {
            total
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_abs_diff;
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 7.31).sin()).collect()
    }

    const FORMATS: [GgmlDType; 4] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
    ];

    #[test]
    fn every_format_matches_a_dense_matmul_with_the_dequantized_weight() {
        let w = Tensor::from_vec(values(40 * 96, 0.5), (40, 96), &Device::Cpu).unwrap();
        for dtype in FORMATS {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let dense_w = q.dequantize(&Device::Cpu).unwrap();
            for op in both_paths(&q) {
                for shape in [vec![1, 96], vec![3, 96], vec![2, 5, 96], vec![9, 96]] {
                    let n: usize = shape.iter().product();
                    let x =
                        Tensor::from_vec(values(n, 3.0), shape.as_slice(), &Device::Cpu).unwrap();
                    let ours = x.apply_op1_no_bwd(&op).unwrap();
                    let reference = x.broadcast_matmul(&dense_w.t().unwrap()).unwrap();
                    assert_eq!(ours.dims(), reference.dims());
                    // 16-bit (15-bit repacked) activations err by up to 1/65534 (1/32766) of a
                    // block's largest value each; over 96 products of weights below 1 that
                    // bounds the difference by about 1e-3.
                    let diff = max_abs_diff(&ours, &reference);
                    assert!(diff < 1e-3, "{dtype:?} {shape:?}: {diff}");
                }
            }
        }
    }

    /// The row-by-row op, and the repacked one where this CPU runs it.
    fn both_paths(q: &Arc<QTensor>) -> Vec<QuantizedMatMul> {
        let mut ops = vec![QuantizedMatMul::row_by_row(q.clone())];
        if PackedWeight::available() {
            if let Some(packed) = PackedWeight::pack(q).unwrap() {
                ops.push(QuantizedMatMul::packed(Arc::new(packed)));
            }
        }
        ops
    }

    /// A row's outputs alone equal its outputs in a batch of 9 (two SIMD groups of four and
    /// one row alone), to the bit.
    fn assert_batch_invariant(q: &Arc<QTensor>, cols: usize) {
        let batch = Tensor::from_vec(values(9 * cols, 1.5), (9, cols), &Device::Cpu).unwrap();
        for op in both_paths(q) {
            let batched = batch.apply_op1_no_bwd(&op).unwrap();
            for i in 0..9 {
                let alone = batch
                    .narrow(0, i, 1)
                    .unwrap()
                    .apply_op1_no_bwd(&op)
                    .unwrap();
                let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = batched.get(i).unwrap().to_vec1().unwrap();
                assert_eq!(a, b, "{:?} row {i}", q.dtype());
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let w = Tensor::from_vec(values(24 * 64, 0.25), (24, 64), &Device::Cpu).unwrap();
        for dtype in FORMATS {
            assert_batch_invariant(&Arc::new(QTensor::quantize(&w, dtype).unwrap()), 64);
        }
    }

    #[test]
    fn the_simd_and_portable_dots_agree_to_the_bit() {
        // 7 blocks: an odd count exercises the last, unpaired block.
        let cols = 7 * BLOCK;
        let w = Tensor::from_vec(values(3 * cols, 0.1), (3, cols), &Device::Cpu).unwrap();
        let x = I16Blocks::quantize(
            &values(cols, 2.0)
                .iter()
                .map(|v| v * 3.0)
                .collect::<Vec<_>>(),
        );
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            match dtype {
                GgmlDType::Q8_0 => assert_simd_matches_portable::<Blocks<Q8_0>>(&q, &x, 7),
                GgmlDType::Q4_0 => assert_simd_matches_portable::<Blocks<Q4_0>>(&q, &x, 7),
                GgmlDType::Q5_0 => assert_simd_matches_portable::<Blocks<Q5_0>>(&q, &x, 7),
                _ => assert_simd_matches_portable::<Blocks<Q4_1>>(&q, &x, 7),
            }
        }
    }

    /// Every row of `q` (three rows) times `x`'s first row: the dispatched kernel (SIMD where
    /// the CPU has it) gives the portable reference's bits.
    fn assert_simd_matches_portable<K: RowKernel>(q: &QTensor, x: &I16Blocks, blocks: usize) {
        let bytes = q.data().unwrap();
        let row_bytes = bytes.len() / 3;
        for (row, weight) in bytes.chunks_exact(row_bytes).enumerate() {
            let portable = K::portable(weight, x.row(0, blocks));
            let dispatched = dot::<K>(weight, x.row(0, blocks));
            assert_eq!(
                dispatched.to_bits(),
                portable.to_bits(),
                "{:?} row {row}",
                q.dtype()
            );
        }
    }

    const K_FORMATS: [GgmlDType; 2] = [GgmlDType::Q4K, GgmlDType::Q6K];

    #[test]
    fn k_quants_match_a_dense_matmul_and_batch_to_the_bit() {
        // Three super-blocks per row, weights with an offset so Q4_K's minima matter.
        let cols = 3 * kquants::SUPER;
        let w: Vec<f32> = values(24 * cols, 0.5).iter().map(|v| v + 0.3).collect();
        let w = Tensor::from_vec(w, (24, cols), &Device::Cpu).unwrap();
        for dtype in K_FORMATS {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            assert!(QuantizedMatMul::supports(&q));
            let dense_w = q.dequantize(&Device::Cpu).unwrap();
            for shape in [vec![1, cols], vec![5, cols], vec![2, 3, cols]] {
                let n: usize = shape.iter().product();
                let x = Tensor::from_vec(values(n, 3.0), shape.as_slice(), &Device::Cpu).unwrap();
                for op in both_paths(&q) {
                    let ours = x.apply_op1_no_bwd(&op).unwrap();
                    let reference = x.broadcast_matmul(&dense_w.t().unwrap()).unwrap();
                    assert_eq!(ours.dims(), reference.dims());
                    // 768 products of weights below 1.3, activations within 1/65534 (1/32766
                    // repacked) of a block's largest value each: the difference stays far
                    // below the weights' own error.
                    let diff = max_abs_diff(&ours, &reference);
                    assert!(diff < 2e-3, "{dtype:?} {shape:?}: {diff}");
                }
            }
            assert_batch_invariant(&q, cols);
        }
    }

    #[test]
    fn k_quant_unpacking_matches_candles_dequantization() {
        let w = Tensor::from_vec(values(2 * 512, 0.7), (2, 512), &Device::Cpu).unwrap();
        for dtype in K_FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bytes = q.data().unwrap();
            let (size, unpack): (usize, fn(&[u8]) -> kquants::Unpacked) = match dtype {
                GgmlDType::Q4K => (Q4K_BYTES, kquants::unpack_q4k),
                _ => (Q6K_BYTES, kquants::unpack_q6k),
            };
            for (s, block) in bytes.chunks_exact(size).enumerate() {
                let u = unpack(block);
                for (i, &qv) in u.q.iter().enumerate() {
                    let ours = u.scales[i / 16] * qv as f32 - u.mins[i / 32];
                    let theirs = dense[s * kquants::SUPER + i];
                    assert!(
                        (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
                        "{dtype:?} {s}:{i}: {ours} vs {theirs}"
                    );
                }
            }
        }
    }

    #[test]
    fn k_quant_simd_and_portable_dots_agree_to_the_bit() {
        let cols = 3 * kquants::SUPER;
        let w = Tensor::from_vec(values(3 * cols, 0.1), (3, cols), &Device::Cpu).unwrap();
        let scaled: Vec<f32> = values(cols, 2.0).iter().map(|v| v * 3.0).collect();
        let x = I16Blocks::quantize(&scaled);
        let blocks = cols / BLOCK;
        for dtype in K_FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            match dtype {
                GgmlDType::Q4K => assert_simd_matches_portable::<KQuant<false>>(&q, &x, blocks),
                _ => assert_simd_matches_portable::<KQuant<true>>(&q, &x, blocks),
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
            let mut sum = 0i32;
            for (e, v) in block.iter().enumerate() {
                let back = q.values[b * BLOCK + e] as f32 * q.scales[b];
                assert!((back - v).abs() <= max / 65534.0 * 1.01, "{v} vs {back}");
                sum += q.values[b * BLOCK + e] as i32;
            }
            assert_eq!(q.sums[b], sum as f32);
        }
        let zeros = I16Blocks::quantize(&[0.0; BLOCK]);
        assert_eq!(zeros.scales, vec![0.0]);
    }
}
