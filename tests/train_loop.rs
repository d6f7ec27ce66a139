//! The training loop's bookkeeping, checked against a backend that records every call:
//! accumulation, gradient scales, clipping, the schedule, divergence stops and
//! checkpoints.

use std::collections::VecDeque;

use anyhow::Result;
use lomar::backend::{AdamWStep, Backend, MicroBatches, Moments, StepReport, StepSettings};
use lomar::config::{preset, Config, TrainConfig};
use lomar::cpu::CpuBackend;
use lomar::data::batch::Batch;
use lomar::data::BatchSource;
use lomar::dist::Collective;
use lomar::io::checkpoint::CheckpointFile;
use lomar::params::ParamLayout;
use lomar::train::optim::learning_rate;
use lomar::train::{checkpoint_path, train, TrainOptions};

#[derive(Debug, PartialEq)]
enum Call {
    Zero,
    ForwardBackward { batch: Batch, grad_scale: f32 },
    Norm,
    Step(AdamWStep),
}

/// Returns scripted losses and norms, moves every parameter by `-lr` per step. Like a GPU
/// backend it leaves the host's cores free, so the loop prepares batches on its worker
/// thread: these tests cover that path, and the CPU backend's runs the in-line one.
struct Recorder {
    layout: ParamLayout,
    params: Vec<f32>,
    calls: Vec<Call>,
    losses: VecDeque<f32>,
    norm: f32,
    /// Set every parameter to NaN at this optimiser step.
    poison_at: Option<u64>,
}

impl Recorder {
    fn new(config: &Config, losses: &[f32], norm: f32) -> Self {
        let layout = ParamLayout::new(&config.model);
        Recorder {
            params: layout.init(0),
            layout,
            calls: Vec::new(),
            losses: losses.iter().copied().collect(),
            norm,
            poison_at: None,
        }
    }
}

impl Backend for Recorder {
    fn device_name(&self) -> String {
        "recorder".into()
    }
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<f32> {
        self.calls.push(Call::ForwardBackward {
            batch: batch.clone(),
            grad_scale,
        });
        Ok(self.losses.pop_front().unwrap_or(0.5))
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.calls.push(Call::Zero);
        Ok(())
    }
    fn grad_norm(&mut self) -> Result<f32> {
        self.calls.push(Call::Norm);
        Ok(self.norm)
    }
    fn adamw_step(&mut self, step: &AdamWStep) -> Result<()> {
        self.calls.push(Call::Step(*step));
        let value = if self.poison_at == Some(step.t) {
            f32::NAN
        } else {
            step.t as f32
        };
        self.params.fill(value);
        Ok(())
    }
    fn params(&mut self) -> Result<Vec<f32>> {
        Ok(self.params.clone())
    }
    fn set_params(&mut self, flat: &[f32]) -> Result<()> {
        self.params.copy_from_slice(flat);
        Ok(())
    }
    fn grads(&mut self) -> Result<Vec<f32>> {
        Ok(vec![0.0; self.params.len()])
    }
    fn moments(&mut self) -> Result<Moments> {
        let n = self.params.len();
        Ok(Moments {
            m: vec![0.25; n],
            v: vec![0.5; n],
        })
    }
    fn set_moments(&mut self, _: &Moments) -> Result<()> {
        Ok(())
    }
}

fn config(train: TrainConfig) -> Config {
    Config {
        preset: "tiny".into(),
        model: preset("tiny").unwrap(),
        train,
    }
}

fn options(dir: &std::path::Path, checkpoint_every: u64) -> TrainOptions {
    TrainOptions {
        out_dir: dir.to_path_buf(),
        checkpoint_every,
        log_every: 100,
        stop_after: None,
    }
}

