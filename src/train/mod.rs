//! The training loop, written once over the `Backend` trait (docs/DESIGN.md §1.4).
//!
//! Per optimiser step the backend's `train_step` zeroes the gradients, accumulates `accum`
//! micro-batches each scaled by `1/accum`, takes the global gradient norm (for the log, the
//! divergence check and clipping), then applies one AdamW update at the scheduled learning
//! rate, unless the loss or the norm is not finite. Its report (loss, norm, diverged) may
//! arrive a step late: a GPU runs ahead of the host. A diverged report stops the run with
//! the parameters as they were before that step; a checkpoint is written only after the
//! backend finished its queued steps and every report up to it was clean, so no bad state
//! reaches a checkpoint. On a GPU the next micro-batch is prepared on a worker thread while
//! the current one runs (`data::prefetch`).
//!
//! In a data-parallel run (`train_ranks`) every rank runs this same loop on its share of
//! each global micro-batch; inside the step, after the last micro-batch, the gradients and
//! the loss are averaged over the ranks, so the norm, the clipping, the divergence check
//! and the update are the same on every rank. Rank 0 alone writes checkpoints, metrics and
//! the progress line.

mod checkpointing;
pub mod metrics;
pub mod optim;
mod ranks;

pub use checkpointing::{start, Start};

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::backend::{Backend, MicroBatches, StepReport, StepSettings};
use crate::config::Config;
use crate::data::batch::Batch;
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
    let mut log = StepLog {
        metrics: match lead {
            true => Some(MetricsLog::open(
                &metrics_path(&opts.out_dir),
                (step > 0).then_some(step),
            )?),
            false => None,
        },
        checkpoint: checkpoint_path(&opts.out_dir),
        lead,
        first_step: step,
        end,
        total_steps: t.steps,
        world: t.world,
        log_every: opts.log_every,
        started: Instant::now(),
        images_per_step: t.effective_batch() as f64,
        queued: VecDeque::new(),
        reported: None,
        last_saved: None,
        first_loss: f64::NAN,
        last_loss: f64::NAN,
        window: LogWindow::default(),
    };
    let count = (end - step) * t.accum as u64;
    let mut batches = Batches::new(source, t.batch, count, !backend.computes_on_host())?;

    while step < end {
        let step_started = Instant::now();
        let lr = learning_rate(t, step);
        let settings = StepSettings {
            t: step + 1,
            lr: lr as f32,
            beta1: t.beta1 as f32,
            beta2: t.beta2 as f32,
            eps: t.eps as f32,
            weight_decay: t.weight_decay as f32,
            clip_grad: t.clip_grad,
        };
        let mut micro = StepBatches {
            batches: &mut batches,
            count: t.accum,
            last: None,
        };
        let report = backend.train_step(&mut micro, &settings, comm)?;
        // The source's state after this step's last micro-batch.
        let Some(drawn) = micro.last else {
            bail!("accum = 0: a step needs at least one micro-batch");
        };
        step += 1;
        log.queued.push_back(Queued {
            step,
            lr,
            drawn,
            seconds: step_started.elapsed().as_secs_f64(),
        });
        if let Some(r) = report {
            log.record(&r)?;
        }
        let every = opts.checkpoint_every;
        let save = lead && (step == end || (every > 0 && step.is_multiple_of(every)));
        if save || step == end {
            // A checkpoint holds the state after this step, read only once the reports of
            // every step up to it were clean.
            if let Some(r) = backend.finish_steps()? {
                log.record(&r)?;
            }
            if let Some(drawn) = log.saved_state(step, save)? {
                checkpointing::save(backend, config, step, &drawn, &log.checkpoint)?;
                log.last_saved = Some(step);
            }
        }
    }
    if lead && step < t.steps {
        println!(
            "stopped after step {step} of {}; continue with --resume {}",
            t.steps,
            log.checkpoint.display()
        );
    } else if lead {
        println!(
            "done: checkpoint {} (step {step})",
            log.checkpoint.display()
        );
    }
    Ok(Outcome {
        step,
        first_loss: log.first_loss,
        last_loss: log.last_loss,
    })
}

