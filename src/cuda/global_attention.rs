//! The global (whole-sequence, no bias) attention kernels of MAE (kernels/global_attention.cu):
//! their launch plan and the launchers [`Kernels::global_attention_forward`] and
//! [`Kernels::global_attention_backward`], the GPU side of
//! `cpu::ops::global_attention`.
//!
//! forward:  qkv `[S, T, 3D]` E → out `[S, T, D]` E, lse `[S, h, T]` f32
//! backward: qkv, out, dout `[S, T, D]` E, lse → dqkv `[S, T, 3D]` E (overwritten), through
//! delta `[S, h, T]` f32 (scratch, overwritten)
//!
//! Every kernel's grid is `(S·⌈T/64⌉, h)`, a CTA owning 64 query (or key) rows of one
//! (sequence, head) and streaming the other side in tiles of 64. The backward is three
//! launches: `delta` = rowsum(dout ⊙ out) per head, `dq` over the key tiles, `dkdv` over the
//! query tiles; each output row is written by exactly one CTA, so the backward is
//! bit-reproducible without atomics.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaFunction, PushKernelArg};

use super::attention::{
    check_aligned, check_len, load_functions, DeviceLimits, Launch, Pass, HEAD_DIMS,
};
use super::device::{DevPtr, Gpu};
use super::kernels::{load_module, Kernels, GLOBAL_ATTENTION};
use super::storage::Storage;

/// Rows a CTA owns and rows of a streamed tile (kernels/global_attention.cu: `BLOCK`).
const BLOCK: usize = 64;
/// Threads per block of the delta kernel.
const DELTA_THREADS: usize = 256;

/// Sizes of one global attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalAttnShape {
    /// Sequences `S`.
    pub seqs: usize,
    /// Tokens per sequence `T`, any count.
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl GlobalAttnShape {
    /// `D = h·d`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Blocks of 64 rows per sequence.
    fn row_blocks(&self) -> usize {
        self.tokens.div_ceil(BLOCK)
    }

    fn validate(&self) -> Result<()> {
        if self.seqs == 0 || self.tokens == 0 || self.heads == 0 {
            bail!("global attention: empty shape {self:?}");
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            bail!(
                "global attention: head_dim {} has no kernel (supported: {HEAD_DIMS:?})",
                self.head_dim
            );
        }
        // Grid x is limited to 2³¹-1 blocks, y to 65535; the delta kernel indexes
        // (row, head) pairs and the kernels rows in i32.
        let pairs = self.seqs * self.tokens * self.heads;
        if self.seqs * self.row_blocks() > i32::MAX as usize
            || self.heads > 65535
            || pairs > i32::MAX as usize
        {
            bail!("global attention: shape {self:?} exceeds the kernels' grid or index range");
        }
        Ok(())
    }
}

/// Dynamic shared memory of a block: 64-row matrices of `d` columns plus 16 bytes of row
/// pad — bf16: Q (or K), dO (or V) and two stages of two; f32: two stages of two (its own
/// row lives in registers) — and in `dkdv` two stages of 64 lse and 64 delta values.
fn smem_bytes(kernel: &str, elem_size: usize, head_dim: usize) -> usize {
    let matrix = BLOCK * (head_dim + 16 / elem_size) * elem_size;
    let own = match (elem_size, kernel) {
        (4, _) => 0,
        (_, "forward") => 1,
        _ => 2,
    };
    let rows = if kernel == "backward_dkdv" {
        4 * BLOCK * 4
    } else {
        0
    };
    (own + 4) * matrix + rows
}

/// The launches of `pass` for `shape` in element type `elem` (`"f32"` or `"bf16"`), in
/// order: the forward; or the backward's delta, dq and dkdv.
pub fn plan(
    pass: Pass,
    shape: &GlobalAttnShape,
    elem: &str,
    device: &DeviceLimits,
) -> Result<Vec<Launch>> {
    shape.validate()?;
    let elem_size = match elem {
        "bf16" => 2,
        "f32" => 4,
        _ => bail!("global attention: no kernels for element type {elem}"),
    };
    let tiled = |kernel: &str| -> Result<Launch> {
        let smem = smem_bytes(kernel, elem_size, shape.head_dim);
        if smem > device.max_smem_per_block {
            bail!(
                "global attention {kernel} in {elem} with head_dim {} needs {smem} bytes of \
                 shared memory per block; this GPU allows {}",
                shape.head_dim,
                device.max_smem_per_block
            );
        }
        // A warp per 16 rows (bf16, mma.sync), a thread per row (f32).
        let threads = if elem_size == 2 { 2 * BLOCK } else { BLOCK };
        Ok(Launch {
            kernel: format!("global_attention_{kernel}_{elem}_d{}", shape.head_dim),
            grid: ((shape.seqs * shape.row_blocks()) as u32, shape.heads as u32),
            block: threads as u32,
            smem: smem as u32,
        })
    };
    Ok(match pass {
        Pass::Forward => vec![tiled("forward")?],
        Pass::Backward => {
            let pairs = shape.seqs * shape.tokens * shape.heads;
            let delta = Launch {
                kernel: format!("global_attention_delta_{elem}"),
                grid: (pairs.div_ceil(DELTA_THREADS) as u32, 1),
                block: DELTA_THREADS as u32,
                smem: 0,
            };
            vec![delta, tiled("backward_dq")?, tiled("backward_dkdv")?]
        }
    })
}

