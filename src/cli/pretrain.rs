//! `lomar pretrain`: resolve the config, start or resume a run, train.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::RunArgs;
use crate::backend::Backend;
use crate::config::{self, Config};
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
}

pub(super) fn pretrain(a: PretrainArgs) -> Result<()> {
    let resumed = match &a.resume {
        Some(path) => Some(CheckpointFile::open(path)?),
        None => None,
    };
    let config = config::resolve(
        &a.run.model,
        &a.run.train,
        resumed.as_ref().map(|c| c.config().clone()),
    )?;
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
        serde_json::to_string_pretty(&config)?,
    )
    .with_context(|| format!("cannot write {}", out.join("config.json").display()))?;

    let train::Start {
        mut backend,
        step,
        source,
    } = train::start(
        &config,
        resumed,
        a.run.device.device,
        a.run.device.precision,
        &a.run.data,
    )?;
    print_run_header(&config, backend.as_ref(), backend.layout().total(), step);
    println!("data: {}", source.describe());
    let outcome = train::train(
        backend.as_mut(),
        &config,
        step,
        source,
        &TrainOptions {
            out_dir: out.clone(),
            checkpoint_every: a.checkpoint_every,
            log_every: a.log_every,
            stop_after: a.stop_after,
        },
    )?;
    println!(
        "loss {:.4} at the first step of this run, {:.4} at step {}",
        outcome.first_loss, outcome.last_loss, outcome.step
    );
    Ok(())
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
        "batch {} x accum {} = {} images/step | steps {} (warmup {}) | peak lr {:.3e} | seed {}{}",
        t.batch,
        t.accum,
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
