//! The CUDA backend: hand-written kernels (kernels/*.cu, embedded by build.rs) and cuBLASLt,
//! driven through cudarc with dynamic loading, so nothing CUDA is needed to build or to
//! run on a machine without a GPU.
//!
//! [`CudaBackend`] implements [`crate::backend::Backend`]. The kernels' launchers
//! ([`Kernels`]) and the GEMM layer ([`BlasLt`], [`linear::LinearLayers`]) are public so each can be tested against
//! the CPU reference on its own.

mod activations;
pub mod attention;
mod backend;
pub mod blaslt;
mod block;
pub mod device;
pub mod global_attention;
pub mod kernels;
pub mod launch;
pub mod linear;
mod mae;
mod mae_activations;
pub mod mae_tokens;
mod method;
mod model;
pub mod nccl;
mod nvtx;
pub mod pixels;
pub mod step;
pub mod storage;

pub use activations::pos_slots;
pub use backend::CudaBackend;
pub use blaslt::BlasLt;
pub use device::{unavailable, DevPtr, Gpu};
pub use kernels::{Kernels, KERNELS_BUILT};
pub use mae_tokens::{decoder_pos_rows, MaeSlots};
pub use storage::Storage;
