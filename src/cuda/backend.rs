//! [`CudaBackend`]: fp32 master weights, AdamW moments and gradients on the device, the
//! activations and GEMM operands in the chosen precision. A training step
//! (`Backend::train_step`) runs on the device from the first upload to the AdamW update
//! without the host reading anything; its report is read one step late (`step.rs`), and
//! its forward/backward and update are captured once as CUDA graphs and replayed. In a
//! data-parallel step the last micro-batch's backward hands each finished gradient bucket
//! to NCCL's stream as it goes (`nccl.rs`).

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};
use half::bf16;

use super::attention::HEAD_DIMS;
use super::blaslt::BlasLt;
use super::block::Net;
use super::device::{DevPtr, Gpu};
use super::kernels::Kernels;
use super::launch::scratch_len;
use super::method::{MethodActs, Ready};
use super::nccl::{self, NcclCollective};
use super::nvtx;
use super::step::{self, PassKey, Reports, StepBuffers, StepGraphs};
use super::storage::Storage;
use crate::backend::{
    AdamWStep, Backend, MicroBatches, Moments, Precision, StepReport, StepSettings,
};
use crate::config::ModelConfig;
use crate::data::batch::Batch;
use crate::dist::buckets::BUCKET;
use crate::dist::{BucketPlan, Collective};
use crate::params::{ModelRanges, ParamLayout};

/// The GPU backend. Runs on CUDA device 0.
pub struct CudaBackend {
    engine: Box<dyn StepEngine>,
}

