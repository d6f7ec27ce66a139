//! Opening the GPU without ever panicking, typed device addresses, and checked copies.
//!
//! cudarc loads libcuda and libcublas lazily and panics when one is missing, so every
//! library is probed before its first use. One stream of our own (not the legacy default
//! stream, which cannot be captured into a CUDA graph) carries all the compute; the pixel
//! upload's copy stream (`pixels::PixelUpload`) is ordered against it with events of its
//! own, so cudarc's cross-stream event tracking is switched off.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::cudaError_enum;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use super::kernels::KERNELS_BUILT;

/// How to get an nvcc that matches the CUDA 13.0 driver.
pub const NVCC_HINT: &str = "rebuild with nvcc 13.0 available: pip install --target DIR \
    -r scripts/nvcc-requirements.txt (the pinned wheels), then set \
    NVCC=DIR/nvidia/cu13/bin/nvcc and run cargo build again";

/// Why this machine has no usable GPU (no driver, or no device), or `None` when it has
/// one. A missing cuBLASLt or a build without kernels is not reported here: on a GPU
/// machine those are errors for [`Gpu::open`] to name.
pub fn unavailable() -> Option<String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no NVIDIA driver: libcuda.so.1 could not be loaded".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the NVIDIA driver reports no CUDA device".into()),
        Ok(_) => None,
        Err(e) if e.0 == cudaError_enum::CUDA_ERROR_NO_DEVICE => {
            Some("the NVIDIA driver reports no CUDA device".into())
        }
        Err(e) => Some(format!("the NVIDIA driver failed to start: {e}")),
    }
}

/// The device, its compute stream, and the launch policy.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    sync_launches: bool,
    step_graphs: bool,
}

impl Gpu {
    /// Opens device `ordinal`, or explains why it cannot.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if let Some(why) = unavailable() {
            bail!("no usable GPU: {why}");
        }
        if !KERNELS_BUILT {
            bail!("this build of lomar has no CUDA kernels (nvcc was not found when it was compiled); {NVCC_HINT}");
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            bail!(
                "cuBLASLt 13 not found: libcublasLt.so.13 could not be loaded; install it \
                 (pip install nvidia-cublas) and put its nvidia/cu13/lib directory on LD_LIBRARY_PATH"
            );
        }
        let ctx =
            CudaContext::new(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))?;
        // SAFETY: every buffer is used on the one stream below, in issue order, except the
        // pixel upload buffers, whose copy stream waits on and records events of its own.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().context("reading the device name")?;
        let (major, minor) = ctx
            .compute_capability()
            .context("reading the compute capability")?;
        if major < 8 {
            bail!("{name} has compute capability {major}.{minor}; lomar's kernels need 8.0 or newer (bf16)");
        }
        let stream = ctx.new_stream().context("creating the compute stream")?;
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
        let sync_launches = set("LOMAR_CUDA_SYNC");
        let graphs_off = std::env::var("LOMAR_CUDA_GRAPH").is_ok_and(|v| v == "0");
        Ok(Gpu {
            ctx,
            stream,
            name,
            sync_launches,
            step_graphs: !sync_launches && !graphs_off,
        })
    }

    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// With `LOMAR_CUDA_SYNC=1` every launch waits for its kernel, so a fault is reported
    /// against the kernel that caused it rather than at the next copy.
    pub fn sync_launches(&self) -> bool {
        self.sync_launches
    }

    /// Whether training steps are captured once as CUDA graphs and replayed: yes unless
    /// `LOMAR_CUDA_GRAPH=0`, and never under `LOMAR_CUDA_SYNC` (a captured launch cannot
    /// wait for its kernel).
    pub fn step_graphs(&self) -> bool {
        self.step_graphs
    }

    /// Waits for all queued work; a kernel fault surfaces here.
    pub fn synchronize(&self, after: &str) -> Result<()> {
        self.stream
            .synchronize()
            .with_context(|| format!("GPU error after {after}"))
    }

    /// A zero-filled buffer; `what` names it in the out-of-memory error.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        if len == 0 {
            bail!("{what}: a device buffer must not be empty");
        }
        let bytes = len * std::mem::size_of::<T>();
        self.stream
            .alloc_zeros::<T>(len)
            .with_context(|| format!("allocating {what} ({})", human_bytes(bytes)))
    }

    /// A new device copy of `host`.
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        host: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let mut dst = self.zeros(host.len(), what)?;
        self.write(host, &mut dst, what)?;
        Ok(dst)
    }

    /// Copies `host` into `dst`, which must have exactly its length.
    pub fn write<T: DeviceRepr>(
        &self,
        host: &[T],
        dst: &mut CudaSlice<T>,
        what: &str,
    ) -> Result<()> {
        if host.len() != dst.len() {
            bail!(
                "{what}: {} values given, the device buffer holds {}",
                host.len(),
                dst.len()
            );
        }
        self.check_stream(dst, what)?;
        self.stream
            .memcpy_htod(host, dst)
            .with_context(|| format!("copying {what} to the GPU"))
    }

    /// Device memory in use, by every context on the device, in bytes.
    pub fn memory_in_use(&self) -> Result<u64> {
        let (free, total) = self.stream.context().mem_get_info()?;
        Ok(total.saturating_sub(free) as u64)
    }

    /// Copies the first `len` values of `src` back (waits for queued work).
    pub fn read<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        len: usize,
        what: &str,
    ) -> Result<Vec<T>> {
        if len > src.len() {
            bail!(
                "{what}: {len} values asked for, the device buffer holds {}",
                src.len()
            );
        }
        let mut host = vec![T::default(); len];
        if len > 0 {
            let view = src.slice(0..len);
            self.stream
                .memcpy_dtoh(&view, &mut host)
                .with_context(|| format!("copying {what} from the GPU"))?;
        }
        Ok(host)
    }

    /// The device address of a whole buffer, borrowed from it. Errors when the buffer
    /// belongs to another stream or context: the launchers queue work on this GPU's stream
    /// only, and a buffer's free is ordered after that work only on its own stream.
    pub fn ptr<'a, T>(&self, s: &'a CudaSlice<T>) -> Result<DevPtr<'a, T>> {
        self.check_stream(s, "a device buffer")?;
        // The guard records nothing with event tracking off; dropping it at once is fine.
        let (addr, _guard) = s.device_ptr(&self.stream);
        Ok(DevPtr {
            buffer: s,
            addr,
            len: s.len(),
        })
    }

    /// Errors unless `s` lives on this GPU's stream (see [`Gpu::ptr`]).
    fn check_stream<T>(&self, s: &CudaSlice<T>, what: &str) -> Result<()> {
        let theirs = s.stream();
        if theirs.cu_stream() != self.stream.cu_stream()
            || theirs.context().cu_ctx() != self.ctx.cu_ctx()
        {
            bail!(
                "{what} was allocated on another CUDA stream or device; lomar orders all \
                 its work on one stream, so it cannot use that buffer"
            );
        }
        Ok(())
    }

    /// Zero-fills the memory behind `p`, queued on the stream.
    pub fn memset_zero<T>(&self, p: DevPtr<'_, T>) -> Result<()> {
        if p.len == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .context("binding the CUDA context")?;
        // SAFETY: `p` borrows the buffer holding its `p.len` elements, so they are
        // allocated now, and the buffer's free is queued on this stream after the memset.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                p.addr,
                0,
                p.len * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        }
        .context("clearing a device buffer")
    }
}

