//! Q8_0, Q4_0 and Q4_1 weights repacked eight rows at a time, multiplied with AVX2.
//!
//! The row-by-row kernels ([`super::quantized`]) spend most of each 32-value block on
//! bookkeeping: two f16 scales to convert, nibbles widened to 16 bits, a horizontal sum per
//! row. Repacked at load time, one 32-byte vector holds four consecutive values of eight rows,
//! so one broadcast of four activation bytes meets eight rows in a `vpmaddubsw`; the eight
//! rows' scales are one vector; and each output lane is one row, so
//! nothing is summed across lanes. At SmolLM2's 1536x576 this runs 2.2x (one row) to 2.4x
//! (64 rows) the row-by-row kernels' speed (`benches/matmul.rs`).
//!
//! `vpmaddubsw` multiplies bytes, so activations are split into two bytes
//! ([`SplitActivations`]): each 32-value block is quantized to 15 bits (`±16383` times one
//! F32 scale) and each value written `255 · high + low` with `low` in ±127 and `high` in ±64.
//! That keeps 128 times the resolution of the 8-bit activations llama.cpp and candle use, at
//! two byte products per weight instead of one. Products are exact integers until the
//! per-block scale, so every output has the same arithmetic whatever the number of rows
//! (speculative verification reproduces decoding to the bit), and [`reference_dot`] — the
//! plain loop the tests hold the kernel to — agrees to the bit.

#[cfg(test)]
use super::quantized::unpack;
use super::quantized::{block_bytes, Q4_0, Q4_1, Q8_0};
use super::{pool, BLOCK};
use candle_core::quantized::{GgmlDType, QTensor};

/// Weight rows per repacked group: one per F32 lane of an AVX2 vector.
const GROUP: usize = 8;
/// Groups per parallel task (16 rows, like the row-by-row kernels).
const GROUPS_PER_TASK: usize = 2;
/// Activation rows multiplied together, sharing each unpacked weight vector.
const ROWS_TOGETHER: usize = 4;
/// How many blocks ahead the kernel asks for weights.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BLOCKS: usize = 4;
/// Largest quantized activation magnitude (15 bits).
const ACTIVATION_MAX: f32 = 16383.0;
/// `value = 255 · high + low`: base 255 keeps `low` within ±127 (and so pair sums of
/// `vpmaddubsw` within 16 bits).
const BASE: i32 = 255;

/// Repacked bytes per block of a group: eight rows of 32 values, as bytes (Q8_0) or nibbles.
const fn group_block_bytes(format: u8) -> usize {
    if format == Q8_0 {
        GROUP * BLOCK
    } else {
        GROUP * BLOCK / 2
    }
}

/// A Q8_0, Q4_0 or Q4_1 weight in eight-row groups.
///
/// Q4_0 and Q4_1: block `b` of group `g` holds eight "registers" `k` of 32 nibbles (0..15):
/// nibble `4r + t` of register `k` is value `4k + t` of the group's row `r`; register `2j`
/// fills the low nibbles of 32 bytes and `2j + 1` the high ones. Q8_0: sixteen registers
/// `j` of 16 bytes, byte `2r + t` being value `2j + t` of row `r` (widened to 16 bits and
/// multiplied with `vpmaddwd`, which beats two byte products and their sign fix-ups). Scales
/// and Q4_1 minima stay f16, eight per block of a group.
pub struct PackedWeight {
    format: u8,
    rows: usize,
    cols: usize,
    quants: Vec<u8>,
    /// f16 bits, as stored: decoding streams every weight byte from memory once per token,
    /// so F32 copies would cost a fifth more traffic than they save in conversions (one
    /// `vcvtph2ps` per eight rows).
    scales: Vec<u16>,
    /// Q4_1 only.
    minima: Vec<u16>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({}x{})", self.rows, self.cols)
    }
}

