//! dynexec-quant: cheaper layers, with their quality cost measured.
//!
//! - [`quantize_in_place`]: converts every linear layer of any model that implements
//!   [`HasLinears`] to F32, F16, Q8_0, Q4_0 or Q4_1 (embeddings and norms stay in float).
//! - [`gguf_export`]: writes a converted decoder as a GGUF that keeps the architecture
//!   metadata and the tokenizer, so it loads like any GGUF.
//! - [`perplexity`]: sliding-window perplexity on real text.

pub mod auto;
pub mod gguf_export;
pub mod perplexity;

pub use auto::{quantize_auto, AutoReport, QuantTarget};
use dynexec_core::Result;
pub use dynexec_models::linear::{HasLinears, WeightFormat};
use serde::Serialize;

/// What an in-place conversion changed.
#[derive(Debug, Clone, Serialize)]
pub struct QuantReport {
    pub format: WeightFormat,
    pub layers: usize,
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// Converts every linear layer of `model` to `format`, in place.
pub fn quantize_in_place(model: &mut impl HasLinears, format: WeightFormat) -> Result<QuantReport> {
    let mut report = QuantReport {
        format,
        layers: 0,
        bytes_before: 0,
        bytes_after: 0,
    };
    for (name, linear) in model.linears_mut() {
        report.bytes_before += linear.weight_bytes();
        let converted = linear
            .convert(format)
            .map_err(|e| dynexec_core::Error::InvalidArgument(format!("layer `{name}`: {e}")))?;
        report.bytes_after += converted.weight_bytes();
        *linear = converted;
        report.layers += 1;
    }
    Ok(report)
}