/// A typed device address and the number of elements behind it: a sub-range of a device
/// buffer, which it borrows, so it cannot outlive the memory.
///
/// Made only by [`Gpu::ptr`], so the buffer lives on the GPU's one stream and its
/// stream-ordered free follows every kernel queued through this address. Kernels write
/// through it although it is a shared borrow: device memory is not Rust memory, and the
/// one stream orders every access to it. Sub-ranges are bounds checked, and every launcher
/// checks the lengths it will touch, so a shape mistake is an error naming the tensor
/// instead of a fault on the device.
///
/// It is used while its buffer lives:
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let gpu = lomar::cuda::Gpu::open(0)?;
/// let buffer = gpu.zeros::<f32>(4, "buffer")?;
/// gpu.memset_zero(gpu.ptr(&buffer)?)?;
/// # Ok(())
/// # }
/// ```
/// and cannot be kept past it:
/// ```compile_fail,E0597
/// # fn main() -> anyhow::Result<()> {
/// let gpu = lomar::cuda::Gpu::open(0)?;
/// let p = {
///     let buffer = gpu.zeros::<f32>(4, "buffer")?;
///     gpu.ptr(&buffer)?
/// };
/// gpu.memset_zero(p)?;
/// # Ok(())
/// # }
/// ```
pub struct DevPtr<'a, T> {
    buffer: &'a CudaSlice<T>,
    addr: u64,
    len: usize,
}

impl<T> Clone for DevPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<'_, T> {}

impl<T> std::fmt::Debug for DevPtr<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevPtr({:#x}, {} x {})",
            self.addr,
            self.len,
            std::any::type_name::<T>()
        )
    }
}

impl<'a, T> DevPtr<'a, T> {
    /// The raw address, as a kernel argument.
    pub fn addr(&self) -> &u64 {
        &self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements `r` of this buffer.
    pub fn range(&self, r: Range<usize>) -> Result<DevPtr<'a, T>> {
        if r.start > r.end || r.end > self.len {
            bail!(
                "range {r:?} is outside a device buffer of {} values",
                self.len
            );
        }
        Ok(DevPtr {
            buffer: self.buffer,
            addr: self.addr + (r.start * std::mem::size_of::<T>()) as u64,
            len: r.len(),
        })
    }

    /// Errors unless at least `need` elements are behind the address.
    pub fn check(&self, need: usize, what: &str) -> Result<()> {
        if self.len < need {
            bail!(
                "{what}: the device buffer holds {} values, the launch needs {need}",
                self.len
            );
        }
        Ok(())
    }
}

fn human_bytes(bytes: usize) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes as f64 >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB)
    } else {
        format!("{:.2} MiB", bytes as f64 / MIB)
    }
}
