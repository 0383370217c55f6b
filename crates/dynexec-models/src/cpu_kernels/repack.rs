//! The repacked layout of [`super::interleaved::PackedWeight`]: GGUF rows into eight-row
//! groups, and back, byte for byte.
//!
//! Per group and 32-value block, every format but Q8_0 keeps the low four bits of its
//! unsigned stored integers as eight "registers" of 32 nibbles: nibble `4r + t` of register
//! `k` is value `4k + t` of the group's row `r`; register `2j` fills the low nibbles of 32
//! bytes and `2j + 1` the high ones. Wider integers keep their higher bits in 32-byte planes:
//! bit `k` of byte `4r + t` is the bit of register `k`'s value `4k + t` of row `r` (Q5_0:
//! one plane, bit 4; Q6_K: two, bits 4 and 5). Q8_0 keeps sixteen registers `j` of 16
//! bytes, byte `2r + t` being value `2j + t` of row `r`.
//!
//! Scales stay as stored. Q8_0, Q4_0, Q4_1 and Q5_0: one f16 per block and row (Q4_1 also
//! its f16 minimum). Q4_K: the super-block's f16 `d` and `dmin` per row, and per block the
//! eight rows' 6-bit scales then their 6-bit minima. Q6_K: the super-block's f16 `d` per row,
//! and per block the eight rows' i8 scales of values 0–15, then of values 16–31. So a
//! repacked weight holds what its GGUF tensor holds, in about as many bytes.

use super::kquants::{scale_min_k4, unpack_q6k, Q4K_BYTES, Q6K_BYTES, SUPER};
use super::quantized::{block_bytes, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0};
use super::BLOCK;

/// Weight rows per repacked group: one per F32 lane of an AVX2 vector.
pub(super) const GROUP: usize = 8;
/// Blocks per K-quant super-block.
pub(super) const SUB_BLOCKS: usize = SUPER / BLOCK;

pub(super) const fn is_k_quant(format: u8) -> bool {
    format == Q4_K || format == Q6_K
}

/// Repacked quant bytes per block of a group: eight rows of 32 values, as bytes (Q8_0) or
/// nibbles.
pub(super) const fn group_block_bytes(format: u8) -> usize {
    if format == Q8_0 {
        GROUP * BLOCK
    } else {
        GROUP * BLOCK / 2
    }
}

/// Bytes of higher-bit planes per block of a group.
pub(super) const fn high_bytes(format: u8) -> usize {
    match format {
        Q5_0 => 32,
        Q6_K => 64,
        _ => 0,
    }
}

/// The sizes of one group's share of each buffer, for rows of `blocks` 32-value blocks.
#[derive(Clone, Copy)]
pub(super) struct GroupSizes {
    pub quants: usize,
    pub high: usize,
    pub scales: usize,
    pub minima: usize,
    pub sub_scales: usize,
}

impl GroupSizes {
    pub(super) fn new(format: u8, blocks: usize) -> Self {
        let scales = GROUP
            * if is_k_quant(format) {
                blocks / SUB_BLOCKS
            } else {
                blocks
            };
        Self {
            quants: blocks * group_block_bytes(format),
            high: blocks * high_bytes(format),
            scales,
            minima: if format == Q4_1 || format == Q4_K {
                scales
            } else {
                0
            },
            sub_scales: if is_k_quant(format) { blocks * 16 } else { 0 },
        }
    }
}

/// One group's share of each buffer.
pub(super) struct Group<Q, S> {
    pub quants: Q,
    pub high: Q,
    pub scales: S,
    pub minima: S,
    pub sub_scales: Q,
}

pub(super) type GroupMut<'a> = Group<&'a mut [u8], &'a mut [u16]>;
pub(super) type GroupRef<'a> = Group<&'a [u8], &'a [u16]>;

