//! The one linear type: dense (F32/F16/BF16) or quantized weights behind candle's `QMatMul`,
//! so any model can be quantized in place and every technique works on both. On CPUs with
//! AVX2, Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K weights are held repacked instead ([`PackedWeight`], the only copy:
//! the GGUF tensor is rebuilt from it, byte for byte, when needed).

use crate::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use dynexec_core::Error;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use crate::cpu_kernels::{DenseSmallBatch, PackedWeight, QuantizedMatMul, SMALL_BATCH};

/// Formats a linear layer's weight can be converted to in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Dense 32-bit floats.
    F32,
    /// Dense 16-bit floats.
    F16,
    /// GGML 8-bit: blocks of 32 values with one scale.
    Q8_0,
    /// GGML 4-bit: blocks of 32 values with one scale.
    Q4_0,
    /// GGML 4-bit: blocks of 32 values with a scale and a minimum.
    Q4_1,
}

impl WeightFormat {
    /// Every format, widest first.
    pub const ALL: [WeightFormat; 5] = [Self::F32, Self::F16, Self::Q8_0, Self::Q4_0, Self::Q4_1];

    /// The lowercase name flags and reports use (`q4_0`); [`FromStr`] parses it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
        }
    }

    /// The GGML storage type of this format.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
        }
    }
}

impl FromStr for WeightFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown quantization `{s}`: use f32, f16, q8_0, q4_0 or q4_1"
                ))
            })
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuKernels {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dynexec" => Ok(Self::Dynexec),
            "candle" => Ok(Self::Candle),
            other => Err(format!(
                "unknown CPU kernels `{other}`: use dynexec or candle"
            )),
        }
    }
}

/// Which CPU kernels multiply quantized weights and small batches of F32 rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuKernels {
    /// dynexec's kernels ([`crate::cpu_kernels`]): Q8_0, Q4_0, Q4_1, Q4_K and Q6_K with 15- or
    /// 16-bit activations (the accuracy of the weights alone; on AVX2, Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K repacked
    /// eight rows at a time), and F32 products of a few rows without repacking the weight;
    /// all give a row the same bits alone or in a batch.
    #[default]
    Dynexec,
    /// candle's kernels everywhere (they quantize activations to 8 bits): bit-identical to
    /// candle-transformers' models, used to check against them.
    Candle,
}

/// Models whose linear layers can be visited (and replaced) one by one, e.g. to quantize them.
pub trait HasLinears {
    /// Every linear layer with a stable name (GGUF-style, e.g. `blk.3.ffn_up`).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Chooses the CPU kernels of every layer.
    fn set_cpu_kernels(&mut self, kernel: CpuKernels) {
        for (_, linear) in self.linears_mut() {
            linear.set_cpu_kernels(kernel);
        }
    }
}

/// `y = x W^T + b` with `W` of shape `(out_features, in_features)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
    cpu_kernels: CpuKernels,
}

#[derive(Debug, Clone)]
enum Weight {
    /// Dense, or quantized as stored (GPUs, the K-quants, CPUs without AVX2).
    Candle(QMatMul),
    /// Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K on an AVX2 CPU, repacked for [`PackedWeight`]'s kernels. The GGUF
    /// tensor is rebuilt from it where candle's kernels are asked for (`--cpu-kernels
    /// candle`) and kept for them; exports and conversions rebuild it each time.
    Packed {
        packed: Arc<PackedWeight>,
        for_candle: Arc<OnceLock<Arc<QTensor>>>,
    },
}

impl Weight {
    /// Repacks a quantized CPU tensor where the repacked kernels can multiply it.
    fn new(weight: QMatMul) -> Result<Self> {
        if let QMatMul::QTensor(q) = &weight {
            if q.device().is_cpu() && PackedWeight::available() {
                if let Some(packed) = PackedWeight::pack(q)? {
                    return Ok(Self::Packed {
                        packed: Arc::new(packed),
                        for_candle: Arc::default(),
                    });
                }
            }
        }
        Ok(Self::Candle(weight))
    }
}

