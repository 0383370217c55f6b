//! One module per subcommand; `common` holds what several of them share.

pub mod analyze;
pub mod bench;
pub mod chat;
pub mod classify;
pub mod common;
pub mod data;
pub mod diffuse;
pub mod diffusion;
pub mod eval;
pub mod exits;
pub mod generate;
pub mod models;
pub mod quantize;
pub mod serve;
pub mod spec;
