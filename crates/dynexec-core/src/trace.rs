//! Hidden states captured during a forward pass, indexed by (layer, position, feature).
//!
//! Layer `i` means "the residual stream after `i` layers": 0 is the embedding output and the
//! model's layer count is the stream entering the final norm. A trace is saved as one
//! safetensors file (`layer.N` tensors of shape positions x features) plus a JSON sidecar, so
//! an analysis can be rerun without the model.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Describes a saved trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceInfo {
    /// The model the trace was taken from, as the caller named it.
    pub model: String,
    /// The traced layers, ascending (see the module doc for what a layer index means).
    pub layers: Vec<usize>,
    /// Positions recorded (the most any layer holds).
    pub positions: usize,
    /// Hidden size: features per position.
    pub features: usize,
    /// The token at each position, prompt first.
    pub token_ids: Vec<u32>,
    /// How many of the positions are the prompt (the rest were generated). Traces saved
    /// before this field existed read as 0.
    #[serde(default)]
    pub prompt_tokens: usize,
}

impl std::fmt::Display for TraceInfo {
    /// `31 layers x 54 positions (7 prompt) x 576 features`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} layers x {} positions ({} prompt) x {} features",
            self.layers.len(),
            self.positions,
            self.prompt_tokens,
            self.features
        )
    }
}

/// Residual-stream snapshots for chosen layers, appended position by position.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    chunks: BTreeMap<usize, Vec<Tensor>>,
}

impl Trace {
    /// A trace that records after each of `layers`.
    pub fn new(layers: impl IntoIterator<Item = usize>) -> Self {
        Self {
            chunks: layers.into_iter().map(|l| (l, Vec::new())).collect(),
        }
    }

    /// Whether `layer` is traced ([`Self::record`] ignores the others).
    pub fn wants(&self, layer: usize) -> bool {
        self.chunks.contains_key(&layer)
    }

    /// The traced layers, ascending.
    pub fn layers(&self) -> Vec<usize> {
        self.chunks.keys().copied().collect()
    }

    /// Records `hidden` (`(batch=1, positions, features)` or `(positions, features)`) as the
    /// next positions of `layer`; ignored when the layer is not traced. Stays on the device.
    pub fn record(&mut self, layer: usize, hidden: &Tensor) -> Result<()> {
        if let Some(chunks) = self.chunks.get_mut(&layer) {
            let hidden = if hidden.rank() == 3 {
                hidden.squeeze(0)?
            } else {
                hidden.clone()
            };
            chunks.push(hidden.to_dtype(DType::F32)?);
        }
        Ok(())
    }

    /// Positions recorded so far (the most any layer holds).
    pub fn positions(&self) -> usize {
        self.chunks
            .values()
            .map(|chunks| chunks.iter().map(|c| c.dim(0).unwrap_or(0)).sum::<usize>())
            .max()
            .unwrap_or(0)
    }

    /// Forgets every position from `positions` on, in every layer: what a speculative step
    /// recorded for drafts the target then rejected.
    pub fn truncate(&mut self, positions: usize) -> Result<()> {
        for chunks in self.chunks.values_mut() {
            let mut kept = 0;
            let mut keep_chunks = 0;
            for chunk in chunks.iter_mut() {
                if kept >= positions {
                    break;
                }
                let rows = chunk.dim(0)?;
                if kept + rows > positions {
                    // A copy: a view would keep the dropped rows' memory.
                    *chunk = chunk.narrow(0, 0, positions - kept)?.copy()?;
                }
                kept += chunk.dim(0)?;
                keep_chunks += 1;
            }
            chunks.truncate(keep_chunks);
        }
        Ok(())
    }

    /// Bytes the states of `positions` positions of `features` each take for `layers`
    /// layers (f32; the file's header and the JSON sidecar are not counted).
    pub fn size_for(layers: usize, positions: usize, features: usize) -> u64 {
        layers as u64 * positions as u64 * features as u64 * std::mem::size_of::<f32>() as u64
    }

    /// The JSON sidecar [`Self::save`] writes beside `path`.
    pub fn sidecar_path(path: &Path) -> PathBuf {
        sidecar(path)
    }

