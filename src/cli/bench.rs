//! `lomar bench`: time training steps and write the report.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::dist::connect;
use super::RunArgs;
use crate::bench;
use crate::config;
use crate::device::{open_backend, Device};
use crate::dist::{launch, Collective, Fingerprint, Launch};
use crate::params::ParamLayout;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Untimed steps first (kernel loading, allocator and cache warm-up).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long = "timed-steps", default_value_t = 10)]
    pub timed_steps: usize,
    /// Dense bf16 peak of the device in TFLOP/s, for MFU [default: looked up by name].
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Also write the whole report as JSON (with the commit and the settings).
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
    /// Average every step's gradients through NCCL even on one GPU, and time it (under a
    /// launcher with several ranks every step averages anyway).
    #[arg(long)]
    pub nccl: bool,
    /// Data-parallel runs: seconds a rank waits for the others.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub dist_timeout: u64,
}

pub(super) fn bench(a: BenchArgs) -> Result<()> {
    let launch = Launch::from_env()?;
    if launch.is_distributed() && a.run.device.device != Device::Cpu {
        launch::bind_gpu(launch.local_rank)?;
    }
    let mut config = config::resolve(&a.run.model, &a.run.train, None)?;
    config.train.world = launch.world;
    let plan = bench::BenchPlan {
        warmup_steps: a.warmup,
        timed_steps: a.timed_steps,
        peak_flops: a.peak_tflops.map(|t| t * 1e12),
    };
    plan.validate()?;
    let params = ParamLayout::new(&config.model).init(config.train.seed);
    let mut backend = open_backend(
        a.run.device.device,
        &config.model,
        params,
        a.run.device.precision,
    )?;
    let averaging = launch.is_distributed() || a.nccl;
    let mut comm = match averaging {
        true => Some(connect(
            &launch,
            Fingerprint::new(&config).map_err(|e| format!("{e:#}")),
            !backend.computes_on_host(),
            a.nccl,
            Duration::from_secs(a.dist_timeout.max(1)),
        )?),
        false => None,
    };
    let report = bench::run(
        backend.as_mut(),
        &config,
        &plan,
        &a.run.data,
        comm.as_mut().map(|c| c.as_mut() as &mut dyn Collective),
    )?;
    if launch.rank > 0 {
        return Ok(());
    }
    print!("{}", bench::summary(&report));
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "lomar_version": env!("CARGO_PKG_VERSION"),
            "commit": bench::commit(),
            "report": report,
        });
        fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
