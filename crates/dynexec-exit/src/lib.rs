//! dynexec-exit: early exit — stop at the layer an input needs.
//!
//! A backbone (BERT-family encoder or small CNN) gets an exit head after every layer
//! ([`heads`]); an [`policy::ExitPolicy`] (confidence, entropy, patience, fixed) decides after
//! each layer whether to stop; [`train`] fits the heads (frozen backbone) or heads and backbone
//! together with AdamW on a loss whose weights grow with depth; [`calibrate`] picks the
//! thresholds that stop earliest within an accuracy budget on the validation split. The
//! result is saved as weights plus a JSON [`card::ExitCard`]. For decoders, [`token_exit`]
//! lets each generated token leave at an exit layer (CALM), through adapters trained by
//! distillation from the final layer, when a measure — such as the learned
//! [`exit_classifier`] — says the deeper layers would not change it.

#![warn(missing_docs)]

pub mod assemble;
pub mod bench;
pub mod calibrate;
pub mod card;
pub mod data;
pub mod distill;
pub mod exit_classifier;
pub mod heads;
pub mod model;
pub mod policy;
pub mod token_exit;
pub mod train;

pub use dynexec_core::{Error, Result};
