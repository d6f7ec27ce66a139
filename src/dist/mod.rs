//! Data-parallel training across processes (docs/DESIGN.md, "Data parallel"): one process
//! per GPU, started by torchrun, Slurm or by hand (`launch`), meeting at rank 0 over TCP
//! (`rendezvous`), then averaging gradients every step through a [`Collective`]: NCCL on
//! CUDA (`cuda::nccl`), the TCP links otherwise (`tcp`), threads of one process in tests
//! (`collective::Threads`).

pub mod buckets;
pub mod collective;
pub mod launch;
pub mod rendezvous;
pub mod tcp;

use std::time::Duration;

use anyhow::Result;

pub use buckets::{BucketPlan, HostBuckets};
pub use collective::{Collective, Solo, Threads};
pub use launch::{Launch, Launcher};
pub use rendezvous::{rendezvous, Fingerprint, Joined};
pub use tcp::TcpCollective;

/// Meets the other ranks and returns the collective over the rendezvous links (the CPU
/// path: gradients travel through rank 0). A single process gets [`Solo`] without any
/// network.
pub fn connect_host(
    launch: &Launch,
    mine: Result<Fingerprint, String>,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    if !launch.is_distributed() {
        return match mine {
            Ok(_) => Ok(Box::new(Solo)),
            Err(e) => anyhow::bail!("{e}"),
        };
    }
    let joined = rendezvous(launch, mine, || Ok(Vec::new()), timeout)?;
    Ok(Box::new(TcpCollective::new(
        joined.links,
        launch.world,
        timeout,
    )?))
}