impl PackedWeight {
    /// Whether this CPU runs the repacked kernels (AVX2, FMA and F16C).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            super::has_avx2_fma()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Repacks a Q8_0, Q4_0 or Q4_1 matrix; `None` for other types.
    pub fn pack(weight: &QTensor) -> candle_core::Result<Option<Self>> {
        let format = match weight.dtype() {
            GgmlDType::Q8_0 => Q8_0,
            GgmlDType::Q4_0 => Q4_0,
            GgmlDType::Q4_1 => Q4_1,
            _ => return Ok(None),
        };
        let (rows, cols) = weight.shape().dims2()?;
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let bytes = weight.data()?;
        let blocks = cols / BLOCK;
        let row_bytes = blocks * block_bytes(format);
        if bytes.len() != rows * row_bytes {
            candle_core::bail!(
                "a {rows}x{cols} {:?} weight holds {} bytes, not {}",
                weight.dtype(),
                bytes.len(),
                rows * row_bytes
            );
        }
        let groups = rows.div_ceil(GROUP);
        let packed_block = group_block_bytes(format);
        let mut quants = vec![0u8; groups * blocks * packed_block];
        let mut scales = vec![0u16; groups * blocks * GROUP];
        let mut minima = vec![0u16; if format == Q4_1 { scales.len() } else { 0 }];
        let f16_bits = |block: &[u8], at: usize| u16::from_le_bytes([block[at], block[at + 1]]);
        // Groups are independent: repack them in parallel (every quantized layer of a model
        // is repacked while it loads).
        let (quants_at, scales_at, minima_at) = (
            quants.as_mut_ptr() as usize,
            scales.as_mut_ptr() as usize,
            minima.as_mut_ptr() as usize,
        );
        pool::run(groups, &|g| {
            // SAFETY: group `g` owns these ranges of the three buffers, no other task touches
            // them, and the buffers outlive the pool call.
            let (dst_quants, dst_scales, dst_minima) = unsafe {
                let per_group = blocks * GROUP;
                (
                    std::slice::from_raw_parts_mut(
                        (quants_at as *mut u8).add(g * blocks * packed_block),
                        blocks * packed_block,
                    ),
                    std::slice::from_raw_parts_mut(
                        (scales_at as *mut u16).add(g * per_group),
                        per_group,
                    ),
                    std::slice::from_raw_parts_mut(
                        (minima_at as *mut u16).add(if format == Q4_1 { g * per_group } else { 0 }),
                        if format == Q4_1 { per_group } else { 0 },
                    ),
                )
            };
            for r in 0..GROUP.min(rows - g * GROUP) {
                let row_data = &bytes[(g * GROUP + r) * row_bytes..(g * GROUP + r + 1) * row_bytes];
                for (b, block) in row_data.chunks_exact(block_bytes(format)).enumerate() {
                    dst_scales[b * GROUP + r] = f16_bits(block, 0);
                    if format == Q4_1 {
                        dst_minima[b * GROUP + r] = f16_bits(block, 2);
                    }
                    let dst = &mut dst_quants[b * packed_block..(b + 1) * packed_block];
                    if format == Q8_0 {
                        for (e, &q) in block[2..2 + BLOCK].iter().enumerate() {
                            dst[(e / 2) * 16 + r * 2 + e % 2] = q;
                        }
                    } else {
                        let nibbles = &block[if format == Q4_0 { 2 } else { 4 }..][..BLOCK / 2];
                        for (j, &byte) in nibbles.iter().enumerate() {
                            // Value j (low nibble) and value j + 16 (high nibble).
                            for (e, q) in [(j, byte & 0x0f), (j + 16, byte >> 4)] {
                                let (k, t) = (e / 4, e % 4);
                                dst[(k / 2) * 32 + r * 4 + t] |=
                                    if k % 2 == 0 { q } else { q << 4 };
                            }
                        }
                    }
                }
            }
        });
        Ok(Some(Self {
            format,
            rows,
            cols,
            quants,
            scales,
            minima,
        }))
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    pub fn dtype(&self) -> GgmlDType {
        match self.format {
            Q8_0 => GgmlDType::Q8_0,
            Q4_0 => GgmlDType::Q4_0,
            _ => GgmlDType::Q4_1,
        }
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes of the weight as a GGUF tensor (the repacked copy holds as many).
    pub fn ggml_size(&self) -> usize {
        self.rows * self.blocks() * block_bytes(self.format)
    }

    /// The weight as the GGUF tensor it was packed from, on the CPU: repacking loses
    /// nothing, so the bytes are exactly the original ones.
    pub fn to_qtensor(&self) -> candle_core::Result<QTensor> {
        let (blocks, size) = (self.blocks(), block_bytes(self.format));
        let packed_block = group_block_bytes(self.format);
        let mut bytes = vec![0u8; self.ggml_size()];
        for (row, row_bytes) in bytes.chunks_exact_mut(blocks * size).enumerate() {
            let (g, r) = (row / GROUP, row % GROUP);
            for (b, block) in row_bytes.chunks_exact_mut(size).enumerate() {
                let at = g * blocks + b;
                block[..2].copy_from_slice(&self.scales[at * GROUP + r].to_le_bytes());
                if self.format == Q4_1 {
                    block[2..4].copy_from_slice(&self.minima[at * GROUP + r].to_le_bytes());
                }
                let src = &self.quants[at * packed_block..(at + 1) * packed_block];
                if self.format == Q8_0 {
                    for e in 0..BLOCK {
                        block[2 + e] = src[(e / 2) * 16 + r * 2 + e % 2];
                    }
                } else {
                    let value = |e: usize| {
                        let (k, t) = (e / 4, e % 4);
                        let byte = src[(k / 2) * 32 + r * 4 + t];
                        if k % 2 == 0 {
                            byte & 0x0f
                        } else {
                            byte >> 4
                        }
                    };
                    let nibbles = &mut block[if self.format == Q4_0 { 2 } else { 4 }..];
                    for j in 0..BLOCK / 2 {
                        nibbles[j] = value(j) | value(j + 16) << 4;
                    }
                }
            }
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype(),
            &bytes,
            vec![self.rows, self.cols],
            &candle_core::Device::Cpu,
        )
    }

    /// `x W^T` for F32 activations `x` (rows of `cols` values), as `(x rows, W rows)`.
    ///
    /// Only on CPUs where [`Self::available`] holds.
    pub(super) fn matmul(&self, x: &[f32]) -> Vec<f32> {
        Self::matmul_many(&[self], x).pop().unwrap_or_default()
    }

    /// `x W^T` for each of several weights with the same input size (a layer's query, key
    /// and value projections; gate and up): the activations are quantized once and every
    /// product runs in one parallel loop, instead of one per weight. Outputs as
    /// `(x rows, W rows)` each, in the order of `weights`.
    ///
    /// Only on CPUs where [`Self::available`] holds; panics if the input sizes differ.
    pub fn matmul_many(weights: &[&PackedWeight], x: &[f32]) -> Vec<Vec<f32>> {
        let Some(cols) = weights.first().map(|w| w.cols) else {
            return Vec::new();
        };
        assert!(weights.iter().all(|w| w.cols == cols), "input sizes differ");
        let m = x.len() / cols;
        let activations = SplitActivations::quantize(x);
        let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; m * w.rows]).collect();
        let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
        // Task `t` is (weight, first group of its run of GROUPS_PER_TASK groups).
        let tasks: Vec<(usize, usize)> = weights
            .iter()
            .enumerate()
            .flat_map(|(k, w)| {
                (0..w.rows.div_ceil(GROUP))
                    .step_by(GROUPS_PER_TASK)
                    .map(move |g| (k, g))
            })
            .collect();
        pool::run(tasks.len(), &|task| {
            let (k, first_group) = tasks[task];
            let w = weights[k];
            let groups = w.rows.div_ceil(GROUP);
            for g in first_group..groups.min(first_group + GROUPS_PER_TASK) {
                let lanes = (w.rows - g * GROUP).min(GROUP);
                let store = |i: usize, ys: &[f32; GROUP]| {
                    // SAFETY: tasks cover disjoint groups, so each output element has one
                    // writer, and `outs` outlives the pool call.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_ptrs[k] as *mut f32).add(i * w.rows + g * GROUP),
                            lanes,
                        )
                    };
                    dst.copy_from_slice(&ys[..lanes]);
                };
                // Rows in fours, the last one to three together (speculative verification
                // multiplies two to five rows).
                let mut i = 0;
                while i < m {
                    let n = (m - i).min(ROWS_TOGETHER);
                    let mut ys = [[0f32; GROUP]; ROWS_TOGETHER];
                    match n {
                        1 => ys[..1].copy_from_slice(&w.group_times::<1>(g, &activations, i)),
                        2 => ys[..2].copy_from_slice(&w.group_times::<2>(g, &activations, i)),
                        3 => ys[..3].copy_from_slice(&w.group_times::<3>(g, &activations, i)),
                        _ => ys = w.group_times::<ROWS_TOGETHER>(g, &activations, i),
                    }
                    for (r, y) in ys[..n].iter().enumerate() {
                        store(i + r, y);
                    }
                    i += n;
                }
            }
        });
        outs
    }

    /// Group `g` times activation rows `first..first + N`.
    // Elsewhere than x86-64 no weight is ever repacked (`available` is false), and the body
    // is only the unreachable end.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn group_times<const N: usize>(
        &self,
        g: usize,
        x: &SplitActivations,
        first: usize,
    ) -> [[f32; GROUP]; N] {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the features the kernels are compiled for were just detected; the
            // kernels check the slices they read without bounds checks.
            return unsafe {
                match self.format {
                    Q8_0 => group_avx2::<Q8_0, N>(self, g, x, first),
                    Q4_0 => group_avx2::<Q4_0, N>(self, g, x, first),
                    _ => group_avx2::<Q4_1, N>(self, g, x, first),
                }
            };
        }
        unreachable!("the repacked kernels run only where PackedWeight::available() holds")
    }
}

