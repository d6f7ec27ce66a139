//! The fused windowed attention kernels (kernels/attention.cu): their launch plan and the
//! launchers [`Kernels::attention_forward`] and [`Kernels::attention_backward`].
//!
//! forward:  qkv `[S, T, 3D]` E, table `[(2K-1)²+3, h]` f32 → out `[S, T, D]` E, lse `[S, h, T]` f32
//! backward: qkv, table, out, dout `[S, T, D]` E, lse → dqkv `[S, T, 3D]` E (overwritten),
//! dtable `[(2K-1)²+3, h]` f32 (added to)
//!
//! Two implementations, picked per pass by [`plan`]:
//! - the fast kernels (kernels/attention_fast.cuh): bf16, `T ≤ 64` (K ≤ 7, vit_base's K = 7)
//!   padded to 64, head dims up to 128 forward and 80 backward; grid `(C, h)`, each CTA
//!   walking `S / C` sequences of one head;
//! - the general kernels: everything else (f32, larger windows); one block per
//!   (sequence, head), whose shared memory holds two whole `T×d` matrices plus per-warp
//!   tiles, computed here piece by piece in the kernel's order.
//!
//! Either backward writes per-CTA partial table gradients into a scratch buffer, which
//! `attention_dtable_finish` adds to dtable in a fixed order: two identical calls give
//! bit-identical tables. The scratch buffer belongs to the [`Kernels`] and is reused call
//! after call, as their stream orders the calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{DevPtr, Gpu};
use super::kernels::{load_module, Kernels, ATTENTION};
use super::storage::Storage;

/// Head dims the kernels are instantiated for.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 80, 128];

/// Most warps per block of the general kernels (kernels/attention.cu: `MAX_THREADS` = 32 × this).
const MAX_WARPS: usize = 8;
/// Tokens are padded to whole 16-row tiles.
const TILE: usize = 16;
/// Each shared-memory piece starts on this boundary (kernels/attention.cu: `SMEM_ALIGN`).
const SMEM_ALIGN: usize = 128;
/// Padding of a row of a shared f32 strip, in floats (kernels/attention.cu: `F32_PAD`).
const F32_PAD: usize = 4;
/// The fast kernels take sequences of at most this many tokens, padded to this many
/// (kernels/attention.cu instantiates them for 4 tiles of 16 only).
const FAST_TOKENS: usize = 64;
/// The fast backward keeps dQ, dK, dV rows in registers: head dims up to this one.
const FAST_BACKWARD_MAX_HEAD_DIM: usize = 80;
/// Threads per block of attention_dtable_finish.
const FINISH_THREADS: usize = 256;
/// Shared memory the driver reserves per resident block (Hopper and Ampere).
const SMEM_RESERVED_PER_BLOCK: usize = 1024;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Window sequences `S`.
    pub seqs: usize,
    /// Window side `K`; a sequence has `1 + K²` tokens.
    pub window: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// `T = 1 + K²`.
    pub fn tokens(&self) -> usize {
        1 + self.window * self.window
    }

    /// `D = h·d`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `(2K-1)² + 3`.
    pub fn table_rows(&self) -> usize {
        let span = 2 * self.window - 1;
        span * span + 3
    }

    fn validate(&self) -> Result<()> {
        if self.seqs == 0 || self.window == 0 || self.heads == 0 {
            bail!("attention: empty shape {self:?}");
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            bail!(
                "attention: head_dim {} has no kernel (supported: {HEAD_DIMS:?})",
                self.head_dim
            );
        }
        // Grid (S, h): x is limited to 2³¹-1 blocks, y to 65535.
        if self.seqs > i32::MAX as usize || self.heads > 65535 || self.window > 255 {
            bail!("attention: shape {self:?} exceeds the kernel's grid or index range");
        }
        Ok(())
    }
}

/// Which of the two passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
        }
    }
}

/// Run-time choices of the launch, for benchmarking the candidates in one run; the
/// default is what the model uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttnTuning {
    /// Sequences each CTA of the fast kernels walks (grid.x = ⌈S / this⌉); `None`: just
    /// enough CTAs for one full wave on the device.
    pub items_per_cta: Option<usize>,
    /// Run the general kernels even where the fast ones apply.
    pub force_general: bool,
}