impl Linear {
    /// A dense layer from a float weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: Weight::Candle(QMatMul::Tensor(weight)),
            bias,
            out_features,
            in_features,
            cpu_kernels: CpuKernels::default(),
        })
    }

    /// A layer from a GGUF tensor; float GGUF tensors become dense weights.
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self {
            weight: Weight::new(QMatMul::from_qtensor(weight)?)?,
            bias,
            out_features,
            in_features,
            cpu_kernels: CpuKernels::default(),
        })
    }

    /// Chooses the kernels this layer multiplies with on the CPU.
    pub fn set_cpu_kernels(&mut self, kernel: CpuKernels) {
        self.cpu_kernels = kernel;
    }

    /// The storage type of the weight (`F32` for dense float weights of any float dtype).
    pub fn weight_type(&self) -> GgmlDType {
        match &self.weight {
            Weight::Packed { packed, .. } => packed.dtype(),
            Weight::Candle(QMatMul::QTensor(q)) => q.dtype(),
            Weight::Candle(QMatMul::Tensor(_)) => GgmlDType::F32,
            Weight::Candle(QMatMul::TensorF16(_)) => GgmlDType::F16,
        }
    }

    /// Output size: rows of the weight.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input size: columns of the weight.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes the weight occupies.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Packed { packed, .. } => packed.ggml_size(),
            Weight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }

    /// The weight as an F32 tensor, dequantized if needed.
    pub fn float_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Packed { packed, .. } => packed.to_qtensor()?.dequantize(&Device::Cpu)?,
            Weight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
        })
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight as a GGUF tensor in its current format (dense weights as F32 or F16);
    /// quantized weights keep their bytes exactly as they were stored.
    pub fn to_qtensor(&self) -> Result<Arc<QTensor>> {
        Ok(match &self.weight {
            Weight::Packed { packed, .. } => Arc::new(packed.to_qtensor()?),
            Weight::Candle(QMatMul::QTensor(q)) => q.clone(),
            Weight::Candle(QMatMul::Tensor(t)) => {
                Arc::new(QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::F32)?)
            }
            Weight::Candle(QMatMul::TensorF16(t)) => {
                Arc::new(QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::F16)?)
            }
        })
    }

    /// This layer with its weight converted to `format` (from its float values, so converting
    /// a Q4_1 layer to F32 dequantizes it exactly). The bias stays as it is.
    pub fn convert(&self, format: WeightFormat) -> Result<Linear> {
        let weight = self.float_weight()?;
        let ggml = format.ggml();
        if self.in_features % ggml.block_size() != 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot store a {}x{} weight as {format}: its input size is not a multiple of the {}-value block",
                self.out_features,
                self.in_features,
                ggml.block_size()
            )));
        }
        let weight = match format {
            WeightFormat::F32 => QMatMul::Tensor(weight),
            WeightFormat::F16 => QMatMul::TensorF16(weight.to_dtype(DType::F16)?),
            _ => QMatMul::QTensor(Arc::new(QTensor::quantize(&weight, ggml)?)),
        };
        Ok(Self {
            weight: Weight::new(weight)?,
            bias: self.bias.clone(),
            out_features: self.out_features,
            in_features: self.in_features,
            cpu_kernels: self.cpu_kernels,
        })
    }

    /// A layer with only the output rows `rows` of this one, in that order, stored exactly as
    /// they are here (quantized rows keep their bytes): an LM head over a subset of the
    /// vocabulary (FR-Spec's draft head) gives the same logits for those tokens.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Linear> {
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= self.out_features) {
            return Err(Error::InvalidArgument(format!(
                "row {bad} is outside the layer's {} output rows",
                self.out_features
            )));
        }
        if rows.is_empty() {
            return Err(Error::InvalidArgument(
                "a layer needs at least one output row".to_string(),
            ));
        }
        let bias = match &self.bias {
            Some(b) => Some(b.index_select(&Tensor::new(rows, b.device())?, 0)?),
            None => None,
        };
        let weight = match &self.weight {
            Weight::Candle(QMatMul::Tensor(w)) => {
                QMatMul::Tensor(w.index_select(&Tensor::new(rows, w.device())?, 0)?)
            }
            Weight::Candle(QMatMul::TensorF16(w)) => {
                QMatMul::TensorF16(w.index_select(&Tensor::new(rows, w.device())?, 0)?)
            }
            _ => {
                let q = self.to_qtensor()?;
                let dtype = q.dtype();
                let row_bytes = self.in_features / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let mut picked = Vec::with_capacity(rows.len() * row_bytes);
                for &r in rows {
                    let start = r as usize * row_bytes;
                    picked.extend_from_slice(&data[start..start + row_bytes]);
                }
                let storage = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(picked),
                    &q.device(),
                    dtype,
                )?;
                QMatMul::QTensor(Arc::new(QTensor::new(
                    storage,
                    (rows.len(), self.in_features),
                )?))
            }
        };
        Ok(Self {
            weight: Weight::new(weight)?,
            bias,
            out_features: rows.len(),
            in_features: self.in_features,
            cpu_kernels: self.cpu_kernels,
        })
    }

    /// The repacked weight when this layer's product with `x` runs on the repacked kernels.
    fn packed_for(&self, x: &Tensor) -> Option<&Arc<PackedWeight>> {
        match &self.weight {
            Weight::Packed { packed, .. } if self.ours(x) => Some(packed),
            _ => None,
        }
    }

    /// Whether dynexec's CPU kernels multiply `x`.
    fn ours(&self, x: &Tensor) -> bool {
        self.cpu_kernels == CpuKernels::Dynexec && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// The outputs of several layers that read the same input (a layer's query, key and
    /// value projections; gate and up). On the repacked kernels the input is quantized once
    /// and all products run in one parallel loop; otherwise each layer runs on its own.
    pub fn forward_shared_input<const N: usize>(
        layers: [&Linear; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let packed: Option<Vec<_>> = layers.iter().map(|l| l.packed_for(x)).collect();
        let same_input = layers
            .iter()
            .all(|l| l.in_features == layers[0].in_features);
        let (Some(packed), true) = (packed, same_input) else {
            return layers.try_map_each(|l| l.forward(x));
        };
        let x = x.contiguous()?;
        let products = {
            let (storage, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)) = &*storage else {
                return layers.try_map_each(|l| l.forward(&x));
            };
            let start = layout.start_offset();
            let weights: Vec<&PackedWeight> = packed.iter().map(|p| p.as_ref()).collect();
            PackedWeight::matmul_many(&weights, &values[start..start + x.elem_count()])
        };
        let mut products = products.into_iter();
        let mut shape = x.dims().to_vec();
        layers.try_map_each(|layer| {
            if let Some(last) = shape.last_mut() {
                *last = layer.out_features;
            }
            let y = Tensor::from_vec(
                products.next().unwrap_or_default(),
                shape.as_slice(),
                x.device(),
            )?;
            layer.add_bias(y)
        })
    }

    /// `x W^T + b` for `x` of shape `(…, in_features)`, with the kernels chosen by
    /// [`Self::set_cpu_kernels`] where they apply.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ours = self.ours(x);
        let rows = x.elem_count() / self.in_features.max(1);
        let y = match &self.weight {
            Weight::Packed { packed, .. } if ours => x
                .contiguous()?
                .apply_op1_no_bwd(&QuantizedMatMul::packed(packed.clone()))?,
            Weight::Packed { packed, for_candle } => {
                let q = match for_candle.get() {
                    Some(q) => q.clone(),
                    None => {
                        let q = Arc::new(packed.to_qtensor()?);
                        for_candle.get_or_init(|| q).clone()
                    }
                };
                QMatMul::QTensor(q).forward(x)?
            }
            Weight::Candle(QMatMul::QTensor(q)) if ours && QuantizedMatMul::supports(q) => x
                .contiguous()?
                .apply_op1_no_bwd(&QuantizedMatMul::row_by_row(q.clone()))?,
            // Our kernel has no backward pass: training (tracked tensors) takes candle's matmul.
            Weight::Candle(QMatMul::Tensor(w))
                if ours
                    && w.dtype() == DType::F32
                    && rows <= SMALL_BATCH
                    && !w.track_op()
                    && !x.track_op() =>
            {
                x.contiguous()?
                    .apply_op2_no_bwd(&w.contiguous()?, &DenseSmallBatch)?
            }
            // Training: one 2-D matmul over every row. candle's batched form broadcasts the
            // weight over the batch, and its backward then sums that broadcast back over a
            // strided dimension, the slowest reduction it has.
            Weight::Candle(QMatMul::Tensor(w))
                if (w.track_op() || x.track_op()) && x.rank() > 2 =>
            {
                let mut shape = x.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = self.out_features;
                }
                x.reshape((rows, self.in_features))?
                    .matmul(&w.t()?)?
                    .reshape(shape)?
            }
            Weight::Candle(weight) => weight.forward(x)?,
        };
        self.add_bias(y)
    }

    /// `y + b`, where the layer has a bias (fused when training on the CPU, whose backward
    /// sums the rows in one pass).
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) if (b.track_op() || y.track_op()) && crate::fused::fusable(&y) => {
                crate::fused::add_row_bias(&y.contiguous()?, b)?
            }
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `array.map` for a fallible function.
trait TryMapEach<T, const N: usize> {
    fn try_map_each<U>(self, f: impl FnMut(T) -> Result<U>) -> Result<[U; N]>;
}