/// Activations quantized per 32-value block to 15 bits and split into two bytes per value:
/// `q = 255 · high + low`, `q = round(x / scale)`, `scale = max|x| / 16383`. Each row is
/// quantized on its own, so a row gets the same values alone or in a batch.
pub(super) struct SplitActivations {
    /// The quantized values whole (Q8_0's weights multiply these).
    values: Vec<i16>,
    low: Vec<i8>,
    high: Vec<i8>,
    scales: Vec<f32>,
    /// Per block, the sum of its quantized values: Q4_0's offset of 8 multiplies it.
    sums: Vec<i32>,
    /// Per block, `scale · sum`: Q4_1's minimum multiplies it.
    scaled_sums: Vec<f32>,
}

impl SplitActivations {
    pub(super) fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut this = Self {
            values: vec![0; x.len()],
            low: vec![0; x.len()],
            high: vec![0; x.len()],
            scales: vec![0.0; blocks],
            sums: vec![0; blocks],
            scaled_sums: vec![0.0; blocks],
        };
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max == 0.0 || !max.is_finite() {
                // Zeros stay zero; a non-finite block makes its outputs NaN, as in F32.
                let scale = if max == 0.0 { 0.0 } else { f32::NAN };
                this.scales[b] = scale;
                this.scaled_sums[b] = scale;
                continue;
            }
            let scale = max / ACTIVATION_MAX;
            let inverse = ACTIVATION_MAX / max;
            let mut sum = 0i32;
            for (e, v) in block.iter().enumerate() {
                let q = round_to_integer((v * inverse).clamp(-ACTIVATION_MAX, ACTIVATION_MAX));
                this.values[b * BLOCK + e] = q as i16;
                let high = (q + BASE / 2).div_euclid(BASE);
                this.high[b * BLOCK + e] = high as i8;
                this.low[b * BLOCK + e] = (q - BASE * high) as i8;
                sum += q;
            }
            this.scales[b] = scale;
            this.sums[b] = sum;
            this.scaled_sums[b] = scale * sum as f32;
        }
        this
    }

    /// Quantized value `e` of block `b` (of the whole matrix's blocks).
    #[cfg(test)]
    fn value(&self, b: usize, e: usize) -> i32 {
        let i = b * BLOCK + e;
        let split = BASE * self.high[i] as i32 + self.low[i] as i32;
        assert_eq!(
            split, self.values[i] as i32,
            "two forms of value {e} of block {b}"
        );
        split
    }
}

