//! The products of a linear layer on cuBLASLt, with the bias, its gradient and the
//! residual add fused into the GEMM's epilogue.
//!
//! cudarc's safe `Matmul` cannot express these (one element type for A, B, C, D and the
//! bias; D written over C; no BGRADB; FAST_TF32 for f32; a heuristic query per call), so
//! this layer drives `cublaslt::result` directly. A product is first described as a
//! [`GemmDesc`], plain data: cuBLASLt's column-major `D = op(A)·op(B) + β·C` followed by
//! an epilogue, with a row-major `X[r, c]` seen as the column-major `Xᵀ` with leading
//! dimension `c`. The descriptors, layouts and the algorithm the heuristic picks are made
//! once per description (shape, types, epilogue, operand alignment) and cached.
//!
//! Every product accumulates in fp32 (`CUBLAS_COMPUTE_32F`): with f32 operands that keeps
//! TF32 off (the reference mode), with bf16 operands it runs on the tensor cores.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    cublasComputeType_t, cublasLtEpilogue_t, cublasLtHandle_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDescAttributes_t, cublasLtMatmulDesc_t, cublasLtMatmulPreferenceAttributes_t,
    cublasLtMatmulPreference_t, cublasLtMatrixLayout_t, cudaDataType,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr as _};

use super::device::{DevPtr, Gpu};
use super::storage::Storage;

/// Bytes of cuBLASLt workspace: what cudarc gives it on Hopper, where the largest tiles
/// need it.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Element types of the operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub fn of<S: Storage>() -> Dtype {
        if S::SUFFIX == "f32" {
            Dtype::F32
        } else {
            Dtype::Bf16
        }
    }

    fn cuda(self) -> cudaDataType {
        match self {
            Dtype::F32 => cudaDataType::CUDA_R_32F,
            Dtype::Bf16 => cudaDataType::CUDA_R_16BF,
        }
    }
}

/// A column-major matrix as a cuBLASLt layout describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl Layout {
    /// The row-major `[rows, cols]` tensor, seen column-major.
    fn row_major(dtype: Dtype, rows: usize, cols: usize) -> Layout {
        Layout {
            dtype,
            rows: cols,
            cols: rows,
            ld: cols,
        }
    }

    /// Elements the layout spans.
    pub fn span(&self) -> usize {
        (self.cols - 1) * self.ld + self.rows
    }
}

/// What runs after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    None,
    /// `D[i, j] += bias[i]`, an f32 vector of D's `rows`.
    Bias,
    /// `bias[j] = Σ_p op(B)[p, j]`, an f32 vector of D's `cols`, written (not added).
    BGradB,
}

/// `D = op(A)·op(B) + (accumulate ? C : 0)`, then the epilogue; column-major `m × n`
/// result, inner dimension `k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmDesc {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Layout,
    pub b: Layout,
    pub c: Layout,
    pub d: Layout,
    /// β = 1 (C is read) or β = 0.
    pub accumulate: bool,
    pub epilogue: Epilogue,
}

/// The row-major sizes of a linear layer: `rows` token rows, `inp` inputs, `out` outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Linear {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

impl GemmDesc {
    /// `y[rows, out] = x[rows, in]·w[out, in]ᵀ (+ bias[out])` in `elem`: column-major
    /// `yᵀ = (wᵀ)ᵀ·xᵀ`, so A is w transposed and B is x.
    pub fn forward(s: Linear, elem: Dtype, bias: bool) -> GemmDesc {
        let y = Layout::row_major(elem, s.rows, s.out);
        GemmDesc {
            trans_a: true,
            trans_b: false,
            m: s.out,
            n: s.rows,
            k: s.inp,
            a: Layout::row_major(elem, s.out, s.inp),
            b: Layout::row_major(elem, s.rows, s.inp),
            c: y,
            d: y,
            accumulate: false,
            epilogue: if bias { Epilogue::Bias } else { Epilogue::None },
        }
    }

