//! The quantized kernels on aarch64 NEON (always present there, so no run-time check).
//!
//! They follow the AVX2 kernels' arithmetic exactly, so every build gives the same bits: an
//! AVX2 `madd` lane `j` (products `2j` and `2j+1`, summed in i32) is a widening multiply and a
//! pairwise add here; the eight F32 lanes are two 4-lane registers; fused multiply-adds and
//! the final pairwise sum run in the same order.

use super::kquants::{super_bytes, super_scales};
use super::quantized::{f16_at, ActivationRow, Q4_0, Q4_1, Q8_0};
use super::BLOCK;
use std::arch::aarch64::*;

/// Eight i32 lanes of `w · x` over 16 values: lane `j` = `w[2j]·x[2j] + w[2j+1]·x[2j+1]`.
#[inline(always)]
unsafe fn madd16(w: [int16x8_t; 2], x: *const i16) -> [int32x4_t; 2] {
    let (x0, x1) = (vld1q_s16(x), vld1q_s16(x.add(8)));
    let p0 = vmull_s16(vget_low_s16(w[0]), vget_low_s16(x0));
    let p1 = vmull_high_s16(w[0], x0);
    let p2 = vmull_s16(vget_low_s16(w[1]), vget_low_s16(x1));
    let p3 = vmull_high_s16(w[1], x1);
    [vpaddq_s32(p0, p1), vpaddq_s32(p2, p3)]
}

/// `acc += lanes · scale`, fused, lane by lane.
#[inline(always)]
unsafe fn fma8(acc: [float32x4_t; 2], lanes: [int32x4_t; 2], scale: f32) -> [float32x4_t; 2] {
    let s = vdupq_n_f32(scale);
    [
        vfmaq_f32(acc[0], vcvtq_f32_s32(lanes[0]), s),
        vfmaq_f32(acc[1], vcvtq_f32_s32(lanes[1]), s),
    ]
}

/// The eight lanes summed as the AVX2 kernels do: `j` with `j+4`, then `j+2`, then `j+1`.
#[inline(always)]
unsafe fn sum8(t: [float32x4_t; 2]) -> f32 {
    let u = vaddq_f32(t[0], t[1]);
    let v0 = vgetq_lane_f32::<0>(u) + vgetq_lane_f32::<2>(u);
    let v1 = vgetq_lane_f32::<1>(u) + vgetq_lane_f32::<3>(u);
    v0 + v1
}

/// 32 bytes (16 + 16) of values → four vectors of eight i16.
#[inline(always)]
unsafe fn widen_u8(lo: uint8x16_t, hi: uint8x16_t) -> [int16x8_t; 4] {
    [
        vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))),
        vreinterpretq_s16_u16(vmovl_high_u8(lo)),
        vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))),
        vreinterpretq_s16_u16(vmovl_high_u8(hi)),
    ]
}

#[inline(always)]
unsafe fn widen_s8(lo: int8x16_t, hi: int8x16_t) -> [int16x8_t; 4] {
    [
        vmovl_s8(vget_low_s8(lo)),
        vmovl_high_s8(lo),
        vmovl_s8(vget_low_s8(hi)),
        vmovl_high_s8(hi),
    ]
}

