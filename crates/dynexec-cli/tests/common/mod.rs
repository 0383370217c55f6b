//! Helpers the CLI test files share.
#![allow(dead_code)]

use serde_json::Value;
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
