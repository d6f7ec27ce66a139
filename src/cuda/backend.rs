//! [`CudaBackend`]: fp32 master weights, AdamW moments and gradients on the device, the
//! activations and GEMM operands in the chosen precision.

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};
use half::bf16;

use super::attention::HEAD_DIMS;
use super::blaslt::BlasLt;
use super::block::Net;
use super::device::Gpu;
use super::kernels::Kernels;
use super::launch::scratch_len;
use super::method::MethodActs;
use super::nvtx;
use super::storage::Storage;
use crate::backend::{AdamWStep, Backend, Moments, Precision};
use crate::config::ModelConfig;
use crate::data::batch::Batch;
use crate::dist::Collective;
use crate::params::{ModelRanges, ParamLayout};

/// The GPU backend. Runs on CUDA device 0.
pub struct CudaBackend {
    engine: Box<dyn Backend>,
}

impl CudaBackend {
    /// Uploads `params` (the flat buffer of [`ParamLayout`]) to the first GPU. Fails with
    /// a message, never a panic, when there is no driver, no GPU, no cuBLASLt, or no kernels
    /// in this build.
    pub fn new(model: &ModelConfig, params: Vec<f32>, precision: Precision) -> Result<CudaBackend> {
        model.validate()?;
        let layout = ParamLayout::new(model);
        layout.check_len("params", params.len())?;
        let decoder = model.decoder.map(|d| ("decoder ", d.width, d.heads));
        for (what, width, heads) in [("", model.width, model.heads)].into_iter().chain(decoder) {
            if !HEAD_DIMS.contains(&(width / heads)) {
                bail!(
                    "{what}head dim {} (width {width} / heads {heads}) has no CUDA attention \
                     kernel; the GPU backend supports head dims {HEAD_DIMS:?}",
                    width / heads
                );
            }
        }
        let gpu = Gpu::open(0)?;
        let engine: Box<dyn Backend> = match precision {
            Precision::Fp32 => {
                Box::new(Engine::<f32>::new(gpu, model, layout, &params, precision)?)
            }
            Precision::Bf16 => {
                Box::new(Engine::<bf16>::new(gpu, model, layout, &params, precision)?)
            }
        };
        Ok(CudaBackend { engine })
    }
}

impl Backend for CudaBackend {
    fn device_name(&self) -> String {
        self.engine.device_name()
    }
    fn layout(&self) -> &ParamLayout {
        self.engine.layout()
    }
    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<f32> {
        self.engine.forward_backward(batch, grad_scale)
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.engine.zero_grads()
    }
    fn average_grads(&mut self, comm: &mut dyn Collective) -> Result<()> {
        self.engine.average_grads(comm)
    }
    fn grad_norm(&mut self) -> Result<f32> {
        let _range = nvtx::range("gradient norm");
        self.engine.grad_norm()
    }
    fn adamw_step(&mut self, step: &AdamWStep) -> Result<()> {
        self.engine.adamw_step(step)
    }
    fn params(&mut self) -> Result<Vec<f32>> {
        self.engine.params()
    }
    fn set_params(&mut self, flat: &[f32]) -> Result<()> {
        self.engine.set_params(flat)
    }
    fn grads(&mut self) -> Result<Vec<f32>> {
        self.engine.grads()
    }
    fn moments(&mut self) -> Result<Moments> {
        self.engine.moments()
    }
    fn set_moments(&mut self, moments: &Moments) -> Result<()> {
        self.engine.set_moments(moments)
    }
    fn synchronize(&mut self) -> Result<()> {
        self.engine.synchronize()
    }
    fn peak_memory_bytes(&mut self) -> Option<u64> {
        self.engine.peak_memory_bytes()
    }
    fn device_step_ms(&mut self) -> Result<Option<f64>> {
        self.engine.device_step_ms()
    }
}

