//! Small conditional UNet denoiser for square grey images (Fashion-MNIST's 28×28).
//!
//! The DDPM UNet (Ho et al. 2020) cut down to what a CPU can train: one residual block per
//! resolution, average-pool down, nearest-neighbour up, skip connections by concatenation,
//! group norm and SiLU. The timestep (sinusoidal) and a conditioning vector (a sentence
//! embedding of the prompt; all zeros means "no prompt", for classifier-free guidance) are
//! projected to one embedding added inside every block. Activations are channels-last and the
//! convolutions are [`Conv3x3`], so training back-propagates through plain GEMMs.

use crate::conv::Conv3x3;
use crate::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, Linear, Module, VarBuilder};
use dynexec_core::Error;
use serde::{Deserialize, Serialize};

/// Shape of the network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnetConfig {
    /// Side of the square image, in pixels; divisible by `2^(channels.len() - 1)`.
    pub image_size: usize,
    /// Image channels (1 for grey).
    pub in_channels: usize,
    /// Channels at each resolution, full resolution first; each further entry halves it.
    pub channels: Vec<usize>,
    /// Width of the conditioning vector (384 for all-MiniLM-L6-v2).
    pub context_dim: usize,
    /// Width of the joint timestep + conditioning embedding.
    pub embed_dim: usize,
    /// Group-norm groups; must divide every channel count.
    pub groups: usize,
}

impl Default for UnetConfig {
    fn default() -> Self {
        Self {
            image_size: 28,
            in_channels: 1,
            channels: vec![16, 32, 64],
            context_dim: 384,
            embed_dim: 128,
            groups: 8,
        }
    }
}

impl UnetConfig {
    fn check(&self) -> Result<()> {
        let levels = self.channels.len();
        let bad = |why: String| Err(Error::InvalidArgument(format!("UNet config: {why}")));
        if levels == 0 || self.in_channels == 0 || self.embed_dim == 0 || self.groups == 0 {
            return bad("needs at least one level and non-zero sizes".into());
        }
        if let Some(c) = self
            .channels
            .iter()
            .find(|&&c| c == 0 || !c.is_multiple_of(self.groups))
        {
            return bad(format!(
                "{c} channels is not a multiple of {} groups",
                self.groups
            ));
        }
        if !self.image_size.is_multiple_of(1 << (levels - 1)) {
            return bad(format!(
                "a {}-pixel image cannot be halved {} times",
                self.image_size,
                levels - 1
            ));
        }
        Ok(())
    }
}

/// Group normalisation over channels-last activations, without the per-channel affine: the
/// convolution that follows every norm learns the scale, and back-propagating candle's
/// broadcast scale and shift (sums over three dimensions) cost more than the norm itself.
#[derive(Debug, Clone)]
struct GroupNorm {
    groups: usize,
}

impl GroupNorm {
    fn new(groups: usize) -> Self {
        Self { groups }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let normed = if x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1(GroupNormalize {
                groups: self.groups,
                channels: c,
            })?
        } else {
            let g = x.reshape((b, h * w, self.groups, c / self.groups))?;
            let mean = g.mean_keepdim(3)?.mean_keepdim(1)?;
            let centered = g.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(3)?.mean_keepdim(1)?;
            centered
                .broadcast_div(&(var + GROUP_NORM_EPS)?.sqrt()?)?
                .reshape((b, h, w, c))?
        };
        Ok(normed)
    }
}

const GROUP_NORM_EPS: f64 = 1e-5;

/// Zero mean, unit variance within each (sample, channel group) of a channels-last tensor,
/// with the analytic backward: candle's composed version back-propagates through five
/// broadcast ops and was the largest cost of a training step.
struct GroupNormalize {
    groups: usize,
    channels: usize,
}

impl GroupNormalize {
    /// Per (sample, group): mean and 1/std over `values` of one sample `(pixels, channels)`.
    fn statistics(&self, sample: &[f32]) -> Vec<(f32, f32)> {
        let size = self.channels / self.groups;
        let pixels = sample.len() / self.channels;
        let mut sums = vec![(0f64, 0f64); self.groups];
        for pixel in sample.chunks_exact(self.channels) {
            for (g, group) in pixel.chunks_exact(size).enumerate() {
                for &v in group {
                    sums[g].0 += v as f64;
                    sums[g].1 += (v as f64) * (v as f64);
                }
            }
        }
        let n = (pixels * size) as f64;
        sums.into_iter()
            .map(|(s, sq)| {
                let mean = s / n;
                let var = (sq / n - mean * mean).max(0.0);
                (mean as f32, (1.0 / (var + GROUP_NORM_EPS).sqrt()) as f32)
            })
            .collect()
    }

    fn sample_len(&self, layout: &candle_core::Layout) -> usize {
        let dims = layout.dims();
        dims[1..].iter().product()
    }
}

