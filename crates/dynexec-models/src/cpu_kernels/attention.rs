//! Attention of a few query rows over a sequence's cached keys and values, in one op.
//!
//! While decoding, attention is a handful of tiny products per layer; as candle ops (two
//! GEMM calls with their packing, a scale, a softmax) it cost SmolLM2 about a tenth of each
//! decoding step in call overhead, all of it on the calling thread. Here each query head is
//! one task on the kernels' pool, reading keys and values in place from the cache, and each
//! query row gets the same arithmetic whatever the number of rows.

use super::pool;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

/// `softmax(scale · q kᵀ) v` for queries `(batch, heads, seq, head_dim)` (contiguous) over
/// keys and values `(batch, kv_heads, len, head_dim)` (rows contiguous; the cache's views).
/// The queries are the last `seq` of the `len` positions: query `i` sees keys
/// `0..len - seq + i + 1`. Query head `h` reads KV head `h / group`.
pub struct CachedAttention {
    /// Multiplies the scores before the softmax, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Query heads per KV head (`heads / kv_heads`).
    pub group: usize,
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "dynexec-cached-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, heads, seq, head_dim) = ql.shape().dims4()?;
        let (kv_batch, kv_heads, len, kv_dim) = kl.shape().dims4()?;
        if kv_batch != batch
            || kv_dim != head_dim
            || kv_heads * self.group != heads
            || vl.shape() != kl.shape()
            || len < seq
        {
            candle_core::bail!(
                "{}: queries {:?} do not fit keys {:?} and values {:?} with {} query heads per KV head",
                self.name(),
                ql.shape(),
                kl.shape(),
                vl.shape(),
                self.group
            );
        }
        let q = match (qs, ql.contiguous_offsets()) {
            (CpuStorage::F32(q), Some((start, end))) => &q[start..end],
            _ => candle_core::bail!("{}: f32 contiguous queries only", self.name()),
        };
        let keys = Rows::new(self.name(), ks, kl)?;
        let values = Rows::new(self.name(), vs, vl)?;
        let mut out = vec![0f32; q.len()];
        let out_ptr = out.as_mut_ptr() as usize;
        pool::run(batch * heads, &|task| {
            let (b, h) = (task / heads, task % heads);
            let kv = h / self.group;
            let (keys, values) = (keys.head(b, kv, len), values.head(b, kv, len));
            for i in 0..seq {
                let at = ((b * heads + h) * seq + i) * head_dim;
                // SAFETY: each task writes the rows of its own (batch, head), and `out`
                // outlives the pool call.
                let out_row = unsafe {
                    std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(at), head_dim)
                };
                let visible = len - seq + i + 1;
                attend_row(
                    &q[at..at + head_dim],
                    &keys[..visible * head_dim],
                    &values[..visible * head_dim],
                    self.scale,
                    out_row,
                );
            }
        });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// A `(batch, kv_heads, len, head_dim)` operand whose rows are contiguous, whatever the
/// strides of its first two dimensions (a view into a larger cache buffer).
struct Rows<'a> {
    values: &'a [f32],
    start: usize,
    batch_stride: usize,
    head_stride: usize,
    head_dim: usize,
}

impl<'a> Rows<'a> {
    fn new(op: &str, storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("{op}: f32 keys and values only");
        };
        let (_, _, len, head_dim) = layout.shape().dims4()?;
        let stride = layout.stride();
        if head_dim > 1 && stride[3] != 1 || len > 1 && stride[2] != head_dim {
            candle_core::bail!("{op}: key and value rows must be contiguous");
        }
        Ok(Self {
            values,
            start: layout.start_offset(),
            batch_stride: stride[0],
            head_stride: stride[1],
            head_dim,
        })
    }

    /// The `len` rows of one (batch, head).
    fn head(&self, b: usize, h: usize, len: usize) -> &'a [f32] {
        let at = self.start + b * self.batch_stride + h * self.head_stride;
        &self.values[at..at + len * self.head_dim]
    }
}

/// One query row: scores against every visible key, a softmax, the weighted sum of values.
fn attend_row(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    let mut weights = vec![0f32; keys.len() / q.len().max(1)];
    scores(q, keys, scale, &mut weights);
    let max = weights.iter().fold(f32::NEG_INFINITY, |m, &w| m.max(w));
    let mut total = 0f32;
    for w in &mut weights {
        *w = (*w - max).exp();
        total += *w;
    }
    weighted_sum(&weights, values, out);
    let inverse = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inverse);
}

