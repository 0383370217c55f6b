//! Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K weights repacked eight rows at a time (layout in
//! [`super::repack`]), multiplied with AVX2 or AVX-512 VNNI.
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
//!
//! Where the CPU has AVX-512 VNNI (and [`super::set_max_cpu_isa`] allows it), the same loop is
//! built a second time around `vpdpbusd`, which multiplies four weight bytes by four
//! activation bytes and adds them to a 32-bit sum in one instruction (AVX2 needs a
//! `vpmaddubsw`, a 16-bit add and a periodic widening), on 256-bit vectors, eight activation
//! rows at a time in its 32 registers. Its integer sums are the same, so it gives the same
//! bits; on Qwen2.5-Coder-1.5B it prefills about 1.2–1.4x faster than the AVX2 build.

#[cfg(test)]
use super::quantized::unpack;
use super::quantized::{block_bytes, block_values, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0};
use super::repack::{
    group_block_bytes, high_bytes, is_k_quant, pack_row, unpack_row, Group, GroupMut, GroupRef,
    GroupSizes, GROUP, SUB_BLOCKS,
};
use super::{pool, Isa, BLOCK};
use candle_core::quantized::{GgmlDType, QTensor};

/// Parallel tasks per pool thread and product. Each task claim is an atomic update of a
/// cache line the threads share, which costs hundreds of nanoseconds when the cores sit on
/// different dies (common on cloud VMs): with one claim per 16 rows (about a microsecond of
/// work), two threads ran a product barely faster than one. A few large tasks per thread
/// keep both the claims rare and the threads' shares even.
const TASKS_PER_THREAD: usize = 8;
/// Activation rows multiplied together, sharing each unpacked weight vector.
const ROWS_TOGETHER: usize = 4;
/// The same on AVX-512 VNNI.
const ROWS_TOGETHER_VNNI: usize = 8;
/// Split activation bytes a task keeps in L2 while its weight groups pass over them (a
/// quarter to a third of the L2 of current x86 cores, leaving room for the weights).
const ACTIVATION_CHUNK_BYTES: usize = 384 * 1024;
/// How many blocks ahead the kernel asks for weights.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BLOCKS: usize = 12;
/// Largest quantized activation magnitude (15 bits).
const ACTIVATION_MAX: f32 = 16383.0;
/// `value = 255 · high + low`: base 255 keeps `low` within ±127 (and so pair sums of
/// `vpmaddubsw` within 16 bits).
const BASE: i32 = 255;

/// A quantized weight in eight-row groups (see [`super::repack`] for the layout), holding
/// the bytes of its GGUF tensor rearranged, and no other copy.
pub struct PackedWeight {
    format: u8,
    rows: usize,
    cols: usize,
    quants: Vec<u8>,
    /// Bits 4 (and 5) of Q5_0's and Q6_K's integers.
    high: Vec<u8>,
    /// f16 bits, as stored: decoding streams every weight byte from memory once per token,
    /// so F32 copies would cost more traffic than they save in conversions (one
    /// `vcvtph2ps` per eight rows). Per block, or per super-block for the K-quants.
    scales: Vec<u16>,
    /// Q4_1's minima per block, Q4_K's `dmin` per super-block.
    minima: Vec<u16>,
    /// The K-quants' per-block integer scales (and Q4_K's minima).
    sub_scales: Vec<u8>,
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

    /// Repacks a Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K matrix; `None` for other types.
    pub fn pack(weight: &QTensor) -> candle_core::Result<Option<Self>> {
        let format = match weight.dtype() {
            GgmlDType::Q8_0 => Q8_0,
            GgmlDType::Q4_0 => Q4_0,
            GgmlDType::Q4_1 => Q4_1,
            GgmlDType::Q5_0 => Q5_0,
            GgmlDType::Q4K => Q4_K,
            GgmlDType::Q6K => Q6_K,
            _ => return Ok(None),
        };
        let (rows, cols) = weight.shape().dims2()?;
        if cols % block_values(format) != 0 {
            return Ok(None);
        }
        let bytes = weight.data()?;
        let blocks = cols / BLOCK;
        let row_bytes = cols / block_values(format) * block_bytes(format);
        if bytes.len() != rows * row_bytes {
            candle_core::bail!(
                "a {rows}x{cols} {:?} weight holds {} bytes, not {}",
                weight.dtype(),
                bytes.len(),
                rows * row_bytes
            );
        }
        let groups = rows.div_ceil(GROUP);
        let sizes = GroupSizes::new(format, blocks);
        let mut this = Self {
            format,
            rows,
            cols,
            quants: vec![0; groups * sizes.quants],
            high: vec![0; groups * sizes.high],
            scales: vec![0; groups * sizes.scales],
            minima: vec![0; groups * sizes.minima],
            sub_scales: vec![0; groups * sizes.sub_scales],
        };
        let at = (
            this.quants.as_mut_ptr() as usize,
            this.high.as_mut_ptr() as usize,
            this.scales.as_mut_ptr() as usize,
            this.minima.as_mut_ptr() as usize,
            this.sub_scales.as_mut_ptr() as usize,
        );
        // Groups are independent: repack them in parallel (every quantized layer of a model
        // is repacked while it loads).
        pool::run(groups, &|g| {
            // SAFETY: group `g` owns these ranges of the five buffers, no other task touches
            // them, and the buffers outlive the pool call.
            let mut dst: GroupMut = unsafe {
                let bytes = |base: usize, n: usize| {
                    std::slice::from_raw_parts_mut((base as *mut u8).add(g * n), n)
                };
                let halves = |base: usize, n: usize| {
                    std::slice::from_raw_parts_mut((base as *mut u16).add(g * n), n)
                };
                Group {
                    quants: bytes(at.0, sizes.quants),
                    high: bytes(at.1, sizes.high),
                    scales: halves(at.2, sizes.scales),
                    minima: halves(at.3, sizes.minima),
                    sub_scales: bytes(at.4, sizes.sub_scales),
                }
            };
            for r in 0..GROUP.min(rows - g * GROUP) {
                let row = &bytes[(g * GROUP + r) * row_bytes..(g * GROUP + r + 1) * row_bytes];
                pack_row(format, row, r, &mut dst);
            }
        });
        Ok(Some(this))
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// Group `g`'s share of each buffer.
    fn group(&self, g: usize) -> GroupRef<'_> {
        let sizes = GroupSizes::new(self.format, self.blocks());
        let range = |n: usize| g * n..(g + 1) * n;
        Group {
            quants: &self.quants[range(sizes.quants)],
            high: &self.high[range(sizes.high)],
            scales: &self.scales[range(sizes.scales)],
            minima: &self.minima[range(sizes.minima)],
            sub_scales: &self.sub_scales[range(sizes.sub_scales)],
        }
    }

