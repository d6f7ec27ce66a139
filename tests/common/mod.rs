//! Helpers shared by the test binaries: running the `lomar` binary, and test batches
//! drawn like the sampler draws them, from a seeded ChaCha stream.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use lomar::batch::Batch;
use lomar::config::ModelConfig;
use lomar::params::standard_normal;
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
        images,
        window_origin,
        mask_index,
    };
    batch.validate(m).unwrap();
    batch
}