/// One step's micro-batches, drawn as the backend asks for them; keeps the last, whose
/// source state a checkpoint after the step records.
struct StepBatches<'a> {
    batches: &'a mut Batches,
    count: usize,
    last: Option<Prepared>,
}

impl MicroBatches for StepBatches<'_> {
    fn count(&self) -> usize {
        self.count
    }

    fn next(&mut self) -> Result<&Batch> {
        let prepared = self.batches.draw()?;
        Ok(&self.last.insert(prepared).batch)
    }
}

/// A step the backend has queued whose report has not arrived yet.
struct Queued {
    /// 1-based.
    step: u64,
    lr: f64,
    drawn: Prepared,
    /// The host's time for the loop iteration that queued it.
    seconds: f64,
}

/// The loop's bookkeeping of reports: metrics, progress lines and the divergence stop.
/// Reports arrive in step order, as late as the backend runs ahead.
struct StepLog {
    metrics: Option<MetricsLog>,
    checkpoint: PathBuf,
    lead: bool,
    first_step: u64,
    end: u64,
    total_steps: u64,
    world: usize,
    log_every: u64,
    started: Instant,
    images_per_step: f64,
    /// Steps queued and not yet reported, oldest first.
    queued: VecDeque<Queued>,
    /// The last step reported: a checkpoint after it records its source state.
    reported: Option<Queued>,
    last_saved: Option<u64>,
    first_loss: f64,
    last_loss: f64,
    window: LogWindow,
}

impl StepLog {
    /// Logs the report of the oldest queued step, or stops the run when it diverged.
    fn record(&mut self, r: &StepReport) -> Result<()> {
        let Some(q) = self.queued.pop_front() else {
            bail!(
                "internal: the backend reported step {}, which the loop never queued",
                r.step
            );
        };
        if q.step != r.step {
            bail!(
                "internal: the backend reported step {} before step {}",
                r.step,
                q.step
            );
        }
        let step = r.step;
        let record = StepRecord {
            step,
            loss: r.loss,
            lr: q.lr,
            grad_norm: r.grad_norm,
            images_per_s: self.images_per_step / q.seconds,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            skipped_files: q.drawn.data.skipped_files(),
        };
        if let Some(m) = &mut self.metrics {
            m.write(&record)?;
        }
        if r.diverged {
            bail!(
                "training diverged at step {step}: loss {}, gradient norm {}; stopped before the update. {}",
                r.loss,
                r.grad_norm,
                match self.last_saved {
                    Some(s) => format!(
                        "The last good checkpoint is {} (step {s}).",
                        self.checkpoint.display()
                    ),
                    None => "This run wrote no checkpoint.".to_string(),
                }
            );
        }
        if step == self.first_step + 1 {
            self.first_loss = r.loss;
        }
        self.last_loss = r.loss;
        self.window.add(&record, q.seconds, self.images_per_step);
        let log_now = step == self.first_step + 1 || step.is_multiple_of(self.log_every.max(1));
        if self.lead && (log_now || step == self.end) {
            let per_step = self.started.elapsed().as_secs_f64() / (step - self.first_step) as f64;
            let eta = Duration::from_secs_f64(per_step * (self.end - step) as f64);
            let line = progress_line(&self.window.take(&record), self.total_steps, eta);
            println!("{line}{}", ranks::suffix(self.world));
        }
        self.reported = Some(q);
        Ok(())
    }

    /// After the backend finished its queued steps: the source state after `step`, the
    /// last one, when `save` asks for it. Errors unless every queued step was reported.
    fn saved_state(&mut self, step: u64, save: bool) -> Result<Option<Prepared>> {
        let last = self.reported.take().filter(|q| q.step == step);
        if !self.queued.is_empty() || last.is_none() {
            bail!("internal: step {step} finished without a report from the backend");
        }
        Ok(last.filter(|_| save).map(|q| q.drawn))
    }
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
