//! A resolved model's files, where the cache lives, and the one thing model loaders need
//! from whatever finds models: [`Resolve`]. Pulling itself (manifest, hub, mirrors) lives
//! in dynexec-hub, so the model crates depend on no network code.

use crate::Result;
use std::path::{Path, PathBuf};

/// The files of a resolved model, all present on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for, for messages and reports.
    pub name: String,
    /// Paths of the model's files (for manifest models, in the manifest's order).
    pub files: Vec<PathBuf>,
}

impl ModelFiles {
    /// The first file whose name ends with `suffix` (e.g. `.gguf`, `config.json`).
    pub fn find(&self, suffix: &str) -> Option<&Path> {
        self.files
            .iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(suffix))
            })
            .map(PathBuf::as_path)
    }

    /// Every file whose name ends with `suffix`, in order.
    pub fn find_all(&self, suffix: &str) -> Vec<&Path> {
        self.files
            .iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(suffix))
            })
            .map(PathBuf::as_path)
            .collect()
    }
}

/// Turns a model reference (a manifest name, `hf:ORG/REPO[@REV][:FILE]`, a local path) into
/// files on disk, fetching them first if needed. dynexec-hub's `Hub` is the implementation
/// front-ends use.
pub trait Resolve {
    /// The files of `reference`, all present on disk.
    fn resolve(&self, reference: &str) -> Result<ModelFiles>;
}

/// `$DYNEXEC_CACHE`, else the platform cache folder + `dynexec`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DYNEXEC_CACHE") {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("dynexec")
}
