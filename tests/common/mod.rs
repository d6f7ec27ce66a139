//! Running the `lomar` binary from tests.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `lomar` with `args` in `dir`.
pub fn lomar(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lomar"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the lomar binary runs")
}

/// Runs `lomar` and requires success; returns stdout.
pub fn lomar_ok(dir: &Path, args: &[&str]) -> String {
    let out = lomar(dir, args);
    assert!(
        out.status.success(),
        "lomar {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `lomar` and requires a clean failure: exit code 1, an `error: ` line, no panic.
/// Returns stderr.
pub fn lomar_err(dir: &Path, args: &[&str]) -> String {
    let out = lomar(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "lomar {args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "lomar {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "lomar {args:?}: {stderr}");
    stderr
}
