//! The [`Collective`] of a data-parallel run on CUDA: one NCCL communicator per process
//! (rank), the gradients averaged on the device.
//!
//! A training step averages its gradients on a stream of its own, bucket by bucket
//! (`dist::buckets`), while the backward of its last micro-batch still runs: at each ready
//! point the backward reports, an event on the compute stream orders the buckets it
//! finished before their all-reduce on this stream ([`NcclCollective::queue_buckets`]);
//! after the backward the loss sum follows and the compute stream waits for this stream's
//! last event before the update ([`NcclCollective::finish_step`]). The host queues all of
//! it without waiting.
//!
//! A rank that dies or hangs leaves the others' all-reduces unfinished. The host notices
//! where it waits anyway: reading a step's report one step late (`step.rs`) polls the
//! report's event together with NCCL's asynchronous error state ([`Communicator`]); an
//! error on any rank, or no completion within the run's timeout, aborts the communicator
//! and fails with a message instead of blocking forever. The per-call collectives
//! (`Backend::average_grads`, the host-side values) wait the same way at once. NCCL's own
//! start-up (`ncclCommInitRank`) follows a successful rendezvous and is bounded by NCCL's
//! bootstrap timeouts, not by ours.
//!
//! NCCL is loaded when first used (cudarc's dynamic loading): a machine without it runs
//! everything else, and a run that needs it fails with a message saying how to get it.

use std::any::Any;
use std::cell::Cell;
use std::ffi::{c_void, CStr};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use cudarc::nccl::sys::{self, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t};

use super::device::{DevPtr, Gpu};
use crate::dist::buckets::BUCKET;
use crate::dist::collective::AllReduceTime;
use crate::dist::Collective;

/// Bytes of NCCL's unique id, the session rank 0 hands to the others.
pub const ID_BYTES: usize = 128;

/// Pause between two polls of a collective's completion.
const POLL: Duration = Duration::from_micros(50);

/// Errors unless libnccl can be loaded.
fn require_library() -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        bail!(
            "NCCL not found: a data-parallel run on CUDA needs libnccl.so. Install libnccl2 \
             (with libnccl-dev for the libnccl.so name), or pip install nvidia-nccl-cu13 and \
             put a symlink libnccl.so -> .../nvidia/nccl/lib/libnccl.so.2 in a directory on \
             LD_LIBRARY_PATH"
        );
    }
    Ok(())
}

/// NCCL's text for `r`.
fn describe(r: ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(r)) };
    format!("{} ({r:?})", text.to_string_lossy())
}

fn check(r: ncclResult_t, what: &str) -> Result<()> {
    match r {
        ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => Ok(()),
        e => bail!("NCCL failed {what}: {}", describe(e)),
    }
}

