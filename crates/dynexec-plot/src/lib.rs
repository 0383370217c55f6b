//! dynexec-plot: PNG in and out for the front-ends and for library users.
//!
//! - [`heatmap`]: a matrix as a PNG heatmap (the analyzer's layer × layer plots, square or
//!   one model's layers against another's).
//! - [`curves`]: trade-off lines as a PNG (early exit's accuracy against layers saved).
//! - [`images`]: image files decoded to grey pixels (a classifier's input), and generated
//!   images written side by side as one PNG (the diffusion samples).
//!
//! ```no_run
//! use dynexec_plot::heatmap::{write_png, Heatmap};
//!
//! let labels: Vec<String> = (0..3).map(|l| l.to_string()).collect();
//! let values = [0.0, 0.2, 0.5, 0.2, 0.0, 0.3, 0.5, 0.3, 0.0];
//! let heatmap = Heatmap::square("CKA between layers", &labels, "layer", &values);
//! let drew_text = write_png(&heatmap, std::path::Path::new("layers.png"))?;
//! # Ok::<(), dynexec_plot::PlotError>(())
//! ```

#![warn(missing_docs)]

pub mod curves;
pub mod heatmap;
pub mod images;

use std::path::PathBuf;

/// What can go wrong reading or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Values and labels disagree.
    #[error("bad heatmap: {0}")]
    Shape(String),
    /// The plotting backend failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The PNG being drawn.
        path: PathBuf,
        /// The backend's error.
        message: String,
    },
    /// An input image could not be read or decoded.
    #[error("cannot read image {path} (PNG files are supported): {message}")]
    Unreadable {
        /// The image file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// An image could not be encoded or written.
    #[error("{path}: {message}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A folder could not be created.
    #[error("creating {path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tensor had the wrong shape or type.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result with [`PlotError`].
pub type Result<T> = std::result::Result<T, PlotError>;
