//! What the training loop does differently with several ranks: check that the collective
//! matches the config, average the gradients and the loss after a step's micro-batches,
//! and say how many ranks the progress line covers.

use anyhow::{bail, Result};

use crate::backend::Backend;
use crate::config::Config;
use crate::dist::Collective;

/// The collective must have the world size the config's global batch and learning rate
/// were computed with.
pub(super) fn check_world(config: &Config, comm: &dyn Collective) -> Result<()> {
    if comm.world() != config.train.world {
        bail!(
            "world = {}: the config's global batch is for {} ranks, but this run has {}",
            config.train.world,
            config.train.world,
            comm.world()
        );
    }
    Ok(())
}

/// Averages the accumulated gradients and the step's mean loss over the ranks, so every
/// rank holds the gradient of the whole global batch (each rank's loss is a mean over its
/// images, every rank has the same number, so the mean of the means is the global mean).
/// With one rank nothing moves and the loss stays in f64.
pub(super) fn average(
    backend: &mut dyn Backend,
    comm: &mut dyn Collective,
    loss: f64,
) -> Result<f64> {
    if comm.world() == 1 {
        return Ok(loss);
    }
    backend.average_grads(comm)?;
    let mut value = [loss as f32];
    comm.all_reduce_mean(&mut value)?;
    Ok(value[0] as f64)
}

/// What the progress line adds in a data-parallel run (its images/s are the global ones).
pub(super) fn suffix(world: usize) -> String {
    match world {
        1 => String::new(),
        w => format!(" | {w} ranks"),
    }
}
