//! Helpers shared by the test binaries: running the `lomar` binary, test batches drawn
//! like the sampler draws them, finding a GPU (or saying why a GPU test skips), and
//! tensor comparisons that report every tensor before failing.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

pub mod fd;
pub mod naive;

use anyhow::Context;
use cudarc::driver::sys::CUevent_flags;
use lomar::backend::{AdamWStep, Backend, MicroBatches, Moments, StepReport, StepSettings};
use lomar::config::ModelConfig;
use lomar::cpu::CpuBackend;
use lomar::cuda::Gpu;
use lomar::data::batch::{Batch, Pixels};
use lomar::dist::Collective;
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

/// Median µs per call of `f` on `gpu`'s stream over `timings` timings of `reps` calls
/// each, after one untimed call.
pub fn median_us(
    gpu: &Gpu,
    reps: usize,
    timings: usize,
    f: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    let mut samples = Vec::new();
    for _ in 0..timings {
        let start = gpu.ctx().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = gpu.ctx().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(gpu.stream())?;
        for _ in 0..reps {
            f()?;
        }
        end.record(gpu.stream())?;
        samples.push(start.elapsed_ms(&end)? as f64 * 1e3 / reps as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[timings / 2])
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

/// The initial parameters of `m` from `seed`, each moved by N(0, 0.05²): away from the
/// initialisation's zeros and ones, so every gradient path carries signal.
pub fn test_params(m: &ModelConfig, seed: u64) -> Vec<f32> {
    let mut flat = ParamLayout::new(m).init(seed);
    let mut r = rng(seed + 1);
    for v in &mut flat {
        *v += (0.05 * standard_normal(&mut r)) as f32;
    }
    flat
}

/// Compares every named tensor of two flat buffers, each within `tol(name)`.
pub fn compare_tensors(
    report: &mut Report,
    layout: &ParamLayout,
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: impl Fn(&str) -> f64,
) {
    for e in layout.entries() {
        report.close(
            &format!("{what} {}", e.name),
            &got[e.range()],
            &want[e.range()],
            tol(&e.name),
        );
    }
}

/// How far the parameters `a` of a data-parallel run are from `b`, the single process's
/// with the same global batch, both trained from `init`: the largest difference in units
/// of the peak learning rate, and RMS(a - b) / RMS(b - init).
///
/// The two compute the same sums in another order. A parameter whose gradient is only
/// rounding noise can move by up to about the learning rate per step either way under
/// AdamW, so the largest difference is bounded by a fraction of the learning rate, not by
/// f32 epsilon; over all parameters, the difference is a small fraction of what training
/// moved them (a rank training on other images than its share moves them by as much).
pub fn parallel_gap(a: &[f32], b: &[f32], init: &[f32], peak_lr: f64) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let rms = |x: &mut dyn Iterator<Item = f64>| {
        let (sum, n) = x.fold((0.0, 0usize), |(s, n), v| (s + v * v, n + 1));
        (sum / n as f64).sqrt()
    };
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let gap = rms(&mut a.iter().zip(b).map(|(x, y)| (x - y) as f64));
    let moved = rms(&mut b.iter().zip(init).map(|(x, y)| (x - y) as f64));
    (max / peak_lr, gap / moved)
}

/// Requires [`parallel_gap`] within what reordered sums explain: at most half the peak
/// learning rate anywhere, and 1e-3 of the distance trained over all parameters.
pub fn assert_same_training(a: &[f32], b: &[f32], init: &[f32], peak_lr: f64, what: &str) {
    let (max_in_lr, rms_ratio) = parallel_gap(a, b, init, peak_lr);
    eprintln!("{what}: largest difference {max_in_lr:.2e} x lr, RMS ratio {rms_ratio:.2e}");
    assert!(
        max_in_lr <= 0.5 && rms_ratio <= 1e-3,
        "{what}: largest difference {max_in_lr:.2e} x lr, RMS of the difference {rms_ratio:.2e} of the distance trained"
    );
}

/// The f32 backend's loss and gradients against the f64 model's: the loss within 1e-5
/// relative, each tensor's gradient within 1e-4 relative in the L2 norm of the difference.
pub fn assert_f32_matches_f64(
    layout: &ParamLayout,
    (loss32, grads32): (f64, &[f32]),
    (loss64, grads64): (f64, &[f64]),
) {
    assert!(
        (loss32 - loss64).abs() <= 1e-5 * loss64,
        "{loss32} vs {loss64}"
    );
    for e in layout.entries() {
        let (g32, g64) = (&grads32[e.range()], &grads64[e.range()]);
        let diff = g32
            .iter()
            .zip(g64)
            .map(|(&a, b)| (a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = g64.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(
            diff <= 1e-4 * norm,
            "{}: |g32 - g64| = {diff:e}, |g64| = {norm:e}",
            e.name
        );
    }
}

/// AdamW step `t` at learning rate `lr` with the settings the tests train with: betas 0.9
/// and 0.95, ε 1e-8, weight decay 0.05, no clipping.
pub fn adamw(t: u64, lr: f32) -> AdamWStep {
    AdamWStep {
        t,
        lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.05,
        grad_scale: 1.0,
    }
}

/// The micro-batches of one step, from a slice.
pub struct MicroList<'a> {
    batches: &'a [Batch],
    next: usize,
}

impl<'a> MicroList<'a> {
    pub fn new(batches: &'a [Batch]) -> Self {
        MicroList { batches, next: 0 }
    }
}

impl MicroBatches for MicroList<'_> {
    fn count(&self) -> usize {
        self.batches.len()
    }
    fn next(&mut self) -> anyhow::Result<&Batch> {
        let b = self.batches.get(self.next).context("no micro-batch left")?;
        self.next += 1;
        Ok(b)
    }
}

/// Step `t`'s settings for `Backend::train_step` in the tests: AdamW as [`adamw`] at
/// lr 1e-3, the gradient clipped to norm 0.5.
pub fn step_settings(t: u64) -> StepSettings {
    StepSettings {
        t,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.05,
        clip_grad: Some(0.5),
    }
}

/// `steps` steps through `Backend::train_step` of `micro` micro-batches each from
/// `batches` (cycled), averaged over `comm`, on a backend that reports one step late (the
/// GPU); every report (the last from `finish_steps`), then the parameters and moments.
pub fn train_steps(
    b: &mut dyn Backend,
    batches: &[Batch],
    micro: usize,
    steps: u64,
    comm: &mut dyn Collective,
) -> (Vec<StepReport>, Vec<f32>, Moments) {
    let mut reports = Vec::new();
    for t in 1..=steps {
        let at = (t as usize - 1) * micro % batches.len();
        let mut list = MicroList::new(&batches[at..at + micro]);
        let r = b.train_step(&mut list, &step_settings(t), comm).unwrap();
        match t {
            1 => assert!(r.is_none(), "a report before any step finished: {r:?}"),
            _ => assert_eq!(r.map(|r| r.step), Some(t - 1), "step {t} reported"),
        }
        reports.extend(r);
    }
    reports.extend(b.finish_steps().unwrap());
    assert!(b.finish_steps().unwrap().is_none());
    (reports, b.params().unwrap(), b.moments().unwrap())
}

/// The losses of 30 AdamW steps (lr 1e-3) of an f32 CPU backend from `params` on the one
/// `batch`, each step's gradient checked to be non-zero.
pub fn overfit_losses(m: &ModelConfig, params: Vec<f32>, batch: &Batch) -> Vec<f32> {
    let mut backend = CpuBackend::new(m, params).unwrap();
    (1..=30)
        .map(|t| {
            backend.zero_grads().unwrap();
            let loss = backend.forward_backward(batch, 1.0).unwrap();
            assert!(
                backend.grad_norm().unwrap() > 0.0,
                "step {t}: zero gradient"
            );
            backend.adamw_step(&adamw(t, 1e-3)).unwrap();
            loss
        })
        .collect()
}
