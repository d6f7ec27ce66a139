//! The NCCL path on one GPU: a world-size-1 communicator averaging the gradients must
//! leave them bit for bit as they were (the mean of one rank is itself), so a run through
//! it must train exactly what the plain single-GPU run trains: through the per-call
//! average, and through whole steps whose last micro-batch hands each gradient bucket to
//! NCCL while its backward runs, with the step graphs on and off, for LoMaR and MAE.
//! Skips without a GPU or without NCCL, saying why; never run on a GPU so far.

mod common;

use std::time::Duration;

use lomar::backend::{Backend, Precision};
use lomar::config::{mae_recipe, preset};
use lomar::cuda::nccl::{unique_id, NcclCollective};
use lomar::cuda::CudaBackend;
use lomar::dist::buckets::BUCKET;
use lomar::dist::{Collective, Solo};
use lomar::params::ParamLayout;

use common::{gpu_or_skip, sample_batch, train_steps};

/// A world-size-1 communicator, or why the test skips.
fn one_rank(test: &str) -> Option<NcclCollective> {
    drop(gpu_or_skip(test)?);
    match unique_id() {
        Ok(id) => Some(NcclCollective::new(&id, 0, 1, Duration::from_secs(60)).unwrap()),
        Err(e) => {
            println!("{test}: skipped: {e:#}");
            None
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn nccl_on_one_gpu_averages_to_the_same_bits() {
    let Some(mut comm) = one_rank("nccl_on_one_gpu_averages_to_the_same_bits") else {
        return;
    };
    let m = preset("tiny").unwrap();
    let params = ParamLayout::new(&m).init(3);
    let mut plain = CudaBackend::new(&m, params.clone(), Precision::Fp32).unwrap();
    let mut through = CudaBackend::new(&m, params, Precision::Fp32).unwrap();
    for t in 1..=3 {
        let batch = sample_batch(&m, 4, 7 + t);
        for b in [&mut plain, &mut through] {
            b.zero_grads().unwrap();
            b.forward_backward(&batch, 1.0).unwrap();
        }
        through.average_grads(&mut comm).unwrap();
        assert_eq!(plain.grads().unwrap(), through.grads().unwrap(), "step {t}");
        let time = comm.last_all_reduce().unwrap().unwrap();
        assert!(time.span_ms >= time.exposed_ms && time.exposed_ms >= 0.0);
        let step = common::adamw(t, 1e-3);
        plain.adamw_step(&step).unwrap();
        through.adamw_step(&step).unwrap();
    }
    assert_eq!(plain.params().unwrap(), through.params().unwrap());
    let mut values = [1.5f32, -2.0];
    comm.all_reduce_mean(&mut values).unwrap();
    assert_eq!(values, [1.5, -2.0]);
}

/// Whole steps of two micro-batches through `train_step`: the overlapped path (the first
/// micro-batch a graph or not, the last launched with the bucket hooks) trains the same
/// bits as the plain single-GPU step, reports included, in one bucket (the default limit
/// holds these models whole) and in dozens.
#[test]
fn overlapped_steps_through_nccl_train_the_same_bits() {
    let Some(mut comm) = one_rank("overlapped_steps_through_nccl_train_the_same_bits") else {
        return;
    };
    let tiny = preset("tiny").unwrap();
    for m in [tiny.clone(), mae_recipe(tiny)] {
        let params = ParamLayout::new(&m).init(3);
        let batches: Vec<_> = (0..4).map(|s| sample_batch(&m, 2, 50 + s)).collect();
        for (graphs, limit) in [(true, BUCKET), (true, 2048), (false, 2048)] {
            let case = format!("{:?}, graphs {graphs}, buckets of {limit}", m.method);
            let run = |comm: &mut dyn Collective| {
                let mut b = CudaBackend::new(&m, params.clone(), Precision::Fp32).unwrap();
                b.set_step_graphs(graphs);
                b.set_bucket_limit(limit);
                train_steps(&mut b, &batches, 2, 4, comm)
            };
            let plain = run(&mut Solo);
            let through = run(&mut comm);
            assert_eq!(plain.0, through.0, "{case}: reports");
            assert!(bits(&plain.1) == bits(&through.1), "{case}: parameters");
            assert!(bits(&plain.2.m) == bits(&through.2.m), "{case}: moments");
            assert!(bits(&plain.1) != bits(&params), "{case}: no update");
            let time = comm.last_all_reduce().unwrap().unwrap();
            assert!(
                time.span_ms >= time.exposed_ms && time.exposed_ms >= 0.0,
                "{case}: {time:?}"
            );
        }
    }
}

#[test]
fn a_missing_nccl_is_explained() {
    match unique_id() {
        Ok(id) => assert_eq!(id.len(), 128),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains("NCCL not found") && msg.contains("libnccl.so"),
                "{msg}"
            );
        }
    }
}
