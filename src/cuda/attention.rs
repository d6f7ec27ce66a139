//! Launchers of the fused windowed attention kernels (kernels/attention.cu).
//!
//! forward:  qkv `[S, T, 3D]` E, table `[(2K-1)²+3, h]` f32 → out `[S, T, D]` E, lse `[S, h, T]` f32
//! backward: qkv, table, out, dout `[S, T, D]` E, lse → dqkv `[S, T, 3D]` E (overwritten),
//! dtable `[(2K-1)²+3, h]` f32 (added to)
//!
//! One block per (sequence, head); the block's shared memory holds two whole `T×d` matrices
//! plus per-warp tiles, and its size is computed here piece by piece in the kernel's order.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::bf16;

/// Head dims the kernels are instantiated for.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 80, 128];

/// Most warps per block (kernels/attention.cu: `MAX_THREADS` = 32 × this).
const MAX_WARPS: usize = 8;
/// Tokens are padded to whole 16-row tiles.
const TILE: usize = 16;
/// Each shared-memory piece starts on this boundary (kernels/attention.cu: `SMEM_ALIGN`).
const SMEM_ALIGN: usize = 128;
/// Padding of a row of a shared f32 strip, in floats (kernels/attention.cu: `F32_PAD`).
const F32_PAD: usize = 4;

/// An element type the kernels are instantiated for.
pub trait AttnElem: DeviceRepr {
    /// Kernel-name suffix.
    const NAME: &'static str;
}

impl AttnElem for f32 {
    const NAME: &'static str = "f32";
}

impl AttnElem for bf16 {
    const NAME: &'static str = "bf16";
}

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

/// Which of the two kernels.
#[derive(Clone, Copy, Debug)]
enum Pass {
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

fn kernel_name(pass: Pass, elem: &str, head_dim: usize) -> String {
    format!("attention_{}_{elem}_d{head_dim}", pass.name())
}

/// One piece of shared memory, rounded like the kernel's `SmemCursor`.
fn piece(bytes: usize) -> usize {
    bytes.next_multiple_of(SMEM_ALIGN)
}

/// Dynamic shared memory of one block, in the order the kernel takes it.
fn smem_bytes(pass: Pass, shape: &AttnShape, elem_size: usize, warps: usize) -> usize {
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
        // two whole matrices, bias, dbias, lse, delta; per warp: two row tiles, f32 s and
        // dp tiles, E p and ds tiles.
        Pass::Backward => {
            let column = piece(padded * 4);
            let f32_tile = piece(TILE * TILE * 4);
            let e_tile = piece(TILE * TILE * elem_size);
            2 * whole + 2 * table + 2 * column + warps * (2 * row_tile + 2 * f32_tile + 2 * e_tile)
        }
    }
}

