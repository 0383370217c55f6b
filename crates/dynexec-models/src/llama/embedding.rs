//! The token embedding table, kept as stored.
//!
//! A quantized GGUF's embedding used to be dequantized to F32 at load. For Qwen2.5's
//! 151,936 x 1536 table that is 933 MB, most of the memory of a 1.1 GB file. On the CPU a
//! quantized table now stays quantized, and a lookup dequantizes only the rows it needs
//! (block by block, so each row gets exactly the values a whole-table dequantization gives).

use crate::Result;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use dynexec_core::Error;
use std::sync::Arc;

/// Token id → embedding row, dense or quantized.
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    /// A `(vocab, hidden)` float table, on any device.
    Dense(Tensor),
    /// A `(vocab, hidden)` quantized table on the CPU.
    Quantized(Arc<QTensor>),
}

impl TokenEmbedding {
    /// Quantized tables stay quantized on the CPU; other devices get the dense table (their
    /// lookup runs there, and they have the memory for it).
    pub fn from_qtensor(table: Arc<QTensor>, device: &Device) -> Result<Self> {
        if device.is_cpu()
            && !matches!(
                table.dtype(),
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            )
            && table.shape().dims().len() == 2
        {
            return Ok(Self::Quantized(table));
        }
        Ok(Self::Dense(table.dequantize(device)?))
    }

    /// The rows of `ids` (a flat `u32` tensor), `(ids, hidden)`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let table = match self {
            Self::Dense(table) => return Ok(table.index_select(ids, 0)?),
            Self::Quantized(table) => table,
        };
        let (vocab, hidden) = table.shape().dims2()?;
        let ids: Vec<u32> = ids.to_vec1()?;
        let bytes = table.data()?;
        let row_bytes = bytes.len() / vocab;
        let mut picked = Vec::with_capacity(ids.len() * row_bytes);
        for &id in &ids {
            let row = id as usize;
            if row >= vocab {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} is outside the model's vocabulary of {vocab}: the tokenizer does not match the model"
                )));
            }
            picked.extend_from_slice(&bytes[row * row_bytes..(row + 1) * row_bytes]);
        }
        let rows = qtensor_from_ggml(
            table.dtype(),
            &picked,
            vec![ids.len(), hidden],
            &Device::Cpu,
        )?;
        Ok(rows.dequantize(&Device::Cpu)?)
    }

    /// The whole table in F32 (for export).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(table) => Ok(table.clone()),
            Self::Quantized(table) => Ok(table.dequantize(&Device::Cpu)?),
        }
    }

    /// Bytes as held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(t) => t.storage_size_in_bytes(),
        }
    }
}