/// What [`plan`] needs to know of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Opt-in dynamic shared memory per block.
    pub max_smem_per_block: usize,
    pub smem_per_sm: usize,
    pub sms: usize,
}

impl DeviceLimits {
    /// An H100 / H200 (132 SMs).
    pub const HOPPER: DeviceLimits = DeviceLimits {
        max_smem_per_block: 232_448,
        smem_per_sm: 233_472,
        sms: 132,
    };
}

/// One kernel launch, decided without a GPU (the CPU emulation launches exactly this).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: String,
    pub grid: (u32, u32),
    pub block: u32,
    pub smem: u32,
}

impl Launch {
    /// A fast kernel (kernels/attention_fast.cuh) takes the sequence count as well.
    fn is_fast(&self) -> bool {
        self.kernel.starts_with("attention_fast_")
    }

    pub(super) fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid.0, self.grid.1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: self.smem,
        }
    }

    /// Blocks per SM that the shared memory allows.
    fn blocks_per_sm(&self, device: &DeviceLimits) -> usize {
        (device.smem_per_sm / (self.smem as usize + SMEM_RESERVED_PER_BLOCK)).max(1)
    }
}

/// One piece of shared memory, rounded like the kernel's `SmemCursor`.
fn piece(bytes: usize) -> usize {
    bytes.next_multiple_of(SMEM_ALIGN)
}

/// Dynamic shared memory of one block of a general kernel, in the order the kernel takes it.
fn general_smem_bytes(pass: Pass, shape: &AttnShape, elem_size: usize, warps: usize) -> usize {
    let padded = shape.tokens().next_multiple_of(TILE);
    let ld = shape.head_dim + 16 / elem_size;
    let whole = piece(padded * ld * elem_size);
    let table = piece(shape.table_rows() * 4);
    let row_tile = piece(TILE * ld * elem_size);
    match pass {
        // keys, values, bias; per warp: query tile, f32 score strip, E probability strip.
        Pass::Forward => {
            let scores = piece(TILE * (padded + F32_PAD) * 4);
            let probs = piece(TILE * (padded + 16 / elem_size) * elem_size);
            2 * whole + table + warps * (row_tile + scores + probs)
        }
        // two whole matrices, bias, a table gradient per warp, lse, delta; per warp: two
        // row tiles, f32 s and dp tiles, E p and ds tiles.
        Pass::Backward => {
            let column = piece(padded * 4);
            let f32_tile = piece(TILE * TILE * 4);
            let e_tile = piece(TILE * TILE * elem_size);
            2 * whole
                + table
                + 2 * column
                + warps * (table + 2 * row_tile + 2 * f32_tile + 2 * e_tile)
        }
    }
}

/// Dynamic shared memory of a fast kernel (kernels/attention_fast.cuh): two stages of
/// 3 (forward: q, k, v) or 5 (backward: q, k, v, o, do) `Tp × (d + 8)` bf16 matrices, and
/// in the backward the staged P and dS, `Tp × (Tp + 8)` bf16 each.
fn fast_smem_bytes(pass: Pass, tiles: usize, head_dim: usize) -> usize {
    let tp = TILE * tiles;
    let matrix = tp * (head_dim + 8) * 2;
    match pass {
        Pass::Forward => 2 * 3 * matrix,
        Pass::Backward => 2 * 5 * matrix + 2 * tp * (tp + 8) * 2,
    }
}