    /// The GGUF format of the packed blocks.
    pub fn dtype(&self) -> GgmlDType {
        match self.format {
            Q8_0 => GgmlDType::Q8_0,
            Q4_0 => GgmlDType::Q4_0,
            Q4_1 => GgmlDType::Q4_1,
            Q5_0 => GgmlDType::Q5_0,
            Q4_K => GgmlDType::Q4K,
            _ => GgmlDType::Q6K,
        }
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn row_bytes(&self) -> usize {
        self.cols / block_values(self.format) * block_bytes(self.format)
    }

    /// Bytes of the weight as a GGUF tensor.
    pub fn ggml_size(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// Bytes held (the GGUF tensor's, plus a few percent for the K-quants' unpacked scales
    /// and for a partly empty last group).
    pub fn held_bytes(&self) -> usize {
        self.quants.len()
            + self.high.len()
            + self.sub_scales.len()
            + 2 * (self.scales.len() + self.minima.len())
    }

    /// The weight as the GGUF tensor it was packed from, on the CPU: repacking loses
    /// nothing, so the bytes are exactly the original ones.
    pub fn to_qtensor(&self) -> candle_core::Result<QTensor> {
        let row_bytes = self.row_bytes();
        let mut bytes = vec![0u8; self.ggml_size()];
        for (row, out) in bytes.chunks_exact_mut(row_bytes).enumerate() {
            unpack_row(self.format, &self.group(row / GROUP), row % GROUP, out);
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
        Self::matmul_many_on(weights, x, super::cpu_isa())
    }

    /// [`Self::matmul_many`] on the kernels built for `isa`, which must not be more than
    /// the CPU has.
    fn matmul_many_on(weights: &[&PackedWeight], x: &[f32], isa: Option<Isa>) -> Vec<Vec<f32>> {
        let Some(cols) = weights.first().map(|w| w.cols) else {
            return Vec::new();
        };
        assert!(weights.iter().all(|w| w.cols == cols), "input sizes differ");
        let m = x.len() / cols;
        let activations = SplitActivations::quantize(x);
        let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; m * w.rows]).collect();
        let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
        let total_groups: usize = weights.iter().map(|w| w.rows.div_ceil(GROUP)).sum();
        let groups_per_task = total_groups
            .div_ceil(TASKS_PER_THREAD * pool::threads())
            .max(1);
        // Task `t` is (weight, first group of its run of `groups_per_task` groups).
        let tasks: Vec<(usize, usize)> = weights
            .iter()
            .enumerate()
            .flat_map(|(k, w)| {
                (0..w.rows.div_ceil(GROUP))
                    .step_by(groups_per_task)
                    .map(move |g| (k, g))
            })
            .collect();
        // Activation rows in chunks small enough to stay in a core's L2 cache while the
        // task's weight groups pass over them: a 512-token prompt's split activations for a
        // 8960-wide input are 9 MB, which every eight-row weight group used to stream again.
        let chunk_rows = (ACTIVATION_CHUNK_BYTES / (2 * cols)).max(ROWS_TOGETHER_VNNI)
            / ROWS_TOGETHER_VNNI
            * ROWS_TOGETHER_VNNI;
        pool::run(tasks.len(), &|task| {
            let (k, first_group) = tasks[task];
            let w = weights[k];
            let groups = first_group..w.rows.div_ceil(GROUP).min(first_group + groups_per_task);
            for chunk in (0..m).step_by(chunk_rows) {
                let chunk_end = m.min(chunk + chunk_rows);
                for g in groups.clone() {
                    w.group_rows(g, chunk..chunk_end, &activations, isa, |i, ys| {
                        // SAFETY: tasks cover disjoint groups, so each output element has
                        // one writer, and `outs` outlives the pool call.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                (out_ptrs[k] as *mut f32).add(i * w.rows + g * GROUP),
                                ys.len(),
                            )
                        };
                        dst.copy_from_slice(ys);
                    });
                }
            }
        });
        outs
    }

    /// Group `g` times activation rows `rows`; `store(i, outputs)` receives row `i`'s
    /// outputs, one per weight row of the group.
    fn group_rows(
        &self,
        g: usize,
        rows: std::ops::Range<usize>,
        activations: &SplitActivations,
        isa: Option<Isa>,
        mut store: impl FnMut(usize, &[f32]),
    ) {
        let lanes = (self.rows - g * GROUP).min(GROUP);
        let group = self.group(g);
        let vnni = isa == Some(Isa::Avx512Vnni);
        // Rows in fours (up to eight on VNNI, whose 32 vector registers hold eight rows' sums:
        // the weights are unpacked once for twice the rows), the rest together: speculative
        // verification multiplies two to nine rows, and five rows in one pass cost about
        // three-quarters of a second pass over the weights less.
        let mut i = rows.start;
        while i < rows.end {
            let left = rows.end - i;
            let n = if vnni {
                left.min(ROWS_TOGETHER_VNNI)
            } else {
                left.min(ROWS_TOGETHER)
            };
            let mut ys = [[0f32; GROUP]; ROWS_TOGETHER_VNNI];
            let times = |ys: &mut [[f32; GROUP]], rows: &[[f32; GROUP]]| {
                ys[..rows.len()].copy_from_slice(rows)
            };
            let x = activations;
            match n {
                1 => times(&mut ys, &self.group_times::<1>(&group, x, i, isa)),
                2 => times(&mut ys, &self.group_times::<2>(&group, x, i, isa)),
                3 => times(&mut ys, &self.group_times::<3>(&group, x, i, isa)),
                ROWS_TOGETHER => times(
                    &mut ys,
                    &self.group_times::<ROWS_TOGETHER>(&group, x, i, isa),
                ),
                5 => times(&mut ys, &self.group_times::<5>(&group, x, i, isa)),
                6 => times(&mut ys, &self.group_times::<6>(&group, x, i, isa)),
                7 => times(&mut ys, &self.group_times::<7>(&group, x, i, isa)),
                _ => ys = self.group_times::<ROWS_TOGETHER_VNNI>(&group, x, i, isa),
            }
            for (r, y) in ys[..n].iter().enumerate() {
                store(i + r, &y[..lanes]);
            }
            i += n;
        }
    }

    /// `group` (of this weight) times activation rows `first..first + N`.
    // Elsewhere than x86-64 no weight is ever repacked (`available` is false), and the body
    // is only the unreachable end.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn group_times<const N: usize>(
        &self,
        group: &GroupRef,
        x: &SplitActivations,
        first: usize,
        isa: Option<Isa>,
    ) -> [[f32; GROUP]; N] {
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! by_format {
                ($kernel:ident) => {
                    match self.format {
                        Q8_0 => $kernel::<Q8_0, N>(self, group, x, first),
                        Q4_0 => $kernel::<Q4_0, N>(self, group, x, first),
                        Q4_1 => $kernel::<Q4_1, N>(self, group, x, first),
                        Q5_0 => $kernel::<Q5_0, N>(self, group, x, first),
                        Q4_K => $kernel::<Q4_K, N>(self, group, x, first),
                        _ => $kernel::<Q6_K, N>(self, group, x, first),
                    }
                };
            }
            // SAFETY: `isa` is at most what the CPU has (`cpu_isa`, or a test's `Isa::detect`); the
            // kernels check the slices they read without bounds checks.
            match isa {
                Some(Isa::Avx512Vnni) => return unsafe { by_format!(group_vnni) },
                Some(Isa::Avx2) => return unsafe { by_format!(group_avx2) },
                None => {}
            }
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
    /// Per block, its 32 low bytes then its 32 high bytes: a kernel reads both through one
    /// pointer per activation row (eight rows at once would otherwise take more pointers
    /// than x86-64 has registers).
    split: Vec<i8>,
    scales: Vec<f32>,
    /// Per block, the sum of its quantized values: Q4_0's offset of 8 (Q5_0's of 16)
    /// multiplies it.
    sums: Vec<i32>,
    /// Per block, the sum of its first 16 quantized values: Q6_K's offset of 32 multiplies
    /// it and the rest (its halves have their own scales).
    low_half_sums: Vec<i32>,
    /// Per block, `scale · sum`: Q4_1's minimum multiplies it.
    scaled_sums: Vec<f32>,
}

