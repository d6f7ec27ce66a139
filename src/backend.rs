//! The one interface every backend implements, so the training loop, checkpoints and
//! parity tests are written once.

use anyhow::Result;

use crate::data::batch::Batch;
use crate::dist::Collective;
use crate::params::ParamLayout;
use crate::train::optim::clip_scale;

/// `--precision`: what the CUDA backend stores activations and matrix-product operands
/// in. Master weights, gradients, optimiser state and the loss are fp32 in both; the CPU
/// always computes in fp32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// bf16 operands, fp32 accumulation: the fast mode.
    Bf16,
    /// fp32 throughout, TF32 off: the reference mode.
    Fp32,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Bf16 => "bf16",
            Precision::Fp32 => "fp32",
        })
    }
}

/// One AdamW update's settings (docs/DESIGN.md §1.4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// 1-based optimiser step, for the bias corrections.
    pub t: u64,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Multiplies every gradient before the update (global-norm clipping).
    pub grad_scale: f32,
}

/// What one optimiser step applies after its micro-batches: AdamW at step `t` and rate
/// `lr`, with the gradients first scaled down to `clip_grad` (their global L2 norm) when
/// set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepSettings {
    /// 1-based optimiser step.
    pub t: u64,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub clip_grad: Option<f64>,
}

impl StepSettings {
    /// The update with the gradients multiplied by `grad_scale` (the clip scale).
    pub fn adamw(&self, grad_scale: f32) -> AdamWStep {
        AdamWStep {
            t: self.t,
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_scale,
        }
    }
}

/// What one optimiser step measured. `diverged`: its loss or gradient norm was not
/// finite, so the backend left the parameters and moments as they were before it (and
/// leaves them so for any step queued after it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The step's 1-based number ([`StepSettings::t`]).
    pub step: u64,
    /// Mean loss over the step's micro-batches (and ranks).
    pub loss: f64,
    pub grad_norm: f64,
    pub diverged: bool,
}

/// The micro-batches of one optimiser step, handed to the backend one at a time (so only
/// one is in memory while the backend computes).
pub trait MicroBatches {
    /// How many the step has (the accumulation count); each gradient is scaled by its
    /// inverse.
    fn count(&self) -> usize;
    /// The next micro-batch.
    fn next(&mut self) -> Result<&Batch>;
}

/// AdamW's first and second moments, flat like the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub trait Backend {
    /// What the backend runs on, for the progress line and result files.
    fn device_name(&self) -> String;

    fn layout(&self) -> &ParamLayout;

    /// Forward and backward on one micro-batch. Adds `grad_scale * dloss/dparam` to the
    /// gradient buffer and returns the batch's mean loss.
    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<f32>;

    fn zero_grads(&mut self) -> Result<()>;

    /// L2 norm of the whole gradient buffer.
    fn grad_norm(&mut self) -> Result<f32>;

    /// Applies AdamW to every parameter from the accumulated gradients.
    fn adamw_step(&mut self, step: &AdamWStep) -> Result<()>;

    fn params(&mut self) -> Result<Vec<f32>>;
    fn set_params(&mut self, flat: &[f32]) -> Result<()>;
    fn grads(&mut self) -> Result<Vec<f32>>;
    fn moments(&mut self) -> Result<Moments>;
    fn set_moments(&mut self, moments: &Moments) -> Result<()>;

    /// Replaces the accumulated gradients by their fp32 mean over the ranks of `comm`
    /// (data-parallel training). A backend that cannot take part says so.
    fn average_grads(&mut self, comm: &mut dyn Collective) -> Result<()> {
        let _ = comm;
        anyhow::bail!(
            "{} cannot average gradients across ranks (data-parallel runs need the CPU or CUDA backend)",
            self.device_name()
        )
    }

    /// [`Backend::forward_backward`] on a step's last micro-batch, followed by the
    /// average of the accumulated gradients over `comm` ([`Backend::average_grads`]). A
    /// backend that can averages each bucket of `dist::BucketPlan` as soon as its backward
    /// finishes it, overlapping the two.
    fn forward_backward_averaged(
        &mut self,
        batch: &Batch,
        grad_scale: f32,
        comm: &mut dyn Collective,
    ) -> Result<f32> {
        let loss = self.forward_backward(batch, grad_scale)?;
        self.average_grads(comm)?;
        Ok(loss)
    }

    /// One whole optimiser step: zero the gradients, forward and backward over every
    /// micro-batch of `batches` (each scaled by `1/count`), with several ranks the
    /// gradient and loss average over `comm`, the global gradient norm, the clip scale
    /// and, unless the loss or the norm is not finite, the AdamW update. A diverged step
    /// leaves the parameters and moments untouched.
    ///
    /// Returns the report of a step this backend queued earlier and that has now
    /// finished, oldest first, or `None`: a device backend returns the step before this
    /// one (it runs a step ahead of the host), this default, which computes in line,
    /// returns this step's. [`Backend::finish_steps`] returns the last one.
    fn train_step(
        &mut self,
        batches: &mut dyn MicroBatches,
        settings: &StepSettings,
        comm: &mut dyn Collective,
    ) -> Result<Option<StepReport>> {
        let count = batches.count();
        if count == 0 {
            anyhow::bail!("accum = 0: a step needs at least one micro-batch");
        }
        self.zero_grads()?;
        let micro_scale = 1.0 / count as f32;
        let mut loss_sum = 0.0f64;
        let averaging = comm.world() > 1;
        for i in 0..count {
            let batch = batches.next()?;
            // The gradients are final only in the last micro-batch's backward.
            loss_sum += match averaging && i + 1 == count {
                true => self.forward_backward_averaged(batch, micro_scale, comm)?,
                false => self.forward_backward(batch, micro_scale)?,
            } as f64;
        }
        let mut loss = loss_sum / count as f64;
        if averaging {
            let mut value = [loss as f32];
            comm.all_reduce_mean(&mut value)?;
            loss = value[0] as f64;
        }
        let grad_norm = self.grad_norm()? as f64;
        let diverged = !(loss.is_finite() && grad_norm.is_finite());
        if !diverged {
            let scale = clip_scale(settings.clip_grad, grad_norm);
            self.adamw_step(&settings.adamw(scale))?;
        }
        Ok(Some(StepReport {
            step: settings.t,
            loss,
            grad_norm,
            diverged,
        }))
    }

    /// Waits for every step [`Backend::train_step`] queued and returns the report not yet
    /// returned, if any. Afterwards the parameters and moments are those after the last
    /// queued step.
    fn finish_steps(&mut self) -> Result<Option<StepReport>> {
        Ok(None)
    }

    /// Waits for all queued work, so host clocks time finished work. The CPU backend
    /// computes synchronously.
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    /// True when the backend computes on the host's cores. The training loop then draws
    /// each batch itself: a worker preparing the next one would compete with the backend
    /// for the same cores (measured 2-6% slower on 2 cores) instead of overlapping it.
    fn computes_on_host(&self) -> bool {
        false
    }

    /// Device time of the last whole step, in milliseconds, from device events: from the
    /// end of the first micro-batch's upload to the end of the AdamW update. It leaves out
    /// the host's work before the upload and the copy, so beside the host-timed step it
    /// shows how long the device waited for the host. `None` where there are no device events (the
    /// CPU) or no step has finished.
    fn device_step_ms(&mut self) -> Result<Option<f64>> {
        Ok(None)
    }

    /// Most memory the backend has held for tensors, in bytes, where it can tell.
    fn peak_memory_bytes(&mut self) -> Option<u64> {
        None
    }
}
