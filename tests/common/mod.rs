//! Helpers shared by the test binaries: running the `lomar` binary, test batches drawn
//! like the sampler draws them, finding a GPU (or saying why a GPU test skips), and
//! tensor comparisons that report every tensor before failing.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use lomar::config::ModelConfig;
use lomar::cuda::Gpu;
use lomar::data::batch::{Batch, Pixels};
use lomar::params::{standard_normal, Init, ParamLayout};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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

/// A batch as the sampler would draw it: uniform window origins, `M` distinct ascending
/// mask indices per window, normal pixels.
pub fn sample_batch(m: &ModelConfig, images_len: usize, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images = (0..images_len * 3 * m.image * m.image)
        .map(|_| standard_normal(&mut rng) as f32)
        .collect();
    let seqs = images_len * m.windows_per_image;
    let max_origin = (m.grid() - m.window) as u32;
    let window_origin = (0..2 * seqs)
        .map(|_| rng.gen_range(0..=max_origin))
        .collect();
    let mut mask_index = Vec::new();
    for _ in 0..seqs {
        let mut picked: Vec<u32> = sample(&mut rng, m.window_area(), m.masked_per_window())
            .into_iter()
            .map(|i| i as u32)
            .collect();
        picked.sort_unstable();
        mask_index.extend(picked);
    }
    let batch = Batch {
        images_len,
        images: Pixels::Normalised(images),
        window_origin,
        mask_index,
    };
    batch.validate(m).unwrap();
    batch
}

/// The GPU, or `None` after printing `skipped: <reason>` when this machine has none. With
/// `LOMAR_REQUIRE_GPU=1` a missing GPU fails the test instead, so a GPU run cannot pass by
/// skipping. A machine with a GPU that fails to open fails the test.
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    if let Some(reason) = lomar::cuda::unavailable() {
        if std::env::var("LOMAR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("{test}: LOMAR_REQUIRE_GPU=1 but {reason}");
        }
        println!("{test}: skipped: {reason}");
        return None;
    }
    match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => panic!("{test}: a GPU is present but could not be opened: {e:#}"),
    }
}

/// The initialisation with every tensor that starts at 0 or 1 (biases, norms, tokens,
/// relative-bias tables) moved to that value plus N(0, `std(name)`), so no tensor can hide
/// a mistake.
pub fn random_params(m: &ModelConfig, seed: u64, std: impl Fn(&str) -> f64) -> Vec<f64> {
    let layout = ParamLayout::new(m);
    let mut params: Vec<f64> = layout.init(seed).iter().map(|&v| v as f64).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for e in layout.entries() {
        let centre = match e.init {
            Init::Zeros => 0.0,
            Init::Ones => 1.0,
            _ => continue,
        };
        let std = std(&e.name);
        for v in &mut params[e.range()] {
            *v = centre + standard_normal(&mut rng) * std;
        }
    }
    params
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [-scale, scale].
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Rounds every value through the storage type, so a CPU reference sees exactly the inputs
/// a bf16 kernel reads.
pub fn round_to<T: lomar::cuda::Storage>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

/// Compares tensors and keeps one line per tensor; `finish` prints them all and fails if any
/// tensor was off, so one GPU run shows every error at once.
pub struct Report {
    title: String,
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    pub fn new(title: impl Into<String>) -> Report {
        Report {
            title: title.into(),
            lines: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Relative error max|got - want| / max|want| against `tol`.
    pub fn close(&mut self, name: &str, got: &[f32], want: &[f32], tol: f64) {
        if got.len() != want.len() {
            let line = format!("{name}: length {} vs reference {}", got.len(), want.len());
            self.lines.push(line.clone());
            self.failures.push(line);
            return;
        }
        let (mut max_err, mut worst, mut max_ref, mut non_finite) = (0.0f64, 0, 0.0f64, 0);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if !g.is_finite() {
                non_finite += 1;
            }
            let err = (g as f64 - w as f64).abs();
            if err > max_err || err.is_nan() {
                max_err = err;
                worst = i;
            }
            max_ref = max_ref.max((w as f64).abs());
        }
        let rel = if max_ref > 0.0 {
            max_err / max_ref
        } else {
            max_err
        };
        let ok = non_finite == 0 && rel <= tol && rel.is_finite();
        let line = format!(
            "{} {name:<44} rel {rel:.3e} (tol {tol:.0e})  max err {max_err:.3e} at {worst} \
             (got {:.6e}, want {:.6e})  max|ref| {max_ref:.3e}{}",
            if ok { "ok  " } else { "FAIL" },
            got.get(worst).copied().unwrap_or(f32::NAN),
            want.get(worst).copied().unwrap_or(f32::NAN),
            if non_finite > 0 {
                format!("  {non_finite} non-finite")
            } else {
                String::new()
            }
        );
        if !ok {
            self.failures.push(line.clone());
        }
        self.lines.push(line);
    }

    /// Scalar comparison, relative to |want|.
    pub fn scalar(&mut self, name: &str, got: f64, want: f64, tol: f64) {
        let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
        let ok = rel <= tol;
        let line = format!(
            "{} {name:<44} rel {rel:.3e} (tol {tol:.0e})  got {got:.9e}  want {want:.9e}",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            self.failures.push(line.clone());
        }
        self.lines.push(line);
    }

    pub fn finish(self) {
        println!("== {}", self.title);
        for line in &self.lines {
            println!("  {line}");
        }
        assert!(
            self.failures.is_empty(),
            "{}: {} tensor(s) off:\n  {}",
            self.title,
            self.failures.len(),
            self.failures.join("\n  ")
        );
    }
}