/// A fresh NCCL unique id, rank 0's session bytes.
pub fn unique_id() -> Result<Vec<u8>> {
    require_library()?;
    let id = cudarc::nccl::result::get_uniqueid()
        .map_err(|e| anyhow::anyhow!("NCCL failed making the unique id: {}", describe(e.0)))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// Averages the gradient buffer `grads` (on `gpu`'s stream) over the ranks of `comm` and
/// waits for it: on the device through NCCL, or through the host for a collective
/// without NCCL.
pub fn average(gpu: &Gpu, grads: &mut CudaSlice<f32>, comm: &mut dyn Collective) -> Result<()> {
    if let Some(nccl) = comm.as_any_mut().downcast_mut::<NcclCollective>() {
        return nccl.average_device(gpu.stream(), gpu.ptr(grads)?);
    }
    let mut host = gpu
        .stream()
        .clone_dtoh(grads)
        .context("copying the gradients to the host")?;
    comm.all_reduce_mean(&mut host)?;
    gpu.stream()
        .memcpy_htod(&host, grads)
        .context("copying the averaged gradients to the GPU")
}

/// One rank's NCCL communicator, shared by the collective that queues work on it and the
/// backend that waits for that work (the step reports, `step.rs`).
pub struct Communicator {
    raw: ncclComm_t,
    rank: usize,
    timeout: Duration,
    /// Set once the communicator was aborted: nothing may use it after.
    aborted: Cell<bool>,
}

impl Communicator {
    fn usable(&self) -> Result<()> {
        if self.aborted.get() {
            bail!("the NCCL communicator was aborted after an earlier failure");
        }
        Ok(())
    }

    /// Waits until `done` completes, polling NCCL's error state; aborts the communicator
    /// on an error or after the timeout.
    pub fn wait_for(&self, done: &CudaEvent, what: &str) -> Result<()> {
        self.usable()?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if done
                .try_is_complete()
                .with_context(|| format!("GPU error while {what}"))?
            {
                return Ok(());
            }
            let mut state = ncclResult_t::ncclSuccess;
            // SAFETY: `raw` is a live communicator; `state` receives its error state.
            let r = unsafe { sys::ncclCommGetAsyncError(self.raw, &mut state) };
            let failure = match (r, state) {
                (ncclResult_t::ncclSuccess, ncclResult_t::ncclSuccess)
                | (ncclResult_t::ncclSuccess, ncclResult_t::ncclInProgress) => None,
                (ncclResult_t::ncclSuccess, s) => Some(describe(s)),
                (e, _) => Some(describe(e)),
            };
            if let Some(why) = failure {
                self.abort();
                bail!(
                    "rank {}: NCCL failed while {what}: {why}; another rank may have stopped",
                    self.rank
                );
            }
            if Instant::now() >= deadline {
                self.abort();
                bail!(
                    "rank {}: {what} did not finish within {:?}: another rank stopped or hangs; aborted the NCCL communicator",
                    self.rank,
                    self.timeout
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: `raw` is live and is not used again (`aborted`).
            unsafe { sys::ncclCommAbort(self.raw) };
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if !self.aborted.get() {
            // SAFETY: `raw` is live; this is its last user.
            unsafe { sys::ncclCommDestroy(self.raw) };
        }
    }
}

/// This process's rank of the NCCL communicator, on the process's GPU 0.
pub struct NcclCollective {
    comm: Rc<Communicator>,
    stream: Arc<CudaStream>,
    world: usize,
    /// Timing events of the last gradient all-reduce: its first bucket's start, the end
    /// of the backward it overlapped, its end.
    started: CudaEvent,
    backward_done: CudaEvent,
    finished: CudaEvent,
    /// `started` is recorded for the all-reduce being queued.
    open: bool,
    /// The three events of a whole all-reduce are recorded.
    timed: bool,
}

impl NcclCollective {
    /// Joins the communicator `session` (rank 0's unique id) as `rank` of `world`.
    /// Every wait on it fails after `timeout`.
    pub fn new(session: &[u8], rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        require_library()?;
        if session.len() != ID_BYTES {
            bail!(
                "rank 0 sent a session of {} bytes, not an NCCL unique id ({ID_BYTES}): is it running with the CPU backend?",
                session.len()
            );
        }
        let ctx = CudaContext::new(0).context("opening this rank's GPU for NCCL")?;
        ctx.bind_to_thread().context("binding the CUDA context")?;
        let stream = ctx
            .new_stream()
            .context("creating the stream of the gradient all-reduce")?;
        let mut id = sys::ncclUniqueId {
            internal: [0; ID_BYTES],
        };
        for (d, &s) in id.internal.iter_mut().zip(session) {
            *d = s as _;
        }
        let mut raw: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` receives the new communicator; the id is rank 0's.
        let r = unsafe { sys::ncclCommInitRank(&mut raw, world as i32, id, rank as i32) };
        check(
            r,
            &format!("joining the communicator as rank {rank} of {world}"),
        )?;
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        Ok(NcclCollective {
            comm: Rc::new(Communicator {
                raw,
                rank,
                timeout,
                aborted: Cell::new(false),
            }),
            stream,
            world,
            started: ctx.new_event(timing)?,
            backward_done: ctx.new_event(timing)?,
            finished: ctx.new_event(timing)?,
            open: false,
            timed: false,
        })
    }

    /// The communicator, for a backend that waits for the work queued on it.
    pub fn communicator(&self) -> Rc<Communicator> {
        self.comm.clone()
    }

    /// Queues the all-reduce of `buckets` of `grads`, ordered after the work queued on
    /// `compute` so far (the backward that finished them); the compute stream goes on.
    /// The first buckets of a step start the all-reduce's timing.
    pub(crate) fn queue_buckets(
        &mut self,
        compute: &CudaStream,
        grads: DevPtr<'_, f32>,
        buckets: &[Range<usize>],
    ) -> Result<()> {
        if buckets.is_empty() {
            return Ok(());
        }
        self.comm.usable()?;
        let ready = compute
            .record_event(None)
            .context("recording the end of the gradients' backward")?;
        self.stream.wait(&ready)?;
        if !self.open {
            self.started.record(&self.stream)?;
            self.open = true;
        }
        for bucket in buckets {
            let part = grads.range(bucket.clone())?;
            self.enqueue_all_reduce(
                *part.addr() as *mut c_void,
                part.len(),
                ncclDataType_t::ncclFloat32,
            )?;
        }
        Ok(())
    }

    /// Ends a step's all-reduce once the backward is queued on `compute`: averages
    /// `loss_sum` too, if given, and makes the compute stream's later work (the update)
    /// wait for all of it. Nothing waits on the host.
    pub(crate) fn finish_step(
        &mut self,
        compute: &CudaStream,
        loss_sum: Option<DevPtr<'_, f32>>,
    ) -> Result<()> {
        self.backward_done.record(compute)?;
        self.stream.wait(&self.backward_done)?;
        if !self.open {
            self.started.record(&self.stream)?;
        }
        if let Some(loss) = loss_sum {
            self.enqueue_all_reduce(
                *loss.addr() as *mut c_void,
                loss.len(),
                ncclDataType_t::ncclFloat32,
            )?;
        }
        self.finished.record(&self.stream)?;
        self.open = false;
        self.timed = true;
        compute
            .wait(&self.finished)
            .context("ordering the update after the gradient all-reduce")
    }

    /// Averages `grads` in place, on the device, in buckets, after the work queued on
    /// `compute`, and waits for it: the per-call path (`Backend::average_grads`).
    pub(crate) fn average_device(
        &mut self,
        compute: &CudaStream,
        grads: DevPtr<'_, f32>,
    ) -> Result<()> {
        let len = grads.len();
        let buckets: Vec<Range<usize>> = (0..len)
            .step_by(BUCKET)
            .map(|at| at..(at + BUCKET).min(len))
            .collect();
        self.queue_buckets(compute, grads, &buckets)?;
        self.finish_step(compute, None)?;
        let done = compute.record_event(None)?;
        self.comm.wait_for(&done, "averaging the gradients")
    }

    fn enqueue_all_reduce(&mut self, at: *mut c_void, n: usize, ty: ncclDataType_t) -> Result<()> {
        self.comm.usable()?;
        // SAFETY: `at` holds `n` values of `ty` on this rank's GPU, alive until this
        // stream's next event, which the stream that frees the buffer waits for.
        let r = unsafe {
            sys::ncclAllReduce(
                at,
                at,
                n,
                ty,
                ncclRedOp_t::ncclAvg,
                self.comm.raw,
                self.stream.cu_stream() as _,
            )
        };
        check(r, "queueing an all-reduce")
    }

    /// Runs a host-side collective through a small device buffer.
    fn through_device<T: DeviceRepr>(
        &mut self,
        values: &mut [T],
        what: &str,
        enqueue: impl FnOnce(&mut Self, *mut c_void, usize) -> Result<()>,
    ) -> Result<()> {
        if values.is_empty() {
            return self.barrier();
        }
        let mut buffer = self.stream.clone_htod(values)?;
        {
            let stream = self.stream.clone();
            let (at, _guard) = buffer.device_ptr_mut(&stream);
            enqueue(self, at as *mut c_void, values.len())?;
        }
        let done = self.stream.record_event(None)?;
        self.comm.wait_for(&done, what)?;
        self.stream.memcpy_dtoh(&buffer, values)?;
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, values: &mut [f32]) -> Result<()> {
        self.through_device(values, "averaging values", |me, at, n| {
            me.enqueue_all_reduce(at, n, ncclDataType_t::ncclFloat32)
        })
    }

    fn broadcast(&mut self, bytes: &mut [u8]) -> Result<()> {
        self.through_device(bytes, "broadcasting from rank 0", |me, at, n| {
            me.comm.usable()?;
            // SAFETY: `at` holds `n` bytes on this GPU until the wait that follows.
            let r = unsafe {
                sys::ncclBroadcast(
                    at,
                    at,
                    n,
                    ncclDataType_t::ncclUint8,
                    0,
                    me.comm.raw,
                    me.stream.cu_stream() as _,
                )
            };
            check(r, "queueing a broadcast")
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_mean(&mut [0.0])
    }

    /// From the events of the last gradient all-reduce, once it has finished.
    fn last_all_reduce(&mut self) -> Result<Option<AllReduceTime>> {
        if !self.timed {
            return Ok(None);
        }
        self.comm
            .wait_for(&self.finished, "the gradient all-reduce")?;
        let span = self.started.elapsed_ms(&self.finished)? as f64;
        let exposed = self.backward_done.elapsed_ms(&self.finished)? as f64;
        Ok(Some(AllReduceTime {
            span_ms: span,
            exposed_ms: exposed.clamp(0.0, span),
        }))
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