/// The names of the `elem` kernels in kernels/global_attention.cu.
fn kernel_names(elem: &str) -> Vec<String> {
    let mut names = vec![format!("global_attention_delta_{elem}")];
    for kernel in ["forward", "backward_dq", "backward_dkdv"] {
        for head_dim in HEAD_DIMS {
            names.push(format!("global_attention_{kernel}_{elem}_d{head_dim}"));
        }
    }
    names
}

/// The global attention kernels of one element type, by name.
pub(super) struct GlobalAttentionKernels {
    functions: HashMap<String, CudaFunction>,
    device: DeviceLimits,
}

impl GlobalAttentionKernels {
    /// Loads the `elem` kernels of kernels/global_attention.cu on `gpu`.
    pub(super) fn load(gpu: &Gpu, elem: &str) -> Result<Self> {
        let module = load_module(gpu, GLOBAL_ATTENTION, "global_attention")?;
        let (functions, device) = load_functions(gpu, &module, kernel_names(elem))?;
        Ok(GlobalAttentionKernels { functions, device })
    }

    fn function(&self, launch: &Launch) -> Result<&CudaFunction> {
        self.functions
            .get(&launch.kernel)
            .with_context(|| format!("global attention kernel {} is not loaded", launch.kernel))
    }
}

impl<T: Storage> Kernels<T> {
    /// qkv [S, T, 3D] T -> out [S, T, D] T, lse [S, h, T] f32, both overwritten.
    pub fn global_attention_forward(
        &self,
        qkv: DevPtr<T>,
        out: DevPtr<T>,
        lse: DevPtr<f32>,
        shape: GlobalAttnShape,
    ) -> Result<()> {
        let kernels = &self.global_attention;
        let launches = plan(Pass::Forward, &shape, T::SUFFIX, &kernels.device)?;
        let (s, t, d) = (shape.seqs, shape.tokens, shape.width());
        check_len("qkv", &qkv, s * t * 3 * d)?;
        check_len("out", &out, s * t * d)?;
        check_len("lse", &lse, s * shape.heads * t)?;
        check_aligned("qkv", &qkv)?;
        check_aligned("out", &out)?;
        let (tokens, heads) = (t as i32, shape.heads as i32);
        for launch in &launches {
            let mut args = self.stream.launch_builder(kernels.function(launch)?);
            args.arg(qkv.addr())
                .arg(out.addr())
                .arg(lse.addr())
                .arg(&tokens)
                .arg(&heads);
            self.run(args, launch.config(), &launch.kernel)?;
        }
        Ok(())
    }

