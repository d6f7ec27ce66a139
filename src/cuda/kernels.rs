//! The embedded fatbins (one per `kernels/*.cu`, compiled by build.rs) and the functions
//! loaded from them for one storage type.

use std::marker::PhantomData;
use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchArgs, LaunchConfig};
use cudarc::nvrtc::Ptx;

use super::attention::AttentionKernels;
use super::device::Gpu;
use super::global_attention::GlobalAttentionKernels;
use super::storage::Storage;

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
pub use fatbins::*;

pub(super) fn load_module(gpu: &Gpu, fatbin: &[u8], file: &str) -> Result<Arc<CudaModule>> {
    gpu.ctx()
        .load_module(Ptx::from_binary(fatbin.to_vec()))
        .with_context(|| {
            format!("loading kernels/{file}.cu (built for sm_80/sm_90; is the driver too old?)")
        })
}

fn function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
    module
        .load_function(name)
        .with_context(|| format!("the kernel module has no function {name}"))
}

/// Every kernel of ours, instantiated for storage type `T` (plus the fp32-only ones), and
/// the stream they are launched on. The attention kernels come in many instances (per head
/// dim and path), chosen per call by `attention::plan` (and `global_attention::plan`), so
/// they are kept by name.
pub struct Kernels<T> {
    pub(super) stream: Arc<CudaStream>,
    sync_launches: bool,
    /// The gathers of f32 images and of 8-bit ones (which normalise them).
    pub(super) window_gather: CudaFunction,
    pub(super) window_gather_bytes: CudaFunction,
    pub(super) assemble_tokens_forward: CudaFunction,
    pub(super) assemble_tokens_backward: CudaFunction,
    pub(super) gather_masked_tokens: CudaFunction,
    pub(super) scatter_masked_tokens: CudaFunction,
    /// MAE's encoder and decoder inputs (`mae_tokens.rs`).
    pub(super) place_tokens_forward: CudaFunction,
    pub(super) place_tokens_backward: CudaFunction,
    pub(super) layernorm_forward: CudaFunction,
    pub(super) layernorm_backward: CudaFunction,
    pub(super) gelu_forward: CudaFunction,
    pub(super) gelu_backward: CudaFunction,
    pub(super) masked_mse: CudaFunction,
    pub(super) adamw: CudaFunction,
    pub(super) partials_finish: CudaFunction,
    pub(super) sum_squares_partial: CudaFunction,
    pub(super) sum_finish: CudaFunction,
    pub(super) step_finish: CudaFunction,
    pub(super) cast_from_f32: CudaFunction,
    pub(super) attention: AttentionKernels,
    pub(super) global_attention: GlobalAttentionKernels,
    _storage: PhantomData<T>,
}

impl<T: Storage> Kernels<T> {
    pub fn load(gpu: &Gpu) -> Result<Self> {
        let typed = |name: &str| format!("{name}_{}", T::SUFFIX);
        let gather = load_module(gpu, WINDOW_GATHER, "window_gather")?;
        let tokens = load_module(gpu, TOKENS, "tokens")?;
        let layernorm = load_module(gpu, LAYERNORM, "layernorm")?;
        let gelu = load_module(gpu, GELU, "gelu")?;
        let loss = load_module(gpu, LOSS, "loss")?;
        let adamw = load_module(gpu, ADAMW, "adamw")?;
        let reduce = load_module(gpu, REDUCE, "reduce")?;
        let elementwise = load_module(gpu, ELEMENTWISE, "elementwise")?;
        Ok(Kernels {
            stream: gpu.stream().clone(),
            sync_launches: gpu.sync_launches(),
            window_gather: function(&gather, &typed("window_gather"))?,
            window_gather_bytes: function(&gather, &typed("window_gather_bytes"))?,
            assemble_tokens_forward: function(&tokens, &typed("assemble_tokens_forward"))?,
            assemble_tokens_backward: function(&tokens, &typed("assemble_tokens_backward"))?,
            gather_masked_tokens: function(&tokens, "gather_masked_tokens")?,
            scatter_masked_tokens: function(&tokens, "scatter_masked_tokens")?,
            place_tokens_forward: function(&tokens, &typed("place_tokens_forward"))?,
            place_tokens_backward: function(&tokens, &typed("place_tokens_backward"))?,
            layernorm_forward: function(&layernorm, &typed("layernorm_forward"))?,
            layernorm_backward: function(&layernorm, &typed("layernorm_backward"))?,
            gelu_forward: function(&gelu, &typed("gelu_forward"))?,
            gelu_backward: function(&gelu, &typed("gelu_backward"))?,
            masked_mse: function(&loss, &typed("masked_mse"))?,
            adamw: function(&adamw, &typed("adamw"))?,
            partials_finish: function(&reduce, "partials_finish")?,
            sum_squares_partial: function(&reduce, "sum_squares_partial")?,
            sum_finish: function(&reduce, "sum_finish")?,
            step_finish: function(&reduce, "step_finish")?,
            cast_from_f32: function(&elementwise, &typed("cast_from_f32"))?,
            attention: AttentionKernels::load(gpu, T::SUFFIX)?,
            global_attention: GlobalAttentionKernels::load(gpu, T::SUFFIX)?,
            _storage: PhantomData,
        })
    }

    /// Launches a prepared argument list; `name` labels any error.
    pub(super) fn run(
        &self,
        mut args: LaunchArgs<'_>,
        cfg: LaunchConfig,
        name: &str,
    ) -> Result<()> {
        // SAFETY: every launcher passes exactly the kernel's parameter list, with device
        // addresses whose lengths it has checked against the launch's extent.
        unsafe { args.launch(cfg) }.with_context(|| format!("launching {name}"))?;
        if self.sync_launches {
            self.stream
                .synchronize()
                .with_context(|| format!("kernel {name} failed"))?;
        }
        Ok(())
    }
}
