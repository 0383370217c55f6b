//! Exit heads: a small classifier after every layer.

use candle_core::{Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use dynexec_core::Result;

/// Pooled hidden state → class logits: dense → tanh → dense (DeeBERT's off-ramp).
#[derive(Debug, Clone)]
pub struct ExitHead {
    pooler: Linear,
    classifier: Linear,
}

impl ExitHead {
    /// Weights `pooler.{weight,bias}` `(hidden, input)` and `classifier.{weight,bias}`
    /// `(classes, hidden)`.
    pub fn load(vb: VarBuilder, input: usize, hidden: usize, classes: usize) -> Result<Self> {
        Ok(Self {
            pooler: linear(input, hidden, vb.pp("pooler"))?,
            classifier: linear(hidden, classes, vb.pp("classifier"))?,
        })
    }

    /// Features `(batch, input)` → logits `(batch, classes)`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self
            .classifier
            .forward(&self.pooler.forward(features)?.tanh()?)?)
    }
}

/// One head per exit, stored as `exits.{i}.…`.
#[derive(Debug, Clone)]
pub struct ExitHeads {
    heads: Vec<ExitHead>,
}

impl ExitHeads {
    /// Loads (or, over a `VarMap`, creates) a head for each exit's feature size.
    pub fn load(
        vb: VarBuilder,
        feature_dims: &[usize],
        hidden: usize,
        classes: usize,
    ) -> Result<Self> {
        let heads = feature_dims
            .iter()
            .enumerate()
            .map(|(i, &dim)| ExitHead::load(vb.pp(format!("exits.{i}")), dim, hidden, classes))
            .collect::<Result<_>>()?;
        Ok(Self { heads })
    }

    /// Number of heads (exits).
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// Whether there are no heads.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Exit `exit`'s logits for its features.
    pub fn logits(&self, exit: usize, features: &Tensor) -> Result<Tensor> {
        self.heads[exit].forward(features)
    }
}
