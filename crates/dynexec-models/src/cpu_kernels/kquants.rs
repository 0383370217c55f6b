//! Q4_K and Q6_K weights (the types of the popular `Q4_K_M` files) times 16-bit activations.
//!
//! A K-quant super-block holds 256 weights. Q4_K: an f16 scale `d` and minimum scale `dmin`,
//! eight 6-bit (scale, minimum) pairs, and 4-bit values; weight = d·sc·q − dmin·m per
//! 32-value sub-block. Q6_K: 6-bit values (4 low bits in `ql`, 2 high in `qh`), sixteen i8
//! scales, an f16 `d`; weight = d·sc·(q − 32) per 16-value half. Each 32-value sub-block
//! lines up with one block of [`I16Blocks`], so the products run on the same integer
//! multiply-adds as the other kernels, and a row gets the same bits alone or in a batch.

use super::quantized::{f16_at, ActivationRow};
use super::BLOCK;

/// Weights per super-block.
pub const SUPER: usize = 256;
pub const Q4K_BYTES: usize = 144;
pub const Q6K_BYTES: usize = 210;

/// A super-block's weights as integers: per 32-value sub-block `t`, values `32t..32t+32`,
/// each half `h` (16 values) scaled by `scales[2t + h]`; Q4_K subtracts `mins[t]` per value.
pub struct Unpacked {
    pub q: [i16; SUPER],
    pub scales: [f32; 16],
    pub mins: [f32; 8],
}

/// Bytes per super-block: Q6_K with `q6`, else Q4_K.
pub const fn super_bytes(q6: bool) -> usize {
    if q6 {
        Q6K_BYTES
    } else {
        Q4K_BYTES
    }
}

/// A super-block's scale per 16-value half and minimum per 32-value sub-block (zero for
/// Q6_K), as the SIMD kernels take them.
pub fn super_scales(q6: bool, block: &[u8]) -> ([f32; 16], [f32; 8]) {
    if q6 {
        (q6k_scales(block), [0.0; 8])
    } else {
        q4k_scales(block)
    }
}

/// Q4_K's packed 6-bit scale and minimum of sub-block `j` (llama.cpp's `get_scale_min_k4`).
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K layout: d (f16), dmin (f16), scales[12], qs[128].
pub fn q4k_scales(block: &[u8]) -> ([f32; 16], [f32; 8]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 8];
    for t in 0..8 {
        let (sc, m) = scale_min_k4(t, &block[4..16]);
        scales[2 * t] = d * sc as f32;
        scales[2 * t + 1] = d * sc as f32;
        mins[t] = dmin * m as f32;
    }
    (scales, mins)
}

/// Q6_K layout: ql[128], qh[64], scales[16] (i8), d (f16).
pub fn q6k_scales(block: &[u8]) -> [f32; 16] {
    let d = f16_at(block, 208);
    std::array::from_fn(|k| d * (block[192 + k] as i8) as f32)
}

pub fn unpack_q4k(block: &[u8]) -> Unpacked {
    let (scales, mins) = q4k_scales(block);
    let qs = &block[16..144];
    let mut q = [0i16; SUPER];
    for c in 0..4 {
        for l in 0..32 {
            let byte = qs[32 * c + l];
            q[64 * c + l] = (byte & 0x0f) as i16;
            q[64 * c + 32 + l] = (byte >> 4) as i16;
        }
    }
    Unpacked { q, scales, mins }
}

pub fn unpack_q6k(block: &[u8]) -> Unpacked {
    let (ql, qh) = (&block[0..128], &block[128..192]);
    let mut q = [0i16; SUPER];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        let out = &mut q[128 * n..];
        for l in 0..32 {
            let h = qh[l];
            out[l] = ((ql[l] & 0x0f) | ((h & 3) << 4)) as i16 - 32;
            out[32 + l] = ((ql[32 + l] & 0x0f) | (((h >> 2) & 3) << 4)) as i16 - 32;
            out[64 + l] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i16 - 32;
            out[96 + l] = ((ql[32 + l] >> 4) | (((h >> 6) & 3) << 4)) as i16 - 32;
        }
    }
    Unpacked {
        q,
        scales: q6k_scales(block),
        mins: [0.0; 8],
    }
}

/// The arithmetic both builds follow, so they agree to the bit: for each 32-value sub-block,
/// integer lane `j` of each 16-value half sums the products of its values `2j, 2j+1`
/// (exactly); the low half's lane goes to F32 times `scale_lo · scale_x` into accumulator lane
/// `j`, then the high half's times `scale_hi · scale_x`; the eight lanes are summed pairwise
/// (`j` with `j+4`, then `j+2`, then `j+1`). Q4_K's minima add `min · scale_x · Σx` per
/// sub-block into a scalar, subtracted last.
pub fn dot_portable(
    weight: &[u8],
    block_bytes: usize,
    unpack: fn(&[u8]) -> Unpacked,
    x: ActivationRow,
) -> f32 {
    let mut acc = [0f32; 8];
    let mut minimum_terms = 0f32;
    for (s, block) in weight.chunks_exact(block_bytes).enumerate() {
        let u = unpack(block);
        for t in 0..8 {
            let g = s * 8 + t;
            let dx = x.scales[g];
            let values = &x.values[g * BLOCK..(g + 1) * BLOCK];
            let q = &u.q[32 * t..32 * t + 32];
            for h in 0..2 {
                let scale = u.scales[2 * t + h] * dx;
                for (j, lane) in acc.iter_mut().enumerate() {
                    let e = 16 * h + 2 * j;
                    let sum =
                        q[e] as i32 * values[e] as i32 + q[e + 1] as i32 * values[e + 1] as i32;
                    *lane = (sum as f32).mul_add(scale, *lane);
                }
            }
            minimum_terms = (u.mins[t] * dx).mul_add(x.sums[g], minimum_terms);
        }
    }
    let u: [f32; 4] = std::array::from_fn(|j| acc[j] + acc[j + 4]);
    let v: [f32; 2] = std::array::from_fn(|j| u[j] + u[j + 2]);
    (v[0] + v[1]) - minimum_terms
}