/// `N` activation rows against one Q8_0/Q4_0/Q4_1 weight row (see the AVX2 kernel).
pub unsafe fn dot_rows<const F: u8, const N: usize>(
    weight: &[u8],
    x: [ActivationRow; N],
) -> [f32; N] {
    let bytes = match F {
        Q8_0 => 34,
        Q4_0 => 18,
        _ => 20,
    };
    let blocks = weight.len() / bytes;
    assert!(x.iter().all(|row| row.covers(blocks)));
    let zero = [vdupq_n_f32(0.0); 2];
    let mut acc = [[zero; 2]; N];
    let mut minimum_terms = [0f32; N];
    for b in 0..blocks {
        let block = &weight[b * bytes..(b + 1) * bytes];
        let dw = f16_at(block, 0);
        let w = match F {
            Q8_0 => {
                let p = block.as_ptr().add(2) as *const i8;
                widen_s8(vld1q_s8(p), vld1q_s8(p.add(16)))
            }
            _ => {
                let offset = if F == Q4_0 { 2 } else { 4 };
                let q = vld1q_u8(block.as_ptr().add(offset));
                let mut w = widen_u8(vandq_u8(q, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(q));
                if F == Q4_0 {
                    let eight = vdupq_n_s16(8);
                    for v in &mut w {
                        *v = vsubq_s16(*v, eight);
                    }
                }
                w
            }
        };
        let minimum = if F == Q4_1 { f16_at(block, 2) } else { 0.0 };
        for r in 0..N {
            let values = x[r].values.as_ptr().add(b * BLOCK);
            let lo = madd16([w[0], w[1]], values);
            let hi = madd16([w[2], w[3]], values.add(16));
            let lanes = [vaddq_s32(lo[0], hi[0]), vaddq_s32(lo[1], hi[1])];
            let dx = *x[r].scales.get_unchecked(b);
            acc[r][b % 2] = fma8(acc[r][b % 2], lanes, dw * dx);
            if F == Q4_1 {
                minimum_terms[r] =
                    (minimum * dx).mul_add(*x[r].sums.get_unchecked(b), minimum_terms[r]);
            }
        }
    }
    std::array::from_fn(|r| {
        let [even, odd] = acc[r];
        let total = sum8([vaddq_f32(even[0], odd[0]), vaddq_f32(even[1], odd[1])]);
        if F == Q4_1 {
            total + minimum_terms[r]
        } else {
            total
        }
    })
}

/// `N` activation rows against one Q4_K (or, with `Q6`, Q6_K) weight row.
pub unsafe fn dot_rows_k<const Q6: bool, const N: usize>(
    weight: &[u8],
    x: [ActivationRow; N],
) -> [f32; N] {
    let bytes = super_bytes(Q6);
    let supers = weight.len() / bytes;
    assert!(x.iter().all(|row| row.covers(supers * 8)));
    let mut acc = [[vdupq_n_f32(0.0); 2]; N];
    let mut minimum_terms = [0f32; N];
    let low4 = vdupq_n_u8(0x0f);
    let low2 = vdupq_n_u8(0x03);
    for s in 0..supers {
        let block = &weight[s * bytes..(s + 1) * bytes];
        let p = block.as_ptr();
        let (scales, mins) = super_scales(Q6, block);
        // The eight 32-value sub-blocks, as four vectors of eight i16 each.
        let mut sub = [[vdupq_n_s16(0); 4]; 8];
        if Q6 {
            for n in 0..2 {
                for half in 0..2 {
                    let o = 16 * half;
                    let ql_a = vld1q_u8(p.add(64 * n + o));
                    let ql_b = vld1q_u8(p.add(64 * n + 32 + o));
                    let qh = vld1q_u8(p.add(128 + 32 * n + o));
                    let high = |shift_and: uint8x16_t| vshlq_n_u8::<4>(vandq_u8(shift_and, low2));
                    let parts = [
                        vorrq_u8(vandq_u8(ql_a, low4), high(qh)),
                        vorrq_u8(vandq_u8(ql_b, low4), high(vshrq_n_u8::<2>(qh))),
                        vorrq_u8(vshrq_n_u8::<4>(ql_a), high(vshrq_n_u8::<4>(qh))),
                        vorrq_u8(vshrq_n_u8::<4>(ql_b), high(vshrq_n_u8::<6>(qh))),
                    ];
                    for (k, part) in parts.into_iter().enumerate() {
                        let signed = vsubq_s8(vreinterpretq_s8_u8(part), vdupq_n_s8(32));
                        sub[4 * n + k][2 * half] = vmovl_s8(vget_low_s8(signed));
                        sub[4 * n + k][2 * half + 1] = vmovl_high_s8(signed);
                    }
                }
            }
        } else {
            for c in 0..4 {
                let q0 = vld1q_u8(p.add(16 + 32 * c));
                let q1 = vld1q_u8(p.add(16 + 32 * c + 16));
                sub[2 * c] = widen_u8(vandq_u8(q0, low4), vandq_u8(q1, low4));
                sub[2 * c + 1] = widen_u8(vshrq_n_u8::<4>(q0), vshrq_n_u8::<4>(q1));
            }
        }
        for (t, w) in sub.iter().enumerate() {
            let g = s * 8 + t;
            for r in 0..N {
                let values = x[r].values.as_ptr().add(g * BLOCK);
                let dx = *x[r].scales.get_unchecked(g);
                let lo = madd16([w[0], w[1]], values);
                let hi = madd16([w[2], w[3]], values.add(16));
                acc[r] = fma8(acc[r], lo, scales[2 * t] * dx);
                acc[r] = fma8(acc[r], hi, scales[2 * t + 1] * dx);
                if !Q6 {
                    minimum_terms[r] =
                        (mins[t] * dx).mul_add(*x[r].sums.get_unchecked(g), minimum_terms[r]);
                }
            }
        }
    }
    std::array::from_fn(|r| sum8(acc[r]) - minimum_terms[r])
}
