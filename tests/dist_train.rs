//! Data parallel on the CPU, ranks as threads of this process (`dist::Threads`): W ranks
//! of batch B train what one process trains with batch W·B (LoMaR and MAE, each gradient
//! bucket averaged from inside the last micro-batch's backward), only rank 0 writes, and a
//! checkpoint of one world size resumes on another.
//!
//! Tolerance (`common::assert_same_training`): the ranks' gradients are means over B
//! images averaged over W ranks, the single process's a mean over W·B images, so the sums
//! run in another order. The largest difference must stay below half the learning rate and
//! the RMS difference below 1e-3 of the distance trained; one rank's share trained alone
//! (a slicing mistake) is off by far more (checked below).

mod common;

use std::path::Path;
use std::time::Duration;

use lomar::backend::Backend;
use lomar::config::{mae_recipe, preset, train_defaults, Config, ModelConfig, TrainConfig};
use lomar::cpu::CpuBackend;
use lomar::data::shards::Part;
use lomar::data::{BatchSource, DataArgs};
use lomar::dist::{Collective, Threads};
use lomar::io::checkpoint::CheckpointFile;
use lomar::params::ParamLayout;
use lomar::train::{checkpoint_path, metrics_path, train_ranks, TrainOptions};

const STEPS: u64 = 4;

fn config(batch: usize, world: usize) -> Config {
    config_of(preset("tiny").unwrap(), batch, world)
}

fn config_of(model: ModelConfig, batch: usize, world: usize) -> Config {
    Config {
        preset: "tiny".into(),
        model,
        train: TrainConfig {
            batch,
            accum: 2,
            steps: STEPS,
            warmup_steps: 1,
            blr: 0.05,
            clip_grad: Some(0.5),
            world,
            ..train_defaults("tiny")
        },
    }
}

fn options(dir: &Path, stop_after: Option<u64>) -> TrainOptions {
    TrainOptions {
        out_dir: dir.to_path_buf(),
        checkpoint_every: 0,
        log_every: 100,
        stop_after,
    }
}

/// Runs `config.train.world` ranks as threads, rank r writing to `dirs[r]`, from the
/// checkpoint `resume` if given; returns each rank's parameters at the end.
fn run_ranks(
    config: &Config,
    dirs: &[&Path],
    resume: Option<&Path>,
    stop_after: Option<u64>,
) -> Vec<Vec<f32>> {
    let world = config.train.world;
    let ranks = Threads::group(world, Duration::from_secs(120));
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut comm| {
                let dir = dirs[comm.rank()];
                s.spawn(move || {
                    let rank = comm.rank();
                    let (params, moments, step, states) = match resume {
                        Some(path) => {
                            let ck = CheckpointFile::open(path)
                                .unwrap()
                                .load(&config.model)
                                .unwrap();
                            (
                                ck.params,
                                Some(ck.moments),
                                ck.step,
                                Some((ck.sampler, ck.data)),
                            )
                        }
                        None => (
                            ParamLayout::new(&config.model).init(config.train.seed),
                            None,
                            0,
                            None,
                        ),
                    };
                    let mut backend = CpuBackend::new(&config.model, params).unwrap();
                    if let Some(m) = moments {
                        backend.set_moments(&m).unwrap();
                    }
                    let source = BatchSource::open_share(
                        &config.model,
                        config.train.seed,
                        config.train.batch,
                        &DataArgs::default(),
                        states,
                        Part { rank, world },
                    )
                    .unwrap();
                    train_ranks(
                        &mut backend,
                        config,
                        step,
                        source,
                        &options(dir, stop_after),
                        &mut comm,
                    )
                    .unwrap();
                    backend.params().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn tempdirs(n: usize) -> Vec<tempfile::TempDir> {
    (0..n).map(|_| tempfile::tempdir().unwrap()).collect()
}

fn paths(dirs: &[tempfile::TempDir]) -> Vec<&Path> {
    dirs.iter().map(|d| d.path()).collect()
}

#[test]
fn w_ranks_of_batch_b_train_what_one_process_of_batch_wb_trains_and_only_rank_0_writes() {
    let b = 2;
    let single_dir = tempdirs(1);
    let single = run_ranks(&config(4 * b, 1), &paths(&single_dir), None, None).remove(0);
    let initial = ParamLayout::new(&config(b, 1).model).init(0);
    let lr = config(4 * b, 1).train.peak_lr();
    // One rank's share alone (batch B, world 1) is another run: the scale of a slicing
    // mistake, far outside the tolerance.
    let alone = run_ranks(&config(b, 1), &paths(&tempdirs(1)), None, None).remove(0);
    let (_, mistake) = common::parallel_gap(&alone, &single, &initial, lr);
    assert!(
        mistake > 0.1,
        "one rank's share alone is only {mistake:.2e} off"
    );

    for world in [2, 4] {
        let batch = 4 * b / world;
        let dirs = tempdirs(world);
        let params = run_ranks(&config(batch, world), &paths(&dirs), None, None);
        for (rank, p) in params.iter().enumerate() {
            assert_eq!(
                p, &params[0],
                "rank {rank} ended with other parameters than rank 0"
            );
        }
        let what = format!("{world} ranks");
        common::assert_same_training(&params[0], &single, &initial, lr, &what);
        assert!(checkpoint_path(dirs[0].path()).exists());
        let metrics = std::fs::read_to_string(metrics_path(dirs[0].path())).unwrap();
        assert_eq!(metrics.lines().count(), STEPS as usize);
        for dir in &dirs[1..] {
            let written: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert!(written.is_empty(), "rank > 0 wrote {written:?}");
        }
    }
}

/// MAE's backward reports its own points (decoder first): 2 ranks through its buckets
/// train what one process trains.
#[test]
fn mae_ranks_train_what_one_process_trains() {
    let mae = |batch, world| config_of(mae_recipe(preset("tiny").unwrap()), batch, world);
    let single = run_ranks(&mae(4, 1), &paths(&tempdirs(1)), None, None).remove(0);
    let params = run_ranks(&mae(2, 2), &paths(&tempdirs(2)), None, None);
    assert_eq!(
        params[1], params[0],
        "rank 1 ended with other parameters than rank 0"
    );
    let initial = ParamLayout::new(&mae(4, 1).model).init(mae(4, 1).train.seed);
    let lr = mae(4, 1).train.peak_lr();
    common::assert_same_training(&params[0], &single, &initial, lr, "MAE on 2 ranks");
}

#[test]
fn a_checkpoint_from_two_ranks_resumes_on_four_and_on_one() {
    let single_dir = tempdirs(1);
    let single = run_ranks(&config(4, 1), &paths(&single_dir), None, None).remove(0);
    let initial = ParamLayout::new(&config(4, 1).model).init(0);
    let lr = config(4, 1).train.peak_lr();
    let first = tempdirs(2);
    run_ranks(&config(2, 2), &paths(&first), None, Some(2));
    let ck = checkpoint_path(first[0].path());
    assert_eq!(CheckpointFile::open(&ck).unwrap().config().train.world, 2);
    // The same global batch on another world size continues the same run.
    for (batch, world) in [(1, 4), (4, 1)] {
        let dirs = tempdirs(world);
        let params = run_ranks(&config(batch, world), &paths(&dirs), Some(&ck), None);
        let what = format!("resumed on {world}");
        common::assert_same_training(&params[0], &single, &initial, lr, &what);
    }
}
