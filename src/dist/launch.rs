//! Who this process is in a data-parallel run, read from the launcher's environment.
//!
//! Three launchers set the same facts under different names:
//! - torchrun (or anyone by hand): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`;
//! - Slurm `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with rank 0's host
//!   from `MASTER_ADDR` when given, else the first host of `SLURM_STEP_NODELIST` (or
//!   `SLURM_JOB_NODELIST`);
//! - nothing: one process, world size 1.
//!
//! torchrun's variables win when both are present (torchrun inside an `srun` allocation
//! sees Slurm's too, and there `SLURM_PROCID` counts nodes, not GPUs). Rank 0 listens for
//! the others on a port of its own: `LOMAR_PORT` when set, else `MASTER_PORT + 1`, since
//! torchrun's own store already listens on `MASTER_PORT`; under Slurm without either,
//! a port derived from the job id, so that two jobs on one node do not collide.

use anyhow::{bail, Context, Result};

/// The launcher a process was started by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: a single process.
    Single,
    /// `RANK`/`WORLD_SIZE`: torchrun, or set by hand.
    Env,
    /// `SLURM_PROCID`/`SLURM_NTASKS`.
    Slurm,
}

/// This process's place in the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    /// Global rank, `0..world`.
    pub rank: usize,
    pub world: usize,
    /// Rank among the processes on this node: which of the node's GPUs this process uses.
    pub local_rank: usize,
    /// Rank 0's host and the port it listens on for the others (empty and 0 when alone).
    pub host: String,
    pub port: u16,
}

/// Ports below this are left to the system; a Slurm job's derived port is above it.
const SLURM_PORT_BASE: u16 = 29_600;
/// Distinct derived ports before two job ids share one.
const SLURM_PORT_SPAN: u64 = 20_000;

impl Launch {
    /// A process on its own.
    pub fn single() -> Self {
        Launch {
            launcher: Launcher::Single,
            rank: 0,
            world: 1,
            local_rank: 0,
            host: String::new(),
            port: 0,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::detect(&|name| std::env::var(name).ok())
    }

    /// Reads the launch from `var` (the environment, or a test's table).
    pub fn detect(var: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let env = Vars(var);
        let torch = ["RANK", "WORLD_SIZE"].map(|n| env.get(n).is_some());
        if torch.iter().any(|&set| set) {
            if torch != [true, true] {
                bail!("RANK and WORLD_SIZE must be set together (one of them is missing)");
            }
            return from_vars(&env, Launcher::Env, ["RANK", "WORLD_SIZE", "LOCAL_RANK"]);
        }
        if env.get("SLURM_PROCID").is_some() && env.get("SLURM_NTASKS").is_some() {
            return from_vars(
                &env,
                Launcher::Slurm,
                ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
            );
        }
        Ok(Self::single())
    }

    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }

    /// For the run header: who this is and where rank 0 is.
    pub fn describe(&self) -> String {
        let by = match self.launcher {
            Launcher::Single => return "single process".to_string(),
            Launcher::Env => "RANK/WORLD_SIZE",
            Launcher::Slurm => "Slurm",
        };
        format!(
            "rank {} of {} (local rank {}, launched by {by}; rank 0 at {}:{})",
            self.rank, self.world, self.local_rank, self.host, self.port
        )
    }
}

/// Environment lookups that treat an empty value as unset and name the variable in errors.
struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| {
                anyhow::anyhow!("{name}={v:?}: must be a non-negative integer in range")
            }),
        }
    }
}

/// The launch from one launcher's rank, world-size and local-rank variables.
fn from_vars(
    env: &Vars,
    launcher: Launcher,
    [rank_var, world_var, local_var]: [&str; 3],
) -> Result<Launch> {
    let rank: usize = env.number(rank_var)?.context("checked present")?;
    let world: usize = env.number(world_var)?.context("checked present")?;
    if world == 0 {
        bail!("{world_var}=0: the world size must be at least 1");
    }
    if rank >= world {
        bail!("{rank_var}={rank} with {world_var}={world}: the rank must be below the world size");
    }
    let local_rank = match env.number::<usize>(local_var)? {
        Some(l) => l,
        None if world == 1 => 0,
        None => bail!("{local_var} is not set: with {world_var}={world} each process needs its rank on its node (which GPU it uses)"),
    };
    if local_rank > rank {
        bail!("{local_var}={local_rank} with {rank_var}={rank}: a local rank cannot exceed the global rank");
    }
    if let Some(local_world) = env.number::<usize>("LOCAL_WORLD_SIZE")? {
        if local_rank >= local_world {
            bail!("LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_world}: the local rank must be below the processes on the node");
        }
    }
    if world == 1 {
        return Ok(Launch {
            launcher,
            ..Launch::single()
        });
    }
    let (host, port) = match launcher {
        Launcher::Slurm => slurm_master(env)?,
        _ => {
            let host = env.get("MASTER_ADDR").with_context(|| {
                format!("MASTER_ADDR is not set: with {world_var}={world} every rank needs rank 0's host name or address")
            })?;
            let port = own_port(env)?.with_context(|| {
                format!("MASTER_PORT (or LOMAR_PORT) is not set: with {world_var}={world} rank 0 needs a port to listen on")
            })?;
            (host, port)
        }
    };
    Ok(Launch {
        launcher,
        rank,
        world,
        local_rank,
        host,
        port,
    })
}