/// `N` activation rows against one K-quant weight row (`Q6` selects Q6_K, else Q4_K). Each
/// sub-block is unpacked once, in registers, for all `N` rows; each row's arithmetic is
/// exactly [`dot_portable`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows_avx2<const Q6: bool, const N: usize>(
    weight: &[u8],
    x: [ActivationRow; N],
) -> [f32; N] {
    use std::arch::x86_64::*;
    let bytes = super_bytes(Q6);
    let supers = weight.len() / bytes;
    assert!(x.iter().all(|row| row.covers(supers * 8)));
    let mut acc = [_mm256_setzero_ps(); N];
    let mut minimum_terms = [0f32; N];
    let low4 = _mm256_set1_epi8(0x0f);
    let low2 = _mm256_set1_epi8(0x03);
    let thirty_two = _mm256_set1_epi8(32);
    for s in 0..supers {
        let block = weight.as_ptr().add(s * bytes);
        let (scales, mins) = super_scales(Q6, &weight[s * bytes..(s + 1) * bytes]);
        // Four 32-byte vectors of 32 weights each per 128 values (sub-blocks in order).
        let mut sub = [_mm256_setzero_si256(); 8];
        if Q6 {
            for n in 0..2 {
                let ql_a = _mm256_loadu_si256(block.add(64 * n) as *const __m256i);
                let ql_b = _mm256_loadu_si256(block.add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(block.add(128 + 32 * n) as *const __m256i);
                // The two high bits of each of the four 32-value groups, moved to bits 4–5
                // (no closures here: they would lose this function's target features).
                let high = [
                    _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), low2), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), low2), 4),
                ];
                let nib_a_hi = _mm256_and_si256(_mm256_srli_epi16(ql_a, 4), low4);
                let nib_b_hi = _mm256_and_si256(_mm256_srli_epi16(ql_b, 4), low4);
                let parts = [
                    _mm256_or_si256(_mm256_and_si256(ql_a, low4), high[0]),
                    _mm256_or_si256(_mm256_and_si256(ql_b, low4), high[1]),
                    _mm256_or_si256(nib_a_hi, high[2]),
                    _mm256_or_si256(nib_b_hi, high[3]),
                ];
                for (k, p) in parts.into_iter().enumerate() {
                    sub[4 * n + k] = _mm256_sub_epi8(p, thirty_two);
                }
            }
        } else {
            for c in 0..4 {
                let qs = _mm256_loadu_si256(block.add(16 + 32 * c) as *const __m256i);
                sub[2 * c] = _mm256_and_si256(qs, low4);
                sub[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(qs, 4), low4);
            }
        }
        for (t, &packed) in sub.iter().enumerate() {
            // Signed for Q6_K (q − 32), unsigned nibbles for Q4_K.
            let (w_lo, w_hi) = if Q6 {
                (
                    _mm256_cvtepi8_epi16(_mm256_castsi256_si128(packed)),
                    _mm256_cvtepi8_epi16(_mm256_extracti128_si256(packed, 1)),
                )
            } else {
                (
                    _mm256_cvtepu8_epi16(_mm256_castsi256_si128(packed)),
                    _mm256_cvtepu8_epi16(_mm256_extracti128_si256(packed, 1)),
                )
            };
            let g = s * 8 + t;
            for r in 0..N {
                let values = x[r].values.as_ptr().add(g * BLOCK);
                let x_lo = _mm256_loadu_si256(values as *const __m256i);
                let x_hi = _mm256_loadu_si256(values.add(16) as *const __m256i);
                let dx = *x[r].scales.get_unchecked(g);
                let lo = _mm256_cvtepi32_ps(_mm256_madd_epi16(w_lo, x_lo));
                let hi = _mm256_cvtepi32_ps(_mm256_madd_epi16(w_hi, x_hi));
                acc[r] = _mm256_fmadd_ps(lo, _mm256_set1_ps(scales[2 * t] * dx), acc[r]);
                acc[r] = _mm256_fmadd_ps(hi, _mm256_set1_ps(scales[2 * t + 1] * dx), acc[r]);
                if !Q6 {
                    minimum_terms[r] =
                        (mins[t] * dx).mul_add(*x[r].sums.get_unchecked(g), minimum_terms[r]);
                }
            }
        }
    }
    let mut out = [0f32; N];
    for r in 0..N {
        let t = acc[r];
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        let v = _mm_add_ps(u, _mm_movehl_ps(u, u));
        let total = _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)));
        out[r] = total - minimum_terms[r];
    }
    out
}