/// `out[j] = scale · q·keys[j]`, one call for every key (a call per key cost more than the
/// products at these sizes).
fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() && q.len() % 8 == 0 {
        // SAFETY: the features were just detected; the kernel reads whole rows of `q.len()`.
        return unsafe { scores_avx2(q, keys, scale, out) };
    }
    for (key, o) in keys.chunks_exact(q.len()).zip(out) {
        *o = super::dot_lanes(q, key) * scale;
    }
}

/// Two 8-wide accumulators per key, written out: left to itself the compiler vectorized
/// across keys instead, gathering every value from eight rows apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    for (key, o) in keys.chunks_exact(d).zip(out) {
        let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= d {
            even = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(i)),
                _mm256_loadu_ps(key.as_ptr().add(i)),
                even,
            );
            odd = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(i + 8)),
                _mm256_loadu_ps(key.as_ptr().add(i + 8)),
                odd,
            );
            i += 16;
        }
        if i < d {
            even = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(i)),
                _mm256_loadu_ps(key.as_ptr().add(i)),
                even,
            );
        }
        let t = _mm256_add_ps(even, odd);
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        let v = _mm_add_ps(u, _mm_movehl_ps(u, u));
        *o = _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1))) * scale;
    }
}

/// `out = Σ_j weights[j] · rows[j]`, lane by lane; for the common head sizes the whole sum
/// stays in vector registers.
fn weighted_sum(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the features were just detected; each kernel reads rows of `out.len()`
        // values and writes `out.len()` values.
        match out.len() {
            64 => return unsafe { weighted_sum_avx2::<8>(weights, rows, out) },
            128 => return unsafe { weighted_sum_avx2::<16>(weights, rows, out) },
            _ => {}
        }
    }
    out.fill(0.0);
    for (&w, row) in weights.iter().zip(rows.chunks_exact(out.len())) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += w * x;
        }
    }
}

/// Rows of `8 · V` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2<const V: usize>(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(out.len() >= 8 * V);
    let mut acc = [_mm256_setzero_ps(); V];
    for (&w, row) in weights.iter().zip(rows.chunks_exact(8 * V)) {
        let w = _mm256_set1_ps(w);
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.as_ptr().add(8 * v)), *a);
        }
    }
    for (v, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 1.37).sin()).collect()
    }

    /// Against candle ops with K/V repeated per query head and a causal mask, on cache views
    /// narrowed from larger buffers; and a row alone equals the same row among several.
    #[test]
    fn matches_masked_softmax_attention_on_cache_views() {
        // 16: the generic loops; 64: the fixed-size ones (SmolLM2's head size).
        for d in [16, 64] {
            check_against_masked_softmax(d);
        }
    }

    fn check_against_masked_softmax(d: usize) {
        let (heads, kv_heads, len, seq) = (6, 2, 11, 3);
        let dev = Device::Cpu;
        let buffer = |seed| {
            Tensor::from_vec(values(kv_heads * 20 * d, seed), (1, kv_heads, 20, d), &dev).unwrap()
        };
        let (k, v) = (
            buffer(0.5).narrow(2, 0, len).unwrap(),
            buffer(7.0).narrow(2, 0, len).unwrap(),
        );
        let q = Tensor::from_vec(values(heads * seq * d, 3.0), (1, heads, seq, d), &dev).unwrap();
        let op = CachedAttention {
            scale: 0.25,
            group: heads / kv_heads,
        };
        let ours = q.apply_op3_no_bwd(&k, &v, &op).unwrap();

        let repeat = |t: &Tensor| {
            Tensor::cat(&vec![t.contiguous().unwrap(); 3], 2)
                .unwrap()
                .reshape((1, heads, len, d))
                .unwrap()
        };
        let scores = (q.matmul(&repeat(&k).t().unwrap()).unwrap() * 0.25).unwrap();
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..len).map(move |j| {
                    if j <= len - seq + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (seq, len), &dev).unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap())
            .unwrap()
            .matmul(&repeat(&v))
            .unwrap();
        let diff = super::super::tests::max_abs_diff(&ours, &reference);
        assert!(diff < 1e-5, "{diff}");

        // The last query alone (one new token) gives the bits it had among three.
        let last = q.narrow(2, seq - 1, 1).unwrap().contiguous().unwrap();
        let alone = last.apply_op3_no_bwd(&k, &v, &op).unwrap();
        let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = ours
            .narrow(2, seq - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 1, 8), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 5, 8), candle_core::DType::F32, &dev).unwrap();
        let op = CachedAttention {
            scale: 1.0,
            group: 2,
        };
        assert!(q.apply_op3_no_bwd(&k, &k, &op).is_err());
    }
}
