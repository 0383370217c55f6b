//! dynexec-spec: speculative decoding (Leviathan et al. 2023, Chen et al. 2023) with an
//! adaptive lookahead (DISCO, Mamou et al. 2024).
//!
//! A [`drafter::Drafter`] proposes tokens; the target verifies all of them in one forward
//! pass ([`verify`]), greedily (accept while the argmax agrees) or by rejection sampling
//! (accept with probability min(1, p/q), resample from max(0, p − q) on rejection), so the
//! output is exactly what the target alone would produce. A [`lookahead::Lookahead`] decides
//! how many tokens to draft. [`engine::generate_speculative`] ties them together, rolling the
//! KV caches of both models back to the accepted prefix after every step.

#![warn(missing_docs)]

pub mod batch;
pub mod cost;
pub mod disco;
pub mod draft_spec;
pub mod drafter;
pub mod engine;
pub mod lookahead;
pub mod token_ranking;
pub mod verify;