/// An [`Engine`] of either storage type.
trait StepEngine: Backend {
    fn set_step_graphs(&mut self, on: bool);
    fn set_bucket_limit(&mut self, values: usize);
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
        let engine: Box<dyn StepEngine> = match precision {
            Precision::Fp32 => {
                Box::new(Engine::<f32>::new(gpu, model, layout, &params, precision)?)
            }
            Precision::Bf16 => {
                Box::new(Engine::<bf16>::new(gpu, model, layout, &params, precision)?)
            }
        };
        Ok(CudaBackend { engine })
    }

    /// Whether `train_step` captures and replays CUDA graphs (on by default, see
    /// [`Gpu::step_graphs`]) or launches every kernel itself. Under `LOMAR_CUDA_SYNC` it
    /// always launches.
    pub fn set_step_graphs(&mut self, on: bool) {
        self.engine.set_step_graphs(on);
    }

    /// Gradient values per NCCL all-reduce of a data-parallel step (default
    /// `dist::buckets::BUCKET`); small limits make the tests' small models run many.
    pub fn set_bucket_limit(&mut self, values: usize) {
        self.engine.set_bucket_limit(values);
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
    fn train_step(
        &mut self,
        batches: &mut dyn MicroBatches,
        settings: &StepSettings,
        comm: &mut dyn Collective,
    ) -> Result<Option<StepReport>> {
        self.engine.train_step(batches, settings, comm)
    }
    fn finish_steps(&mut self) -> Result<Option<StepReport>> {
        self.engine.finish_steps()
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
    /// The gradient buckets of a data-parallel step, in the order the backward ends them.
    buckets: BucketPlan,
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
    /// The step's constants and state on the device.
    step: StepBuffers,
    /// The step reports, read a step late.
    reports: Reports,
    graphs: StepGraphs,
    /// `train_step` replays graphs (else launches every kernel).
    use_graphs: bool,
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
            buckets: BucketPlan::new(&layout, BUCKET),
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
            step: StepBuffers::new(&gpu)?,
            reports: Reports::new(&gpu)?,
            graphs: StepGraphs::default(),
            use_graphs: gpu.step_graphs(),
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

    /// Fits the activation buffers to `batch` and uploads it: the pixels on the copy
    /// stream, the index tensors on the compute stream. Graphs of buffers that change are
    /// dropped.
    fn upload(&mut self, batch: &Batch) -> Result<()> {
        batch.validate(&self.model)?;
        if self.acts.as_ref().map(|a| a.images_len()) != Some(batch.images_len) {
            self.graphs.forget_passes();
            // Free the old shape's buffers before allocating the new ones.
            self.acts = None;
            self.acts = Some(MethodActs::new(&self.gpu, &self.model, batch.images_len)?);
        }
        let acts = self
            .acts
            .as_mut()
            .context("the activation buffers are missing")?;
        let kind = acts.input().pixel_slot().map(|(bytes, _)| bytes);
        {
            let _range = nvtx::range("upload");
            acts.upload(&self.gpu, &self.model, batch)?;
        }
        if acts.input().pixel_slot().map(|(bytes, _)| bytes) != kind {
            // New upload buffers for the other kind of pixels.
            self.graphs.forget_passes();
        }
        if !self.timer.started {
            self.timer.start.record(self.gpu.stream())?;
            self.timer.started = true;
        }
        Ok(())
    }

    /// Queues the forward and backward of the last uploaded batch, adding `grad_scale`
    /// times its gradient to the gradients and its mean loss to `loss`; `ready` as the
    /// backward finishes gradients.
    fn queue_pass(
        &self,
        grad_scale: f32,
        loss: DevPtr<'_, f32>,
        ready: &mut Ready<'_>,
    ) -> Result<()> {
        let acts = self.acts.as_ref().context("no batch has been uploaded")?;
        let net = Net {
            gpu: &self.gpu,
            kernels: &self.kernels,
            blas: &self.blas,
            master: self.gpu.ptr(&self.master)?,
            shadow: self.gpu.ptr(&self.shadow)?,
            grads: self.gpu.ptr(&self.grads)?,
            scratch: self.gpu.ptr(&self.scratch)?,
        };
        acts.forward_backward(net, &self.model, &self.ranges, grad_scale, loss, ready)
    }

    /// One micro-batch of a training step: upload, then the pass (replayed from its
    /// graph, or launched), its mean loss added to the step's loss sum.
    fn micro_batch(&mut self, batch: &Batch, grad_scale: f32) -> Result<()> {
        self.upload(batch)?;
        let acts = self.acts.as_ref().context("no batch has been uploaded")?;
        let (bytes, pixel_slot) = acts
            .input()
            .pixel_slot()
            .context("no pixels were uploaded")?;
        let key = PassKey {
            images_len: acts.images_len(),
            bytes,
            pixel_slot,
            grad_scale_bits: grad_scale.to_bits(),
        };
        let pass =
            |e: &Self| e.queue_pass(grad_scale, e.gpu.ptr(&e.step.loss_sum)?, &mut |_| Ok(()));
        match self.use_graphs {
            true => self.with_graphs(|graphs, e| graphs.pass(&e.gpu, key, || pass(e)))?,
            false => pass(self)?,
        }
        let acts = self.acts.as_ref().context("no batch has been uploaded")?;
        acts.input().mark_pixels_read(&self.gpu)
    }

    /// The last micro-batch of a step averaged through NCCL: each gradient bucket's
    /// all-reduce is queued on NCCL's stream as soon as the backward that finishes it is
    /// queued here, the loss sum's after the pass, and the update that follows on this
    /// stream waits for all of them on the device.
    ///
    /// This pass is launched, never replayed from a graph. Capturing it would put NCCL's
    /// calls and the fork and join of its stream through events into the graph, which
    /// NCCL supports but which no GPU has run for lomar yet, and a mistake there would
    /// hang or mix up every rank with nothing to read but a timeout. Launched, it uses only
    /// the stream and event calls the rest of the backend uses; it costs the host the
    /// launches of one pass per step, made while the GPU still runs the work before.
    fn averaged_micro_batch(
        &mut self,
        batch: &Batch,
        grad_scale: f32,
        nccl: &mut NcclCollective,
    ) -> Result<()> {
        self.upload(batch)?;
        let (gpu, stream) = (&self.gpu, self.gpu.stream());
        let grads = gpu.ptr(&self.grads)?;
        let mut schedule = self.buckets.schedule();
        self.queue_pass(grad_scale, gpu.ptr(&self.step.loss_sum)?, &mut |from| {
            nccl.queue_buckets(stream, grads, schedule.due(from))
        })?;
        schedule.finish()?;
        let acts = self.acts.as_ref().context("no batch has been uploaded")?;
        acts.input().mark_pixels_read(gpu)?;
        nccl.finish_step(stream, Some(gpu.ptr(&self.step.loss_sum)?))
    }

    /// Runs `f` on the graphs taken out of the engine, so that it can capture from the
    /// rest of it.
    fn with_graphs(&mut self, f: impl FnOnce(&mut StepGraphs, &Self) -> Result<()>) -> Result<()> {
        let mut graphs = std::mem::take(&mut self.graphs);
        let done = f(&mut graphs, self);
        self.graphs = graphs;
        done
    }

    /// Queues the end of a step: the gradient norm, the mean loss, the clip scale and the
    /// divergence flag into `state`, then AdamW, which a raised flag turns into nothing.
    fn queue_update(&self) -> Result<()> {
        let g = &self.gpu;
        self.kernels.step_finish(
            g.ptr(&self.grads)?,
            g.ptr(&self.scratch)?,
            g.ptr(&self.step.loss_sum)?,
            g.ptr(&self.step.hyper)?,
            g.ptr(&self.step.state)?,
        )?;
        self.queue_adamw()
    }

    /// AdamW with the constants in `hyper` and the scale and flag in `state`.
    fn queue_adamw(&self) -> Result<()> {
        let g = &self.gpu;
        self.kernels.adamw(
            g.ptr(&self.master)?,
            g.ptr(&self.grads)?,
            g.ptr(&self.m)?,
            g.ptr(&self.v)?,
            g.ptr(&self.decay_mask)?,
            g.ptr(&self.shadow)?,
            g.ptr(&self.step.hyper)?,
            g.ptr(&self.step.state)?,
        )
    }

    /// Records the end of a step's device work, after its update.
    fn end_timer(&mut self) -> Result<()> {
        if self.timer.started {
            self.timer.end.record(self.gpu.stream())?;
            self.timer.started = false;
            self.timer.finished = true;
        }
        Ok(())
    }
}

impl<T: Storage> StepEngine for Engine<T> {
    fn set_step_graphs(&mut self, on: bool) {
        self.use_graphs = on && !self.gpu.sync_launches();
    }

    fn set_bucket_limit(&mut self, values: usize) {
        self.buckets = BucketPlan::new(&self.layout, values);
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
        if !grad_scale.is_finite() {
            bail!("grad_scale = {grad_scale}: must be finite");
        }
        self.upload(batch)?;
        let acts = self.acts.as_ref().context("no batch has been uploaded")?;
        self.gpu.memset_zero(self.gpu.ptr(acts.loss())?)?;
        self.queue_pass(grad_scale, self.gpu.ptr(acts.loss())?, &mut |_| Ok(()))?;
        acts.input().mark_pixels_read(&self.gpu)?;
        let loss = self
            .gpu
            .read(acts.loss(), 1, "loss")
            .context("running the forward and backward on the GPU")?;
        Ok(loss[0])
    }

    /// The whole step on the device (see the module doc): nothing is read back but the
    /// report of the step before, whose update finished while this one was queued.
    fn train_step(
        &mut self,
        batches: &mut dyn MicroBatches,
        settings: &StepSettings,
        comm: &mut dyn Collective,
    ) -> Result<Option<StepReport>> {
        let count = batches.count();
        let hyper = step::hyper(settings, count)?;
        let micro_scale = 1.0 / count as f32;
        // Stream-ordered after the previous step's update, the last reader of all three.
        self.gpu
            .write(&hyper, &mut self.step.hyper, "step constants")?;
        self.gpu.memset_zero(self.gpu.ptr(&self.grads)?)?;
        self.gpu.memset_zero(self.gpu.ptr(&self.step.loss_sum)?)?;
        let world = comm.world();
        // NCCL, also at world size 1 (`bench --nccl`, tests): overlapped with the backward.
        let mut nccl = comm.as_any_mut().downcast_mut::<NcclCollective>();
        let watch = nccl.as_ref().map(|n| n.communicator());
        for i in 0..count {
            let batch = batches.next()?;
            match nccl.as_deref_mut() {
                // The gradients are final only in the last micro-batch's backward.
                Some(n) if i + 1 == count => self.averaged_micro_batch(batch, micro_scale, n)?,
                _ => self.micro_batch(batch, micro_scale)?,
            }
        }
        if watch.is_none() && world > 1 {
            // A host collective: through the host, after the backward, waiting for it.
            nccl::average(&self.gpu, &mut self.grads, comm)?;
            nccl::average(&self.gpu, &mut self.step.loss_sum, comm)?;
        }
        {
            let _range = nvtx::range("gradient norm and AdamW");
            match self.use_graphs {
                true => self.with_graphs(|graphs, e| graphs.update(&e.gpu, || e.queue_update()))?,
                false => self.queue_update()?,
            }
        }
        self.end_timer()?;
        self.reports
            .queue(&self.gpu, &self.step.state, settings.t, watch)
    }

    fn finish_steps(&mut self) -> Result<Option<StepReport>> {
        self.reports.finish()
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.gpu.memset_zero(self.gpu.ptr(&self.grads)?)
    }

    fn average_grads(&mut self, comm: &mut dyn Collective) -> Result<()> {
        nccl::average(&self.gpu, &mut self.grads, comm)
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
        let (hyper, state) = step::single_update(step)?;
        self.gpu
            .write(&hyper, &mut self.step.hyper, "step constants")?;
        self.gpu.write(&state, &mut self.step.state, "step state")?;
        self.queue_adamw()?;
        self.end_timer()
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
