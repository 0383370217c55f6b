//! dynexec-quant: cheaper layers, with their quality cost measured.
//!
//! - [`quantize_in_place`]: converts every linear layer of any model that implements
//!   [`HasLinears`] to F32, F16, Q8_0, Q4_0 or Q4_1 (embeddings and norms stay in float).
//! - [`gguf_export`]: writes a converted decoder as a GGUF that keeps the architecture
//!   metadata and the tokenizer, so it loads like any GGUF.
//! - [`perplexity`]: sliding-window perplexity on real text.

#![warn(missing_docs)]

pub mod gguf_export;
pub mod perplexity;

pub use dynexec_models::linear::{HasLinears, WeightFormat};
/// In-place conversion lives with the models, so loading can convert; re-exported here.
pub use dynexec_models::quantize::{
    self as auto, quantize_auto, quantize_in_place, AutoReport, QuantReport, QuantTarget,
};