/// Block size and shared memory: a warp per 16-token tile up to MAX_WARPS, fewer when the
/// per-warp buffers would not fit in `max_smem`.
fn launch_config(
    pass: Pass,
    shape: &AttnShape,
    elem: &str,
    elem_size: usize,
    max_smem: usize,
) -> Result<LaunchConfig> {
    let tiles = shape.tokens().div_ceil(TILE);
    let fits = (1..=tiles.min(MAX_WARPS))
        .rev()
        .map(|warps| (warps, smem_bytes(pass, shape, elem_size, warps)))
        .find(|&(_, bytes)| bytes <= max_smem);
    let Some((warps, bytes)) = fits else {
        bail!(
            "attention {} in {elem} with window {} (T = {}) and head_dim {} needs {} bytes of \
             shared memory per block; this GPU allows {max_smem}. Use bf16 or a smaller window \
             or head_dim.",
            pass.name(),
            shape.window,
            shape.tokens(),
            shape.head_dim,
            smem_bytes(pass, shape, elem_size, 1),
        );
    };
    Ok(LaunchConfig {
        grid_dim: (shape.seqs as u32, shape.heads as u32, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: bytes as u32,
    })
}

/// Every attention kernel of the module, by name, allowed the device's whole opt-in
/// shared memory.
pub struct AttentionKernels {
    functions: HashMap<String, CudaFunction>,
    max_smem: usize,
}

impl AttentionKernels {
    /// Loads the kernels from `module` (the fatbin of kernels/attention.cu) on `ctx`.
    pub fn load(ctx: &Arc<CudaContext>, module: &Arc<CudaModule>) -> Result<Self> {
        let max_smem = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .context("querying the opt-in shared memory per block")?;
        ctx.bind_to_thread()?;
        let mut functions = HashMap::new();
        for pass in [Pass::Forward, Pass::Backward] {
            for elem in [f32::NAME, bf16::NAME] {
                for head_dim in HEAD_DIMS {
                    let name = kernel_name(pass, elem, head_dim);
                    let func = module
                        .load_function(&name)
                        .with_context(|| format!("the attention module has no {name}"))?;
                    func.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        max_smem,
                    )
                    .with_context(|| {
                        format!("allowing {name} {max_smem} bytes of shared memory")
                    })?;
                    functions.insert(name, func);
                }
            }
        }
        Ok(AttentionKernels {
            functions,
            max_smem: max_smem as usize,
        })
    }

    fn prepare<E: AttnElem>(
        &self,
        pass: Pass,
        shape: &AttnShape,
    ) -> Result<(&CudaFunction, LaunchConfig)> {
        shape.validate()?;
        let name = kernel_name(pass, E::NAME, shape.head_dim);
        let func = self
            .functions
            .get(&name)
            .with_context(|| format!("attention kernel {name} is not loaded"))?;
        let cfg = launch_config(
            pass,
            shape,
            E::NAME,
            std::mem::size_of::<E>(),
            self.max_smem,
        )?;
        Ok((func, cfg))
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        bail!("attention: {what} has {got} elements, the shape needs {want}");
    }
    Ok(())
}

/// The kernels move E rows in 16-byte pieces.
fn check_aligned<T>(what: &str, buf: &impl DevicePtr<T>, stream: &CudaStream) -> Result<()> {
    let (addr, _sync) = buf.device_ptr(stream);
    if addr % 16 != 0 {
        bail!("attention: {what} starts at {addr:#x}, which is not 16-byte aligned");
    }
    Ok(())
}

/// Enqueues the forward on `stream`: `out` and `lse` are overwritten.
pub fn attention_forward<E: AttnElem>(
    stream: &Arc<CudaStream>,
    kernels: &AttentionKernels,
    qkv: &CudaView<E>,
    table: &CudaView<f32>,
    out: &mut CudaViewMut<E>,
    lse: &mut CudaViewMut<f32>,
    shape: AttnShape,
) -> Result<()> {
    let (func, cfg) = kernels.prepare::<E>(Pass::Forward, &shape)?;
    let (s, t, d) = (shape.seqs, shape.tokens(), shape.width());
    check_len("qkv", qkv.len(), s * t * 3 * d)?;
    check_len("table", table.len(), shape.table_rows() * shape.heads)?;
    check_len("out", out.len(), s * t * d)?;
    check_len("lse", lse.len(), s * shape.heads * t)?;
    check_aligned("qkv", qkv, stream)?;
    check_aligned("out", out, stream)?;
    let (window, heads) = (shape.window as i32, shape.heads as i32);
    let mut args = stream.launch_builder(func);
    args.arg(qkv)
        .arg(table)
        .arg(out)
        .arg(lse)
        .arg(&window)
        .arg(&heads);
    // SAFETY: the arguments match the kernel's parameter list, every buffer's length was
    // checked against the shape the grid covers, and the E buffers are 16-byte aligned.
    unsafe { args.launch(cfg) }.context("launching the attention forward")?;
    Ok(())
}