/// `v` rounded to the nearest integer (ties to even), for `|v| < 2^22`: adding and
/// subtracting 1.5 · 2^23 leaves no bits for a fraction. Two additions instead of a call to
/// libm's `roundf` per value, which cost as much as a third of a decoding step's quantization.
#[inline(always)]
fn round_to_integer(v: f32) -> i32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    ((v + SHIFT) - SHIFT) as i32
}

/// The arithmetic the kernel follows, written plainly from the GGML bytes of one weight row
/// and activation row `i`: per block, the exact integer dot product of the stored weights and
/// the quantized activations (Q4_0 with its offset of 8 taken out), to F32, times
/// `scale_w · scale_x` added into one accumulator by a fused multiply-add; Q4_1 then adds
/// `minimum · scale_x · Σq` by another.
#[cfg(test)]
pub(super) fn reference_dot(format: u8, weight_row: &[u8], x: &SplitActivations, i: usize) -> f32 {
    let blocks = weight_row.len() / block_bytes(format);
    let mut acc = 0f32;
    for (b, block) in weight_row.chunks_exact(block_bytes(format)).enumerate() {
        let xb = i * blocks + b;
        // The stored integers (Q4_0's offset of 8 taken out), the scale and Q4_1's minimum.
        let (w, scale, minimum) = match format {
            Q8_0 => unpack::<Q8_0>(block),
            Q4_0 => unpack::<Q4_0>(block),
            _ => unpack::<Q4_1>(block),
        };
        let dot: i32 = (0..BLOCK).map(|e| w[e] * x.value(xb, e)).sum();
        acc = (dot as f32).mul_add(scale * x.scales[xb], acc);
        if format == Q4_1 {
            acc = minimum.mul_add(x.scaled_sums[xb], acc);
        }
    }
    acc
}

