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
//! [`QuantizedMatMul`]: Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K weights times F32 activations (see
//! [`quantized`] and [`kquants`]; on AVX2 and AVX-512 VNNI ([`Isa`]), all six repacked eight
//! rows at a time, see [`interleaved`]). Both split their rows over [`pool`], where the calling
//! thread works too and never waits for a helper that has not started.

mod attention;
mod interleaved;
mod kquants;
#[cfg(target_arch = "aarch64")]
mod neon;
mod pool;
mod quantized;
mod repack;

pub use attention::CachedAttention;
pub use interleaved::PackedWeight;
pub use quantized::QuantizedMatMul;

use candle_core::{CpuStorage, Layout, Shape};

/// Values per quantized block (every format these kernels read).
const BLOCK: usize = 32;
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
        let x = f32_rows(self.name(), xs, xl, cols)?;
        let w = f32_rows(self.name(), ws, wl, cols)?;
        let dims = xl.shape().dims();
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

/// The contiguous F32 values of an operand whose rows have `cols` values, or an error naming
/// the op.
fn f32_rows<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
    cols: usize,
) -> candle_core::Result<&'a [f32]> {
    let dims = layout.shape().dims();
    if dims.last() != Some(&cols) {
        candle_core::bail!("{op}: input {dims:?} does not end in {cols}");
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op}: f32 only"),
    }
}

/// Runs `fill(row, outputs_of_that_row)` for every weight row on the kernels' pool (see
/// [`pool`]); returns the `(rows, m)` results.
fn rows_times_activations(
    rows: usize,
    m: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out_t = vec![0f32; rows * m];
    let out_ptr = out_t.as_mut_ptr() as usize;
    pool::run(rows.div_ceil(ROWS_PER_TASK), &|task| {
        for row in task * ROWS_PER_TASK..rows.min((task + 1) * ROWS_PER_TASK) {
            // SAFETY: tasks cover disjoint rows, so each output row has one writer, and
            // `out_t` outlives the pool call.
            let out =
                unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(row * m), m) };
            fill(row, out);
        }
    });
    out_t
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
    (CpuStorage::F32(out), output_shape(input_dims, rows))
}

/// A product's output shape: the input's with `rows` as the last size.
fn output_shape(input_dims: &[usize], rows: usize) -> Shape {
    let mut shape = input_dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = rows;
    }
    Shape::from(shape)
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

/// The instruction sets the repacked kernels ([`PackedWeight`]) are built for, in order.
///
/// The best one the CPU has runs, unless [`set_max_cpu_isa`] lowers it: every build gives
/// the same bits (their integer sums are exact), so the limit is for measuring one against
/// another, or for a machine whose CPU reports more than its hypervisor enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors (`vpdpbusd`, `vpdpwssd`), with AVX2, FMA and F16C.
    Avx512Vnni,
}

impl Isa {
    /// The best of these this CPU has; `None` where it has none (then the row-by-row
    /// kernels run).
    pub fn detect() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            if !has_avx2_fma() {
                return None;
            }
            let vnni = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni");
            Some(if vnni { Isa::Avx512Vnni } else { Isa::Avx2 })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// `isa` lowered to the limit [`set_max_cpu_isa`] set, if any.
    fn limit(isa: Option<Isa>) -> Option<Isa> {
        let limit = match MAX_ISA.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Isa::Avx2,
            _ => return isa,
        };
        isa.map(|isa| isa.min(limit))
    }

    /// The name [`Isa::from_str`](std::str::FromStr) reads: `avx2` or `avx512-vnni`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "avx2" => Ok(Isa::Avx2),
            "avx512-vnni" => Ok(Isa::Avx512Vnni),
            _ => Err(format!(
                "unknown instruction set `{s}`: use avx2 or avx512-vnni"
            )),
        }
    }
}

/// 0: no limit; 1: AVX2.
static MAX_ISA: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Lowers the instruction set of the repacked kernels to at most `max` for this process
/// (`None` lifts the limit). A limit above what the CPU has changes nothing.
pub fn set_max_cpu_isa(max: Option<Isa>) {
    let code = match max {
        Some(Isa::Avx2) => 1,
        Some(Isa::Avx512Vnni) | None => 0,
    };
    MAX_ISA.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// The instruction set the repacked kernels run on now (see [`Isa`]); `None` where they do
/// not run.
pub fn cpu_isa() -> Option<Isa> {
    Isa::limit(Isa::detect())
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The largest absolute difference between two tensors of the same shape.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("tensors of the same shape")
    }
    use candle_core::{Device, Tensor};

    #[test]
    fn dense_small_batches_match_the_gemm_and_are_batch_invariant() {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + seed) * 3.7).sin()).collect()
        };
        let w = Tensor::from_vec(values(24 * 40, 0.5), (24, 40), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(values(2 * 3 * 40, 2.0), (2, 3, 40), &Device::Cpu).unwrap();
        let ours = x.apply_op2_no_bwd(&w, &DenseSmallBatch).unwrap();
        let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let diff = max_abs_diff(&ours, &reference);
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
}
