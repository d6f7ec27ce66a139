//! `lomar pretrain` end to end on the CPU with the tiny preset.

mod common;

use std::path::Path;

use common::{lomar_err, lomar_ok};
use lomar::config::preset;
use lomar::io::checkpoint::{Checkpoint, CheckpointFile};

/// Few images per step so the test is quick; the schedule still warms up and decays.
const SMALL: [&str; 8] = [
    "--batch",
    "4",
    "--accum",
    "2",
    "--warmup-steps",
    "2",
    "--log-every",
    "100",
];

fn load(path: &Path) -> Checkpoint {
    CheckpointFile::open(path)
        .unwrap()
        .load(&preset("tiny").unwrap())
        .unwrap()
}

/// Requires bitwise equality, naming the first value that differs.
fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: value {i} differs: {} vs {}", a[i], b[i]);
    }
}

#[test]
fn stopping_and_resuming_gives_the_same_bits_as_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut whole = vec!["pretrain", "--out", "whole", "--steps", "8"];
    whole.extend(SMALL);
    lomar_ok(d, &whole);

    let mut first = vec![
        "pretrain",
        "--out",
        "split",
        "--steps",
        "8",
        "--stop-after",
        "4",
    ];
    first.extend(SMALL);
    let stdout = lomar_ok(d, &first);
    assert!(stdout.contains("stopped after step 4 of 8"), "{stdout}");
    assert_eq!(load(&d.join("split/checkpoint.safetensors")).step, 4);
    let stdout = lomar_ok(
        d,
        &[
            "pretrain",
            "--out",
            "split",
            "--resume",
            "split/checkpoint.safetensors",
            "--log-every",
            "100",
        ],
    );
    assert!(stdout.contains("resuming at step 4"), "{stdout}");

    let (a, b) = (
        load(&d.join("whole/checkpoint.safetensors")),
        load(&d.join("split/checkpoint.safetensors")),
    );
    assert_eq!(a.step, 8);
    assert_same_bits("parameters", &a.params, &b.params);
    assert_same_bits("first moments", &a.moments.m, &b.moments.m);
    assert_same_bits("second moments", &a.moments.v, &b.moments.v);
    assert_eq!((a.sampler, a.data), (b.sampler, b.data));
    assert_eq!(a.config, b.config);
    // Training moved the parameters away from the initialisation.
    let init = lomar::params::ParamLayout::new(&a.config.model).init(a.config.train.seed);
    assert!(a.params.iter().zip(&init).any(|(p, q)| p != q));

    // Both runs logged the same eight losses, the resumed one appending to its file.
    let losses = |run: &str| -> Vec<f64> {
        std::fs::read_to_string(d.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(losses("whole").len(), 8);
    assert_eq!(losses("whole"), losses("split"));
}

#[test]
fn an_exploding_learning_rate_stops_with_the_last_good_checkpoint_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = vec![
        "pretrain",
        "--out",
        "boom",
        "--steps",
        "20",
        "--warmup-steps",
        "0",
        "--blr",
        "1e30",
        "--checkpoint-every",
        "1",
        "--batch",
        "4",
    ];
    args.extend(["--log-every", "100"]);
    let stderr = lomar_err(d, &args);
    assert!(stderr.contains("training diverged at step"), "{stderr}");
    assert!(stderr.contains("last good checkpoint"), "{stderr}");
    let ck = load(&d.join("boom/checkpoint.safetensors"));
    assert!(ck.step >= 1 && ck.step < 20, "step {}", ck.step);
    assert!(ck.params.iter().all(|v| v.is_finite()));
    assert!(stderr.contains(&format!("(step {})", ck.step)), "{stderr}");
}

#[test]
fn a_new_run_does_not_overwrite_an_existing_one_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "pretrain",
        "--out",
        "r",
        "--steps",
        "2",
        "--warmup-steps",
        "0",
        "--batch",
        "2",
    ];
    lomar_ok(d, &args);
    let stderr = lomar_err(d, &args);
    assert!(stderr.contains("already holds a checkpoint"), "{stderr}");
    let mut forced = args.to_vec();
    forced.push("--force");
    lomar_ok(d, &forced);
    // The run directory records its config, which can start a new run.
    lomar_ok(
        d,
        &["pretrain", "--out", "again", "--config", "r/config.json"],
    );
    let c: lomar::config::Config =
        serde_json::from_str(&std::fs::read_to_string(d.join("again/config.json")).unwrap())
            .unwrap();
    assert_eq!((c.train.steps, c.train.batch), (2, 2));
    // Resuming one run into the directory of another would replace the other's checkpoint.
    let stderr = lomar_err(
        d,
        &[
            "pretrain",
            "--out",
            "again",
            "--resume",
            "r/checkpoint.safetensors",
            "--steps",
            "3",
        ],
    );
    assert!(
        stderr.contains("again already holds a checkpoint"),
        "{stderr}"
    );
}
