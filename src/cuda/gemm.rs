//! The three products of a linear layer on cuBLAS, for row-major tensors.
//!
//! cuBLAS is column-major: a row-major `X[r, c]` is a column-major `X^T` with leading
//! dimension `c`, so each row-major product below is issued as its transpose. Every GEMM
//! accumulates in fp32 (`CUBLAS_COMPUTE_32F`): with f32 operands that rules out TF32, with
//! bf16 operands it runs on the tensor cores. Weight gradients are written in fp32 straight
//! into the gradient buffer with beta = 1, so they accumulate across micro-batches.

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::cublas::result::{destroy_handle, gemm_ex};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasMath_t, cublasOperation_t, cublasSetMathMode,
    cublasSetWorkspace_v2, cudaDataType,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream};

use super::device::{DevPtr, Gpu};
use super::storage::Storage;

/// cuBLAS's workspace: 32 MiB, what it takes by default on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

const N: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;
const T: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;

pub struct Blas {
    /// Never dropped by cudarc: its Drop unwraps cublasDestroy, which fails after a device
    /// fault and would turn an error report into a panic. [`Blas`]'s Drop destroys the
    /// handle instead and ignores that failure (the wrapper's stream reference is leaked).
    blas: ManuallyDrop<CudaBlas>,
    /// Set once on the handle, so no GEMM allocates (a captured one must not).
    _workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    sync_launches: bool,
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is valid and nothing uses it after this.
        let _ = unsafe { destroy_handle(*self.blas.handle()) };
    }
}

/// One column-major operand: address, element type, leading dimension.
struct Operand {
    addr: u64,
    dtype: cudaDataType,
    ld: usize,
}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Blas> {
        let stream = gpu.stream();
        let blas = CudaBlas::new(stream.clone()).context("creating the cuBLAS handle")?;
        // The default math mode never lowers precision below the compute type (no TF32).
        // SAFETY: a valid handle and a valid enum value.
        unsafe { cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_DEFAULT_MATH) }
            .result()
            .context("setting the cuBLAS math mode")?;
        let workspace = gpu.zeros::<u8>(WORKSPACE_BYTES, "cuBLAS workspace")?;
        let addr = *gpu.ptr(&workspace)?.addr();
        // SAFETY: a valid handle, and a device buffer of that many bytes that lives as long
        // as the handle (dropped with it).
        unsafe { cublasSetWorkspace_v2(*blas.handle(), addr as *mut c_void, WORKSPACE_BYTES) }
            .result()
            .context("setting the cuBLAS workspace")?;
        Ok(Blas {
            blas: ManuallyDrop::new(blas),
            _workspace: workspace,
            stream: stream.clone(),
            sync_launches: gpu.sync_launches(),
        })
    }

    /// y[rows, out] = x[rows, in] · w[out, in]^T  (nn.Linear without its bias).
    pub fn linear_forward<S: Storage>(
        &self,
        x: DevPtr<S>,
        w: DevPtr<S>,
        y: DevPtr<S>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<()> {
        x.check(rows * inp, "linear_forward x")?;
        w.check(out * inp, "linear_forward w")?;
        y.check(rows * out, "linear_forward y")?;
        self.gemm(
            (T, N),
            (out, rows, inp),
            operand(&w, inp),
            operand(&x, inp),
            operand(&y, out),
            0.0,
        )
        .context("linear_forward GEMM")
    }

    /// dx[rows, in] = dy[rows, out] · w[out, in].
    pub fn linear_backward_input<S: Storage>(
        &self,
        dy: DevPtr<S>,
        w: DevPtr<S>,
        dx: DevPtr<S>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<()> {
        dy.check(rows * out, "linear_backward_input dy")?;
        w.check(out * inp, "linear_backward_input w")?;
        dx.check(rows * inp, "linear_backward_input dx")?;
        self.gemm(
            (N, N),
            (inp, rows, out),
            operand(&w, inp),
            operand(&dy, out),
            operand(&dx, inp),
            0.0,
        )
        .context("linear_backward_input GEMM")
    }

    /// dw[out, in] += dy[rows, out]^T · x[rows, in], in fp32.
    pub fn linear_backward_weight<S: Storage>(
        &self,
        dy: DevPtr<S>,
        x: DevPtr<S>,
        dw: DevPtr<f32>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<()> {
        dy.check(rows * out, "linear_backward_weight dy")?;
        x.check(rows * inp, "linear_backward_weight x")?;
        dw.check(out * inp, "linear_backward_weight dw")?;
        self.gemm(
            (N, T),
            (inp, out, rows),
            operand(&x, inp),
            operand(&dy, out),
            operand(&dw, inp),
            1.0,
        )
        .context("linear_backward_weight GEMM")
    }

    /// Column-major C[m, n] = alpha op(A)[m, k] · op(B)[k, n] + beta C, alpha = 1.
    fn gemm(
        &self,
        (transa, transb): (cublasOperation_t, cublasOperation_t),
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
        beta: f32,
    ) -> Result<()> {
        let dims = [m, n, k, a.ld, b.ld, c.ld];
        if dims.iter().any(|&d| d == 0 || d > i32::MAX as usize) {
            bail!("GEMM dimensions {dims:?} (m, n, k, lda, ldb, ldc) must be in 1..2^31");
        }
        let alpha = 1.0f32;
        self.stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context")?;
        // SAFETY: the callers checked every operand's length against m, n, k; alpha and
        // beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                transa,
                transb,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                a.addr as *const c_void,
                a.dtype,
                a.ld as i32,
                b.addr as *const c_void,
                b.dtype,
                b.ld as i32,
                &beta as *const f32 as *const c_void,
                c.addr as *mut c_void,
                c.dtype,
                c.ld as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow::anyhow!("cublasGemmEx failed: {e:?}"))?;
        if self.sync_launches {
            self.stream.synchronize().context("a cuBLAS GEMM failed")?;
        }
        Ok(())
    }
}

fn operand<S: Storage>(p: &DevPtr<S>, ld: usize) -> Operand {
    Operand {
        addr: *p.addr(),
        dtype: S::BLAS_TYPE,
        ld,
    }
}