    /// `x_out[rows, out] = x_in + x[rows, in]·w[out, in]ᵀ + bias[out]`, the residual
    /// stream in fp32: C is `x_in`, D is `x_out` (C ≠ D), so the branch is never rounded
    /// to `elem`.
    pub fn forward_residual(s: Linear, elem: Dtype) -> GemmDesc {
        let resid = Layout::row_major(Dtype::F32, s.rows, s.out);
        GemmDesc {
            c: resid,
            d: resid,
            accumulate: true,
            ..GemmDesc::forward(s, elem, true)
        }
    }

    /// `dx[rows, in] = dy[rows, out]·w[out, in]`: column-major `dxᵀ = wᵀ·dyᵀ`.
    pub fn backward_input(s: Linear, elem: Dtype) -> GemmDesc {
        let dx = Layout::row_major(elem, s.rows, s.inp);
        GemmDesc {
            trans_a: false,
            trans_b: false,
            m: s.inp,
            n: s.rows,
            k: s.out,
            a: Layout::row_major(elem, s.out, s.inp),
            b: Layout::row_major(elem, s.rows, s.out),
            c: dx,
            d: dx,
            accumulate: false,
            epilogue: Epilogue::None,
        }
    }

    /// `dw[out, in] += dy[rows, out]ᵀ·x[rows, in]` in fp32: column-major
    /// `dwᵀ += xᵀ·dy`, so B is dy transposed and BGRADB's sum over `k` (the rows) is the
    /// bias gradient `Σ_r dy[r, :]`.
    pub fn backward_weight(s: Linear, elem: Dtype, bias_grad: bool) -> GemmDesc {
        let dw = Layout::row_major(Dtype::F32, s.out, s.inp);
        GemmDesc {
            trans_a: false,
            trans_b: true,
            m: s.inp,
            n: s.out,
            k: s.rows,
            a: Layout::row_major(elem, s.rows, s.inp),
            b: Layout::row_major(elem, s.rows, s.out),
            c: dw,
            d: dw,
            accumulate: true,
            epilogue: if bias_grad {
                Epilogue::BGradB
            } else {
                Epilogue::None
            },
        }
    }

    /// Errors unless the layouts agree with `m, n, k` and the transposes, every size fits
    /// cuBLASLt's integers, and the epilogue's types are ones we pass.
    pub fn validate(&self) -> Result<()> {
        let op = |l: &Layout, t: bool| {
            if t {
                (l.cols, l.rows)
            } else {
                (l.rows, l.cols)
            }
        };
        let want = [
            ("A", op(&self.a, self.trans_a), (self.m, self.k)),
            ("B", op(&self.b, self.trans_b), (self.k, self.n)),
            ("C", (self.c.rows, self.c.cols), (self.m, self.n)),
            ("D", (self.d.rows, self.d.cols), (self.m, self.n)),
        ];
        for (name, got, need) in want {
            if got != need {
                bail!("GEMM {name} is {got:?} after its transpose, the product needs {need:?}");
            }
        }
        for (name, l) in [("A", self.a), ("B", self.b), ("C", self.c), ("D", self.d)] {
            if l.rows == 0 || l.cols == 0 || l.ld < l.rows || l.span() > i64::MAX as usize {
                bail!("GEMM {name} layout {l:?} is empty or its leading dimension too short");
            }
        }
        if self.a.dtype != self.b.dtype || self.c.dtype != self.d.dtype {
            bail!("GEMM types: A and B must agree, and C and D ({self:?})");
        }
        if self.a.dtype == Dtype::F32 && self.d.dtype != Dtype::F32 {
            bail!("GEMM with f32 operands must write f32");
        }
        Ok(())
    }

    /// Elements of the epilogue's vector: D's rows for a bias, its columns for BGRADB.
    pub fn bias_len(&self) -> usize {
        match self.epilogue {
            Epilogue::None => 0,
            Epilogue::Bias => self.m,
            Epilogue::BGradB => self.n,
        }
    }
}

/// The largest power of two up to 256 that divides `addr`: cuBLASLt's heuristic picks
/// kernels for the alignment it is promised (256 bytes unless told), and tensors inside
/// the flat parameter buffer are often aligned to less.
pub fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        256
    } else {
        1u32 << addr.trailing_zeros().min(8)
    }
}