impl candle_core::CustomOp1 for GroupNormalize {
    fn name(&self) -> &'static str {
        "group-normalize"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("group-normalize needs a contiguous input")
        };
        let input = &storage.as_slice::<f32>()?[start..end];
        let size = self.channels / self.groups;
        let mut out = Vec::with_capacity(input.len());
        for sample in input.chunks_exact(self.sample_len(layout)) {
            let stats = self.statistics(sample);
            for pixel in sample.chunks_exact(self.channels) {
                for (i, &v) in pixel.iter().enumerate() {
                    let (mean, rstd) = stats[i / size];
                    out.push((v - mean) * rstd);
                }
            }
        }
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    /// dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)), means over the group.
    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, h, w, c) = arg.dims4()?;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let normed = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let size = c / self.groups;
        let per_sample = h * w * c;
        let n = (h * w * size) as f32;
        let mut dx = vec![0f32; x.len()];
        for s in 0..b {
            let range = s * per_sample..(s + 1) * per_sample;
            let stats = self.statistics(&x[range.clone()]);
            let mut sums = vec![(0f32, 0f32); self.groups];
            for (i, (gv, nv)) in g[range.clone()]
                .iter()
                .zip(&normed[range.clone()])
                .enumerate()
            {
                let group = (i % c) / size;
                sums[group].0 += gv;
                sums[group].1 += gv * nv;
            }
            for i in range {
                let group = (i % c) / size;
                let (mean_g, mean_gx) = (sums[group].0 / n, sums[group].1 / n);
                dx[i] = stats[group].1 * (g[i] - mean_g - normed[i] * mean_gx);
            }
        }
        Ok(Some(Tensor::from_vec(dx, (b, h, w, c), arg.device())?))
    }
}

/// norm → SiLU → conv, plus the embedding, → norm → SiLU → conv, plus a (projected) skip.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv3x3,
    embed_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv3x3,
    skip: Option<Linear>,
}

impl ResBlock {
    fn load(vb: VarBuilder, inputs: usize, outputs: usize, cfg: &UnetConfig) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(cfg.groups),
            conv1: Conv3x3::load(vb.pp("conv1"), inputs, outputs)?,
            embed_proj: linear(cfg.embed_dim, outputs, vb.pp("embed_proj"))?,
            norm2: GroupNorm::new(cfg.groups),
            conv2: Conv3x3::load(vb.pp("conv2"), outputs, outputs)?,
            skip: match inputs == outputs {
                true => None,
                false => Some(linear(inputs, outputs, vb.pp("skip"))?),
            },
        })
    }

    /// `x` `(b, h, w, in)`, `embed` `(b, embed_dim)` already through SiLU.
    fn forward(&self, x: &Tensor, embed: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let e = self.embed_proj.forward(embed)?.unsqueeze(1)?.unsqueeze(1)?;
        let h = h.broadcast_add(&e)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.skip {
            // As one 2-d product: candle's Linear on a 4-d input runs a matmul per row.
            Some(s) => {
                let (b, hh, w, c) = x.dims4()?;
                s.forward(&x.reshape((b * hh * w, c))?)?
                    .reshape((b, hh, w, ()))?
            }
            None => x.clone(),
        };
        Ok((h + skip)?)
    }
}

/// The denoiser: `forward(x_t, t, context)` predicts the noise in `x_t`.
#[derive(Debug, Clone)]
pub struct Unet {
    conv_in: Conv3x3,
    time_mlp: (Linear, Linear),
    context_proj: Linear,
    down: Vec<ResBlock>,
    mid: ResBlock,
    up: Vec<ResBlock>,
    norm_out: GroupNorm,
    conv_out: Conv3x3,
    config: UnetConfig,
}

impl Unet {
    /// Loads (or, over a `VarMap`, creates) the weights.
    pub fn load(vb: VarBuilder, config: &UnetConfig) -> Result<Self> {
        config.check()?;
        let c = &config.channels;
        let e = config.embed_dim;
        let levels = c.len();
        let mut down = Vec::with_capacity(levels);
        let mut previous = c[0];
        for (i, &channels) in c.iter().enumerate() {
            down.push(ResBlock::load(
                vb.pp(format!("down.{i}")),
                previous,
                channels,
                config,
            )?);
            previous = channels;
        }
        let mid = ResBlock::load(vb.pp("mid"), previous, previous, config)?;
        let mut up = Vec::with_capacity(levels);
        for (i, &channels) in c.iter().enumerate().rev() {
            let from_below = if i + 1 < levels { c[i + 1] } else { c[i] };
            up.push(ResBlock::load(
                vb.pp(format!("up.{i}")),
                from_below + channels,
                channels,
                config,
            )?);
        }
        Ok(Self {
            conv_in: Conv3x3::load(vb.pp("conv_in"), config.in_channels, c[0])?,
            time_mlp: (
                linear(c[0], e, vb.pp("time_mlp.0"))?,
                linear(e, e, vb.pp("time_mlp.2"))?,
            ),
            context_proj: linear(config.context_dim, e, vb.pp("context_proj"))?,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(config.groups),
            conv_out: Conv3x3::load(vb.pp("conv_out"), c[0], config.in_channels)?,
            config: config.clone(),
        })
    }