fn f16_bits(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Where value `e` of row `r` sits in a block's registers: (byte, high nibble?).
fn nibble_at(r: usize, e: usize) -> (usize, bool) {
    let (k, t) = (e / 4, e % 4);
    ((k / 2) * 32 + r * 4 + t, k % 2 == 1)
}

/// Writes the low four bits of 32 unsigned values of row `r` into a block's registers, and
/// their bits 4 (and 5) into the planes `high` (empty when there are none). Row `r` owns
/// every byte it writes, so bytes are assigned whole (this runs for every weight at load).
fn put_values(quants: &mut [u8], high: &mut [u8], r: usize, values: &[u8; BLOCK]) {
    for j in 0..BLOCK / 8 {
        for t in 0..4 {
            // Register 2j (low nibbles) holds value 8j + t, register 2j + 1 value 8j + 4 + t.
            quants[j * 32 + r * 4 + t] = (values[8 * j + t] & 0x0f) | (values[8 * j + 4 + t] << 4);
        }
    }
    for (plane, bits) in high.chunks_exact_mut(32).enumerate() {
        for t in 0..4 {
            bits[r * 4 + t] = (0..8).fold(0u8, |byte, k| {
                byte | ((values[4 * k + t] >> (4 + plane)) & 1) << k
            });
        }
    }
}

/// The inverse of [`put_values`].
fn get_values(quants: &[u8], high: &[u8], r: usize) -> [u8; BLOCK] {
    std::array::from_fn(|e| {
        let (byte, upper) = nibble_at(r, e);
        let mut v = if upper {
            quants[byte] >> 4
        } else {
            quants[byte] & 0x0f
        };
        let (k, t) = (e / 4, e % 4);
        for (plane, bits) in high.chunks_exact(32).enumerate() {
            v |= ((bits[r * 4 + t] >> k) & 1) << (4 + plane);
        }
        v
    })
}

/// Repacks GGUF row `row` as row `r` of a group (the group's buffers start zeroed).
pub(super) fn pack_row(format: u8, row: &[u8], r: usize, dst: &mut GroupMut) {
    let (qb, hb) = (group_block_bytes(format), high_bytes(format));
    let block_quants = |b: usize| b * qb..(b + 1) * qb;
    let block_high = |b: usize| b * hb..(b + 1) * hb;
    match format {
        Q4_K | Q6_K => {
            let bytes = if format == Q4_K { Q4K_BYTES } else { Q6K_BYTES };
            for (s, sb) in row.chunks_exact(bytes).enumerate() {
                let values: [u8; SUPER] = if format == Q4_K {
                    // Byte `32c + l` holds value `64c + l` (low nibble) and `64c + 32 + l`.
                    let mut values = [0u8; SUPER];
                    for (i, &byte) in sb[16..144].iter().enumerate() {
                        let (c, l) = (i / 32, i % 32);
                        values[64 * c + l] = byte & 0x0f;
                        values[64 * c + 32 + l] = byte >> 4;
                    }
                    values
                } else {
                    let q = unpack_q6k(sb).q;
                    std::array::from_fn(|i| (q[i] + 32) as u8)
                };
                if format == Q4_K {
                    dst.scales[s * GROUP + r] = f16_bits(sb, 0);
                    dst.minima[s * GROUP + r] = f16_bits(sb, 2);
                } else {
                    dst.scales[s * GROUP + r] = f16_bits(sb, 208);
                }
                for t in 0..SUB_BLOCKS {
                    let b = s * SUB_BLOCKS + t;
                    let (low, high) = if format == Q4_K {
                        scale_min_k4(t, &sb[4..16])
                    } else {
                        (sb[192 + 2 * t], sb[192 + 2 * t + 1])
                    };
                    dst.sub_scales[b * 16 + r] = low;
                    dst.sub_scales[b * 16 + 8 + r] = high;
                    let v: &[u8; BLOCK] = values[t * BLOCK..(t + 1) * BLOCK].try_into().unwrap();
                    put_values(
                        &mut dst.quants[block_quants(b)],
                        &mut dst.high[block_high(b)],
                        r,
                        v,
                    );
                }
            }
        }
        _ => {
            for (b, block) in row.chunks_exact(block_bytes(format)).enumerate() {
                dst.scales[b * GROUP + r] = f16_bits(block, 0);
                let quants = &mut dst.quants[block_quants(b)];
                let values: [u8; BLOCK] = match format {
                    Q8_0 => {
                        for (e, &q) in block[2..2 + BLOCK].iter().enumerate() {
                            quants[(e / 2) * 16 + r * 2 + e % 2] = q;
                        }
                        continue;
                    }
                    Q5_0 => {
                        let fifth = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                        std::array::from_fn(|e| {
                            let nibble = if e < 16 {
                                block[6 + e] & 0x0f
                            } else {
                                block[6 + e - 16] >> 4
                            };
                            nibble | (((fifth >> e) & 1) as u8) << 4
                        })
                    }
                    _ => {
                        if format == Q4_1 {
                            dst.minima[b * GROUP + r] = f16_bits(block, 2);
                        }
                        let nibbles = &block[if format == Q4_0 { 2 } else { 4 }..];
                        std::array::from_fn(|e| {
                            if e < 16 {
                                nibbles[e] & 0x0f
                            } else {
                                nibbles[e - 16] >> 4
                            }
                        })
                    }
                };
                put_values(quants, &mut dst.high[block_high(b)], r, &values);
            }
        }
    }
}

/// Rebuilds GGUF row `r` of a group into `row`, exactly as it was packed.
pub(super) fn unpack_row(format: u8, src: &GroupRef, r: usize, row: &mut [u8]) {
    let (qb, hb) = (group_block_bytes(format), high_bytes(format));
    let block = |b: usize| {
        (
            &src.quants[b * qb..(b + 1) * qb],
            &src.high[b * hb..(b + 1) * hb],
        )
    };
    match format {
        Q4_K | Q6_K => {
            let bytes = if format == Q4_K { Q4K_BYTES } else { Q6K_BYTES };
            for (s, sb) in row.chunks_exact_mut(bytes).enumerate() {
                let mut values = [0u8; SUPER];
                for t in 0..SUB_BLOCKS {
                    let (quants, high) = block(s * SUB_BLOCKS + t);
                    values[t * BLOCK..(t + 1) * BLOCK]
                        .copy_from_slice(&get_values(quants, high, r));
                }
                let sub = |t: usize, upper: bool| {
                    src.sub_scales[(s * SUB_BLOCKS + t) * 16 + usize::from(upper) * 8 + r]
                };
                if format == Q4_K {
                    sb[0..2].copy_from_slice(&src.scales[s * GROUP + r].to_le_bytes());
                    sb[2..4].copy_from_slice(&src.minima[s * GROUP + r].to_le_bytes());
                    let (sc, m): ([u8; 8], [u8; 8]) = (
                        std::array::from_fn(|t| sub(t, false)),
                        std::array::from_fn(|t| sub(t, true)),
                    );
                    // The inverse of `scale_min_k4`: six bits each, the top two of the last
                    // four in the spare bits of the first eight bytes.
                    for j in 0..4 {
                        sb[4 + j] = sc[j] | (sc[j + 4] >> 4) << 6;
                        sb[8 + j] = m[j] | (m[j + 4] >> 4) << 6;
                        sb[12 + j] = (sc[j + 4] & 0x0f) | (m[j + 4] & 0x0f) << 4;
                    }
                    for c in 0..4 {
                        for l in 0..32 {
                            sb[16 + 32 * c + l] = values[64 * c + l] | values[64 * c + 32 + l] << 4;
                        }
                    }
                } else {
                    for t in 0..SUB_BLOCKS {
                        sb[192 + 2 * t] = sub(t, false);
                        sb[192 + 2 * t + 1] = sub(t, true);
                    }
                    sb[208..210].copy_from_slice(&src.scales[s * GROUP + r].to_le_bytes());
                    // The inverse of `unpack_q6k`.
                    for n in 0..2 {
                        for l in 0..32 {
                            let v = |i: usize| values[128 * n + i];
                            sb[64 * n + l] = (v(l) & 0x0f) | (v(64 + l) & 0x0f) << 4;
                            sb[64 * n + 32 + l] = (v(32 + l) & 0x0f) | (v(96 + l) & 0x0f) << 4;
                            sb[128 + 32 * n + l] = (v(l) >> 4)
                                | (v(32 + l) >> 4) << 2
                                | (v(64 + l) >> 4) << 4
                                | (v(96 + l) >> 4) << 6;
                        }
                    }
                }
            }
        }
        _ => {
            for (b, out) in row.chunks_exact_mut(block_bytes(format)).enumerate() {
                out[..2].copy_from_slice(&src.scales[b * GROUP + r].to_le_bytes());
                let (quants, high) = block(b);
                if format == Q8_0 {
                    for e in 0..BLOCK {
                        out[2 + e] = quants[(e / 2) * 16 + r * 2 + e % 2];
                    }
                    continue;
                }
                let values = get_values(quants, high, r);
                let nibbles_at = match format {
                    Q5_0 => {
                        let fifth =
                            (0..BLOCK).fold(0u32, |f, e| f | (((values[e] >> 4) & 1) as u32) << e);
                        out[2..6].copy_from_slice(&fifth.to_le_bytes());
                        6
                    }
                    Q4_1 => {
                        out[2..4].copy_from_slice(&src.minima[b * GROUP + r].to_le_bytes());
                        4
                    }
                    _ => 2,
                };
                for j in 0..BLOCK / 2 {
                    out[nibbles_at + j] = (values[j] & 0x0f) | (values[j + 16] & 0x0f) << 4;
                }
            }
        }
    }
}