/// A description and the alignments of its A, B, C, D addresses: what a plan is for.
type PlanKey = (GemmDesc, [u32; 4]);

/// The cuBLASLt objects of one [`PlanKey`].
struct Plan {
    desc: cublasLtMatmulDesc_t,
    layouts: [cublasLtMatrixLayout_t; 4],
    algo: cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the objects were created by `Plan::new` (null where creation failed),
        // are destroyed once, here, and no GEMM reads them afterwards: cuBLASLt takes what
        // it needs when a matmul is enqueued. A failure after a device fault is ignored.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// A preference for the heuristic, destroyed on drop.
struct Preference(cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref`, destroyed once, here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl Preference {
    /// At most `workspace` bytes of workspace, and the alignments of A, B, C, D.
    fn new(workspace: usize, align: [u32; 4]) -> Result<Preference> {
        use cublasLtMatmulPreferenceAttributes_t as P;
        let pref = Preference(lt::create_matmul_pref().context("creating a cuBLASLt preference")?);
        let workspace = workspace as u64;
        // SAFETY: `pref.0` is live; the workspace limit is a u64, the alignments u32.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )?;
            let attrs = [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            for (attr, bytes) in attrs.into_iter().zip(&align) {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    attr,
                    bytes as *const u32 as *const c_void,
                    std::mem::size_of::<u32>(),
                )?;
            }
        }
        Ok(pref)
    }
}

/// Sets one attribute of a matmul descriptor.
///
/// # Safety
/// `desc` must be live and `T` the attribute's type.
unsafe fn set_desc<T>(
    desc: cublasLtMatmulDesc_t,
    attr: cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .with_context(|| format!("setting cuBLASLt {attr:?}"))
}

/// The TRANSA / TRANSB attribute: an int32 `cublasOperation_t`, 1 for CUBLAS_OP_T.
fn op(transpose: bool) -> i32 {
    i32::from(transpose)
}

impl Plan {
    /// The descriptor and layouts of `g`, and the algorithm the heuristic picks for them at
    /// the given alignments; an error names the description when there is none.
    fn new(handle: cublasLtHandle_t, (g, align): &PlanKey) -> Result<Plan> {
        use cublasLtMatmulDescAttributes_t as A;
        g.validate()?;
        let desc = lt::create_matmul_desc(
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudaDataType::CUDA_R_32F,
        )
        .context("creating a cuBLASLt matmul descriptor")?;
        // Owned from here, so an early return destroys what was made.
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 4],
            algo: cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        for (slot, l) in plan.layouts.iter_mut().zip([g.a, g.b, g.c, g.d]) {
            *slot =
                lt::create_matrix_layout(l.dtype.cuda(), l.rows as u64, l.cols as u64, l.ld as i64)
                    .context("creating a cuBLASLt matrix layout")?;
        }
        let epilogue = match g.epilogue {
            Epilogue::None => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::BGradB => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
        };
        // SAFETY: `desc` is live and each value has its attribute's type.
        unsafe {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.trans_a))?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.trans_b))?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
            if g.epilogue != Epilogue::None {
                set_desc(
                    desc,
                    A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &cudaDataType::CUDA_R_32F,
                )?;
            }
        }
        let pref = Preference::new(WORKSPACE_BYTES, *align)?;
        let [a, b, c, d] = plan.layouts;
        // SAFETY: the handle, descriptor, layouts and preference are live.
        let found = unsafe { lt::get_matmul_algo_heuristic(handle, desc, a, b, c, d, pref.0) }
            .with_context(|| {
                format!("cuBLASLt has no algorithm for {g:?} with alignments {align:?}")
            })?;
        plan.algo = found.algo;
        Ok(plan)
    }
}

/// cuBLASLt on the GPU's stream, with its workspace and the plans made so far.
pub struct BlasLt {
    handle: cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: RefCell<HashMap<PlanKey, Plan>>,
    sync_launches: bool,
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // The plans go before the handle they were made for.
        self.plans.get_mut().clear();
        // SAFETY: the handle is live and nothing uses it after this; a failure after a
        // device fault is ignored.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl BlasLt {
    pub fn new(gpu: &Gpu) -> Result<BlasLt> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            bail!(
                "cuBLASLt 13 not found: libcublasLt.so.13 could not be loaded; install it \
                 (pip install nvidia-cublas) and put its nvidia/cu13/lib directory on LD_LIBRARY_PATH"
            );
        }
        gpu.ctx()
            .bind_to_thread()
            .context("binding the CUDA context")?;
        let workspace = gpu.zeros::<u8>(WORKSPACE_BYTES, "cuBLASLt workspace")?;
        let handle = lt::create_handle().context("creating the cuBLASLt handle")?;
        Ok(BlasLt {
            handle,
            stream: gpu.stream().clone(),
            workspace,
            plans: RefCell::new(HashMap::new()),
            sync_launches: gpu.sync_launches(),
        })
    }

    /// Plans made so far (one per description and alignment).
    pub fn plans(&self) -> usize {
        self.plans.borrow().len()
    }

    /// `y = x·wᵀ (+ bias)`, y in the storage type.
    pub fn linear_forward<S: Storage>(
        &self,
        x: DevPtr<'_, S>,
        w: DevPtr<'_, S>,
        bias: Option<DevPtr<'_, f32>>,
        y: DevPtr<'_, S>,
        s: Linear,
    ) -> Result<()> {
        let g = GemmDesc::forward(s, Dtype::of::<S>(), bias.is_some());
        self.matmul(&g, [*w.addr(), *x.addr()], y, y, bias, [w.len(), x.len()])
            .context("linear_forward GEMM")
    }

    /// `x_out = x_in + x·wᵀ + bias`, the residual stream in fp32.
    pub fn linear_forward_residual<S: Storage>(
        &self,
        x: DevPtr<'_, S>,
        w: DevPtr<'_, S>,
        bias: DevPtr<'_, f32>,
        x_in: DevPtr<'_, f32>,
        x_out: DevPtr<'_, f32>,
        s: Linear,
    ) -> Result<()> {
        let g = GemmDesc::forward_residual(s, Dtype::of::<S>());
        self.matmul(
            &g,
            [*w.addr(), *x.addr()],
            x_in,
            x_out,
            Some(bias),
            [w.len(), x.len()],
        )
        .context("linear_forward_residual GEMM")
    }

    /// `dx = dy·w`.
    pub fn linear_backward_input<S: Storage>(
        &self,
        dy: DevPtr<'_, S>,
        w: DevPtr<'_, S>,
        dx: DevPtr<'_, S>,
        s: Linear,
    ) -> Result<()> {
        let g = GemmDesc::backward_input(s, Dtype::of::<S>());
        self.matmul(
            &g,
            [*w.addr(), *dy.addr()],
            dx,
            dx,
            None,
            [w.len(), dy.len()],
        )
        .context("linear_backward_input GEMM")
    }

    /// `dw += dyᵀ·x` in fp32; with `db`, also `db = Σ_rows dy` (written, not added).
    pub fn linear_backward_weight<S: Storage>(
        &self,
        dy: DevPtr<'_, S>,
        x: DevPtr<'_, S>,
        dw: DevPtr<'_, f32>,
        db: Option<DevPtr<'_, f32>>,
        s: Linear,
    ) -> Result<()> {
        let g = GemmDesc::backward_weight(s, Dtype::of::<S>(), db.is_some());
        self.matmul(&g, [*x.addr(), *dy.addr()], dw, dw, db, [x.len(), dy.len()])
            .context("linear_backward_weight GEMM")
    }

    /// Runs `g` on A and B at `ab` (holding `ab_len` elements), C at `c`, D at `d`, with
    /// the epilogue's vector.
    fn matmul<C, D>(
        &self,
        g: &GemmDesc,
        ab: [u64; 2],
        c: DevPtr<'_, C>,
        d: DevPtr<'_, D>,
        vector: Option<DevPtr<'_, f32>>,
        ab_len: [usize; 2],
    ) -> Result<()> {
        g.validate()?;
        for (name, have, need) in [
            ("A", ab_len[0], g.a.span()),
            ("B", ab_len[1], g.b.span()),
            ("C", c.len(), g.c.span()),
            ("D", d.len(), g.d.span()),
        ] {
            if have < need {
                bail!(
                    "GEMM {name}: the device buffer holds {have} values, the product needs {need}"
                );
            }
        }
        let vector = match (g.epilogue, vector) {
            (Epilogue::None, None) => None,
            (Epilogue::None, Some(_)) => bail!("GEMM without an epilogue was given a bias"),
            (_, None) => bail!("GEMM epilogue {:?} needs its vector", g.epilogue),
            (_, Some(v)) => {
                v.check(g.bias_len(), "GEMM epilogue vector")?;
                Some(*v.addr())
            }
        };
        let key = (*g, [ab[0], ab[1], *c.addr(), *d.addr()].map(alignment));
        self.stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context")?;
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(self.handle, &key)?),
        };
        if let Some(v) = vector {
            // SAFETY: the descriptor is live and the bias pointer attribute is a device
            // address; cuBLASLt reads it when the matmul is enqueued below.
            unsafe {
                set_desc(
                    plan.desc,
                    cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &v,
                )?
            };
        }
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let (ws, _guard) = self.workspace.device_ptr(&self.stream);
        // SAFETY: every buffer holds at least the span its layout covers (checked above),
        // the epilogue vector its length, all borrowed until this call returns and freed
        // only in stream order after it; alpha and beta are f32 as the f32 scale type
        // requires; the plan's objects are live.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                ab[0] as *const c_void,
                plan.layouts[0],
                ab[1] as *const c_void,
                plan.layouts[1],
                *c.addr() as *const c_void,
                plan.layouts[2],
                *d.addr() as *mut c_void,
                plan.layouts[3],
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| anyhow::anyhow!("cublasLtMatmul failed: {e:?}"))?;
        if self.sync_launches {
            self.stream
                .synchronize()
                .context("a cuBLASLt GEMM failed")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::linear;

    /// cuBLASLt's contract, read literally from a [`GemmDesc`]: column-major operands at
    /// their leading dimensions, the transposes, β, and the epilogue. Returns D's buffer
    /// (starting from `d`) and the BGRADB vector.
    fn interpret(
        g: &GemmDesc,
        a: &[f64],
        b: &[f64],
        c: &[f64],
        bias: &[f64],
        d: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        g.validate().unwrap();
        assert!(a.len() >= g.a.span() && b.len() >= g.b.span() && c.len() >= g.c.span());
        let op_a = |i: usize, p: usize| {
            if g.trans_a {
                a[p + i * g.a.ld]
            } else {
                a[i + p * g.a.ld]
            }
        };
        let op_b = |p: usize, j: usize| {
            if g.trans_b {
                b[j + p * g.b.ld]
            } else {
                b[p + j * g.b.ld]
            }
        };
        let mut out = d.to_vec();
        for j in 0..g.n {
            for i in 0..g.m {
                let mut v: f64 = (0..g.k).map(|p| op_a(i, p) * op_b(p, j)).sum();
                if g.accumulate {
                    v += c[i + j * g.c.ld];
                }
                if g.epilogue == Epilogue::Bias {
                    v += bias[i];
                }
                out[i + j * g.d.ld] = v;
            }
        }
        let grad = match g.epilogue {
            Epilogue::BGradB => (0..g.n)
                .map(|j| (0..g.k).map(|p| op_b(p, j)).sum())
                .collect(),
            _ => Vec::new(),
        };
        (out, grad)
    }

    const S: Linear = Linear {
        rows: 7,
        inp: 5,
        out: 3,
    };

    fn values(n: usize, seed: f64) -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + 1.0) * seed).sin()).collect()
    }

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-12, "[{i}]: {g} vs {w}");
        }
    }

    fn operands() -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let x = values(S.rows * S.inp, 0.7);
        let w = values(S.out * S.inp, 1.3);
        let b = values(S.out, 2.1);
        let dy = values(S.rows * S.out, 0.4);
        (x, w, b, dy)
    }

    #[test]
    fn forward_descriptors_are_the_row_major_linear_layer() {
        let (x, w, b, _) = operands();
        for bias in [false, true] {
            let g = GemmDesc::forward(S, Dtype::Bf16, bias);
            let zero = vec![0.0; S.out];
            let used = if bias { &b } else { &zero };
            let mut want = vec![0.0; S.rows * S.out];
            linear::linear_forward(&mut want, &x, &w, used);
            let nan = vec![f64::NAN; S.rows * S.out];
            let (got, _) = interpret(&g, &w, &x, &nan, &b, &nan);
            close(&got, &want);
            assert_eq!(g.bias_len(), if bias { S.out } else { 0 });
        }
    }

    #[test]
    fn the_residual_descriptor_adds_into_a_separate_fp32_output() {
        let (x, w, b, _) = operands();
        let x_in = values(S.rows * S.out, 3.3);
        let g = GemmDesc::forward_residual(S, Dtype::Bf16);
        assert_eq!(
            (g.c.dtype, g.d.dtype, g.a.dtype),
            (Dtype::F32, Dtype::F32, Dtype::Bf16)
        );
        let mut want = vec![0.0; x_in.len()];
        linear::linear_forward_residual(&mut want, &x_in, &x, &w, &b);
        let (got, _) = interpret(&g, &w, &x, &x_in, &b, &vec![f64::NAN; x_in.len()]);
        close(&got, &want);
    }

    #[test]
    fn backward_descriptors_are_the_row_major_gradients() {
        let (x, w, _, dy) = operands();
        let dw_start = values(S.out * S.inp, 5.1);
        let mut want_dx = vec![0.0; x.len()];
        let mut want_dw = dw_start.clone();
        let mut want_db = vec![0.0; S.out];
        linear::linear_backward(Some(&mut want_dx), &mut want_dw, &mut want_db, &dy, &x, &w);

        let g = GemmDesc::backward_input(S, Dtype::F32);
        let nan = vec![f64::NAN; x.len()];
        let (dx, _) = interpret(&g, &w, &dy, &nan, &[], &nan);
        close(&dx, &want_dx);

        let g = GemmDesc::backward_weight(S, Dtype::Bf16, true);
        assert_eq!((g.d.dtype, g.bias_len()), (Dtype::F32, S.out));
        let (dw, db) = interpret(&g, &x, &dy, &dw_start, &[], &dw_start);
        close(&dw, &want_dw);
        close(&db, &want_db);
        assert_eq!(
            GemmDesc::backward_weight(S, Dtype::Bf16, false).bias_len(),
            0
        );
    }

    #[test]
    fn inconsistent_descriptors_are_refused() {
        let good = GemmDesc::forward(S, Dtype::F32, true);
        good.validate().unwrap();
        let flipped = GemmDesc {
            trans_a: false,
            ..good
        };
        assert!(flipped
            .validate()
            .unwrap_err()
            .to_string()
            .contains("GEMM A"));
        let short = GemmDesc {
            b: Layout { ld: 1, ..good.b },
            ..good
        };
        assert!(short.validate().is_err());
        let narrowing = GemmDesc {
            d: Layout {
                dtype: Dtype::Bf16,
                ..good.d
            },
            c: Layout {
                dtype: Dtype::Bf16,
                ..good.c
            },
            ..good
        };
        assert!(narrowing.validate().is_err());
        let empty = GemmDesc::forward(Linear { rows: 0, ..S }, Dtype::F32, false);
        assert!(empty.validate().is_err());
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x1000 + 2), 2);
        assert_eq!(alignment(0x1000 + 4), 4);
        assert_eq!(alignment(0x1000 + 96), 32);
        assert_eq!(alignment(0x1000 + 512), 256);
    }
}
