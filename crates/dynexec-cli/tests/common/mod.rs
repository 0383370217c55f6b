//! Helpers the CLI test files share.
#![allow(dead_code)]

pub mod server;

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Parses stdout as one JSON object, after checking the command succeeded.
pub fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "dynexec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Asserts a failure with a message containing `needle`, and no panic.
pub fn assert_clear_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "expected `{needle}` in: {stderr}"
    );
}

/// Runs the `dynexec` binary on the CPU, quietly.
pub fn dynexec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynexec"))
        .args(args)
        .args(["--device", "cpu", "--quiet"])
        .output()
        .expect("run dynexec")
}

/// A data set's folder, pulled into $DYNEXEC_CACHE on first use (parallel tests wait on one
/// pull), as `dynexec data path NAME` does.
pub fn data_dir(name: &str) -> PathBuf {
    let mut hub = dynexec_hub::Hub::from_env().expect("hub");
    hub.progress = false;
    hub.data_set(name)
        .unwrap_or_else(|e| panic!("pulling data set `{name}` failed: {e}"))
        .dir
}

/// The first `train` training and `test` test images of Fashion-MNIST as idx files.
pub fn small_fashion(train: usize, test: usize) -> tempfile::TempDir {
    let source = data_dir("fashion-mnist");
    let dir = tempfile::tempdir().unwrap();
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let images = std::fs::read(source.join(format!("{prefix}-images-idx3-ubyte"))).unwrap();
        let labels = std::fs::read(source.join(format!("{prefix}-labels-idx1-ubyte"))).unwrap();
        let count = (n as u32).to_be_bytes();
        let mut head = images[..16].to_vec();
        head[4..8].copy_from_slice(&count);
        head.extend_from_slice(&images[16..16 + n * 784]);
        std::fs::write(dir.path().join(format!("{prefix}-images-idx3-ubyte")), head).unwrap();
        let mut head = labels[..8].to_vec();
        head[4..8].copy_from_slice(&count);
        head.extend_from_slice(&labels[8..8 + n]);
        std::fs::write(dir.path().join(format!("{prefix}-labels-idx1-ubyte")), head).unwrap();
    }
    dir
}
