//! dynexec-models: layer-addressable models on candle.
//!
//! Every model exposes its depth: embed, run layers `a..b` on a hidden state, apply the head.
//! Early exit stops after any layer, self-speculative drafting runs the first layers, and a
//! [`dynexec_core::trace::Trace`] taps any layer — no technique re-implements a model.
//!
//! - [`linear::Linear`]: the one linear type, dense or quantized (candle's `QMatMul`).
//! - [`llama::Llama`]: llama-family decoder (SmolLM2, Llama, Mistral, Qwen2) from GGUF or
//!   safetensors, with a truncatable [`kv_cache::KvCache`].
//! - [`bert::Bert`]: BERT-family encoder (all-MiniLM-L6-v2) with mean pooling.
//! - [`cnn::Cnn`]: small image CNN (Fashion-MNIST) whose blocks can be run one at a time.
//! - [`unet::Unet`]: small conditional UNet denoiser (Fashion-MNIST diffusion).
//! - [`generation`]: the decoding loop shared by `generate`, `bench` and the server.
//! - [`loading::load`]: a model reference to a decoder ready to run (load, convert, kernels).
//! - [`quantize`]: converting linear layers in place, to one format or per layer (`auto`).

#![warn(missing_docs)]

pub mod bert;
pub mod cnn;
pub mod conv;
pub mod cpu_kernels;
pub mod fused;
pub mod generation;
pub mod init;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod loading;
pub mod optim;
pub mod quantize;
mod safetensors;
pub mod unet;

pub use dynexec_core::{Error, Result};
