//! Backend selection: the one place that knows which backends this build has.

use anyhow::{bail, Result};
use clap::ValueEnum;

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;

/// `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when this build and this machine have it, else the CPU.
    Auto,
    /// The CPU reference backend (fp32, all cores).
    Cpu,
    /// The CUDA backend on the first GPU.
    Cuda,
}

/// `--precision`: what the CUDA backend computes in. The CPU always computes in fp32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// bf16 matmul inputs, fp32 accumulation and fp32 master weights.
    Bf16,
    /// fp32 throughout (TF32 off).
    Fp32,
}

/// Opens a backend holding `params`. `precision` is `None` when the user did not ask for
/// one.
pub fn open_backend(
    device: Device,
    model: &ModelConfig,
    params: Vec<f32>,
    precision: Option<Precision>,
) -> Result<Box<dyn Backend>> {
    match device {
        Device::Auto | Device::Cpu => {
            if device == Device::Cpu && precision == Some(Precision::Bf16) {
                bail!("--precision bf16 needs --device cuda; the CPU backend computes in fp32");
            }
            Ok(Box::new(CpuBackend::new(model, params)?))
        }
        Device::Cuda => {
            bail!("--device cuda: this build has no CUDA backend; use --device cpu (or auto)")
        }
    }
}