    /// qkv, out, dout [S, T, D] T, lse (the forward's, for the same inputs) -> dqkv
    /// [S, T, 3D] T (overwritten); delta [S, h, T] f32 is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn global_attention_backward(
        &self,
        qkv: DevPtr<T>,
        out: DevPtr<T>,
        dout: DevPtr<T>,
        lse: DevPtr<f32>,
        delta: DevPtr<f32>,
        dqkv: DevPtr<T>,
        shape: GlobalAttnShape,
    ) -> Result<()> {
        let kernels = &self.global_attention;
        let launches = plan(Pass::Backward, &shape, T::SUFFIX, &kernels.device)?;
        let (s, t, d) = (shape.seqs, shape.tokens, shape.width());
        check_len("qkv", &qkv, s * t * 3 * d)?;
        check_len("out", &out, s * t * d)?;
        check_len("dout", &dout, s * t * d)?;
        check_len("lse", &lse, s * shape.heads * t)?;
        check_len("delta", &delta, s * shape.heads * t)?;
        check_len("dqkv", &dqkv, s * t * 3 * d)?;
        for (what, p) in [
            ("qkv", &qkv),
            ("out", &out),
            ("dout", &dout),
            ("dqkv", &dqkv),
        ] {
            check_aligned(what, p)?;
        }
        let (rows, tokens) = ((s * t) as i32, t as i32);
        let (heads, head_dim) = (shape.heads as i32, shape.head_dim as i32);
        let [delta_launch, tiled @ ..] = launches.as_slice() else {
            unreachable!("plan gives the backward three launches")
        };
        let mut args = self.stream.launch_builder(kernels.function(delta_launch)?);
        args.arg(out.addr())
            .arg(dout.addr())
            .arg(delta.addr())
            .arg(&rows)
            .arg(&tokens)
            .arg(&heads)
            .arg(&head_dim);
        self.run(args, delta_launch.config(), &delta_launch.kernel)?;
        for launch in tiled {
            let mut args = self.stream.launch_builder(kernels.function(launch)?);
            args.arg(qkv.addr())
                .arg(dout.addr())
                .arg(lse.addr())
                .arg(delta.addr())
                .arg(dqkv.addr())
                .arg(&tokens)
                .arg(&heads);
            self.run(args, launch.config(), &launch.kernel)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(seqs: usize, tokens: usize, heads: usize, head_dim: usize) -> GlobalAttnShape {
        GlobalAttnShape {
            seqs,
            tokens,
            heads,
            head_dim,
        }
    }

    fn hopper(pass: Pass, s: &GlobalAttnShape, elem: &str) -> Vec<Launch> {
        plan(pass, s, elem, &DeviceLimits::HOPPER).unwrap()
    }

    #[test]
    fn mae_decoder_at_448_by_hand() {
        // mae_base's decoder at 448: T = 785 → 13 blocks of 64 rows, 16 heads of 32.
        let s = shape(256, 785, 16, 32);
        let fwd = hopper(Pass::Forward, &s, "bf16");
        assert_eq!(fwd.len(), 1);
        assert_eq!(fwd[0].kernel, "global_attention_forward_bf16_d32");
        // Q and two stages of K and V, 64 × (32 + 8) bf16 each.
        assert_eq!(
            (fwd[0].grid, fwd[0].block, fwd[0].smem),
            ((256 * 13, 16), 128, 5 * 64 * 40 * 2)
        );
        let bwd = hopper(Pass::Backward, &s, "bf16");
        let names: Vec<&str> = bwd.iter().map(|l| l.kernel.as_str()).collect();
        assert_eq!(
            names,
            [
                "global_attention_delta_bf16",
                "global_attention_backward_dq_bf16_d32",
                "global_attention_backward_dkdv_bf16_d32"
            ]
        );
        assert_eq!(bwd[0].grid, ((256 * 785 * 16usize).div_ceil(256) as u32, 1));
        assert_eq!(bwd[1].smem, 6 * 64 * 40 * 2);
        // dkdv adds two stages of 64 lse and 64 delta floats.
        assert_eq!(bwd[2].smem, 6 * 64 * 40 * 2 + 4 * 64 * 4);
        assert_eq!(bwd[2].grid, (256 * 13, 16));
    }

    #[test]
    fn f32_runs_a_thread_per_row_without_staging_its_own_rows() {
        // vit_base's MAE encoder: T = 50, one block of 64 rows, 12 heads of 64.
        let s = shape(8, 50, 12, 64);
        let fwd = &hopper(Pass::Forward, &s, "f32")[0];
        assert_eq!(fwd.kernel, "global_attention_forward_f32_d64");
        assert_eq!(
            (fwd.grid, fwd.block, fwd.smem),
            ((8, 12), 64, 4 * 64 * 68 * 4)
        );
        let bwd = hopper(Pass::Backward, &s, "f32");
        assert_eq!(bwd[1].smem, 4 * 64 * 68 * 4);
        assert_eq!(bwd[2].smem, 4 * 64 * 68 * 4 + 4 * 64 * 4);
        // d = 128 in f32 still fits an H100's shared memory.
        let big = hopper(Pass::Backward, &shape(1, 785, 1, 128), "f32");
        assert!(big[2].smem as usize <= DeviceLimits::HOPPER.max_smem_per_block);
    }

    #[test]
    fn every_planned_kernel_is_loaded() {
        for elem in ["bf16", "f32"] {
            let names = kernel_names(elem);
            for head_dim in HEAD_DIMS {
                for tokens in [1, 17, 64, 65, 197, 785] {
                    for pass in [Pass::Forward, Pass::Backward] {
                        for l in hopper(pass, &shape(2, tokens, 3, head_dim), elem) {
                            assert!(names.contains(&l.kernel), "{l:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let device = DeviceLimits::HOPPER;
        let err = |s: GlobalAttnShape, elem: &str| {
            plan(Pass::Forward, &s, elem, &device)
                .unwrap_err()
                .to_string()
        };
        assert!(err(shape(2, 50, 2, 48), "bf16").contains("head_dim 48"));
        assert!(err(shape(0, 50, 2, 64), "bf16").contains("empty"));
        assert!(err(shape(2, 0, 2, 64), "bf16").contains("empty"));
        assert!(err(shape(2, 50, 70000, 64), "bf16").contains("grid"));
        assert!(err(shape(2, 50, 2, 64), "f16").contains("element type"));
        let small = DeviceLimits {
            max_smem_per_block: 48 * 1024,
            ..device
        };
        let e = plan(Pass::Forward, &shape(2, 50, 2, 128), "f32", &small).unwrap_err();
        assert!(e.to_string().contains("shared memory"), "{e}");
    }
}
