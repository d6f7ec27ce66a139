//! The element type of activations and GEMM operands: f32 (reference mode, TF32 off) or
//! bf16 (mixed precision). Master weights, moments, gradients, the residual stream and the
//! loss are fp32 in both.

use std::fmt::Debug;

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::bf16;

pub trait Storage:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Debug + Send + Sync + 'static
{
    /// Suffix of the kernel instantiations, `f32` or `bf16`.
    const SUFFIX: &'static str;
    /// Round to nearest even, as the kernels' `from_float`.
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Storage for bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
