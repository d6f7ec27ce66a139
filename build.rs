//! Compiles every `kernels/*.cu` with nvcc into a fatbin and embeds it, so the binary
//! needs no CUDA toolkit at run time. Without nvcc the crate still builds, CPU-only.
//!
//! Environment:
//! - `NVCC`: the nvcc to use; else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then `nvcc`
//!   on `PATH`.
//! - `LOMAR_CUDA_GENCODE`: replaces the default targets (whitespace-separated nvcc flags).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// sm_80 and sm_90 machine code plus compute_80 PTX, so one build loads on A100, H100 and
/// H200 (and JIT-compiles on anything newer).
const DEFAULT_GENCODE: &str = "-gencode=arch=compute_80,code=sm_80 \
     -gencode=arch=compute_90,code=sm_90 \
     -gencode=arch=compute_80,code=compute_80";

/// Where the pinned nvcc wheels are listed; a newer nvvm emits PTX the CUDA 13.0 driver
/// cannot load.
const NVCC_INSTALL_HINT: &str = "pip install --target DIR -r scripts/nvcc-requirements.txt, \
     then set NVCC=DIR/nvidia/cu13/bin/nvcc";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "LOMAR_CUDA_GENCODE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let sources = kernel_sources(Path::new("kernels"));
    let built = match find_nvcc() {
        Some(nvcc) => {
            compile_all(&nvcc, &sources, &out_dir);
            true
        }
        None => {
            println!(
                "cargo:warning=nvcc not found: building without CUDA kernels (the CPU backend \
                 still works). To build the GPU backend: {NVCC_INSTALL_HINT}"
            );
            false
        }
    };
    write_bindings(&sources, &out_dir, built);
}

/// The `.cu` files, sorted so the generated bindings are stable.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("listing kernels/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    sources
}

/// The first nvcc that answers `--version`.
fn find_nvcc() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(nvcc) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(nvcc));
    }
    for root in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env::var_os(root) {
            candidates.push(Path::new(&dir).join("bin").join("nvcc"));
        }
    }
    candidates.push(PathBuf::from("nvcc"));
    candidates.into_iter().find(|nvcc| {
        Command::new(nvcc)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Compiles every source in parallel (nvcc is slow); any failure stops the build with
/// nvcc's own output. No `--use_fast_math`: GELU's erff/expf and the divisions and square
/// roots of LayerNorm, norm-pix and AdamW stay IEEE-accurate, which the fp32 parity with
/// the CPU reference relies on; those kernels are memory-bound, so it would buy nothing.
fn compile_all(nvcc: &Path, sources: &[PathBuf], out_dir: &Path) {
    let gencode = env::var("LOMAR_CUDA_GENCODE").unwrap_or_else(|_| DEFAULT_GENCODE.into());
    let jobs: Vec<(&PathBuf, Child)> = sources
        .iter()
        .map(|src| {
            let child = Command::new(nvcc)
                .args(["--fatbin", "-O3", "-std=c++17", "-lineinfo", "-Ikernels"])
                .args(gencode.split_whitespace())
                .arg("-o")
                .arg(fatbin_path(src, out_dir))
                .arg(src)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", nvcc.display()));
            (src, child)
        })
        .collect();
    let mut failures = String::new();
    for (src, child) in jobs {
        let out = child.wait_with_output().expect("waiting for nvcc");
        if !out.status.success() {
            let _ = writeln!(
                failures,
                "nvcc failed on {} ({}):\n{}{}",
                src.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    if !failures.is_empty() {
        panic!("{failures}");
    }
}

fn fatbin_path(src: &Path, out_dir: &Path) -> PathBuf {
    out_dir.join(src.with_extension("fatbin").file_name().expect("a file"))
}

/// `$OUT_DIR/kernels.rs`: one byte constant per source (empty when nvcc was missing) and
/// `KERNELS_BUILT`.
fn write_bindings(sources: &[PathBuf], out_dir: &Path, built: bool) {
    let mut rs = String::new();
    let _ = writeln!(rs, "/// Whether nvcc compiled the kernels into this build.");
    let _ = writeln!(rs, "pub const KERNELS_BUILT: bool = {built};");
    for src in sources {
        let stem = src.file_stem().expect("a file").to_string_lossy();
        let name = stem.to_uppercase().replace(['-', '.'], "_");
        let _ = writeln!(rs, "/// Fatbin of `kernels/{stem}.cu`.");
        if built {
            let _ = writeln!(
                rs,
                "pub const {name}: &[u8] = include_bytes!({:?});",
                fatbin_path(src, out_dir)
            );
        } else {
            let _ = writeln!(rs, "pub const {name}: &[u8] = &[];");
        }
    }
    fs::write(out_dir.join("kernels.rs"), rs).expect("writing kernels.rs");
}
