//! `lomar pretrain`: resolve the config, start or resume a run, train.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::dist::connect;
use super::RunArgs;
use crate::backend::Backend;
use crate::config::{self, Config};
use crate::device::Device;
use crate::dist::{launch, Fingerprint, Launch};
use crate::io::checkpoint::CheckpointFile;
use crate::train::{self, TrainOptions};

#[derive(Args, Debug)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Directory for checkpoint.safetensors, metrics.jsonl and config.json.
    #[arg(long, default_value = "runs/pretrain")]
    pub out: PathBuf,
    /// Write a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub checkpoint_every: u64,
    /// Print progress every N steps.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub log_every: u64,
    /// Continue the run saved in this checkpoint, bit-identically.
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<PathBuf>,
    /// Stop after this step with a checkpoint, keeping the schedule, to --resume later.
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<u64>,
    /// Start a new run even if --out already holds a checkpoint (it is replaced).
    #[arg(long)]
    pub force: bool,
    /// Data-parallel runs: seconds a rank waits for the others (to meet at the start, and
    /// in every step's gradient average) before it stops with an error.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub dist_timeout: u64,
}

pub(super) fn pretrain(a: PretrainArgs) -> Result<()> {
    let launch = Launch::from_env()?;
    if launch.is_distributed() && a.run.device.device != Device::Cpu {
        launch::bind_gpu(launch.local_rank)?;
    }
    // Every rank prepares, then meets the others even when it failed, so that one
    // rank's bad start stops them all at once instead of leaving them waiting.
    let prepared = prepare(&a, &launch);
    let mine = match &prepared {
        Ok(p) => fingerprint(&a, p).map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("{e:#}")),
    };
    let on_gpu = prepared
        .as_ref()
        .is_ok_and(|p| !p.start.backend.computes_on_host());
    let timeout = Duration::from_secs(a.dist_timeout.max(1));
    let mut comm = connect(&launch, mine, on_gpu, false, timeout)?;
    let Prepared {
        config,
        start:
            train::Start {
                mut backend,
                step,
                source,
            },
        resumed_world,
    } = prepared?;
    let lead = launch.rank == 0;
    if lead {
        print_run_header(&config, backend.as_ref(), backend.layout().total(), step);
        if launch.is_distributed() {
            println!(
                "data parallel: {} | {}",
                launch.describe(),
                world_change(&config, resumed_world)
            );
        }
        println!("data: {}", source.describe());
    }
    let outcome = train::train_ranks(
        backend.as_mut(),
        &config,
        step,
        source,
        &TrainOptions {
            out_dir: a.out.clone(),
            checkpoint_every: a.checkpoint_every,
            log_every: a.log_every,
            stop_after: a.stop_after,
        },
        comm.as_mut(),
    )?;
    if lead {
        println!(
            "loss {:.4} at the first step of this run, {:.4} at step {}",
            outcome.first_loss, outcome.last_loss, outcome.step
        );
    }
    Ok(())
}

/// A rank ready to train: the config, the backend and data source, and the world size of
/// the run it resumes (if any).
struct Prepared {
    config: Config,
    start: train::Start,
    resumed_world: Option<usize>,
}

/// Resolves the config for this launch, checks and fills the run directory (rank 0
/// alone writes there), and opens the backend and this rank's data source.
fn prepare(a: &PretrainArgs, launch: &Launch) -> Result<Prepared> {
    let resumed = match &a.resume {
        Some(path) => Some(CheckpointFile::open(path)?),
        None => None,
    };
    let resumed_world = resumed.as_ref().map(|c| c.config().train.world);
    let mut config = config::resolve(
        &a.run.model,
        &a.run.train,
        resumed.as_ref().map(|c| c.config().clone()),
    )?;
    config.train.world = launch.world;
    config
        .validate()
        .context("invalid configuration for this world size")?;
    if launch.rank == 0 {
        prepare_out_dir(a, &config)?;
    }
    let start = train::start(
        &config,
        resumed,
        a.run.device.device,
        a.run.device.precision,
        &a.run.data,
        launch.rank,
    )?;
    Ok(Prepared {
        config,
        start,
        resumed_world,
    })
}

/// Creates `--out`, refuses to overwrite another run's checkpoint, writes config.json.
fn prepare_out_dir(a: &PretrainArgs, config: &Config) -> Result<()> {
    let out = &a.out;
    fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let existing = train::checkpoint_path(out);
    if existing.exists() && !a.force && !resumes_from(a.resume.as_deref(), &existing) {
        bail!(
            "{} already holds a checkpoint; continue it with --resume {}, replace it with --force, or pick another --out",
            out.display(),
            existing.display()
        );
    }
    fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )
    .with_context(|| format!("cannot write {}", out.join("config.json").display()))
}

/// What every rank must agree on before the first step.
fn fingerprint(a: &PretrainArgs, p: &Prepared) -> Result<Fingerprint> {
    let data = &a.run.data;
    Fingerprint::new(&serde_json::json!({
        "config": p.config,
        "run": {
            "backend": if p.start.backend.computes_on_host() { "cpu" } else { "cuda" },
            "precision": a.run.device.precision.map(|x| x.to_string()),
            "data": data.data.as_ref().map(|d| d.display().to_string()),
            "shuffle_buffer": data.shuffle_buffer,
            "resumed_step": p.start.step,
            "stop_after": a.stop_after,
        },
    }))
}

/// The global batch, and how it changed when the resumed run had another world size.
fn world_change(config: &Config, resumed_world: Option<usize>) -> String {
    let t = &config.train;
    let now = format!(
        "global batch {} = {} x accum {} x {} ranks",
        t.effective_batch(),
        t.batch,
        t.accum,
        t.world
    );
    match resumed_world {
        Some(w) if w != t.world => {
            let before = t.batch * t.accum * w;
            format!("{now}; the checkpoint's run had {w} ranks (global batch {before} with this batch and accum), so the learning rate follows the new global batch")
        }
        _ => now,
    }
}

/// Whether `resume` is the checkpoint file `existing` (which exists).
pub(super) fn resumes_from(resume: Option<&Path>, existing: &Path) -> bool {
    match (resume.map(fs::canonicalize), fs::canonicalize(existing)) {
        (Some(Ok(a)), Ok(b)) => a == b,
        _ => false,
    }
}

pub(super) fn print_run_header(config: &Config, backend: &dyn Backend, params: usize, step: u64) {
    let (m, t) = (&config.model, &config.train);
    println!(
        "lomar pretrain: preset {} | image {} patch {} window {}x{} x{} mask {:.2} | depth {} width {} heads {} | {:.2}M params | {}",
        config.preset,
        m.image,
        m.patch,
        m.window,
        m.window,
        m.windows_per_image,
        m.mask_ratio,
        m.depth,
        m.width,
        m.heads,
        params as f64 / 1e6,
        backend.device_name()
    );
    println!(
        "batch {} x accum {}{} = {} images/step | steps {} (warmup {}) | peak lr {:.3e} | seed {}{}",
        t.batch,
        t.accum,
        match t.world {
            1 => String::new(),
            w => format!(" x {w} ranks"),
        },
        t.effective_batch(),
        t.steps,
        t.warmup_steps,
        t.peak_lr(),
        t.seed,
        if step > 0 {
            format!(" | resuming at step {step}")
        } else {
            String::new()
        }
    );
}