/// The backend for one storage type.
struct Engine<T: Storage> {
    gpu: Gpu,
    kernels: Kernels<T>,
    blas: BlasLt,
    precision: Precision,
    model: ModelConfig,
    layout: ParamLayout,
    ranges: ModelRanges,
    /// [P] fp32 master weights.
    master: CudaSlice<f32>,
    /// [P] the weights in storage type, rewritten by every AdamW step.
    shadow: CudaSlice<T>,
    /// [P] fp32 gradient accumulator.
    grads: CudaSlice<f32>,
    /// [P] AdamW moments.
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    /// [P] 1 where AdamW decays the weight.
    decay_mask: CudaSlice<u8>,
    /// Partial sums of the two-pass reductions.
    scratch: CudaSlice<f32>,
    /// [1] a reduction's result.
    scalar: CudaSlice<f32>,
    /// Buffers of the last batch size, reused while it holds.
    acts: Option<MethodActs<T>>,
    timer: StepTimer,
}

/// Timing events around a step's device work (see [`Backend::device_step_ms`]).
struct StepTimer {
    start: CudaEvent,
    end: CudaEvent,
    /// The start of the current step is recorded (a micro-batch has been queued since
    /// the last AdamW update).
    started: bool,
    /// Both events of the last step are recorded.
    finished: bool,
}

impl StepTimer {
    fn new(gpu: &Gpu) -> Result<StepTimer> {
        let timed = || {
            gpu.ctx()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .context("creating a timing event")
        };
        Ok(StepTimer {
            start: timed()?,
            end: timed()?,
            started: false,
            finished: false,
        })
    }
}

impl<T: Storage> Engine<T> {
    fn new(
        gpu: Gpu,
        model: &ModelConfig,
        layout: ParamLayout,
        params: &[f32],
        precision: Precision,
    ) -> Result<Self> {
        let total = layout.total();
        let kernels = Kernels::load(&gpu)?;
        let blas = BlasLt::new(&gpu)?;
        let decay: Vec<u8> = layout
            .decay_mask()
            .iter()
            .map(|&v| u8::from(v != 0.0))
            .collect();
        let mut engine = Engine {
            kernels,
            blas,
            precision,
            model: model.clone(),
            ranges: layout.ranges().clone(),
            master: gpu.upload(params, "master weights")?,
            shadow: gpu.zeros(total, "weight copy")?,
            grads: gpu.zeros(total, "gradients")?,
            m: gpu.zeros(total, "AdamW first moments")?,
            v: gpu.zeros(total, "AdamW second moments")?,
            decay_mask: gpu.upload(&decay, "weight-decay mask")?,
            scratch: gpu.zeros(scratch_len(model), "reduction scratch")?,
            scalar: gpu.zeros(1, "reduction result")?,
            acts: None,
            timer: StepTimer::new(&gpu)?,
            layout,
            gpu,
        };
        engine.refresh_shadow()?;
        Ok(engine)
    }

    /// Rewrites the storage copy from the master weights.
    fn refresh_shadow(&mut self) -> Result<()> {
        let n = self.layout.total();
        self.kernels
            .cast_from_f32(self.gpu.ptr(&self.master)?, self.gpu.ptr(&self.shadow)?, n)
    }
}

impl<T: Storage> Backend for Engine<T> {
    fn device_name(&self) -> String {
        format!("{} (CUDA, {})", self.gpu.name(), self.precision)
    }

    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<f32> {
        batch.validate(&self.model)?;
        if !grad_scale.is_finite() {
            bail!("grad_scale = {grad_scale}: must be finite");
        }
        if self.acts.as_ref().map(|a| a.images_len()) != Some(batch.images_len) {
            // Free the old shape's buffers before allocating the new ones.
            self.acts = None;
            self.acts = Some(MethodActs::new(&self.gpu, &self.model, batch.images_len)?);
        }
        let Some(acts) = self.acts.as_mut() else {
            bail!(
                "activation buffers for batch {} are missing",
                batch.images_len
            );
        };
        {
            let _range = nvtx::range("upload");
            acts.upload(&self.gpu, &self.model, batch)?;
        }
        if !self.timer.started {
            self.timer.start.record(self.gpu.stream())?;
            self.timer.started = true;
        }
        let net = Net {
            gpu: &self.gpu,
            kernels: &self.kernels,
            blas: &self.blas,
            master: self.gpu.ptr(&self.master)?,
            shadow: self.gpu.ptr(&self.shadow)?,
            grads: self.gpu.ptr(&self.grads)?,
            scratch: self.gpu.ptr(&self.scratch)?,
        };
        acts.forward_backward(net, &self.model, &self.ranges, grad_scale)?;
        let loss = self
            .gpu
            .read(acts.loss(), 1, "loss")
            .context("running the forward and backward on the GPU")?;
        Ok(loss[0])
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.gpu.memset_zero(self.gpu.ptr(&self.grads)?)
    }