impl SplitActivations {
    pub(super) fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut this = Self {
            values: vec![0; x.len()],
            split: vec![0; 2 * x.len()],
            scales: vec![0.0; blocks],
            sums: vec![0; blocks],
            low_half_sums: vec![0; blocks],
            scaled_sums: vec![0.0; blocks],
        };
        // Blocks are independent; a prefill's activations (64 rows of up to 8960 values) took
        // a tenth of the product's time on one thread, so large ones are split over the pool.
        let tasks = blocks.div_ceil(QUANTIZE_BLOCKS_PER_TASK);
        let at = (
            this.values.as_mut_ptr() as usize,
            this.split.as_mut_ptr() as usize,
            this.scales.as_mut_ptr() as usize,
            this.sums.as_mut_ptr() as usize,
            this.low_half_sums.as_mut_ptr() as usize,
            this.scaled_sums.as_mut_ptr() as usize,
        );
        pool::run(tasks, &|task| {
            let range =
                task * QUANTIZE_BLOCKS_PER_TASK..blocks.min((task + 1) * QUANTIZE_BLOCKS_PER_TASK);
            // SAFETY: each task writes only its own blocks' entries of the six buffers,
            // which outlive the pool call.
            let mut out = unsafe {
                let n = range.len();
                let (b0, v0) = (range.start, range.start * BLOCK);
                BlockOut {
                    values: std::slice::from_raw_parts_mut((at.0 as *mut i16).add(v0), n * BLOCK),
                    split: std::slice::from_raw_parts_mut(
                        (at.1 as *mut i8).add(2 * v0),
                        2 * n * BLOCK,
                    ),
                    scales: std::slice::from_raw_parts_mut((at.2 as *mut f32).add(b0), n),
                    sums: std::slice::from_raw_parts_mut((at.3 as *mut i32).add(b0), n),
                    low_half_sums: std::slice::from_raw_parts_mut((at.4 as *mut i32).add(b0), n),
                    scaled_sums: std::slice::from_raw_parts_mut((at.5 as *mut f32).add(b0), n),
                }
            };
            quantize_blocks(&x[range.start * BLOCK..range.end * BLOCK], &mut out);
        });
        this
    }

    /// The low and high bytes of value `e` of block `b` (of the whole matrix's blocks).
    #[cfg(test)]
    fn bytes(&self, b: usize, e: usize) -> (i8, i8) {
        (
            self.split[2 * b * BLOCK + e],
            self.split[(2 * b + 1) * BLOCK + e],
        )
    }

    /// Quantized value `e` of block `b` (of the whole matrix's blocks).
    #[cfg(test)]
    fn value(&self, b: usize, e: usize) -> i32 {
        let i = b * BLOCK + e;
        let (low, high) = self.bytes(b, e);
        let split = BASE * high as i32 + low as i32;
        assert_eq!(
            split, self.values[i] as i32,
            "two forms of value {e} of block {b}"
        );
        split
    }
}

/// Activation blocks per parallel task of [`SplitActivations::quantize`].
const QUANTIZE_BLOCKS_PER_TASK: usize = 512;

/// One task's share of [`SplitActivations`]' buffers.
struct BlockOut<'a> {
    values: &'a mut [i16],
    /// Per block, 32 low bytes then 32 high bytes.
    split: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [i32],
    low_half_sums: &'a mut [i32],
    scaled_sums: &'a mut [f32],
}

