//! Launching data-parallel runs: the launcher variables, and real `lomar pretrain`
//! processes meeting over TCP on 127.0.0.1 (the CPU backend, the rendezvous links as the
//! collective): they train what one process trains, and stop with a clear message when a
//! rank never arrives or runs another config.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lomar::dist::{Launch, Launcher};
use lomar::io::checkpoint::CheckpointFile;
use lomar::params::ParamLayout;
use lomar::train::checkpoint_path;

fn detect(vars: &[(&str, &str)]) -> anyhow::Result<Launch> {
    let table: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Launch::detect(&|name| table.get(name).cloned())
}

fn refusal(vars: &[(&str, &str)]) -> String {
    format!("{:#}", detect(vars).unwrap_err())
}

#[test]
fn torchrun_slurm_and_plain_variables() {
    assert_eq!(detect(&[]).unwrap(), Launch::single());
    let torch = detect(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "8"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        // torchrun inside an srun allocation: its own variables win.
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
    ])
    .unwrap();
    assert_eq!(
        torch,
        Launch {
            launcher: Launcher::Env,
            rank: 5,
            world: 16,
            local_rank: 1,
            host: "node0".into(),
            port: 29501,
        }
    );
    let own_port = [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "29500"),
        ("LOMAR_PORT", "40000"),
    ];
    assert_eq!(detect(&own_port).unwrap().port, 40000);

    let slurm = detect(&[
        ("SLURM_PROCID", "9"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_STEP_NODELIST", "gpu[07-08]"),
        ("SLURM_JOB_ID", "123456"),
    ])
    .unwrap();
    assert_eq!(
        (slurm.launcher, slurm.rank, slurm.world, slurm.local_rank),
        (Launcher::Slurm, 9, 16, 1)
    );
    assert_eq!((slurm.host.as_str(), slurm.port), ("gpu07", 29_600 + 3456));
    // A world of one needs no address.
    let one = detect(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
    assert_eq!((one.world, one.launcher), (1, Launcher::Env));
}

#[test]
fn inconsistent_launch_variables_are_refused_naming_them() {
    let base = [("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        refusal(&v)
    };
    for (vars, needle) in [
        (
            with(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]),
            "RANK=2 with WORLD_SIZE=2",
        ),
        (with(&[("RANK", "0")]), "RANK and WORLD_SIZE"),
        (
            with(&[("RANK", "1"), ("WORLD_SIZE", "2")]),
            "LOCAL_RANK is not set",
        ),
        (
            with(&[("RANK", "x"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]),
            "RANK=\"x\"",
        ),
        (
            with(&[("RANK", "0"), ("WORLD_SIZE", "0"), ("LOCAL_RANK", "0")]),
            "WORLD_SIZE=0",
        ),
        (
            with(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")]),
            "LOCAL_RANK=3 with RANK=1",
        ),
        (
            with(&[
                ("RANK", "3"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_RANK", "3"),
                ("LOCAL_WORLD_SIZE", "2"),
            ]),
            "LOCAL_WORLD_SIZE=2",
        ),
        (
            refusal(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]),
            "MASTER_ADDR is not set",
        ),
        (
            refusal(&[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "h"),
            ]),
            "MASTER_PORT",
        ),
        (
            refusal(&[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_LOCALID", "0"),
            ]),
            "SLURM_STEP_NODELIST",
        ),
        (
            refusal(&[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_LOCALID", "0"),
                ("SLURM_JOB_NODELIST", "n[1-2]"),
            ]),
            "SLURM_JOB_ID",
        ),
    ] {
        assert!(vars.contains(needle), "{vars:?} should mention {needle:?}");
    }
}

/// A port nothing listens on right now (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `lomar pretrain` as rank `rank` of `world`, with rank 0 listening on `port`.
fn rank(rank: usize, world: usize, port: u16, out: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lomar"))
        .args([
            "pretrain",
            "--device",
            "cpu",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
        ])
        .args([
            "--blr",
            "0.05",
            "--accum",
            "2",
            "--dist-timeout",
            "3",
            "--log-every",
            "1",
        ])
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("LOMAR_PORT", port.to_string())
        .env("MASTER_PORT", "1")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (bool, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.success(), text)
}

fn params(out: &Path) -> Vec<f32> {
    let file = CheckpointFile::open(&checkpoint_path(out)).unwrap();
    let model = file.config().model.clone();
    file.load(&model).unwrap().params
}

#[test]
fn two_processes_train_what_one_process_with_twice_the_batch_trains() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let port = free_port();
    let children: Vec<Child> = (0..2)
        .map(|r| rank(r, 2, port, dirs[r].path(), &["--batch", "2"]))
        .collect();
    let outcomes: Vec<(bool, String)> = children.into_iter().map(finish).collect();
    for (r, (ok, text)) in outcomes.iter().enumerate() {
        assert!(ok, "rank {r} failed:\n{text}");
    }
    assert!(outcomes[0].1.contains("| 2 ranks"), "{}", outcomes[0].1);
    assert!(
        outcomes[0].1.contains("data parallel: rank 0 of 2"),
        "{}",
        outcomes[0].1
    );
    assert!(
        outcomes[1].1.trim().is_empty(),
        "rank 1 printed:\n{}",
        outcomes[1].1
    );
    assert_eq!(std::fs::read_dir(dirs[1].path()).unwrap().count(), 0);

    let single = Command::new(env!("CARGO_BIN_EXE_lomar"))
        .args([
            "pretrain",
            "--device",
            "cpu",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
        ])
        .args(["--blr", "0.05", "--accum", "2", "--batch", "4", "--out"])
        .arg(dirs[2].path())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(single.status.success());
    let config = CheckpointFile::open(&checkpoint_path(dirs[2].path()))
        .unwrap()
        .config()
        .clone();
    let initial = ParamLayout::new(&config.model).init(config.train.seed);
    let (a, b) = (params(dirs[0].path()), params(dirs[2].path()));
    common::assert_same_training(&a, &b, &initial, config.train.peak_lr(), "two processes");
}

#[test]
fn a_rank_that_never_arrives_stops_the_others_within_the_timeout() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let port = free_port();
    let started = Instant::now();
    let children: Vec<Child> = (0..2)
        .map(|r| rank(r, 3, port, dirs[r].path(), &["--batch", "2"]))
        .collect();
    let outcomes: Vec<(bool, String)> = children.into_iter().map(finish).collect();
    assert!(started.elapsed() < Duration::from_secs(30));
    for (r, (ok, text)) in outcomes.iter().enumerate() {
        assert!(!ok, "rank {r} should have failed:\n{text}");
        assert!(
            text.contains("rank(s) 2 did not reach rank 0"),
            "rank {r}:\n{text}"
        );
    }

    // And a rank whose rank 0 never comes.
    let lone = rank(1, 2, free_port(), dirs[1].path(), &["--batch", "2"]);
    let (ok, text) = finish(lone);
    assert!(!ok);
    assert!(
        text.contains("rank 1: rank 0 at 127.0.0.1:") && text.contains("unreachable"),
        "{text}"
    );
}

#[test]
fn a_rank_with_another_config_is_refused_naming_the_field() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let port = free_port();
    let children = vec![
        rank(0, 2, port, dirs[0].path(), &["--batch", "2"]),
        rank(1, 2, port, dirs[1].path(), &["--batch", "3"]),
    ];
    for (r, (ok, text)) in children.into_iter().map(finish).enumerate() {
        assert!(!ok, "rank {r} should have failed:\n{text}");
        assert!(
            text.contains(
                "rank 1 differs from rank 0 in config.train.batch: 3 on rank 1, 2 on rank 0"
            ),
            "rank {r}:\n{text}"
        );
    }
}
