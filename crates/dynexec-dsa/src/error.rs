//! The crate's one error type: every failure on user input is a value, never a panic.

use std::path::PathBuf;

/// Everything that can go wrong while reading arrays or analysing them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory being read or written.
        path: PathBuf,
        /// The underlying I/O error from the OS.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a .npy file this reader understands.
    #[error("invalid .npy data: {0}")]
    Npy(String),
    /// An array has the wrong number of axes or inconsistent sizes.
    #[error("bad shape: {0}")]
    Shape(String),
    /// A setting is out of range (zero delays, negative ridge, ...).
    #[error("invalid setting: {0}")]
    Config(String),
    /// Too few time points for the requested delay embedding.
    #[error("too few time points: {0}")]
    TooShort(String),
    /// Input contains NaN or infinity.
    #[error("input contains non-finite values ({0})")]
    NonFinite(String),
    /// A decomposition failed to converge (should not happen on finite input).
    #[error("linear algebra failed: {0}")]
    Numerical(String),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, Error>;
