//! A per-sequence KV cache that can be truncated to any length (speculative rollback) and
//! whose layers can be filled independently (early exit).

use crate::Result;
use candle_core::Tensor;

/// Keys and values of every layer, `(batch, kv_heads, positions, head_dim)` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions cached for layer `layer`.
    pub fn layer_len(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// The cached keys and values of one layer, if any.
    pub fn layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?.as_ref().map(|(k, v)| (k, v))
    }

    /// Positions cached for the first layer: the length of the sequence so far.
    pub fn len(&self) -> usize {
        self.layer_len(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new keys/values to a layer and returns the whole cached keys/values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let entry = &mut self.layers[layer];
        let (k, v) = match entry.take() {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        };
        *entry = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Forgets every position at or after `len`, in every layer.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for entry in &mut self.layers {
            if let Some((k, v)) = entry.take() {
                let keep = len.min(k.dim(2)?);
                if keep > 0 {
                    *entry = Some((k.narrow(2, 0, keep)?, v.narrow(2, 0, keep)?));
                }
            }
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|e| *e = None);
    }
}