/// The launch of `pass` for `shape` in element type `elem` (`"f32"` or `"bf16"`).
pub fn plan(
    pass: Pass,
    shape: &AttnShape,
    elem: &str,
    device: &DeviceLimits,
    tuning: AttnTuning,
) -> Result<Launch> {
    shape.validate()?;
    let max_head_dim = match pass {
        Pass::Forward => usize::MAX,
        Pass::Backward => FAST_BACKWARD_MAX_HEAD_DIM,
    };
    let fast_tiles = FAST_TOKENS / TILE;
    let smem = fast_smem_bytes(pass, fast_tiles, shape.head_dim);
    if elem == "bf16"
        && !tuning.force_general
        && shape.tokens() <= FAST_TOKENS
        && shape.head_dim <= max_head_dim
        && smem <= device.max_smem_per_block
    {
        let mut launch = Launch {
            kernel: format!(
                "attention_fast_{}_t{fast_tiles}_d{}",
                pass.name(),
                shape.head_dim
            ),
            grid: (1, shape.heads as u32),
            block: (32 * fast_tiles) as u32,
            smem: smem as u32,
        };
        let ctas = match tuning.items_per_cta {
            Some(items) => shape.seqs.div_ceil(items.max(1)),
            None => (device.sms * launch.blocks_per_sm(device)).div_ceil(shape.heads),
        };
        launch.grid.0 = ctas.clamp(1, shape.seqs) as u32;
        return Ok(launch);
    }
    let elem_size = if elem == "bf16" { 2 } else { 4 };
    let tiles = shape.tokens().div_ceil(TILE);
    let fits = (1..=tiles.min(MAX_WARPS))
        .rev()
        .map(|warps| (warps, general_smem_bytes(pass, shape, elem_size, warps)))
        .find(|&(_, bytes)| bytes <= device.max_smem_per_block);
    let Some((warps, bytes)) = fits else {
        bail!(
            "attention {} in {elem} with window {} (T = {}) and head_dim {} needs {} bytes of \
             shared memory per block; this GPU allows {}. Use bf16 or a smaller window \
             or head_dim.",
            pass.name(),
            shape.window,
            shape.tokens(),
            shape.head_dim,
            general_smem_bytes(pass, shape, elem_size, 1),
            device.max_smem_per_block,
        );
    };
    Ok(Launch {
        kernel: format!("attention_{}_{elem}_d{}", pass.name(), shape.head_dim),
        grid: (shape.seqs as u32, shape.heads as u32),
        block: (32 * warps) as u32,
        smem: bytes as u32,
    })
}

/// The launch of attention_dtable_finish after `backward`, and how many partial tables
/// per head that backward wrote (its grid.x).
pub fn plan_finish(shape: &AttnShape, backward: &Launch) -> (Launch, usize) {
    let threads = shape.table_rows() * shape.heads;
    let launch = Launch {
        kernel: "attention_dtable_finish".to_string(),
        grid: (threads.div_ceil(FINISH_THREADS) as u32, 1),
        block: FINISH_THREADS as u32,
        smem: 0,
    };
    (launch, backward.grid.0 as usize)
}

/// The functions `names` of `module`, each allowed the device's whole opt-in shared
/// memory, and what [`plan`] needs to know of the device.
pub(super) fn load_functions(
    gpu: &Gpu,
    module: &Arc<CudaModule>,
    names: Vec<String>,
) -> Result<(HashMap<String, CudaFunction>, DeviceLimits)> {
    let ctx = gpu.ctx();
    let attribute = |a| {
        ctx.attribute(a)
            .with_context(|| format!("querying {a:?}"))
            .map(|v| v as usize)
    };
    let device = DeviceLimits {
        max_smem_per_block: attribute(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?,
        smem_per_sm: attribute(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
        )?,
        sms: attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
    };
    ctx.bind_to_thread()?;
    let mut functions = HashMap::new();
    for name in names {
        let func = module
            .load_function(&name)
            .with_context(|| format!("the kernel module has no {name}"))?;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            device.max_smem_per_block as i32,
        )
        .with_context(|| {
            format!(
                "allowing {name} {} bytes of shared memory",
                device.max_smem_per_block
            )
        })?;
        functions.insert(name, func);
    }
    Ok((functions, device))
}

/// Every attention kernel for one element type, by name, allowed the device's whole opt-in
/// shared memory, and the scratch buffer of the backward's partial table gradients. Part of
/// [`Kernels`], which launches them.
pub(super) struct AttentionKernels {
    functions: HashMap<String, CudaFunction>,
    device: DeviceLimits,
    partials: Mutex<Option<CudaSlice<f32>>>,
}

