//! The [`Collective`] of a data-parallel run on CUDA: one NCCL communicator per process
//! (rank), the gradients averaged on the device.
//!
//! The gradient all-reduce runs on a stream of its own, in buckets of [`BUCKET`] values,
//! ordered after the step's backward by an event and before the optimiser by another. It
//! starts once the whole backward is queued (the backward is one pass over the blocks that
//! does not report when a block's gradients are final), so it does not overlap the
//! backward yet; the buckets are what such an overlap would hand over one by one.
//!
//! The host waits for every collective by polling its completion event together with
//! NCCL's asynchronous error state: an error on any rank, or no completion within the
//! run's timeout (a rank died or hangs), aborts the communicator and fails with a message
//! instead of blocking forever. NCCL's own start-up (`ncclCommInitRank`) follows a
//! successful rendezvous and is bounded by NCCL's bootstrap timeouts, not by ours.
//!
//! NCCL is loaded when first used (cudarc's dynamic loading): a machine without it runs
//! everything else, and a run that needs it fails with a message saying how to get it.

use std::any::Any;
use std::ffi::{c_void, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use cudarc::nccl::sys::{self, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t};

use crate::dist::Collective;

/// Values per all-reduce call: 32 MiB of fp32, large enough that NCCL reaches its
/// bandwidth, small enough to hand over while later buckets are still being computed.
pub const BUCKET: usize = 8 << 20;

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

/// Averages the gradient buffer `grads` (on `compute`'s stream) over the ranks of `comm`:
/// on the device through NCCL, or through the host for a collective without NCCL.
pub fn average(
    compute: &Arc<CudaStream>,
    grads: &mut CudaSlice<f32>,
    comm: &mut dyn Collective,
) -> Result<()> {
    if let Some(nccl) = comm.as_any_mut().downcast_mut::<NcclCollective>() {
        return nccl.average_device(compute, grads);
    }
    let mut host = compute
        .clone_dtoh(grads)
        .context("copying the gradients to the host")?;
    comm.all_reduce_mean(&mut host)?;
    compute
        .memcpy_htod(&host, grads)
        .context("copying the averaged gradients to the GPU")
}

/// This process's rank of the NCCL communicator, on the process's GPU 0.
pub struct NcclCollective {
    comm: ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Set once the communicator was aborted: nothing may use it after.
    aborted: bool,
    /// Timing events around the last gradient all-reduce.
    started: CudaEvent,
    finished: CudaEvent,
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
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is rank 0's.
        let r = unsafe { sys::ncclCommInitRank(&mut comm, world as i32, id, rank as i32) };
        check(
            r,
            &format!("joining the communicator as rank {rank} of {world}"),
        )?;
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        Ok(NcclCollective {
            comm,
            stream,
            rank,
            world,
            timeout,
            aborted: false,
            started: ctx.new_event(timing)?,
            finished: ctx.new_event(timing)?,
            timed: false,
        })
    }

    /// Averages `grads` in place, on the device, in buckets. `compute` is the stream the
    /// backward ran on: the reduction starts after its queued work and the compute
    /// stream's later work (the optimiser) waits for the reduction.
    pub fn average_device(
        &mut self,
        compute: &Arc<CudaStream>,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let ready = compute
            .record_event(None)
            .context("recording the end of the backward")?;
        self.stream.wait(&ready)?;
        self.started.record(&self.stream)?;
        let len = grads.len();
        let stream = self.stream.clone();
        let (base, _guard) = grads.device_ptr_mut(&stream);
        let mut offset = 0;
        while offset < len {
            let n = BUCKET.min(len - offset);
            let at = (base + (offset * 4) as u64) as *mut c_void;
            self.enqueue_all_reduce(at, n, ncclDataType_t::ncclFloat32)?;
            offset += n;
        }
        self.finished.record(&self.stream)?;
        self.timed = true;
        compute.wait(&self.finished)?;
        let done = self.stream.record_event(None)?;
        self.wait_for(&done, "averaging the gradients")
    }

    /// Milliseconds the last gradient all-reduce took on the device.
    pub fn last_all_reduce_ms(&self) -> Result<Option<f64>> {
        if !self.timed {
            return Ok(None);
        }
        Ok(Some(self.started.elapsed_ms(&self.finished)? as f64))
    }

    fn enqueue_all_reduce(&mut self, at: *mut c_void, n: usize, ty: ncclDataType_t) -> Result<()> {
        self.usable()?;
        // SAFETY: `at` holds `n` values of `ty` on this rank's GPU, alive until the
        // completion event this call is followed by has been waited for.
        let r = unsafe {
            sys::ncclAllReduce(
                at,
                at,
                n,
                ty,
                ncclRedOp_t::ncclAvg,
                self.comm,
                self.stream.cu_stream() as _,
            )
        };
        check(r, "queueing an all-reduce")
    }

    fn usable(&self) -> Result<()> {
        if self.aborted {
            bail!("the NCCL communicator was aborted after an earlier failure");
        }
        Ok(())
    }

    /// Waits until `done` completes, polling NCCL's error state; aborts the communicator
    /// on an error or after the timeout.
    fn wait_for(&mut self, done: &CudaEvent, what: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if done
                .try_is_complete()
                .with_context(|| format!("GPU error while {what}"))?
            {
                return Ok(());
            }
            let mut state = ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is a live communicator; `state` receives its error state.
            let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
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

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: `comm` is live and is not used again (`aborted`).
            unsafe { sys::ncclCommAbort(self.comm) };
        }
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
        self.wait_for(&done, what)?;
        self.stream.memcpy_dtoh(&buffer, values)?;
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
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
            me.usable()?;
            // SAFETY: `at` holds `n` bytes on this GPU until the wait that follows.
            let r = unsafe {
                sys::ncclBroadcast(
                    at,
                    at,
                    n,
                    ncclDataType_t::ncclUint8,
                    0,
                    me.comm,
                    me.stream.cu_stream() as _,
                )
            };
            check(r, "queueing a broadcast")
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_mean(&mut [0.0])
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: `comm` is live; nothing uses it after the drop.
            unsafe { sys::ncclCommDestroy(self.comm) };
        }
    }
}
