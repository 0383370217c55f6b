//! Small CNN for square grey or colour images (Fashion-MNIST's 28×28) with addressable blocks.
//!
//! Each block is conv 3×3 (padding 1) → ReLU → 2×2 max-pool. Activations are kept channels-last
//! `(batch, height, width, channels)`; the convolution is [`crate::conv::Conv3x3`].

use crate::conv::Conv3x3;
use crate::Result;
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use dynexec_core::Error;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Shape of the network: input size and the output channels of each block.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CnnConfig {
    /// Side of the square input, in pixels; each block halves it.
    pub image_size: usize,
    /// Input channels: 1 for grey, 3 for colour.
    pub in_channels: usize,
    /// Output channels of each block, in order; one block per entry.
    pub channels: Vec<usize>,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            image_size: 28,
            in_channels: 1,
            channels: vec![16, 32, 64],
        }
    }
}

impl CnnConfig {
    /// `(height, width, channels)` after block `block`.
    pub fn block_output(&self, block: usize) -> (usize, usize, usize) {
        let side = self.image_size >> (block + 1);
        (side, side, self.channels[block])
    }

    fn check(&self) -> Result<()> {
        if self.channels.is_empty() || self.in_channels == 0 || self.channels.contains(&0) {
            return Err(Error::InvalidArgument(
                "a CNN needs at least one block and non-zero channel counts".into(),
            ));
        }
        if self.image_size >> self.channels.len() == 0 {
            return Err(Error::InvalidArgument(format!(
                "{} blocks halve a {}-pixel image to nothing: use fewer blocks",
                self.channels.len(),
                self.image_size
            )));
        }
        Ok(())
    }
}

/// A loaded (or freshly initialised) CNN.
#[derive(Debug, Clone)]
pub struct Cnn {
    blocks: Vec<Conv3x3>,
    config: CnnConfig,
}

impl Cnn {
    /// Weights `blocks.{i}.conv.weight` `(out, in, 3, 3)` (PyTorch layout) and
    /// `blocks.{i}.conv.bias`; a `VarBuilder` over a `VarMap` creates them, He-initialised.
    pub fn load(vb: VarBuilder, config: &CnnConfig) -> Result<Self> {
        config.check()?;
        let mut blocks = Vec::with_capacity(config.channels.len());
        let mut inputs = config.in_channels;
        for (i, &outputs) in config.channels.iter().enumerate() {
            blocks.push(Conv3x3::load(
                vb.pp(format!("blocks.{i}.conv")),
                inputs,
                outputs,
            )?);
            inputs = outputs;
        }
        Ok(Self {
            blocks,
            config: config.clone(),
        })
    }

    /// The shape it was built with.
    pub fn config(&self) -> &CnnConfig {
        &self.config
    }

    /// Conv blocks: the depth early exit can stop at.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Raw pixels `(batch, height, width[, channels])` (u8 0–255 or float 0–1) → the
    /// channels-last float input of block 0, scaled to [-0.5, 0.5].
    pub fn prepare(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = if pixels.dtype() == DType::U8 {
            (pixels.to_dtype(DType::F32)? / 255.0)?
        } else {
            pixels.to_dtype(DType::F32)?
        };
        let x = if x.rank() == 3 { x.unsqueeze(3)? } else { x };
        let (_, h, w, c) = x.dims4()?;
        let size = self.config.image_size;
        if (h, w, c) != (size, size, self.config.in_channels) {
            return Err(Error::InvalidArgument(format!(
                "images are {h}×{w} with {c} channel(s), but this CNN takes {size}×{size} with {}",
                self.config.in_channels
            )));
        }
        Ok((x - 0.5)?)
    }

    /// Runs blocks `blocks` on a channels-last activation.
    pub fn forward_blocks(&self, x: &Tensor, blocks: Range<usize>) -> Result<Tensor> {
        if blocks.end > self.blocks.len() || blocks.start > blocks.end {
            return Err(Error::InvalidArgument(format!(
                "block range {}..{} is outside the CNN's {} blocks",
                blocks.start,
                blocks.end,
                self.blocks.len()
            )));
        }
        let mut x = x.clone();
        for block in &self.blocks[blocks] {
            x = max_pool_2x2(&block.forward(&x)?.relu()?)?;
        }
        Ok(x)
    }
}

/// 2×2 max-pool with stride 2 on a channels-last tensor; an odd last row/column is dropped.
fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (batch, h, w, c) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = x.narrow(1, 0, h2 * 2)?.narrow(2, 0, w2 * 2)?;
    Ok(x.reshape((batch, h2, 2, w2, 2, c))?
        .max(D::Minus2)?
        .max(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn conv_and_pool_match_candles_conv2d_and_max_pool() {
        let device = Device::Cpu;
        let config = CnnConfig {
            image_size: 12,
            in_channels: 2,
            channels: vec![5, 3],
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let cnn = Cnn::load(vb, &config).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 12, 12, 2), &device).unwrap();
        let ours = cnn.forward_blocks(&x, 0..2).unwrap();

        let data = varmap.data().lock().unwrap();
        let mut peer = x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        for i in 0..2 {
            let weight = data[&format!("blocks.{i}.conv.weight")].as_tensor();
            let bias = data[&format!("blocks.{i}.conv.bias")].as_tensor();
            peer = peer
                .conv2d(weight, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap()
                .max_pool2d(2)
                .unwrap();
        }
        let peer = peer.permute((0, 2, 3, 1)).unwrap();
        assert_eq!(ours.dims(), &[3, 3, 3, 3]);
        let diff = crate::cpu_kernels::tests::max_abs_diff(&ours, &peer);
        assert!(diff < 1e-5, "max abs diff {diff}");
    }

    #[test]
    fn the_forward_pass_reads_the_trainable_variables() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cnn = Cnn::load(vb, &CnnConfig::default()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 28, 28, 1), &Device::Cpu).unwrap();
        let before = cnn.forward_blocks(&x, 0..1).unwrap();
        let data = varmap.data().lock().unwrap();
        let var = &data["blocks.0.conv.weight"];
        var.set(&(var.as_tensor() * 2.0).unwrap()).unwrap();
        let after = cnn.forward_blocks(&x, 0..1).unwrap();
        let changed = (after - before).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(
            changed.to_scalar::<f32>().unwrap() > 0.0,
            "an update must reach the model"
        );
    }

    #[test]
    fn wrong_image_sizes_and_block_ranges_are_clear_errors() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cnn = Cnn::load(vb, &CnnConfig::default()).unwrap();
        let pixels = Tensor::zeros((1, 32, 32), DType::U8, &Device::Cpu).unwrap();
        let err = cnn.prepare(&pixels).unwrap_err().to_string();
        assert!(err.contains("32×32") && err.contains("28×28"), "{err}");
        let x = Tensor::zeros((1, 28, 28, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(cnn.forward_blocks(&x, 0..4).is_err());
        assert_eq!(config_side(&CnnConfig::default()), vec![14, 7, 3]);
    }

    fn config_side(c: &CnnConfig) -> Vec<usize> {
        (0..c.channels.len()).map(|b| c.block_output(b).0).collect()
    }
}