/// The names of every kernel in kernels/attention.cu for element type `elem`.
fn kernel_names(elem: &str) -> Vec<String> {
    let mut names = vec!["attention_dtable_finish".to_string()];
    for pass in [Pass::Forward, Pass::Backward] {
        for head_dim in HEAD_DIMS {
            names.push(format!("attention_{}_{elem}_d{head_dim}", pass.name()));
        }
        if elem != "bf16" {
            continue;
        }
        for head_dim in HEAD_DIMS {
            if pass == Pass::Forward || head_dim <= FAST_BACKWARD_MAX_HEAD_DIM {
                names.push(format!(
                    "attention_fast_{}_t{}_d{head_dim}",
                    pass.name(),
                    FAST_TOKENS / TILE
                ));
            }
        }
    }
    names
}

impl AttentionKernels {
    /// Loads the `elem` kernels of kernels/attention.cu on `gpu`.
    pub(super) fn load(gpu: &Gpu, elem: &str) -> Result<Self> {
        let module = load_module(gpu, ATTENTION, "attention")?;
        let (functions, device) = load_functions(gpu, &module, kernel_names(elem))?;
        Ok(AttentionKernels {
            functions,
            device,
            partials: Mutex::new(None),
        })
    }

    fn function(&self, launch: &Launch) -> Result<&CudaFunction> {
        self.functions
            .get(&launch.kernel)
            .with_context(|| format!("attention kernel {} is not loaded", launch.kernel))
    }
}

/// Errors unless `p` holds exactly `want` values.
pub(super) fn check_len<T>(what: &str, p: &DevPtr<T>, want: usize) -> Result<()> {
    if p.len() != want {
        bail!(
            "attention: {what} has {} elements, the shape needs {want}",
            p.len()
        );
    }
    Ok(())
}

/// The kernels move E rows in 16-byte pieces.
pub(super) fn check_aligned<T>(what: &str, p: &DevPtr<T>) -> Result<()> {
    if !p.addr().is_multiple_of(16) {
        bail!(
            "attention: {what} starts at {:#x}, which is not 16-byte aligned",
            p.addr()
        );
    }
    Ok(())
}

impl<T: Storage> Kernels<T> {
    /// What [`plan`] is told of this device.
    pub fn attention_limits(&self) -> DeviceLimits {
        self.attention.device
    }

    /// qkv [S, T, 3D] T, table [(2K-1)²+3, h] f32 -> out [S, T, D] T, lse [S, h, T] f32,
    /// both overwritten; launched as `tuning` says (`AttnTuning::default()`: as planned).
    pub fn attention_forward(
        &self,
        qkv: DevPtr<T>,
        table: DevPtr<f32>,
        out: DevPtr<T>,
        lse: DevPtr<f32>,
        shape: AttnShape,
        tuning: AttnTuning,
    ) -> Result<()> {
        let launch = plan(
            Pass::Forward,
            &shape,
            T::SUFFIX,
            &self.attention.device,
            tuning,
        )?;
        let func = self.attention.function(&launch)?;
        let (s, t, d) = (shape.seqs, shape.tokens(), shape.width());
        check_len("qkv", &qkv, s * t * 3 * d)?;
        check_len("table", &table, shape.table_rows() * shape.heads)?;
        check_len("out", &out, s * t * d)?;
        check_len("lse", &lse, s * shape.heads * t)?;
        check_aligned("qkv", &qkv)?;
        check_aligned("out", &out)?;
        let (seqs, window, heads) = (s as i32, shape.window as i32, shape.heads as i32);
        let mut args = self.stream.launch_builder(func);
        args.arg(qkv.addr())
            .arg(table.addr())
            .arg(out.addr())
            .arg(lse.addr());
        if launch.is_fast() {
            args.arg(&seqs);
        }
        args.arg(&window).arg(&heads);
        self.run(args, launch.config(), &launch.kernel)
    }

