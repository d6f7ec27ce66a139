//! The scalar the CPU reference computes in: f32 for training, f64 for finite-difference
//! checks of every gradient.

use std::fmt::Debug;
use std::iter::Sum;

use num_traits::{Float, NumAssign};

use super::gemm::{self, Mat, Start};

/// A float the ops and the model are generic over. Only f32 and f64 implement it, the two
/// types the GEMM crate multiplies.
pub trait Real: Float + NumAssign + Sum + Debug + Default + Send + Sync + Copy + 'static {
    /// The error function, for the exact GELU.
    fn erf(self) -> Self;
    /// e^x by code that vectorises in f32 (src/cpu/exp.rs); libm's in f64.
    fn exp_vectorised(self) -> Self;
    /// A constant or a count, converted once; exact for f64, rounded for f32.
    fn of(v: f64) -> Self;
    /// An input pixel.
    fn of_f32(v: f32) -> Self;
    /// `dst[m, n] = start + a · b` on all cores, `dst` row-major at row stride `dst_rs`.
    /// The linear layers' products: each type on its fastest code (src/cpu/gemm.rs).
    fn product(dst: &mut [Self], dst_rs: usize, a: Mat<Self>, b: Mat<Self>, start: Start<Self>);
}

impl Real for f32 {
    #[inline]
    fn erf(self) -> Self {
        super::erf::erf_f32(self)
    }
    #[inline]
    fn exp_vectorised(self) -> Self {
        super::exp::exp_f32(self)
    }
    fn of(v: f64) -> Self {
        v as f32
    }
    fn of_f32(v: f32) -> Self {
        v
    }
    fn product(dst: &mut [Self], dst_rs: usize, a: Mat<Self>, b: Mat<Self>, start: Start<Self>) {
        gemm::product_f32(dst, dst_rs, a, b, start)
    }
}

impl Real for f64 {
    #[inline]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline]
    fn exp_vectorised(self) -> Self {
        self.exp()
    }
    fn of(v: f64) -> Self {
        v
    }
    fn of_f32(v: f32) -> Self {
        v as f64
    }
    fn product(dst: &mut [Self], dst_rs: usize, a: Mat<Self>, b: Mat<Self>, start: Start<Self>) {
        gemm::product_f64(dst, dst_rs, a, b, start)
    }
}