/// `LOMAR_PORT`, else `MASTER_PORT + 1`, else `None`.
fn own_port(env: &Vars) -> Result<Option<u16>> {
    if let Some(p) = env.number::<u16>("LOMAR_PORT")? {
        if p == 0 {
            bail!("LOMAR_PORT=0: must be a port in 1..=65535");
        }
        return Ok(Some(p));
    }
    match env.number::<u16>("MASTER_PORT")? {
        Some(p) if p == 0 || p == u16::MAX => {
            bail!("MASTER_PORT={p}: must be in 1..=65534 (rank 0 listens on MASTER_PORT + 1)")
        }
        Some(p) => Ok(Some(p + 1)),
        None => Ok(None),
    }
}

/// Rank 0's host and port under Slurm.
fn slurm_master(env: &Vars) -> Result<(String, u16)> {
    let host = match env.get("MASTER_ADDR") {
        Some(h) => h,
        None => {
            let list = env
                .get("SLURM_STEP_NODELIST")
                .or_else(|| env.get("SLURM_JOB_NODELIST"))
                .context("neither MASTER_ADDR nor SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is set: cannot tell where rank 0 runs")?;
            first_host(&list)?
        }
    };
    let port = match own_port(env)? {
        Some(p) => p,
        None => {
            let job: u64 = env.number("SLURM_JOB_ID")?.context(
                "none of LOMAR_PORT, MASTER_PORT, SLURM_JOB_ID is set: cannot choose rank 0's port",
            )?;
            SLURM_PORT_BASE + (job % SLURM_PORT_SPAN) as u16
        }
    };
    Ok((host, port))
}

/// The first host of a Slurm host list: `gpu[03-05,9],login1` → `gpu03`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let bad = || anyhow::anyhow!("host list {list:?}: not a Slurm host list");
    let head = match list.find([',', '[']) {
        None => return Ok(list.to_string()),
        Some(i) if list.as_bytes()[i] == b',' => return nonempty(&list[..i], bad),
        Some(i) => i,
    };
    let prefix = &list[..head];
    let close = list[head..].find(']').ok_or_else(bad)? + head;
    let first_range = list[head + 1..close].split(',').next().ok_or_else(bad)?;
    let first = first_range.split('-').next().ok_or_else(bad)?;
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // A suffix after the bracket (`n[1-2]-ib`) belongs to every host of the range.
    let rest = &list[close + 1..];
    let suffix = rest.split(',').next().unwrap_or("");
    nonempty(&format!("{prefix}{first}{suffix}"), bad)
}

fn nonempty(host: &str, bad: impl Fn() -> anyhow::Error) -> Result<String> {
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host.to_string())
}

/// Chooses this process's GPU before anything initialises CUDA: the `local_rank`-th of
/// the visible devices becomes the only one, so the backend's "GPU 0" is this rank's GPU.
/// A launcher that already bound one GPU to each task (`CUDA_VISIBLE_DEVICES` holding one
/// device, e.g. Slurm's `--gpus-per-task=1`) is left alone.
pub fn bind_gpu(local_rank: usize) -> Result<()> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    if let (None, Some(n)) = (&visible, node_gpus()) {
        if local_rank >= n {
            bail!("LOCAL_RANK {local_rank} but this node has {n} GPUs: start at most {n} processes on it");
        }
    }
    let chosen = visible_device(visible.as_deref(), local_rank)?;
    std::env::set_var("CUDA_VISIBLE_DEVICES", chosen);
    Ok(())
}

/// The GPUs the NVIDIA driver lists on this node (one folder each), read without starting
/// CUDA; `None` where the driver does not say (no driver, or not Linux).
fn node_gpus() -> Option<usize> {
    let n = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?.count();
    (n > 0).then_some(n)
}

/// The `CUDA_VISIBLE_DEVICES` value that leaves only local rank `local_rank`'s GPU visible.
pub fn visible_device(visible: Option<&str>, local_rank: usize) -> Result<String> {
    let Some(list) = visible.map(str::trim) else {
        return Ok(local_rank.to_string());
    };
    let devices: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    match devices.len() {
        0 => bail!("CUDA_VISIBLE_DEVICES is empty: this process sees no GPU"),
        1 => Ok(devices[0].to_string()),
        n if local_rank < n => Ok(devices[local_rank].to_string()),
        n => bail!(
            "LOCAL_RANK {local_rank} but CUDA_VISIBLE_DEVICES={list:?} lists {n} GPUs: start at most {n} processes on this node"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_host_lists() {
        for (list, first) in [
            ("node7", "node7"),
            ("gpu[03-05,9],login1", "gpu03"),
            ("a1,b2", "a1"),
            ("n[1-2]-ib", "n1-ib"),
            ("rack[12]", "rack12"),
        ] {
            assert_eq!(first_host(list).unwrap(), first, "{list}");
        }
        for bad in ["gpu[03", "gpu[]", ",x", "g[a-b]"] {
            assert!(first_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn visible_devices() {
        assert_eq!(visible_device(None, 3).unwrap(), "3");
        assert_eq!(visible_device(Some("4,5,6"), 1).unwrap(), "5");
        assert_eq!(visible_device(Some("7"), 2).unwrap(), "7");
        let err = visible_device(Some("0,1"), 2).unwrap_err().to_string();
        assert!(
            err.contains("LOCAL_RANK 2") && err.contains("2 GPUs"),
            "{err}"
        );
        assert!(visible_device(Some(""), 0).is_err());
    }
}
