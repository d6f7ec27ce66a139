//! The CUDA kernels compiled as C++ for the CPU against the shim of `kernels/emu/` and run
//! under ThreadSanitizer (docs/DESIGN.md §7): a check of indexing, fragment layouts and
//! barriers that needs no GPU. It needs a C++17 compiler with `-fsanitize=thread` (`$CXX`,
//! else `g++`); without one these tests fail, they do not skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The compiler, from `$CXX` or `g++`.
fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".to_string())
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `main` (with `include_dirs` searched before `kernels/`) under ThreadSanitizer
/// into `dir/name`; panics with the compiler's output on failure.
fn compile(main: &Path, include_dirs: &[&Path], dir: &Path, name: &str) -> PathBuf {
    let exe = dir.join(name);
    let mut cmd = Command::new(compiler());
    cmd.args([
        "-std=c++17",
        "-O1",
        "-g",
        "-fsanitize=thread",
        "-pthread",
        "-Wall",
    ]);
    for inc in include_dirs {
        cmd.arg("-I").arg(inc);
    }
    cmd.arg("-I").arg(repo().join("kernels"));
    cmd.arg(main).arg("-o").arg(&exe);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run the C++ compiler `{}` ({e}); the kernel emulation tests need g++ with \
             ThreadSanitizer (set CXX to use another)",
            compiler()
        )
    });
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        main.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs an emulation binary with ThreadSanitizer stopping at the first report.
fn run(exe: &Path, args: &[&Path]) -> Output {
    Command::new(exe)
        .args(args)
        .env(
            "TSAN_OPTIONS",
            "halt_on_error=1 exitcode=66 report_signal_unsafe=0",
        )
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn shim_primitives_follow_the_ptx_isa() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(
        &repo().join("kernels/emu/shim_test.cpp"),
        &[],
        dir.path(),
        "shim_test",
    );
    let out = run(&exe, &[]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{}", describe(&out));
}

/// Compiles and runs one of the kernel drivers of `kernels/emu/` (which compare kernels
/// with a C++ reference and print one line per tensor), failing on any mismatch or race.
fn run_driver(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(
        &repo().join(format!("kernels/emu/{name}.cpp")),
        &[&repo().join("kernels/emu")],
        dir.path(),
        name,
    );
    let out = run(&exe, &[]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn bias_adds_casts_and_adamw_match_the_reference() {
    run_driver("elementwise_driver");
}

#[test]
fn gelu_and_its_fused_bias_gradient_match_the_reference() {
    run_driver("gelu_driver");
}

#[test]
fn layernorm_and_its_fused_backward_match_the_reference() {
    run_driver("layernorm_driver");
}

#[test]
fn column_sums_match_the_reference() {
    run_driver("reduce_driver");
}

#[test]
fn masked_mse_matches_the_reference() {
    run_driver("loss_driver");
}