#[test]
fn each_step_accumulates_scaled_micro_batches_then_updates_at_the_scheduled_rate() {
    let c = config(TrainConfig {
        batch: 2,
        accum: 3,
        steps: 4,
        warmup_steps: 2,
        clip_grad: Some(1.0),
        ..TrainConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut b = Recorder::new(&c, &[], 4.0);
    let source = BatchSource::new(&c.model, c.train.seed);
    let out = train(&mut b, &c, 0, source, &options(dir.path(), 0)).unwrap();
    assert_eq!(out.step, 4);

    let mut expected_batches = BatchSource::new(&c.model, c.train.seed);
    let mut want = Vec::new();
    for step in 0..4u64 {
        want.push(Call::Zero);
        for _ in 0..3 {
            want.push(Call::ForwardBackward {
                batch: expected_batches.next_batch(2).unwrap(),
                grad_scale: 1.0 / 3.0,
            });
        }
        want.push(Call::Norm);
        want.push(Call::Step(AdamWStep {
            t: step + 1,
            lr: learning_rate(&c.train, step) as f32,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
            // Norm 4 clipped to 1.
            grad_scale: 0.25,
        }));
    }
    assert_eq!(b.calls, want);
    // The checkpoint at the end records where the data and the sampler stand.
    let ck = CheckpointFile::open(&checkpoint_path(dir.path()))
        .unwrap()
        .load(&c.model)
        .unwrap();
    assert_eq!(ck.step, 4);
    assert_eq!(ck.data, expected_batches.data_state());
    assert_eq!(ck.sampler, expected_batches.sampler_state());
    assert!(ck.params.iter().all(|&v| v == 4.0));
}

#[test]
fn a_norm_under_the_clip_is_left_alone() {
    let c = config(TrainConfig {
        batch: 1,
        steps: 1,
        warmup_steps: 0,
        clip_grad: Some(10.0),
        ..TrainConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut b = Recorder::new(&c, &[], 4.0);
    let source = BatchSource::new(&c.model, 0);
    train(&mut b, &c, 0, source, &options(dir.path(), 0)).unwrap();
    match b.calls.last() {
        Some(Call::Step(s)) => assert_eq!(s.grad_scale, 1.0),
        other => panic!("last call {other:?}"),
    }
}

fn metrics_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint() {
    let c = config(TrainConfig {
        batch: 1,
        steps: 10,
        warmup_steps: 0,
        ..TrainConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut b = Recorder::new(&c, &[1.0, 0.9, f32::NAN], 1.0);
    let source = BatchSource::new(&c.model, 0);
    let err = train(&mut b, &c, 0, source, &options(dir.path(), 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("diverged at step 3: loss NaN"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let steps = b
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Step(_)))
        .count();
    assert_eq!(steps, 2, "no update after the NaN");
    let ck = CheckpointFile::open(&checkpoint_path(dir.path())).unwrap();
    assert_eq!(ck.step(), 2);
    let lines = metrics_lines(dir.path());
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["loss"].as_f64(), Some(0.8999999761581421));
    assert!(lines[2]["loss"].is_null());
}

#[test]
fn an_infinite_gradient_norm_stops_the_run() {
    let c = config(TrainConfig {
        batch: 1,
        steps: 3,
        warmup_steps: 0,
        ..TrainConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut b = Recorder::new(&c, &[], f32::INFINITY);
    let source = BatchSource::new(&c.model, 0);
    let err = train(&mut b, &c, 0, source, &options(dir.path(), 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gradient norm inf"), "{err}");
    assert!(err.contains("wrote no checkpoint"), "{err}");
    assert!(!checkpoint_path(dir.path()).exists());
}

#[test]
fn non_finite_parameters_never_reach_the_checkpoint() {
    let c = config(TrainConfig {
        batch: 1,
        steps: 5,
        warmup_steps: 0,
        ..TrainConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut b = Recorder::new(&c, &[], 1.0);
    b.poison_at = Some(3);
    let source = BatchSource::new(&c.model, 0);
    let err = train(&mut b, &c, 0, source, &options(dir.path(), 1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diverged at step 3: parameter patch_embed.proj.weight is NaN"),
        "{err}"
    );
    let ck = CheckpointFile::open(&checkpoint_path(dir.path()))
        .unwrap()
        .load(&c.model)
        .unwrap();
    assert_eq!(ck.step, 2);
    assert!(ck.params.iter().all(|&v| v == 2.0));
}

#[test]
fn stop_after_ends_early_on_the_full_schedule() {
    let c = config(TrainConfig {
        batch: 1,
        steps: 6,
        warmup_steps: 2,
        ..TrainConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut b = Recorder::new(&c, &[], 1.0);
    let opts = TrainOptions {
        stop_after: Some(3),
        ..options(dir.path(), 0)
    };
    let out = train(&mut b, &c, 0, BatchSource::new(&c.model, 0), &opts).unwrap();
    assert_eq!(out.step, 3);
    let lrs: Vec<f32> = b
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::Step(s) => Some(s.lr),
            _ => None,
        })
        .collect();
    let want: Vec<f32> = (0..3).map(|s| learning_rate(&c.train, s) as f32).collect();
    assert_eq!(lrs, want);
    assert_eq!(
        CheckpointFile::open(&checkpoint_path(dir.path()))
            .unwrap()
            .step(),
        3
    );
}

/// A CPU backend whose steps report one step late, as the GPU backend's do: each
/// `train_step` returns the previous step's report, a diverged step stops every later
/// update (the device's divergence flag stays raised), and `finish_steps` returns the
/// last report. `nan_at` poisons the first parameter just before that step, so its loss
/// is NaN.
struct OneStepLate {
    inner: CpuBackend,
    pending: Option<StepReport>,
    nan_at: Option<u64>,
    diverged: bool,
}

impl OneStepLate {
    fn new(c: &Config, nan_at: Option<u64>) -> Self {
        let params = ParamLayout::new(&c.model).init(c.train.seed);
        OneStepLate {
            inner: CpuBackend::new(&c.model, params).unwrap(),
            pending: None,
            nan_at,
            diverged: false,
        }
    }
}

impl Backend for OneStepLate {
    fn device_name(&self) -> String {
        "one step late".into()
    }
    fn layout(&self) -> &ParamLayout {
        self.inner.layout()
    }
    fn computes_on_host(&self) -> bool {
        true
    }
    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<f32> {
        self.inner.forward_backward(batch, grad_scale)
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.inner.zero_grads()
    }
    fn grad_norm(&mut self) -> Result<f32> {
        self.inner.grad_norm()
    }
    fn adamw_step(&mut self, step: &AdamWStep) -> Result<()> {
        self.inner.adamw_step(step)
    }
    fn params(&mut self) -> Result<Vec<f32>> {
        self.inner.params()
    }
    fn set_params(&mut self, flat: &[f32]) -> Result<()> {
        self.inner.set_params(flat)
    }
    fn grads(&mut self) -> Result<Vec<f32>> {
        self.inner.grads()
    }
    fn moments(&mut self) -> Result<Moments> {
        self.inner.moments()
    }
    fn set_moments(&mut self, moments: &Moments) -> Result<()> {
        self.inner.set_moments(moments)
    }
    fn train_step(
        &mut self,
        batches: &mut dyn MicroBatches,
        settings: &StepSettings,
        comm: &mut dyn Collective,
    ) -> Result<Option<StepReport>> {
        if self.nan_at == Some(settings.t) {
            let mut p = self.inner.params()?;
            p[0] = f32::NAN;
            self.inner.set_params(&p)?;
        }
        let report = if self.diverged {
            for _ in 0..batches.count() {
                batches.next()?;
            }
            StepReport {
                step: settings.t,
                loss: f64::NAN,
                grad_norm: f64::NAN,
                diverged: true,
            }
        } else {
            self.inner.train_step(batches, settings, comm)?.unwrap()
        };
        self.diverged = report.diverged;
        Ok(self.pending.replace(report))
    }
    fn finish_steps(&mut self) -> Result<Option<StepReport>> {
        Ok(self.pending.take())
    }
}

fn cpu_config() -> Config {
    config(TrainConfig {
        batch: 2,
        accum: 2,
        steps: 5,
        warmup_steps: 1,
        clip_grad: Some(0.05),
        ..TrainConfig::default()
    })
}

fn cpu_backend(c: &Config) -> CpuBackend {
    CpuBackend::new(&c.model, ParamLayout::new(&c.model).init(c.train.seed)).unwrap()
}

/// The fields of every metrics line that do not depend on the clock.
fn logged_values(dir: &std::path::Path) -> Vec<[serde_json::Value; 4]> {
    metrics_lines(dir)
        .into_iter()
        .map(|l| {
            [
                l["step"].clone(),
                l["loss"].clone(),
                l["grad_norm"].clone(),
                l["lr"].clone(),
            ]
        })
        .collect()
}

#[test]
fn reports_a_step_late_log_and_checkpoint_what_the_cpu_backend_does_in_line() {
    let c = cpu_config();
    let (in_line, late) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = || BatchSource::new(&c.model, c.train.seed);
    train(
        &mut cpu_backend(&c),
        &c,
        0,
        source(),
        &options(in_line.path(), 2),
    )
    .unwrap();
    let mut b = OneStepLate::new(&c, None);
    train(&mut b, &c, 0, source(), &options(late.path(), 2)).unwrap();
    let want = logged_values(in_line.path());
    assert_eq!(want.len(), 5);
    assert!(want
        .iter()
        .all(|v| v[1].as_f64().is_some_and(f64::is_finite)));
    assert_eq!(logged_values(late.path()), want);
    let load = |dir: &tempfile::TempDir| {
        CheckpointFile::open(&checkpoint_path(dir.path()))
            .unwrap()
            .load(&c.model)
            .unwrap()
    };
    let (got, want) = (load(&late), load(&in_line));
    assert_eq!(got.step, 5);
    // Field by field (the file's metadata order varies); a failure names the field.
    assert!(
        got.params == want.params,
        "the parameters after step 5 differ"
    );
    assert!(
        got.moments == want.moments,
        "the moments after step 5 differ"
    );
    assert_eq!(
        (got.sampler, got.data),
        (want.sampler, want.data),
        "the source state"
    );
}

#[test]
fn a_nan_reported_a_step_late_stops_the_run_with_the_previous_checkpoint() {
    let c = config(TrainConfig {
        steps: 6,
        ..cpu_config().train
    });
    let clean = tempfile::tempdir().unwrap();
    let source = || BatchSource::new(&c.model, c.train.seed);
    let stop = TrainOptions {
        stop_after: Some(2),
        ..options(clean.path(), 2)
    };
    train(&mut cpu_backend(&c), &c, 0, source(), &stop).unwrap();
    let load = |dir: &std::path::Path| {
        CheckpointFile::open(&checkpoint_path(dir))
            .unwrap()
            .load(&c.model)
            .unwrap()
    };
    let after_two = load(clean.path());

    let dir = tempfile::tempdir().unwrap();
    let mut b = OneStepLate::new(&c, Some(3));
    let err = train(&mut b, &c, 0, source(), &options(dir.path(), 2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "training diverged at step 3: loss NaN, gradient norm NaN; stopped before the update"
        ),
        "{err}"
    );
    assert!(err.contains("(step 2)"), "{err}");
    let ck = load(dir.path());
    assert_eq!(ck.step, 2);
    assert!(
        ck.params == after_two.params,
        "the parameters after step 2 differ"
    );
    assert!(
        ck.moments == after_two.moments,
        "the moments after step 2 differ"
    );
    // Steps 3 and 4 (queued before the report of 3 arrived) left the parameters alone.
    let params = b.params().unwrap();
    assert!(params[0].is_nan());
    assert!(
        params[1..] == after_two.params[1..],
        "a diverged step changed the parameters"
    );
    let lines = metrics_lines(dir.path());
    assert_eq!(lines.len(), 3);
    assert!(lines[2]["loss"].is_null());
}
