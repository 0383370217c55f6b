//! A per-sequence KV cache that can be truncated to any length (speculative rollback) and
//! whose layers can be filled independently (early exit).
//!
//! Each layer's keys and values live in buffers with room to spare, written in place: a
//! cache that grew by concatenation copied every cached position on every token, which at a
//! few hundred positions cost SmolLM2 a tenth of its decoding time. Buffers double when full.

use crate::Result;
use candle_core::Tensor;

/// Positions a layer's buffers hold at first (grown by doubling).
const INITIAL_CAPACITY: usize = 256;

/// One layer's buffers `(batch, kv_heads, capacity, head_dim)`, of which the first `len`
/// positions are filled.
#[derive(Debug)]
struct LayerKv {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.keys.dim(2).unwrap_or(0)
    }

    /// Buffers like `like` (batch, heads, _, head_dim) with room for `capacity` positions,
    /// holding `self`'s filled positions if given.
    fn with_capacity(like: &Tensor, capacity: usize, old: Option<&LayerKv>) -> Result<Self> {
        let (batch, heads, _, head_dim) = like.dims4()?;
        let buffer = || {
            Tensor::zeros(
                (batch, heads, capacity, head_dim),
                like.dtype(),
                like.device(),
            )
        };
        let (keys, values) = (buffer()?, buffer()?);
        let len = match old {
            Some(old) if old.len > 0 => {
                keys.slice_set(&old.keys.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                values.slice_set(&old.values.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                old.len
            }
            _ => 0,
        };
        Ok(Self { keys, values, len })
    }

    /// The filled positions (views into the buffers, not copies).
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys.narrow(2, 0, self.len)?,
            self.values.narrow(2, 0, self.len)?,
        ))
    }
}

/// Keys and values of every layer, `(batch, kv_heads, positions, head_dim)` each.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

/// A copy with buffers of its own: clones must not write into each other's buffers.
impl Clone for KvCache {
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|entry| {
                entry.as_ref().map(|layer| {
                    // Only a failed allocation can fail this copy, and a clone that silently
                    // lost positions would give wrong answers.
                    LayerKv::with_capacity(&layer.keys, layer.capacity(), Some(layer))
                        .expect("memory for a copy of the KV cache")
                })
            })
            .collect();
        Self { layers }
    }
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers; buffers are made on first append.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Layers it holds keys and values for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions cached for layer `layer`.
    pub fn layer_len(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    /// The cached keys and values of one layer, if any.
    pub fn layer(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        match self.layers.get(layer)? {
            Some(l) if l.len > 0 => l.filled().ok(),
            _ => None,
        }
    }

    /// Positions cached for the first layer: the length of the sequence so far.
    pub fn len(&self) -> usize {
        self.layer_len(0)
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new keys/values to a layer and returns the whole cached keys/values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let entry = &mut self.layers[layer];
        let needed = entry.as_ref().map_or(0, |l| l.len) + new;
        if entry.as_ref().is_none_or(|l| l.capacity() < needed) {
            let capacity = entry
                .as_ref()
                .map_or(INITIAL_CAPACITY, |l| 2 * l.capacity())
                .max(needed);
            *entry = Some(LayerKv::with_capacity(k, capacity, entry.as_ref())?);
        }
        let Some(entry) = entry.as_mut() else {
            unreachable!("the layer's buffers were just made")
        };
        entry.keys.slice_set(&k.contiguous()?, 2, entry.len)?;
        entry.values.slice_set(&v.contiguous()?, 2, entry.len)?;
        entry.len = needed;
        entry.filled()
    }

    /// Forgets every position at or after `len`, in every layer (the buffers stay, and
    /// later appends overwrite the forgotten positions).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for entry in self.layers.iter_mut().flatten() {
            entry.len = entry.len.min(len);
        }
        Ok(())
    }

    /// Forgets every position and frees the buffers.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|e| *e = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn positions(start: usize, n: usize) -> Tensor {
        let values: Vec<f32> = (0..2 * n * 4).map(|i| (start * 1000 + i) as f32).collect();
        // (batch 1, 2 heads, n positions, head_dim 4), values counting up from start·1000.
        Tensor::from_vec(values, (1, 2, n, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn appends_grow_past_the_capacity_and_truncation_rewinds() {
        let mut cache = KvCache::new(2);
        let mut expected: Vec<Tensor> = Vec::new();
        let mut len = 0;
        for n in [3, INITIAL_CAPACITY, 1, INITIAL_CAPACITY + 5] {
            let chunk = positions(len, n);
            expected.push(chunk.clone());
            let (k, v) = cache.append(0, &chunk, &chunk).unwrap();
            len += n;
            let all = Tensor::cat(&expected, 2).unwrap();
            assert_eq!(k.dims(), &[1, 2, len, 4]);
            let diff = (k.contiguous().unwrap() - &all)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0);
            assert_eq!(v.dims(), k.dims());
        }
        assert_eq!(cache.len(), len);
        assert_eq!(cache.layer_len(1), 0);

        // A clone keeps its own copy: appends after a rewind do not reach it.
        let position_2 = |c: &KvCache| -> Vec<f32> {
            let (k, _) = c.layer(0).unwrap();
            k.narrow(2, 2, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let snapshot = cache.clone();
        let before = position_2(&cache);
        cache.truncate(2).unwrap();
        assert_eq!(cache.len(), 2);
        let replacement = positions(9, 1);
        let (k, _) = cache.append(0, &replacement, &replacement).unwrap();
        assert_eq!(k.dim(2).unwrap(), 3);
        let replaced: Vec<f32> = replacement.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(position_2(&cache), replaced);
        assert_eq!(position_2(&snapshot), before);
        assert_ne!(before, replaced);
    }
}