    /// The states of one layer as `(positions, features)`, on the CPU.
    pub fn layer(&self, layer: usize) -> Result<Option<Tensor>> {
        match self.chunks.get(&layer) {
            Some(chunks) if !chunks.is_empty() => {
                Ok(Some(Tensor::cat(chunks, 0)?.to_device(&Device::Cpu)?))
            }
            _ => Ok(None),
        }
    }

    /// Writes `path` (safetensors) and `path.json` (the [`TraceInfo`]). `token_ids` is the
    /// sequence the states belong to; it is cut to the positions recorded (a generation's
    /// last token is sampled but never run through the model). The first `prompt_tokens`
    /// positions are the prompt.
    pub fn save(
        &self,
        path: &Path,
        model: &str,
        token_ids: &[u32],
        prompt_tokens: usize,
    ) -> Result<TraceInfo> {
        let mut tensors = HashMap::new();
        let mut positions = 0;
        let mut features = 0;
        for layer in self.layers() {
            if let Some(t) = self.layer(layer)? {
                let (p, f) = t.dims2()?;
                (positions, features) = (positions.max(p), f);
                tensors.insert(format!("layer.{layer}"), t);
            }
        }
        candle_core::safetensors::save(&tensors, path)?;
        let info = TraceInfo {
            model: model.to_string(),
            layers: self.layers(),
            positions,
            features,
            token_ids: token_ids[..positions.min(token_ids.len())].to_vec(),
            prompt_tokens: prompt_tokens.min(positions),
        };
        let json_path = sidecar(path);
        let json = serde_json::to_string_pretty(&info)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        std::fs::write(&json_path, json).map_err(|e| Error::io(&json_path, e))?;
        Ok(info)
    }

    /// Reads a saved trace back: its info and `layer -> (positions, features)` tensors.
    pub fn load(path: &Path) -> Result<(TraceInfo, BTreeMap<usize, Tensor>)> {
        let json_path = sidecar(path);
        let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let info: TraceInfo = serde_json::from_str(&text).map_err(|e| Error::InvalidModel {
            path: json_path.clone(),
            message: e.to_string(),
        })?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        let mut layers = BTreeMap::new();
        for layer in &info.layers {
            if let Some(t) = tensors.get(&format!("layer.{layer}")) {
                layers.insert(*layer, t.clone());
            }
        }
        Ok((info, layers))
    }
}

fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".json");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_chosen_layers_and_round_trips() {
        let mut trace = Trace::new([0, 2]);
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3))
            .unwrap();
        let b = Tensor::arange(6f32, 9., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3))
            .unwrap();
        trace.record(0, &a).unwrap();
        trace.record(0, &b).unwrap();
        trace.record(1, &a).unwrap();
        trace.record(2, &a).unwrap();
        assert!(!trace.wants(1));
        assert_eq!(trace.layer(0).unwrap().unwrap().dims(), &[3, 3]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        trace.save(&path, "m", &[1, 2, 3, 4], 2).unwrap();
        assert_eq!(Trace::load(&path).unwrap().0.prompt_tokens, 2);
        let (info, layers) = Trace::load(&path).unwrap();
        assert_eq!(info.layers, vec![0, 2]);
        assert_eq!(
            info.token_ids,
            vec![1, 2, 3],
            "cut to the 3 recorded positions"
        );
        let l0: Vec<f32> = layers[&0].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(l0, (0..9).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(layers[&2].dims(), &[2, 3]);
    }

    #[test]
    fn truncation_drops_the_last_positions_of_every_layer() {
        let mut trace = Trace::new([0, 1]);
        let rows = |start: f32, n: usize| {
            Tensor::arange(start, start + n as f32, &Device::Cpu)
                .unwrap()
                .reshape((n, 1))
                .unwrap()
        };
        trace.record(0, &rows(0., 3)).unwrap();
        trace.record(0, &rows(3., 4)).unwrap();
        trace.record(1, &rows(10., 7)).unwrap();
        assert_eq!(trace.positions(), 7);
        trace.truncate(5).unwrap();
        assert_eq!(trace.positions(), 5);
        let l0: Vec<f32> = trace
            .layer(0)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(l0, vec![0., 1., 2., 3., 4.]);
        trace.truncate(2).unwrap();
        trace.record(0, &rows(9., 1)).unwrap();
        let l0: Vec<f32> = trace
            .layer(0)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(l0, vec![0., 1., 9.]);
        assert_eq!(trace.layer(1).unwrap().unwrap().dims(), &[2, 1]);
    }
}