impl<T, const N: usize> TryMapEach<T, N> for [T; N] {
    fn try_map_each<U>(self, mut f: impl FnMut(T) -> Result<U>) -> Result<[U; N]> {
        let mut out = Vec::with_capacity(N);
        for item in self {
            out.push(f(item)?);
        }
        out.try_into()
            .map_err(|_| unreachable!("N items in, N items out"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::tests::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn formats_parse_and_name_themselves() {
        for f in WeightFormat::ALL {
            assert_eq!(f.name().parse::<WeightFormat>().unwrap(), f);
        }
        let err = "q3_k".parse::<WeightFormat>().unwrap_err().to_string();
        assert!(err.contains("q8_0"), "{err}");
    }

    #[test]
    fn selected_rows_give_the_same_outputs_for_those_rows() {
        let values: Vec<f32> = (0..16 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(values, (16, 64), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(
            (0..2 * 64)
                .map(|i| (i as f32 * 0.11).cos())
                .collect::<Vec<f32>>(),
            (2, 64),
            &Device::Cpu,
        )
        .unwrap();
        let rows = [9u32, 0, 15, 4];
        for format in [WeightFormat::F32, WeightFormat::Q8_0, WeightFormat::Q4_0] {
            let full = Linear::dense(w.clone(), None)
                .unwrap()
                .convert(format)
                .unwrap();
            let subset = full.select_rows(&rows).unwrap();
            assert_eq!(subset.out_features(), 4);
            let want = full
                .forward(&x)
                .unwrap()
                .index_select(&Tensor::new(&rows, &Device::Cpu).unwrap(), 1)
                .unwrap();
            let got = subset.forward(&x).unwrap();
            assert!(max_abs_diff(&want, &got) < 1e-5, "{format}");
        }
        let full = Linear::dense(w, None).unwrap();
        assert!(full.select_rows(&[16]).is_err());
        assert!(full.select_rows(&[]).is_err());
    }

    #[test]
    fn conversion_keeps_the_function_and_shrinks_the_weight() {
        // Deterministic pseudo-random values in [-1, 1].
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 + seed) * 12.9898).sin())
                .collect()
        };
        let w = Tensor::from_vec(values(8 * 64, 0.5), (8, 64), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(values(3 * 64, 7.25), (3, 64), &Device::Cpu).unwrap();
        let dense = Linear::dense(w, None).unwrap();
        let reference = dense.forward(&x).unwrap();
        let scale = reference
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Relative error bounds: f16 rounding, then 8-bit and 4-bit blocks (their kernels
        // quantize activations to 16 bits, far below these bounds).
        for (format, tolerance) in [
            (WeightFormat::F16, 0.002),
            (WeightFormat::Q8_0, 0.03),
            (WeightFormat::Q4_0, 0.3),
        ] {
            let q = dense.convert(format).unwrap();
            assert!(q.weight_bytes() < dense.weight_bytes(), "{format}");
            let diff = max_abs_diff(&q.forward(&x).unwrap(), &reference);
            assert!(
                diff / scale < tolerance,
                "{format}: relative error {}",
                diff / scale
            );
        }
        // Back to F32 from Q8_0 is the dequantized weight, exactly.
        let q8 = dense.convert(WeightFormat::Q8_0).unwrap();
        let back = q8.convert(WeightFormat::F32).unwrap();
        let diff = max_abs_diff(&q8.float_weight().unwrap(), &back.float_weight().unwrap());
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn block_sizes_that_do_not_divide_the_input_are_refused() {
        let w = Tensor::zeros((4, 48), DType::F32, &Device::Cpu).unwrap();
        let err = Linear::dense(w, None)
            .unwrap()
            .convert(WeightFormat::Q8_0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a multiple of the 32-value block"),
            "{err}"
        );
    }
}