/// Quantizes the blocks of `x` into `out` (see [`SplitActivations`]).
fn quantize_blocks(x: &[f32], out: &mut BlockOut) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the features the function is compiled for were just detected.
        return unsafe { quantize_blocks_avx2(x, out) };
    }
    quantize_blocks_portable(x, out);
}

/// [`quantize_blocks`] one value at a time: the definition the AVX2 build must match.
fn quantize_blocks_portable(x: &[f32], out: &mut BlockOut) {
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max == 0.0 || !max.is_finite() {
            // Zeros stay zero; a non-finite block makes its outputs NaN, as in F32.
            let scale = if max == 0.0 { 0.0 } else { f32::NAN };
            out.scales[b] = scale;
            out.scaled_sums[b] = scale;
            continue;
        }
        let scale = max / ACTIVATION_MAX;
        let inverse = ACTIVATION_MAX / max;
        let mut sum = 0i32;
        for (e, v) in block.iter().enumerate() {
            let q = round_to_integer((v * inverse).clamp(-ACTIVATION_MAX, ACTIVATION_MAX));
            out.values[b * BLOCK + e] = q as i16;
            let high = (q + BASE / 2).div_euclid(BASE);
            out.split[(2 * b + 1) * BLOCK + e] = high as i8;
            out.split[2 * b * BLOCK + e] = (q - BASE * high) as i8;
            sum += q;
            if e == BLOCK / 2 - 1 {
                out.low_half_sums[b] = sum;
            }
        }
        out.scales[b] = scale;
        out.sums[b] = sum;
        out.scaled_sums[b] = scale * sum as f32;
    }
}

/// [`quantize_blocks_portable`] eight values at a time, to the same bits: the products of a
/// prefill spent a twentieth of their time quantizing activations one value at a time.
/// `vcvtps2dq` rounds to nearest even as [`round_to_integer`] does; a NaN becomes 0 as the
/// portable cast makes it; and `high = round(q / 255)` equals `⌊(q + 127) / 255⌋` because
/// `q / 255` is never within `1/510` of a half, far beyond a correctly rounded division's
/// error.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2(x: &[f32], out: &mut BlockOut) {
    use std::arch::x86_64::*;
    const LANES: usize = 8;
    let blocks = x.len() / BLOCK;
    assert!(
        out.values.len() >= blocks * BLOCK
            && out.split.len() >= 2 * blocks * BLOCK
            && out.scales.len() >= blocks
            && out.sums.len() >= blocks
            && out.low_half_sums.len() >= blocks
            && out.scaled_sums.len() >= blocks
    );
    let sign = _mm256_set1_ps(-0.0);
    let (lowest, highest) = (
        _mm256_set1_ps(-ACTIVATION_MAX),
        _mm256_set1_ps(ACTIVATION_MAX),
    );
    let base_f = _mm256_set1_ps(BASE as f32);
    // packs work within 128-bit halves; this puts the quarters back in order.
    const IN_ORDER: i32 = 0b11_01_10_00;
    let sum_lanes = |v: __m256i| {
        let half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let pair = _mm_add_epi32(half, _mm_shuffle_epi32::<0b01_00_11_10>(half));
        _mm_cvtsi128_si32(_mm_add_epi32(
            pair,
            _mm_shuffle_epi32::<0b10_11_00_01>(pair),
        ))
    };
    for b in 0..blocks {
        let p = x.as_ptr().add(b * BLOCK);
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(k * LANES)));
        // `max_ps` returns its second operand where the first is NaN: NaNs are skipped, as
        // by `f32::max`.
        let mut max = _mm256_setzero_ps();
        for vk in v {
            max = _mm256_max_ps(_mm256_andnot_ps(sign, vk), max);
        }
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), max);
        let max = lanes.iter().fold(0f32, |m, &l| m.max(l));
        if max == 0.0 || !max.is_finite() {
            let scale = if max == 0.0 { 0.0 } else { f32::NAN };
            *out.scales.get_unchecked_mut(b) = scale;
            *out.scaled_sums.get_unchecked_mut(b) = scale;
            continue;
        }
        let scale = max / ACTIVATION_MAX;
        let inverse = _mm256_set1_ps(ACTIVATION_MAX / max);
        let q: [__m256i; 4] = std::array::from_fn(|k| {
            let scaled = _mm256_mul_ps(v[k], inverse);
            let clamped = _mm256_min_ps(_mm256_max_ps(scaled, lowest), highest);
            // NaN lanes (the clamp made them −16383) back to 0.
            let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(scaled, scaled);
            _mm256_cvtps_epi32(_mm256_and_ps(clamped, ordered))
        });
        let high: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_div_ps(_mm256_cvtepi32_ps(q[k]), base_f))
        });
        let low: [__m256i; 4] = std::array::from_fn(|k| {
            let scaled_high = _mm256_sub_epi32(_mm256_slli_epi32::<8>(high[k]), high[k]);
            _mm256_sub_epi32(q[k], scaled_high)
        });
        let words =
            |a: __m256i, b: __m256i| _mm256_permute4x64_epi64::<IN_ORDER>(_mm256_packs_epi32(a, b));
        let bytes = |a: [__m256i; 4]| {
            let (lo, hi) = (words(a[0], a[1]), words(a[2], a[3]));
            _mm256_permute4x64_epi64::<IN_ORDER>(_mm256_packs_epi16(lo, hi))
        };
        let at = b * BLOCK;
        let values = out.values.as_mut_ptr().add(at) as *mut __m256i;
        _mm256_storeu_si256(values, words(q[0], q[1]));
        _mm256_storeu_si256(values.add(1), words(q[2], q[3]));
        let split = out.split.as_mut_ptr().add(2 * at) as *mut __m256i;
        _mm256_storeu_si256(split, bytes(low));
        _mm256_storeu_si256(split.add(1), bytes(high));
        let low_half = sum_lanes(_mm256_add_epi32(q[0], q[1]));
        let sum = low_half + sum_lanes(_mm256_add_epi32(q[2], q[3]));
        *out.scales.get_unchecked_mut(b) = scale;
        *out.sums.get_unchecked_mut(b) = sum;
        *out.low_half_sums.get_unchecked_mut(b) = low_half;
        *out.scaled_sums.get_unchecked_mut(b) = scale * sum as f32;
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
/// and activation row `i`: per block, the exact integer dot product of the stored weights
/// (offsets taken out) and the quantized activations, to F32, times `scale_w · scale_x`
/// added into one accumulator by a fused multiply-add; Q4_1 then adds `minimum · scale_x ·
/// Σq` by another, and Q4_K subtracts its minimum's term the same way. Q6_K does the first
/// step for each 16-value half, with the half's own scale.
#[cfg(test)]
pub(super) fn reference_dot(format: u8, weight_row: &[u8], x: &SplitActivations, i: usize) -> f32 {
    use super::kquants::{unpack_q4k, unpack_q6k};
    let blocks = weight_row.len() / block_bytes(format) * (block_values(format) / BLOCK);
    let mut acc = 0f32;
    for b in 0..blocks {
        let xb = i * blocks + b;
        let scale_x = x.scales[xb];
        let dot = |w: &[i32], range: std::ops::Range<usize>| -> f32 {
            range.map(|e| w[e] * x.value(xb, e)).sum::<i32>() as f32
        };
        if is_k_quant(format) {
            let (s, t) = (b / SUB_BLOCKS, b % SUB_BLOCKS);
            let bytes = block_bytes(format);
            let sb = &weight_row[s * bytes..(s + 1) * bytes];
            let u = if format == Q4_K {
                unpack_q4k(sb)
            } else {
                unpack_q6k(sb)
            };
            let w: Vec<i32> = u.q[t * BLOCK..(t + 1) * BLOCK]
                .iter()
                .map(|&q| q as i32)
                .collect();
            if format == Q4_K {
                acc = dot(&w, 0..BLOCK).mul_add(u.scales[2 * t] * scale_x, acc);
                acc = (-u.mins[t]).mul_add(x.scaled_sums[xb], acc);
            } else {
                acc = dot(&w, 0..16).mul_add(u.scales[2 * t] * scale_x, acc);
                acc = dot(&w, 16..BLOCK).mul_add(u.scales[2 * t + 1] * scale_x, acc);
            }
            continue;
        }
        let block = &weight_row[b * block_bytes(format)..(b + 1) * block_bytes(format)];
        // The stored integers (offsets taken out), the scale and Q4_1's minimum.
        let (w, scale, minimum) = match format {
            Q8_0 => unpack::<Q8_0>(block),
            Q4_0 => unpack::<Q4_0>(block),
            Q5_0 => unpack::<Q5_0>(block),
            _ => unpack::<Q4_1>(block),
        };
        acc = dot(&w, 0..BLOCK).mul_add(scale * scale_x, acc);
        if format == Q4_1 {
            acc = minimum.mul_add(x.scaled_sums[xb], acc);
        }
    }
    acc
}

