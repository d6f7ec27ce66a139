//! Backend selection: the one place that knows which backends this build has.

use anyhow::{bail, Result};
use clap::ValueEnum;

use crate::backend::{Backend, Precision};
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::cuda::{self, CudaBackend};

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

/// Opens a backend holding `params`. `precision` is `None` when the user did not ask for
/// one.
pub fn open_backend(
    device: Device,
    model: &ModelConfig,
    params: Vec<f32>,
    precision: Option<Precision>,
) -> Result<Box<dyn Backend>> {
    let cpu_precision = || match precision {
        Some(Precision::Bf16) => {
            bail!("--precision bf16 needs --device cuda; the CPU backend computes in fp32")
        }
        _ => Ok(()),
    };
    let use_cuda = match device {
        Device::Cpu => false,
        Device::Cuda => true,
        Device::Auto => match cuda_unusable() {
            Some(reason) => {
                println!("device: cpu ({reason})");
                false
            }
            None => {
                println!("device: cuda (GPU 0)");
                true
            }
        },
    };
    if use_cuda {
        let precision = precision.unwrap_or(Precision::Bf16);
        Ok(Box::new(CudaBackend::new(model, params, precision)?))
    } else {
        cpu_precision()?;
        Ok(Box::new(CpuBackend::new(model, params)?))
    }
}

/// Why this build or machine cannot run the CUDA backend, if it cannot.
fn cuda_unusable() -> Option<String> {
    if !cuda::KERNELS_BUILT {
        return Some("this binary was built without nvcc, so it holds no CUDA kernels".into());
    }
    cuda::unavailable()
}
