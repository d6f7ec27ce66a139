//! What the training loop does differently with several ranks: check that the collective
//! matches the config and say how many ranks the progress line covers. The gradient and
//! loss average sits inside the backend's step (`Backend::train_step`).

use anyhow::{bail, Result};

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

/// What the progress line adds in a data-parallel run (its images/s are the global ones).
pub(super) fn suffix(world: usize) -> String {
    match world {
        1 => String::new(),
        w => format!(" | {w} ranks"),
    }
}