/// Moves bit `from` of every byte to bit `to` (everything else masked off). 16-bit shifts
/// suffice: what crosses into a neighbouring byte lands on bits the mask clears.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn move_bit(
    v: std::arch::x86_64::__m256i,
    from: usize,
    to: usize,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let moved = if from <= to {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128((to - from) as i32))
    } else {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128((from - to) as i32))
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(1 << to))
}

/// [`group_kernel`] built for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_avx2<const F: u8, const N: usize>(
    w: &PackedWeight,
    group: &GroupRef,
    x: &SplitActivations,
    first: usize,
) -> [[f32; GROUP]; N] {
    group_kernel::<F, N, false>(w, group, x, first)
}

/// [`group_kernel`] built for AVX-512 VNNI on 256-bit vectors: `vpdpbusd` multiplies four
/// weight bytes by four activation bytes and adds them to a 32-bit sum in one instruction,
/// where AVX2 takes a `vpmaddubsw`, an add in 16 bits and, every few blocks, a widening
/// `vpmaddwd` (`vpdpwssd` likewise fuses Q8_0's `vpmaddwd` and add). The sums are the
/// same exact integers, so both builds give the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn group_vnni<const F: u8, const N: usize>(
    w: &PackedWeight,
    group: &GroupRef,
    x: &SplitActivations,
    first: usize,
) -> [[f32; GROUP]; N] {
    group_kernel::<F, N, true>(w, group, x, first)
}

