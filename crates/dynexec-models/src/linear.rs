//! The one linear type: dense (F32/F16/BF16) or quantized weights behind candle's `QMatMul`,
//! so any model can be quantized in place and every technique works on both.

use crate::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

/// `y = x W^T + b` with `W` of shape `(out_features, in_features)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// A dense layer from a float weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: QMatMul::Tensor(weight),
            bias,
            out_features,
            in_features,
        })
    }

    /// A layer from a GGUF tensor; float GGUF tensors become dense weights.
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self {
            weight: QMatMul::from_qtensor(weight)?,
            bias,
            out_features,
            in_features,
        })
    }

    /// The storage type of the weight (`F32` for dense float weights of any float dtype).
    pub fn weight_type(&self) -> GgmlDType {
        match &self.weight {
            QMatMul::QTensor(q) => q.dtype(),
            QMatMul::Tensor(_) => GgmlDType::F32,
            QMatMul::TensorF16(_) => GgmlDType::F16,
        }
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes the weight occupies.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
