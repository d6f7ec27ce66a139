//! How `pretrain` and `bench` join the other ranks of a data-parallel run.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::cuda::nccl::{self, NcclCollective};
use crate::dist::{self, Collective, Fingerprint, Launch};

/// Meets the other ranks and returns the collective to average with: NCCL on GPUs, the
/// rendezvous links on the CPU, [`dist::Solo`] alone. `force_nccl` runs a single GPU
/// through NCCL too (`bench --nccl`), so that path can be timed and checked on one GPU.
pub(super) fn connect(
    launch: &Launch,
    mine: std::result::Result<Fingerprint, String>,
    on_gpu: bool,
    force_nccl: bool,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    if force_nccl && !on_gpu {
        bail!("--nccl needs the CUDA backend (--device cuda)");
    }
    if !on_gpu || !(launch.is_distributed() || force_nccl) {
        return dist::connect_host(launch, mine, timeout);
    }
    let session = if launch.is_distributed() {
        dist::rendezvous(launch, mine, nccl::unique_id, timeout)?.session
    } else {
        if let Err(e) = mine {
            bail!("{e}");
        }
        nccl::unique_id()?
    };
    Ok(Box::new(NcclCollective::new(
        &session,
        launch.rank,
        launch.world,
        timeout,
    )?))
}