/// `group` of `w` times activation rows `first..first + N`: one F32 lane per weight row.
/// Inlined into a build per instruction set ([`group_avx2`], [`group_vnni`]), which gives
/// the intrinsics their target features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_kernel<const F: u8, const N: usize, const VNNI: bool>(
    w: &PackedWeight,
    group: &GroupRef,
    x: &SplitActivations,
    first: usize,
) -> [[f32; GROUP]; N] {
    use std::arch::x86_64::*;
    let blocks = w.blocks();
    let packed_block = group_block_bytes(F);
    let high_block = high_bytes(F);
    let k_quant = is_k_quant(F);
    // Every activation row read below lies inside the split activations.
    assert!((first + N) * blocks <= x.scales.len());
    assert!(group.quants.len() >= blocks * packed_block && group.high.len() >= blocks * high_block);
    let x_values = |i: usize, b: usize| (first + i) * blocks * BLOCK + b * BLOCK;
    // Four activation bytes starting at `p`, in every 32-bit lane.
    let broadcast4 = |p: *const i8| _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32));
    let ones = _mm256_set1_epi16(1);
    let base = _mm256_set1_epi16(BASE as i16);
    let nibble_mask = _mm256_set1_epi8(0x0f);
    // Register pairs summed in 16 bits before widening: each adds two pair sums per lane,
    // at most 2·2·(2^bits − 1)·127, and 16 bits hold four of 4-bit weights, two of 5-bit
    // ones and one of 6-bit ones.
    let pairs_per_flush = match F {
        Q5_0 => 2,
        Q6_K => 1,
        _ => BLOCK / 8,
    };
    let mut acc = [_mm256_setzero_ps(); N];
    // The K-quants' per-row super-block scales, converted once per super-block.
    let (mut d, mut dmin) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for b in 0..blocks {
        let q = group.quants.as_ptr().add(b * packed_block);
        // Four blocks ahead: the hardware prefetcher follows one stream per task, and a
        // hint keeps the next blocks in flight while this one is multiplied.
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BLOCKS * packed_block) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(
            q.wrapping_add(PREFETCH_BLOCKS * packed_block + 64) as *const i8
        );
        if high_block > 0 {
            let h = group
                .high
                .as_ptr()
                .wrapping_add((b + PREFETCH_BLOCKS) * high_block);
            _mm_prefetch::<_MM_HINT_T0>(h as *const i8);
        }
        if k_quant && b % SUB_BLOCKS == 0 {
            let s = b / SUB_BLOCKS;
            d = _mm256_cvtph_ps(_mm_loadu_si128(
                group.scales.as_ptr().add(s * GROUP) as *const __m128i
            ));
            if F == Q4_K {
                dmin = _mm256_cvtph_ps(_mm_loadu_si128(
                    group.minima.as_ptr().add(s * GROUP) as *const __m128i
                ));
            }
        }
        // Per activation row, each weight row's exact block dot product, one lane per row
        // (Q6_K: one per 16-value half).
        let mut dots = [_mm256_setzero_si256(); N];
        let mut dots_upper = [_mm256_setzero_si256(); N];
        if F == Q8_0 {
            // 16-bit weights times whole 15-bit activations, two values per 32-bit lane:
            // sixteen pair sums of at most 2·128·16383 stay far inside 32 bits.
            for j in 0..BLOCK / 2 {
                let weights =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(j * 16) as *const __m128i));
                for i in 0..N {
                    let pair = broadcast4(x.values.as_ptr().add(x_values(i, b) + 2 * j) as _);
                    dots[i] = if VNNI {
                        _mm256_dpwssd_epi32(dots[i], weights, pair)
                    } else {
                        _mm256_add_epi32(dots[i], _mm256_madd_epi16(weights, pair))
                    };
                }
            }
        } else {
            // Unsigned weights against bytes within ±127 (low) and ±64 (high).
            let h = group.high.as_ptr().add(b * high_block);
            let planes = match F {
                Q5_0 => [_mm256_loadu_si256(h as *const __m256i); 2],
                Q6_K => [
                    _mm256_loadu_si256(h as *const __m256i),
                    _mm256_loadu_si256(h.add(32) as *const __m256i),
                ],
                _ => [_mm256_setzero_si256(); 2],
            };
            // AVX2 sums in 16 bits (flushed to `dots` every `pairs_per_flush` registers);
            // VNNI in 32 bits, and for one row even and odd registers apart, so that two
            // chains of `vpdpbusd` run at once (several rows are independent chains).
            let (mut low, mut high) = ([_mm256_setzero_si256(); N], [_mm256_setzero_si256(); N]);
            let (mut low_odd, mut high_odd) =
                ([_mm256_setzero_si256(); N], [_mm256_setzero_si256(); N]);
            for j in 0..BLOCK / 8 {
                let packed = _mm256_loadu_si256(q.add(j * 32) as *const __m256i);
                let mut even = _mm256_and_si256(packed, nibble_mask);
                let mut odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble_mask);
                if F == Q5_0 || F == Q6_K {
                    even = _mm256_or_si256(even, move_bit(planes[0], 2 * j, 4));
                    odd = _mm256_or_si256(odd, move_bit(planes[0], 2 * j + 1, 4));
                }
                if F == Q6_K {
                    even = _mm256_or_si256(even, move_bit(planes[1], 2 * j, 5));
                    odd = _mm256_or_si256(odd, move_bit(planes[1], 2 * j + 1, 5));
                }
                for i in 0..N {
                    let xl = x.split.as_ptr().add(2 * x_values(i, b) + 8 * j);
                    let xh = xl.add(BLOCK);
                    if VNNI {
                        low[i] = _mm256_dpbusd_epi32(low[i], even, broadcast4(xl));
                        high[i] = _mm256_dpbusd_epi32(high[i], even, broadcast4(xh));
                        let (xl, xh) = (broadcast4(xl.add(4)), broadcast4(xh.add(4)));
                        if N == 1 {
                            low_odd[i] = _mm256_dpbusd_epi32(low_odd[i], odd, xl);
                            high_odd[i] = _mm256_dpbusd_epi32(high_odd[i], odd, xh);
                        } else {
                            low[i] = _mm256_dpbusd_epi32(low[i], odd, xl);
                            high[i] = _mm256_dpbusd_epi32(high[i], odd, xh);
                        }
                        continue;
                    }
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
                // VNNI's 32-bit sums need a flush only where Q6_K's halves meet, and at the end.
                let flush = if VNNI {
                    j == BLOCK / 8 - 1 || (F == Q6_K && j == BLOCK / 16 - 1)
                } else {
                    (j + 1) % pairs_per_flush == 0
                };
                if flush {
                    for i in 0..N {
                        let wide = if VNNI {
                            let high_sum = _mm256_add_epi32(high[i], high_odd[i]);
                            let low_sum = _mm256_add_epi32(low[i], low_odd[i]);
                            // 255 · high = 256 · high − high.
                            const _: () = assert!(BASE == 255);
                            let high_scaled =
                                _mm256_sub_epi32(_mm256_slli_epi32(high_sum, 8), high_sum);
                            low_odd[i] = _mm256_setzero_si256();
                            high_odd[i] = _mm256_setzero_si256();
                            _mm256_add_epi32(high_scaled, low_sum)
                        } else {
                            _mm256_add_epi32(
                                _mm256_madd_epi16(high[i], base),
                                _mm256_madd_epi16(low[i], ones),
                            )
                        };
                        // Q6_K's registers 0–3 (pairs 0, 1) are values 0–15.
                        if F == Q6_K && j >= BLOCK / 16 {
                            dots_upper[i] = _mm256_add_epi32(dots_upper[i], wide);
                        } else {
                            dots[i] = _mm256_add_epi32(dots[i], wide);
                        }
                        low[i] = _mm256_setzero_si256();
                        high[i] = _mm256_setzero_si256();
                    }
                }
            }
            for i in 0..N {
                let xb = (first + i) * blocks + b;
                let offset = match F {
                    Q4_0 => 8 * *x.sums.get_unchecked(xb),
                    Q5_0 => 16 * *x.sums.get_unchecked(xb),
                    Q6_K => 32 * *x.low_half_sums.get_unchecked(xb),
                    _ => 0,
                };
                dots[i] = _mm256_sub_epi32(dots[i], _mm256_set1_epi32(offset));
                if F == Q6_K {
                    let upper = *x.sums.get_unchecked(xb) - *x.low_half_sums.get_unchecked(xb);
                    dots_upper[i] = _mm256_sub_epi32(dots_upper[i], _mm256_set1_epi32(32 * upper));
                }
            }
        }
        // Per-row scales of this block (of each half, for Q6_K).
        let sub_scale = |upper: bool| {
            let p = group
                .sub_scales
                .as_ptr()
                .add(b * 16 + usize::from(upper) * 8);
            let bytes = _mm_loadl_epi64(p as *const __m128i);
            let ints = if F == Q6_K {
                _mm256_cvtepi8_epi32(bytes)
            } else {
                _mm256_cvtepu8_epi32(bytes)
            };
            _mm256_cvtepi32_ps(ints)
        };
        let (scale, scale_upper, minimum) = match F {
            Q4_K => (
                _mm256_mul_ps(d, sub_scale(false)),
                _mm256_setzero_ps(),
                _mm256_mul_ps(dmin, sub_scale(true)),
            ),
            Q6_K => (
                _mm256_mul_ps(d, sub_scale(false)),
                _mm256_mul_ps(d, sub_scale(true)),
                _mm256_setzero_ps(),
            ),
            _ => (
                _mm256_cvtph_ps(_mm_loadu_si128(
                    group.scales.as_ptr().add(b * GROUP) as *const __m128i
                )),
                _mm256_setzero_ps(),
                if F == Q4_1 {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        group.minima.as_ptr().add(b * GROUP) as *const __m128i
                    ))
                } else {
                    _mm256_setzero_ps()
                },
            ),
        };
        for i in 0..N {
            let xb = (first + i) * blocks + b;
            let scale_x = _mm256_set1_ps(*x.scales.get_unchecked(xb));
            acc[i] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(dots[i]),
                _mm256_mul_ps(scale, scale_x),
                acc[i],
            );
            if F == Q6_K {
                acc[i] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dots_upper[i]),
                    _mm256_mul_ps(scale_upper, scale_x),
                    acc[i],
                );
            }
            if F == Q4_1 || F == Q4_K {
                let scaled_sum = _mm256_set1_ps(*x.scaled_sums.get_unchecked(xb));
                acc[i] = if F == Q4_1 {
                    _mm256_fmadd_ps(minimum, scaled_sum, acc[i])
                } else {
                    _mm256_fnmadd_ps(minimum, scaled_sum, acc[i])
                };
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
                let (low, high) = split.bytes(b, e);
                assert!((-127..=127).contains(&low), "{low}");
                assert!((-64..=64).contains(&high), "{high}");
                let back = split.value(b, e) as f32 * split.scales[b];
                assert!((back - v).abs() <= max / 32766.0 * 1.01, "{v} vs {back}");
                sum += split.value(b, e);
            }
            assert_eq!(split.sums[b], sum);
        }
        let zeros = SplitActivations::quantize(&[0.0; BLOCK]);
        assert_eq!(zeros.scales, vec![0.0]);
    }

    /// The AVX2 quantizer against the portable one, to the bit: ordinary values, ties of
    /// the rounding and of the byte split, zeros, NaN and infinite blocks.
    #[test]
    fn vector_and_portable_quantization_agree_to_the_bit() {
        let mut x: Vec<f32> = values(40 * BLOCK, 0.7).iter().map(|v| v * 5.0).collect();
        // A block whose values land on .5 after scaling (max 16383 → factor 1).
        for (e, v) in x[..BLOCK].iter_mut().enumerate() {
            *v = [16383.0, -0.5, 2.5, 127.5, -127.5, 254.5, 382.5, -16382.5][e % 8];
        }
        // Multiples of 255 and their neighbours (the split's boundaries).
        for (e, v) in x[BLOCK..2 * BLOCK].iter_mut().enumerate() {
            *v = [
                16383.0, 255.0, -255.0, 127.0, 128.0, -128.0, 16320.0, -16065.0,
            ][e % 8];
        }
        x[2 * BLOCK..3 * BLOCK].fill(0.0);
        x[3 * BLOCK + 5] = f32::NAN;
        x[4 * BLOCK + 9] = f32::INFINITY;
        x[5 * BLOCK + 1] = -1e-30;
        let blocks = x.len() / BLOCK;
        let run = |quantize: fn(&[f32], &mut BlockOut)| {
            let (mut values, mut split) = (vec![0i16; x.len()], vec![0i8; 2 * x.len()]);
            let (mut scales, mut sums, mut low_half_sums, mut scaled_sums) = (
                vec![0f32; blocks],
                vec![0i32; blocks],
                vec![0i32; blocks],
                vec![0f32; blocks],
            );
            quantize(
                &x,
                &mut BlockOut {
                    values: &mut values,
                    split: &mut split,
                    scales: &mut scales,
                    sums: &mut sums,
                    low_half_sums: &mut low_half_sums,
                    scaled_sums: &mut scaled_sums,
                },
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (
                values,
                split,
                bits(&scales),
                sums,
                low_half_sums,
                bits(&scaled_sums),
            )
        };
        assert_eq!(run(quantize_blocks), run(quantize_blocks_portable));
    }

    /// Every repacked format, with GGUF's type and the kernels' tag.
    const FORMATS: [(GgmlDType, u8); 6] = [
        (GgmlDType::Q8_0, Q8_0),
        (GgmlDType::Q4_0, Q4_0),
        (GgmlDType::Q4_1, Q4_1),
        (GgmlDType::Q5_0, Q5_0),
        (GgmlDType::Q4K, Q4_K),
        (GgmlDType::Q6K, Q6_K),
    ];

    /// Input sizes: five blocks, or two K-quant super-blocks.
    fn cols_for(format: u8) -> usize {
        if is_k_quant(format) {
            2 * super::super::kquants::SUPER
        } else {
            5 * BLOCK
        }
    }

    /// Every build of the kernels this CPU runs (AVX2, and AVX-512 VNNI where it has it).
    fn builds() -> Vec<Isa> {
        [Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|&isa| Isa::detect().is_some_and(|best| isa <= best))
            .collect()
    }

    /// Each output against [`reference_dot`] to the bit, in a batch of `x`'s rows and alone,
    /// on every build of the kernels.
    fn assert_matches_reference(q: &QTensor, format: u8, x: &[f32]) {
        for isa in builds() {
            assert_matches_reference_on(q, format, x, isa);
        }
    }

    fn assert_matches_reference_on(q: &QTensor, format: u8, x: &[f32], isa: Isa) {
        let packed = PackedWeight::pack(q).unwrap().unwrap();
        let (rows, cols) = packed.dims();
        let bytes = q.data().unwrap();
        let row_bytes = bytes.len() / rows;
        let m = x.len() / cols;
        let split = SplitActivations::quantize(x);
        let times = |x: &[f32]| {
            PackedWeight::matmul_many_on(&[&packed], x, Some(isa))
                .pop()
                .unwrap()
        };
        let batched = times(x);
        for i in 0..m {
            let alone = times(&x[i * cols..(i + 1) * cols]);
            for r in 0..rows {
                let weight_row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                let reference = reference_dot(format, weight_row, &split, i);
                let y = batched[i * rows + r];
                let dtype = q.dtype();
                assert_eq!(
                    y.to_bits(),
                    reference.to_bits(),
                    "{isa:?} {dtype:?} x{i} w{r}: {y} vs {reference}"
                );
                assert_eq!(
                    alone[r].to_bits(),
                    y.to_bits(),
                    "{isa:?} {dtype:?} x{i} w{r}"
                );
            }
        }
    }

    /// Weight rows that are not a multiple of eight (the last group is partly empty), with an
    /// offset so the minima matter, and activation counts that use every grouping.
    #[test]
    fn kernels_agree_with_the_reference_to_the_bit_alone_or_batched() {
        if !PackedWeight::available() {
            return;
        }
        for (dtype, format) in FORMATS {
            let (rows, cols) = (21, cols_for(format));
            let w: Vec<f32> = values(rows * cols, 0.5).iter().map(|v| v + 0.2).collect();
            let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            // On AVX2 seven rows are a four and a three, six a four and a two, thirteen three
            // fours and a one; on VNNI seven, six and five rows go in one pass, thirteen as an
            // eight and a five; and each row alone.
            for m in [7, 6, 5, 13] {
                let x: Vec<f32> = values(m * cols, 2.0).iter().map(|v| v * 3.0).collect();
                assert_matches_reference(&q, format, &x);
            }
        }
    }

    /// Inputs wide enough that the activation rows run in several chunks (here 24 then 6).
    #[test]
    fn chunked_activation_rows_match_the_reference() {
        if !PackedWeight::available() {
            return;
        }
        let (rows, cols, m) = (12, 8192, 30);
        assert!(ACTIVATION_CHUNK_BYTES / (2 * cols) < m);
        let w: Vec<f32> = values(rows * cols, 0.5).iter().map(|v| v + 0.2).collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let x: Vec<f32> = values(m * cols, 2.0).iter().map(|v| v * 3.0).collect();
        assert_matches_reference(&q, Q4_K, &x);
    }

    /// The widest integers each format stores, against activations whose low bytes are all
    /// 127: the 16-bit sums must not saturate.
    #[test]
    fn the_largest_weights_do_not_overflow() {
        if !PackedWeight::available() {
            return;
        }
        for (dtype, format) in FORMATS {
            let cols = cols_for(format);
            let bytes: Vec<u8> = match format {
                // Scale 0.5 (f16 0x3800) or the K-quants' `d`, every other bit set.
                Q4_K => [0x00, 0x38, 0x00, 0x38]
                    .into_iter()
                    .chain([0xff; 140])
                    .cycle()
                    .take(8 * cols / 256 * 144)
                    .collect(),
                Q6_K => [0xffu8; 192]
                    .into_iter()
                    .chain([0x7f; 16])
                    .chain([0x00, 0x38])
                    .cycle()
                    .take(8 * cols / 256 * 210)
                    .collect(),
                _ => {
                    let size = block_bytes(format);
                    [0x00, 0x38]
                        .into_iter()
                        .chain(std::iter::repeat_n(0xff, size - 2))
                        .cycle()
                        .take(8 * cols / BLOCK * size)
                        .collect()
                }
            };
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                &bytes,
                vec![8, cols],
                &Device::Cpu,
            )
            .unwrap();
            // One value sets each block's scale; the rest quantize to 127.
            let x: Vec<f32> = (0..2 * cols)
                .map(|i| {
                    if i % BLOCK == 0 {
                        1.0
                    } else {
                        127.0 / ACTIVATION_MAX
                    }
                })
                .collect();
            assert_matches_reference(&q, format, &x);
        }
    }

    #[test]
    fn repacking_loses_nothing() {
        for (dtype, format) in FORMATS {
            // 21 rows: the last group is partly empty; an offset so the minima vary.
            let (rows, cols) = (
                21,
                cols_for(format) + if is_k_quant(format) { 256 } else { 0 },
            );
            let w: Vec<f32> = values(rows * cols, 0.9).iter().map(|v| v + 0.4).collect();
            let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let packed = PackedWeight::pack(&q).unwrap().unwrap();
            assert_eq!(packed.dtype(), dtype);
            assert_eq!(packed.dims(), (rows, cols));
            assert_eq!(packed.ggml_size(), q.data().unwrap().len());
            // 24 rows held for 21, and the K-quants' scales unpacked: a few percent more.
            assert!(packed.held_bytes() as f64 <= 1.2 * packed.ggml_size() as f64);
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