/// Group `g` of `w` times activation rows `first..first + N`: one F32 lane per weight row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_avx2<const F: u8, const N: usize>(
    w: &PackedWeight,
    g: usize,
    x: &SplitActivations,
    first: usize,
) -> [[f32; GROUP]; N] {
    use std::arch::x86_64::*;
    let blocks = w.blocks();
    let packed_block = group_block_bytes(F);
    let quants = &w.quants[g * blocks * packed_block..(g + 1) * blocks * packed_block];
    let scales = &w.scales[g * blocks * GROUP..(g + 1) * blocks * GROUP];
    let minima = if F == Q4_1 {
        &w.minima[g * blocks * GROUP..(g + 1) * blocks * GROUP]
    } else {
        &[][..]
    };
    // Every activation row read below lies inside the split activations.
    assert!((first + N) * blocks <= x.scales.len());
    let x_values = |i: usize, b: usize| (first + i) * blocks * BLOCK + b * BLOCK;
    // Four activation bytes starting at `p`, in every 32-bit lane.
    let broadcast4 = |p: *const i8| _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32));
    let ones = _mm256_set1_epi16(1);
    let base = _mm256_set1_epi16(BASE as i16);
    let nibble_mask = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..blocks {
        let q = quants.as_ptr().add(b * packed_block);
        // Four blocks ahead: the hardware prefetcher follows one stream per task, and a
        // hint keeps the next blocks in flight while this one is multiplied.
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BLOCKS * packed_block) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(
            q.wrapping_add(PREFETCH_BLOCKS * packed_block + 64) as *const i8
        );
        // Per activation row, each weight row's exact block dot product, one lane per row.
        let mut dots = [_mm256_setzero_si256(); N];
        if F == Q8_0 {
            // 16-bit weights times whole 15-bit activations, two values per 32-bit lane:
            // sixteen pair sums of at most 2·128·16383 stay far inside 32 bits.
            for j in 0..BLOCK / 2 {
                let weights =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(j * 16) as *const __m128i));
                for i in 0..N {
                    let pair = x.values.as_ptr().add(x_values(i, b) + 2 * j);
                    dots[i] = _mm256_add_epi32(
                        dots[i],
                        _mm256_madd_epi16(weights, broadcast4(pair as *const i8)),
                    );
                }
            }
        } else {
            // Nibbles 0..15 against bytes within ±127: eight pair sums of at most 2·15·127
            // stay inside 16 bits, so the whole block accumulates in 16-bit lanes.
            let (mut low, mut high) = ([_mm256_setzero_si256(); N], [_mm256_setzero_si256(); N]);
            for j in 0..BLOCK / 8 {
                let packed = _mm256_loadu_si256(q.add(j * 32) as *const __m256i);
                let even = _mm256_and_si256(packed, nibble_mask);
                let odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble_mask);
                for i in 0..N {
                    let at = x_values(i, b) + 8 * j;
                    let (xl, xh) = (x.low.as_ptr().add(at), x.high.as_ptr().add(at));
                    low[i] = _mm256_add_epi16(
                        low[i],
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(even, broadcast4(xl)),
                            _mm256_maddubs_epi16(odd, broadcast4(xl.add(4))),
                        ),
                    );
                    high[i] = _mm256_add_epi16(
                        high[i],
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(even, broadcast4(xh)),
                            _mm256_maddubs_epi16(odd, broadcast4(xh.add(4))),
                        ),
                    );
                }
            }
            for i in 0..N {
                dots[i] = _mm256_add_epi32(
                    _mm256_madd_epi16(high[i], base),
                    _mm256_madd_epi16(low[i], ones),
                );
                if F == Q4_0 {
                    let offset = 8 * *x.sums.get_unchecked((first + i) * blocks + b);
                    dots[i] = _mm256_sub_epi32(dots[i], _mm256_set1_epi32(offset));
                }
            }
        }
        let scale = _mm256_cvtph_ps(_mm_loadu_si128(
            scales.as_ptr().add(b * GROUP) as *const __m128i
        ));
        for i in 0..N {
            let xb = (first + i) * blocks + b;
            let scale_x = _mm256_set1_ps(*x.scales.get_unchecked(xb));
            acc[i] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(dots[i]),
                _mm256_mul_ps(scale, scale_x),
                acc[i],
            );
            if F == Q4_1 {
                let minimum = _mm256_cvtph_ps(_mm_loadu_si128(
                    minima.as_ptr().add(b * GROUP) as *const __m128i
                ));
                let scaled_sum = _mm256_set1_ps(*x.scaled_sums.get_unchecked(xb));
                acc[i] = _mm256_fmadd_ps(minimum, scaled_sum, acc[i]);
            }
        }
    }
    let mut out = [[0f32; GROUP]; N];
    for i in 0..N {
        _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 7.31).sin()).collect()
    }

    #[test]
    fn rounding_goes_to_the_nearest_integer() {
        for (v, expected) in [
            (0.4, 0),
            (0.6, 1),
            (-0.6, -1),
            (2.5, 2),
            (3.5, 4),
            (-16383.0, -16383),
            (16382.7, 16383),
        ] {
            assert_eq!(round_to_integer(v), expected, "{v}");
        }
    }

    #[test]
    fn split_activations_rebuild_fifteen_bit_values() {
        let x: Vec<f32> = (0..3 * BLOCK)
            .map(|i| ((i as f32) * 0.731).sin() * 10.0)
            .collect();
        let split = SplitActivations::quantize(&x);
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut sum = 0;
            for (e, v) in block.iter().enumerate() {
                let i = b * BLOCK + e;
                assert!((-127..=127).contains(&split.low[i]), "{}", split.low[i]);
                assert!((-64..=64).contains(&split.high[i]), "{}", split.high[i]);
                let back = split.value(b, e) as f32 * split.scales[b];
                assert!((back - v).abs() <= max / 32766.0 * 1.01, "{v} vs {back}");
                sum += split.value(b, e);
            }
            assert_eq!(split.sums[b], sum);
        }
        let zeros = SplitActivations::quantize(&[0.0; BLOCK]);
        assert_eq!(zeros.scales, vec![0.0]);
    }

    /// Weight rows that are not a multiple of eight (the last group is partly empty), with an
    /// offset so Q4_1's minima matter, and activation counts that use both kernels.
    #[test]
    fn kernels_agree_with_the_reference_to_the_bit_alone_or_batched() {
        if !PackedWeight::available() {
            return;
        }
        let (rows, cols) = (21, 5 * BLOCK);
        let w: Vec<f32> = values(rows * cols, 0.5).iter().map(|v| v + 0.2).collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for (dtype, format) in [
            (GgmlDType::Q8_0, Q8_0),
            (GgmlDType::Q4_0, Q4_0),
            (GgmlDType::Q4_1, Q4_1),
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let packed = PackedWeight::pack(&q).unwrap().unwrap();
            let bytes = q.data().unwrap();
            let row_bytes = bytes.len() / rows;
            // Seven rows: a four and a three; six: a four and a two; one alone.
            for m in [7, 6] {
                let x: Vec<f32> = values(m * cols, 2.0).iter().map(|v| v * 3.0).collect();
                let split = SplitActivations::quantize(&x);
                let batched = packed.matmul(&x);
                for i in 0..m {
                    let alone = packed.matmul(&x[i * cols..(i + 1) * cols]);
                    for r in 0..rows {
                        let weight_row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                        let reference = reference_dot(format, weight_row, &split, i);
                        let y = batched[i * rows + r];
                        assert_eq!(y.to_bits(), reference.to_bits(), "{dtype:?} x{i} w{r}");
                        assert_eq!(alone[r].to_bits(), y.to_bits(), "{dtype:?} x{i} w{r}");
                    }
                }
            }
        }
    }

    #[test]
    fn repacking_loses_nothing() {
        // 21 rows: the last group is partly empty; an offset so Q4_1's minima vary.
        let (rows, cols) = (21, 3 * BLOCK);
        let w: Vec<f32> = values(rows * cols, 0.9).iter().map(|v| v + 0.4).collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let packed = PackedWeight::pack(&q).unwrap().unwrap();
            assert_eq!(packed.dtype(), dtype);
            assert_eq!(packed.dims(), (rows, cols));
            assert_eq!(packed.ggml_size(), q.data().unwrap().len());
            let back = packed.to_qtensor().unwrap();
            assert_eq!(back.dtype(), dtype);
            assert_eq!(back.shape().dims(), &[rows, cols]);
            assert_eq!(back.data().unwrap(), q.data().unwrap(), "{dtype:?}");
        }
    }

    #[test]
    fn products_sharing_an_input_equal_their_separate_products() {
        if !PackedWeight::available() {
            return;
        }
        let cols = 3 * BLOCK;
        let weights: Vec<PackedWeight> = [(40, GgmlDType::Q4_1), (13, GgmlDType::Q8_0)]
            .iter()
            .map(|&(rows, dtype)| {
                let w =
                    Tensor::from_vec(values(rows * cols, rows as f32), (rows, cols), &Device::Cpu)
                        .unwrap();
                PackedWeight::pack(&QTensor::quantize(&w, dtype).unwrap())
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let x = values(5 * cols, 0.3);
        let together = PackedWeight::matmul_many(&[&weights[0], &weights[1]], &x);
        assert_eq!(together.len(), 2);
        for (w, y) in weights.iter().zip(&together) {
            assert_eq!(&w.matmul(&x), y);
        }
    }

    #[test]
    fn extreme_q8_weights_do_not_overflow() {
        if !PackedWeight::available() {
            return;
        }
        // A Q8_0 block of -128s (which llama.cpp's quantizer never writes, but a file may
        // hold) against activations at full scale with alternating signs.
        let cols = 2 * BLOCK;
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        for byte in &mut block[2..] {
            *byte = (-128i8) as u8;
        }
        let bytes: Vec<u8> = block.iter().copied().cycle().take(34 * 2 * 8).collect();
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &bytes,
            vec![8, cols],
            &Device::Cpu,
        )
        .unwrap();
        let packed = PackedWeight::pack(&q).unwrap().unwrap();
        let x: Vec<f32> = (0..cols)
            .map(|i| if i % 3 == 0 { -1.0 } else { 0.999 })
            .collect();
        let ys = packed.matmul(&x);
        let expected: f32 = x.iter().map(|v| -64.0 * v).sum();
        for y in ys {
            assert!(
                (y - expected).abs() < 1e-2 * expected.abs().max(1.0),
                "{y} vs {expected}"
            );
        }
    }
}