    /// qkv, table, out, dout [S, T, D] T, lse (the forward's, for the same inputs)
    /// -> dqkv [S, T, 3D] T (overwritten), dtable [(2K-1)²+3, h] f32 (added to).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        qkv: DevPtr<T>,
        table: DevPtr<f32>,
        out: DevPtr<T>,
        dout: DevPtr<T>,
        lse: DevPtr<f32>,
        dqkv: DevPtr<T>,
        dtable: DevPtr<f32>,
        shape: AttnShape,
        tuning: AttnTuning,
    ) -> Result<()> {
        let kernels = &self.attention;
        let launch = plan(Pass::Backward, &shape, T::SUFFIX, &kernels.device, tuning)?;
        let (finish, producers) = plan_finish(&shape, &launch);
        let (func, finish_func) = (kernels.function(&launch)?, kernels.function(&finish)?);
        let (s, t, d) = (shape.seqs, shape.tokens(), shape.width());
        let table_len = shape.table_rows() * shape.heads;
        check_len("qkv", &qkv, s * t * 3 * d)?;
        check_len("table", &table, table_len)?;
        check_len("out", &out, s * t * d)?;
        check_len("dout", &dout, s * t * d)?;
        check_len("lse", &lse, s * shape.heads * t)?;
        check_len("dqkv", &dqkv, s * t * 3 * d)?;
        check_len("dtable", &dtable, table_len)?;
        for (what, p) in [
            ("qkv", &qkv),
            ("out", &out),
            ("dout", &dout),
            ("dqkv", &dqkv),
        ] {
            check_aligned(what, p)?;
        }

        let partials_len = producers * table_len;
        let mut scratch = kernels
            .partials
            .lock()
            .map_err(|_| anyhow::anyhow!("the attention scratch lock is poisoned"))?;
        if scratch.as_ref().is_none_or(|p| p.len() < partials_len) {
            *scratch = Some(
                self.stream
                    .alloc_zeros::<f32>(partials_len)
                    .context("allocating the attention table-gradient partials")?,
            );
        }
        let partials = scratch.as_mut().expect("allocated above");
        let mut partials = partials.slice_mut(0..partials_len);

        let (seqs, window, heads) = (s as i32, shape.window as i32, shape.heads as i32);
        let mut args = self.stream.launch_builder(func);
        args.arg(qkv.addr())
            .arg(table.addr())
            .arg(out.addr())
            .arg(dout.addr())
            .arg(lse.addr())
            .arg(dqkv.addr())
            .arg(&mut partials);
        if launch.is_fast() {
            args.arg(&seqs);
        }
        args.arg(&window).arg(&heads);
        self.run(args, launch.config(), &launch.kernel)?;

        // The partials: heads × producers tables of rows values, the slice's length.
        let (producers, rows) = (producers as i32, shape.table_rows() as i32);
        let mut args = self.stream.launch_builder(finish_func);
        args.arg(&mut partials)
            .arg(dtable.addr())
            .arg(&producers)
            .arg(&rows)
            .arg(&heads);
        self.run(args, finish.config(), &finish.kernel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(window: usize, head_dim: usize) -> AttnShape {
        AttnShape {
            seqs: 1024,
            window,
            heads: 12,
            head_dim,
        }
    }

    fn hopper(pass: Pass, s: &AttnShape, elem: &str) -> Result<Launch> {
        plan(pass, s, elem, &DeviceLimits::HOPPER, AttnTuning::default())
    }

    #[test]
    fn vit_base_takes_the_fast_kernels_for_one_full_wave() {
        // T = 50 → Tp = 64: 4 warps; stages of (64 × 72) bf16 matrices.
        let s = shape(7, 64);
        let fwd = hopper(Pass::Forward, &s, "bf16").unwrap();
        assert_eq!(fwd.kernel, "attention_fast_forward_t4_d64");
        assert_eq!((fwd.block, fwd.smem), (128, 2 * 3 * 64 * 72 * 2));
        // 233472 / (55296 + 1024) = 4 blocks per SM, 132 SMs, 12 heads.
        assert_eq!(fwd.grid, ((132 * 4usize).div_ceil(12) as u32, 12));
        let bwd = hopper(Pass::Backward, &s, "bf16").unwrap();
        assert_eq!(bwd.kernel, "attention_fast_backward_t4_d64");
        assert_eq!(bwd.smem, 2 * 5 * 64 * 72 * 2 + 2 * 64 * 72 * 2);
        assert_eq!(bwd.grid, (22, 12));
        let (finish, producers) = plan_finish(&s, &bwd);
        assert_eq!(producers, 22);
        assert!(finish.grid.0 as usize * FINISH_THREADS >= 172 * 12);
    }

    #[test]
    fn items_per_cta_sets_the_grid() {
        let s = shape(7, 64);
        for (items, ctas) in [(1, 1024), (4, 256), (1000, 2), (5000, 1)] {
            let tuning = AttnTuning {
                items_per_cta: Some(items),
                force_general: false,
            };
            let launch = plan(Pass::Forward, &s, "bf16", &DeviceLimits::HOPPER, tuning).unwrap();
            assert_eq!(launch.grid, (ctas, 12), "{items} items per CTA");
        }
    }

    #[test]
    fn other_cases_take_the_general_kernels() {
        let general = |pass, window, head_dim, elem| {
            let l = hopper(pass, &shape(window, head_dim), elem).unwrap();
            assert!(
                l.kernel.starts_with(&format!("attention_{}_", pass.name())),
                "{l:?}"
            );
            assert_eq!(l.grid, (1024, 12));
        };
        general(Pass::Forward, 7, 64, "f32");
        general(Pass::Backward, 7, 64, "f32");
        general(Pass::Forward, 8, 64, "bf16");
        general(Pass::Backward, 7, 128, "bf16");
        let forced = AttnTuning {
            items_per_cta: None,
            force_general: true,
        };
        let l = plan(
            Pass::Forward,
            &shape(7, 64),
            "bf16",
            &DeviceLimits::HOPPER,
            forced,
        )
        .unwrap();
        assert_eq!(l.kernel, "attention_forward_bf16_d64");
        // Every planned kernel is one the loader asks the module for.
        for elem in ["bf16", "f32"] {
            let names = kernel_names(elem);
            for window in 2..=14 {
                for head_dim in HEAD_DIMS {
                    for pass in [Pass::Forward, Pass::Backward] {
                        if let Ok(l) = hopper(pass, &shape(window, head_dim), elem) {
                            assert!(names.contains(&l.kernel), "{l:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn general_kernels_shed_warps_until_they_fit() {
        let s = shape(14, 128);
        for pass in [Pass::Forward, Pass::Backward] {
            let l = hopper(pass, &s, "bf16").unwrap();
            assert!(l.smem as usize <= DeviceLimits::HOPPER.max_smem_per_block);
            let warps = l.block as usize / 32;
            assert!((1..=MAX_WARPS).contains(&warps));
            if warps < MAX_WARPS {
                assert!(
                    general_smem_bytes(pass, &s, 2, warps + 1)
                        > DeviceLimits::HOPPER.max_smem_per_block
                );
            }
        }
        // General vit_base backward by hand: K, V 2·64·72·2 = 18432; bias 768, lse and
        // delta 2·256; per warp a table 768 + 2·2304 + 2·1024 + 2·512.
        assert_eq!(
            general_smem_bytes(Pass::Backward, &shape(7, 64), 2, 4),
            18432 + 768 + 512 + 4 * (768 + 4608 + 2048 + 1024)
        );
    }

    #[test]
    fn a_config_that_cannot_fit_is_an_error() {
        // f32, T = 197, d = 128: K and V alone take 2·208·132·4 = 219648 bytes.
        let err = hopper(Pass::Forward, &shape(14, 128), "f32").unwrap_err();
        assert!(err.to_string().contains("shared memory"), "{err}");
    }

    #[test]
    fn shapes_without_a_kernel_are_errors() {
        assert!(shape(7, 48).validate().is_err());
        assert!(shape(0, 64).validate().is_err());
        assert!(AttnShape {
            seqs: 0,
            ..shape(7, 64)
        }
        .validate()
        .is_err());
        assert!(shape(7, 64).validate().is_ok());
    }
}