    fn average_grads(&mut self, comm: &mut dyn Collective) -> Result<()> {
        super::nccl::average(self.gpu.stream(), &mut self.grads, comm)
    }

    fn grad_norm(&mut self) -> Result<f32> {
        let _range = nvtx::range("gradient norm");
        let (grads, scratch, out) = (
            self.gpu.ptr(&self.grads)?,
            self.gpu.ptr(&self.scratch)?,
            self.gpu.ptr(&self.scalar)?,
        );
        self.kernels.sum_squares(grads, scratch, out)?;
        let sum = self.gpu.read(&self.scalar, 1, "gradient sum of squares")?;
        Ok(sum[0].sqrt())
    }

    fn adamw_step(&mut self, step: &AdamWStep) -> Result<()> {
        let _range = nvtx::range("AdamW");
        let g = &self.gpu;
        self.kernels.adamw(
            g.ptr(&self.master)?,
            g.ptr(&self.grads)?,
            g.ptr(&self.m)?,
            g.ptr(&self.v)?,
            g.ptr(&self.decay_mask)?,
            g.ptr(&self.shadow)?,
            step,
        )?;
        if self.timer.started {
            self.timer.end.record(self.gpu.stream())?;
            self.timer.started = false;
            self.timer.finished = true;
        }
        Ok(())
    }

    fn params(&mut self) -> Result<Vec<f32>> {
        self.gpu
            .read(&self.master, self.layout.total(), "parameters")
    }

    fn set_params(&mut self, flat: &[f32]) -> Result<()> {
        self.layout.check_len("params", flat.len())?;
        self.gpu.write(flat, &mut self.master, "parameters")?;
        self.refresh_shadow()
    }

    fn grads(&mut self) -> Result<Vec<f32>> {
        self.gpu.read(&self.grads, self.layout.total(), "gradients")
    }

    fn moments(&mut self) -> Result<Moments> {
        Ok(Moments {
            m: self
                .gpu
                .read(&self.m, self.layout.total(), "AdamW first moments")?,
            v: self
                .gpu
                .read(&self.v, self.layout.total(), "AdamW second moments")?,
        })
    }

    fn set_moments(&mut self, moments: &Moments) -> Result<()> {
        self.layout.check_len("moments.m", moments.m.len())?;
        self.layout.check_len("moments.v", moments.v.len())?;
        self.gpu
            .write(&moments.m, &mut self.m, "AdamW first moments")?;
        self.gpu
            .write(&moments.v, &mut self.v, "AdamW second moments")
    }

    fn synchronize(&mut self) -> Result<()> {
        self.gpu.synchronize("the queued work")
    }

    /// All device memory in use, by any context: every buffer is allocated up front, so
    /// after a step this is the run's peak (plus whatever else runs on the device).
    fn peak_memory_bytes(&mut self) -> Option<u64> {
        self.gpu.memory_in_use().ok()
    }

    fn device_step_ms(&mut self) -> Result<Option<f64>> {
        if !self.timer.finished {
            return Ok(None);
        }
        let ms = self
            .timer
            .start
            .elapsed_ms(&self.timer.end)
            .context("reading the step's timing events")?;
        Ok(Some(ms as f64))
    }
}
