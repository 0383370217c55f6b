//! Helpers shared by the cross-crate tests.
#![allow(dead_code)]

use dynexec_core::hub::{Hub, ModelFiles};
use std::path::PathBuf;

/// The default decoder's files. Pulled (and cached) on first use, like the CLI does; CI pulls
/// it beforehand with `dynexec models pull`.
pub fn smollm2_files() -> ModelFiles {
    let mut hub = Hub::from_env().expect("manifest");
    hub.progress = false;
    hub.resolve("smollm2-135m-instruct").expect(
        "smollm2-135m-instruct must be available: run `dynexec models pull smollm2-135m-instruct`",
    )
}

pub fn smollm2_gguf() -> PathBuf {
    smollm2_files()
        .find(".gguf")
        .expect("gguf file")
        .to_path_buf()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
