//! A run's state on disk: where it starts from (fresh, or restored from a checkpoint) and
//! how it is saved. Restore and save are each other's inverse, so they live together.

use anyhow::{bail, Result};

use crate::backend::{Backend, Precision};
use crate::config::Config;
use crate::data::prefetch::Prepared;
use crate::data::shards::Part;
use crate::data::{BatchSource, DataArgs};
use crate::device::{open_backend, Device};
use crate::io::checkpoint::{Checkpoint, CheckpointFile};
use crate::io::finite::first_non_finite;
use crate::params::ParamLayout;

/// Where training begins: the backend holding the parameters (and, when resumed, the
/// moments), the optimiser step, and the data source positioned after the last batch.
pub struct Start {
    pub backend: Box<dyn Backend>,
    pub step: u64,
    pub source: BatchSource,
}

/// A fresh run of `config` (parameters initialised from its seed), or the continuation of
/// `resumed`, bit-identical to a run that never stopped. `config` must be the checkpoint's
/// own config with any overrides applied; a resumed run keeps its seed, since the sampler
/// and data order it continues were drawn from it. `rank` is this process's rank among
/// `config.train.world` (0 alone): the data source draws its share.
pub fn start(
    config: &Config,
    resumed: Option<CheckpointFile>,
    device: Device,
    precision: Option<Precision>,
    data: &DataArgs,
    rank: usize,
) -> Result<Start> {
    let (backend, step, states) = match resumed {
        Some(file) => {
            let ck = file.load(&config.model)?;
            if ck.sampler.seed != config.train.seed {
                bail!(
                    "seed = {}: the checkpoint's run uses seed {}; a resumed run keeps its seed",
                    config.train.seed,
                    ck.sampler.seed
                );
            }
            let mut backend = open_backend(device, &config.model, ck.params, precision)?;
            backend.set_moments(&ck.moments)?;
            (backend, ck.step, Some((ck.sampler, ck.data)))
        }
        None => {
            let params = ParamLayout::new(&config.model).init(config.train.seed);
            (
                open_backend(device, &config.model, params, precision)?,
                0,
                None,
            )
        }
    };
    let share = Part {
        rank,
        world: config.train.world,
    };
    let source = BatchSource::open_share(
        &config.model,
        config.train.seed,
        config.train.batch,
        data,
        states,
        share,
    )?;
    Ok(Start {
        backend,
        step,
        source,
    })
}

/// Writes the backend's state and the data source's after the batch `drawn`, refusing
/// parameters that went non-finite so the file on disk stays the last good one.
pub(super) fn save(
    backend: &mut dyn Backend,
    config: &Config,
    step: u64,
    drawn: &Prepared,
    path: &std::path::Path,
) -> Result<()> {
    let params = backend.params()?;
    if let Some(bad) = first_non_finite(&params) {
        let name = backend
            .layout()
            .entries()
            .iter()
            .find(|e| e.range().contains(&bad))
            .map_or("?", |e| e.name.as_str());
        bail!(
            "training diverged at step {step}: parameter {name} is {}; kept the previous checkpoint {}",
            params[bad],
            path.display()
        );
    }
    Checkpoint {
        config: config.clone(),
        step,
        params,
        moments: backend.moments()?,
        sampler: drawn.sampler,
        data: drawn.data.clone(),
    }
    .save(path)
}
