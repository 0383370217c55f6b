//! dynexec-core: what every dynexec crate shares.
//!
//! - [`device`]: `--device auto|cpu|cuda[:N]|metal` parsing and selection.
//! - [`files`]: a resolved model's files, the cache folder, and [`files::Resolve`], what model
//!   loaders need from dynexec-hub (which pulls models; no network code lives here).
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or built from GGUF metadata, chat
//!   templates and incremental (streaming) detokenization.
//! - [`sampling`]: greedy, temperature, top-k, top-p and repetition-penalty sampling.
//! - [`card`]: the JSON cards saved next to trained weights.
//! - [`trace`]: hidden states captured per layer, saved as safetensors + JSON.
//! - [`stats`]: timing of prefill and decode, shared by every engine.
//! - [`error`]: the error type of the library crates.

#![warn(missing_docs)]

pub mod card;
pub mod chat_template;
pub mod device;
pub mod error;
pub mod files;
pub mod sampling;
pub mod stats;
pub mod tokenizer;
pub mod trace;

pub use error::{Error, Result, Setting};