/// Enqueues the backward on `stream`: `dqkv` is overwritten, `dtable` is added to.
/// `out` and `lse` are the forward's outputs for the same inputs.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<E: AttnElem>(
    stream: &Arc<CudaStream>,
    kernels: &AttentionKernels,
    qkv: &CudaView<E>,
    table: &CudaView<f32>,
    out: &CudaView<E>,
    dout: &CudaView<E>,
    lse: &CudaView<f32>,
    dqkv: &mut CudaViewMut<E>,
    dtable: &mut CudaViewMut<f32>,
    shape: AttnShape,
) -> Result<()> {
    let (func, cfg) = kernels.prepare::<E>(Pass::Backward, &shape)?;
    let (s, t, d) = (shape.seqs, shape.tokens(), shape.width());
    let table_len = shape.table_rows() * shape.heads;
    check_len("qkv", qkv.len(), s * t * 3 * d)?;
    check_len("table", table.len(), table_len)?;
    check_len("out", out.len(), s * t * d)?;
    check_len("dout", dout.len(), s * t * d)?;
    check_len("lse", lse.len(), s * shape.heads * t)?;
    check_len("dqkv", dqkv.len(), s * t * 3 * d)?;
    check_len("dtable", dtable.len(), table_len)?;
    check_aligned("qkv", qkv, stream)?;
    check_aligned("out", out, stream)?;
    check_aligned("dout", dout, stream)?;
    check_aligned("dqkv", dqkv, stream)?;
    let (window, heads) = (shape.window as i32, shape.heads as i32);
    let mut args = stream.launch_builder(func);
    args.arg(qkv)
        .arg(table)
        .arg(out)
        .arg(dout)
        .arg(lse)
        .arg(dqkv)
        .arg(dtable)
        .arg(&window)
        .arg(&heads);
    // SAFETY: as in the forward; dqkv and dtable are the only buffers written.
    unsafe { args.launch(cfg) }.context("launching the attention backward")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hopper's opt-in shared memory per block.
    const H100_SMEM: usize = 232_448;

    fn shape(window: usize, head_dim: usize) -> AttnShape {
        AttnShape {
            seqs: 1024,
            window,
            heads: 12,
            head_dim,
        }
    }

    #[test]
    fn vit_base_uses_a_warp_per_tile_and_fits_four_blocks_per_sm() {
        // T = 50 → 4 tiles of 16 tokens, padded to 64; bf16 rows of d + 8 = 72.
        let s = shape(7, 64);
        for pass in [Pass::Forward, Pass::Backward] {
            let cfg = launch_config(pass, &s, "bf16", 2, H100_SMEM).unwrap();
            assert_eq!(cfg.block_dim, (128, 1, 1));
            assert_eq!(cfg.grid_dim, (1024, 12, 1));
            assert!(4 * (cfg.shared_mem_bytes as usize + 1024) <= 233_472);
        }
        // Forward by hand: K and V 2·64·72·2 = 18432; bias 172·4 → 768; per warp
        // q 16·72·2 = 2304, scores 16·68·4 = 4352, probs 16·72·2 = 2304.
        assert_eq!(
            smem_bytes(Pass::Forward, &s, 2, 4),
            18432 + 768 + 4 * (2304 + 4352 + 2304)
        );
        // Backward: 18432 + bias, dbias 2·768 + lse, delta 2·256 + per warp
        // 2·2304 + 2·1024 + 2·512.
        assert_eq!(
            smem_bytes(Pass::Backward, &s, 2, 4),
            18432 + 1536 + 512 + 4 * (4608 + 2048 + 1024)
        );
    }

    #[test]
    fn large_windows_shed_warps_until_they_fit() {
        let s = shape(14, 128);
        for pass in [Pass::Forward, Pass::Backward] {
            let cfg = launch_config(pass, &s, "bf16", 2, H100_SMEM).unwrap();
            assert!(cfg.shared_mem_bytes as usize <= H100_SMEM);
            let warps = cfg.block_dim.0 as usize / 32;
            assert!((1..=MAX_WARPS).contains(&warps));
            if warps < MAX_WARPS {
                assert!(smem_bytes(pass, &s, 2, warps + 1) > H100_SMEM);
            }
        }
    }

    #[test]
    fn a_config_that_cannot_fit_is_an_error() {
        // f32, T = 197, d = 128: K and V alone take 2·208·132·4 = 219648 bytes.
        let err = launch_config(Pass::Forward, &shape(14, 128), "f32", 4, H100_SMEM).unwrap_err();
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
