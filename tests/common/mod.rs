//! Shared by the GPU tests: finding a GPU (or saying why the test skips), random inputs,
//! and tensor comparisons that report every tensor before failing.

#![allow(dead_code)] // each test binary uses its own subset

use lomar::batch::Batch;
use lomar::config::ModelConfig;
use lomar::cuda::Gpu;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The tiny preset with two heads: head dim 32, the smallest the attention kernels are
/// built for.
pub fn tiny_d32() -> ModelConfig {
    ModelConfig {
        heads: 2,
        ..lomar::config::preset("tiny").expect("the tiny preset")
    }
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

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [-scale, scale].
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A batch drawn like the sampler draws one: per image and window a uniform origin and
/// exactly M masked positions, sorted.
pub fn random_batch(m: &ModelConfig, images_len: usize, seed: u64) -> Batch {
    let mut r = rng(seed);
    let seqs = images_len * m.windows_per_image;
    let max_origin = (m.grid() - m.window) as u32;
    let window_origin = (0..2 * seqs).map(|_| r.gen_range(0..=max_origin)).collect();
    let mut mask_index = Vec::with_capacity(seqs * m.masked_per_window());
    for _ in 0..seqs {
        let mut positions: Vec<u32> = (0..m.window_area() as u32).collect();
        positions.shuffle(&mut r);
        let mut masked = positions[..m.masked_per_window()].to_vec();
        masked.sort_unstable();
        mask_index.extend(masked);
    }
    let batch = Batch {
        images_len,
        images: uniform(&mut r, images_len * 3 * m.image * m.image, 2.0),
        window_origin,
        mask_index,
    };
    batch.validate(m).expect("the test batch is valid");
    batch
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
