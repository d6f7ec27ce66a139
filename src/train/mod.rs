//! The training loop, written once over the `Backend` trait (docs/DESIGN.md §1.4).
//!
//! Per optimiser step: zero the gradients, accumulate `accum` micro-batches each scaled by
//! `1/accum`, take the global gradient norm (for the log, the divergence check and
//! clipping), then one AdamW update at the scheduled learning rate. A non-finite loss or
//! gradient norm stops the run before the update, so no bad state reaches a checkpoint.
//! On a GPU the next micro-batch is prepared on a worker thread while the current one runs
//! (`data::prefetch`).
//!
//! In a data-parallel run (`train_ranks`) every rank runs this same loop on its share of
//! each global micro-batch; after the last micro-batch the gradients and the loss are
//! averaged over the ranks (`ranks.rs`), so the norm, the clipping, the divergence check
//! and the update are the same on every rank. Rank 0 alone writes checkpoints, metrics and
//! the progress line.

mod checkpointing;
pub mod metrics;
pub mod optim;
mod ranks;

pub use checkpointing::{start, Start};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::backend::{AdamWStep, Backend};
use crate::config::Config;
use crate::data::prefetch::{Batches, Prepared};
use crate::data::BatchSource;
use crate::dist::{Collective, Solo};
use crate::train::metrics::{progress_line, MetricsLog, StepRecord};
use crate::train::optim::learning_rate;

/// Where a run writes and how often.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Receives `checkpoint.safetensors` and `metrics.jsonl`.
    pub out_dir: PathBuf,
    /// Write a checkpoint every this many steps; 0 writes one at the end only.
    pub checkpoint_every: u64,
    /// Print a progress line every this many steps (and after the first and last).
    pub log_every: u64,
    /// End this process after this step, with a checkpoint, without changing the
    /// schedule; `--resume` continues as if the run had never stopped.
    pub stop_after: Option<u64>,
}

/// The checkpoint a run in `out_dir` keeps (always the latest good state).
pub fn checkpoint_path(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoint.safetensors")
}