    /// The shape it was built with.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Predicted noise for `x_t` `(b, h, w, c)` at timesteps `timesteps` (one per sample)
    /// under `context` `(b, context_dim)`.
    pub fn forward(&self, x_t: &Tensor, timesteps: &[usize], context: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x_t.dims4()?;
        let size = self.config.image_size;
        if (h, w, c) != (size, size, self.config.in_channels) || timesteps.len() != b {
            return Err(Error::InvalidArgument(format!(
                "UNet input is {b}×{h}×{w}×{c} with {} timestep(s); it takes N×{size}×{size}×{} \
                 and one timestep per sample",
                timesteps.len(),
                self.config.in_channels
            )));
        }
        let time = timestep_embedding(timesteps, self.config.channels[0], x_t.device())?;
        let time = self
            .time_mlp
            .1
            .forward(&self.time_mlp.0.forward(&time)?.silu()?)?;
        let embed = (time + self.context_proj.forward(context)?)?.silu()?;

        let levels = self.down.len();
        let mut h = self.conv_in.forward(x_t)?;
        let mut skips = Vec::with_capacity(levels);
        for (i, block) in self.down.iter().enumerate() {
            h = block.forward(&h, &embed)?;
            skips.push(h.clone());
            if i + 1 < levels {
                h = avg_pool_2x2(&h)?;
            }
        }
        h = self.mid.forward(&h, &embed)?;
        for (block, i) in self.up.iter().zip((0..levels).rev()) {
            if i + 1 < levels {
                h = upsample_2x(&h)?;
            }
            h = block.forward(&Tensor::cat(&[&h, &skips[i]], 3)?, &embed)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// Transformer-style sinusoidal embedding of integer timesteps, `(b, dim)`.
fn timestep_embedding(timesteps: &[usize], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let mut values = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let frequencies =
            (0..half).map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp() * t as f64);
        let (sin, cos): (Vec<f64>, Vec<f64>) = frequencies.map(|a| (a.sin(), a.cos())).unzip();
        values.extend(sin.into_iter().chain(cos).map(|v| v as f32));
        values.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    Ok(Tensor::from_vec(values, (timesteps.len(), dim), device)?.to_dtype(DType::F32)?)
}

fn avg_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    Ok(x.reshape((b, h / 2, 2, w / 2, 2, c))?
        .mean(D::Minus2)?
        .mean(2)?)
}

fn upsample_2x(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .unsqueeze(4)?
        .broadcast_as((b, h, 2, w, 2, c))?
        .reshape((b, 2 * h, 2 * w, c))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn unet() -> (Unet, VarMap) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let config = UnetConfig {
            channels: vec![8, 16],
            context_dim: 6,
            embed_dim: 12,
            groups: 4,
            ..Default::default()
        };
        let net = Unet::load(vb, &config).unwrap();
        crate::init::seeded_init(&varmap, 1).unwrap();
        (net, varmap)
    }

    #[test]
    fn group_norm_normalises_each_group() {
        let x = Tensor::randn(3f32, 2.0, (2, 4, 4, 8), &Device::Cpu).unwrap();
        let norm = GroupNorm::new(2);
        let y = norm.forward(&x).unwrap().reshape((2, 16, 2, 4)).unwrap();
        let mean = y.mean_keepdim(3).unwrap().mean_keepdim(1).unwrap();
        let max_mean = mean
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max_mean < 1e-4, "{max_mean}");
        // candle's own group norm (channels first) agrees.
        let peer = candle_nn::GroupNorm::new(
            Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
            8,
            2,
            1e-5,
        )
        .unwrap();
        let theirs = peer
            .forward(&x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let ours = norm.forward(&x).unwrap();
        let diff = crate::cpu_kernels::tests::max_abs_diff(&ours, &theirs);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn shapes_gradients_and_conditioning() {
        let (net, varmap) = unet();
        let x = Tensor::randn(0f32, 1.0, (2, 28, 28, 1), &Device::Cpu).unwrap();
        let ctx = Tensor::randn(0f32, 1.0, (2, 6), &Device::Cpu).unwrap();
        let y = net.forward(&x, &[10, 500], &ctx).unwrap();
        assert_eq!(y.dims(), &[2, 28, 28, 1]);
        let other = net
            .forward(&x, &[10, 500], &ctx.zeros_like().unwrap())
            .unwrap();
        let moved = (&y - other).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(
            moved.to_scalar::<f32>().unwrap() > 0.0,
            "conditioning must matter"
        );
        let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "{name} has no gradient"
            );
        }
        assert!(net.forward(&x, &[1], &ctx).is_err());
    }
}
