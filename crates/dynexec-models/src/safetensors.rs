//! Opening transformers-layout safetensors weights with errors that say what is wrong.

use crate::Result;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use dynexec_core::Error;
use std::path::PathBuf;

/// Memory-maps `weights`, failing clearly on a missing or unreadable file.
pub(crate) fn open<'a>(
    weights: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'a>> {
    for path in weights {
        if !path.exists() {
            return Err(Error::MissingFile(path.clone()));
        }
    }
    // SAFETY: the files are memory-mapped read-only; dynexec never writes to them while they
    // are mapped (another process truncating them is outside what we can guard).
    unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device) }
        .map_err(|e| corrupt(weights, e.into()))
}

/// Maps a candle error met while reading `weights` to one that names the likely cause.
pub(crate) fn corrupt(weights: &[PathBuf], error: Error) -> Error {
    match error {
        Error::Candle(e) => Error::InvalidModel {
            path: weights.first().cloned().unwrap_or_default(),
            message: format!(
                "{e} (the safetensors file may be corrupt, or not this model's weights)"
            ),
        },
        other => other,
    }
}