/// The per-step metrics a run in `out_dir` appends to.
pub fn metrics_path(out_dir: &Path) -> PathBuf {
    out_dir.join("metrics.jsonl")
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Optimiser steps completed, counting those before a resume.
    pub step: u64,
    /// Loss of the first and the last step this process ran.
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Trains from optimiser step `step` (0 for a fresh run; a checkpoint's step when
/// resuming, with the backend already holding its parameters and moments) to the end
/// of the schedule or `stop_after`.
pub fn train(
    backend: &mut dyn Backend,
    config: &Config,
    step: u64,
    source: BatchSource,
    opts: &TrainOptions,
) -> Result<Outcome> {
    train_ranks(backend, config, step, source, opts, &mut Solo)
}

/// [`train`] as rank `comm.rank()` of a data-parallel run of `comm.world()` ranks:
/// `source` draws this rank's share of every global micro-batch.
pub fn train_ranks(
    backend: &mut dyn Backend,
    config: &Config,
    mut step: u64,
    source: BatchSource,
    opts: &TrainOptions,
    comm: &mut dyn Collective,
) -> Result<Outcome> {
    let t = &config.train;
    ranks::check_world(config, comm)?;
    let lead = comm.rank() == 0;
    let end = opts.stop_after.map_or(t.steps, |s| s.min(t.steps));
    if step >= end {
        bail!(
            "nothing to train: the run is at step {step} and this process would stop at step {end}"
        );
    }
    let checkpoint = checkpoint_path(&opts.out_dir);
    let mut metrics = match lead {
        true => Some(MetricsLog::open(
            &metrics_path(&opts.out_dir),
            (step > 0).then_some(step),
        )?),
        false => None,
    };
    let first_step = step;
    let started = Instant::now();
    let images_per_step = t.effective_batch() as f64;
    let micro_scale = 1.0 / t.accum as f32;
    let mut last_saved: Option<u64> = None;
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut logged = LogWindow::default();
    let count = (end - step) * t.accum as u64;
    let mut batches = Batches::new(source, t.batch, count, !backend.computes_on_host())?;

    while step < end {
        let step_started = Instant::now();
        backend.zero_grads()?;
        let mut loss_sum = 0.0f64;
        let mut last: Option<Prepared> = None;
        for _ in 0..t.accum {
            let prepared = batches.draw()?;
            loss_sum += backend.forward_backward(&prepared.batch, micro_scale)? as f64;
            last = Some(prepared);
        }
        // The source's state after this step's last micro-batch.
        let Some(drawn) = last else {
            bail!("accum = 0: a step needs at least one micro-batch");
        };
        let loss = ranks::average(backend, comm, loss_sum / t.accum as f64)?;
        let grad_norm = backend.grad_norm()? as f64;
        let lr = learning_rate(t, step);
        let timed = |step_secs: f64| StepRecord {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            images_per_s: images_per_step / step_secs,
            elapsed_s: started.elapsed().as_secs_f64(),
            skipped_files: drawn.data.skipped_files(),
        };
        if !(loss.is_finite() && grad_norm.is_finite()) {
            let record = timed(step_started.elapsed().as_secs_f64());
            if let Some(m) = &mut metrics {
                m.write(&record)?;
            }
            bail!(
                "training diverged at step {}: loss {loss}, gradient norm {grad_norm}; stopped before the update. {}",
                step + 1,
                match last_saved {
                    Some(s) => format!("The last good checkpoint is {} (step {s}).", checkpoint.display()),
                    None => "This run wrote no checkpoint.".to_string(),
                }
            );
        }
        let clip_scale = t.clip_grad.map_or(1.0, |c| (c / grad_norm).min(1.0));
        backend.adamw_step(&AdamWStep {
            t: step + 1,
            lr: lr as f32,
            beta1: t.beta1 as f32,
            beta2: t.beta2 as f32,
            eps: t.eps as f32,
            weight_decay: t.weight_decay as f32,
            grad_scale: clip_scale as f32,
        })?;
        let step_secs = step_started.elapsed().as_secs_f64();
        let record = timed(step_secs);
        step += 1;
        if let Some(m) = &mut metrics {
            m.write(&record)?;
        }
        if step == first_step + 1 {
            first_loss = loss;
        }
        last_loss = loss;

        logged.add(&record, step_secs, images_per_step);
        let log_now = step == first_step + 1 || step.is_multiple_of(opts.log_every.max(1));
        if lead && (log_now || step == end) {
            let per_step = started.elapsed().as_secs_f64() / (step - first_step) as f64;
            let eta = Duration::from_secs_f64(per_step * (end - step) as f64);
            let line = progress_line(&logged.take(&record), t.steps, eta);
            println!("{line}{}", ranks::suffix(t.world));
        }
        let every = opts.checkpoint_every;
        if lead && (step == end || (every > 0 && step.is_multiple_of(every))) {
            checkpointing::save(backend, config, step, &drawn, &checkpoint)?;
            last_saved = Some(step);
        }
    }
    if lead && step < t.steps {
        println!(
            "stopped after step {step} of {}; continue with --resume {}",
            t.steps,
            checkpoint.display()
        );
    } else if lead {
        println!("done: checkpoint {} (step {step})", checkpoint.display());
    }
    Ok(Outcome {
        step,
        first_loss,
        last_loss,
    })
}

/// Averages the steps between two progress lines, so the line is not one noisy step.
#[derive(Default)]
struct LogWindow {
    steps: u64,
    loss: f64,
    images: f64,
    seconds: f64,
}

impl LogWindow {
    fn add(&mut self, r: &StepRecord, seconds: f64, images: f64) {
        self.steps += 1;
        self.loss += r.loss;
        self.images += images;
        self.seconds += seconds;
    }

    /// The window's means on top of the latest record, and a fresh window.
    fn take(&mut self, latest: &StepRecord) -> StepRecord {
        let mean = StepRecord {
            loss: self.loss / self.steps.max(1) as f64,
            images_per_s: self.images / self.seconds,
            ..latest.clone()
        };
        *self = LogWindow::default();
        mean
    }
}
