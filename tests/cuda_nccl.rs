//! The NCCL path on one GPU: a world-size-1 communicator averaging the gradients must
//! leave them bit for bit as they were (the mean of one rank is itself), and a run through
//! it must train exactly what the plain single-GPU run trains. Skips without a GPU or
//! without NCCL, saying why; never run on a GPU so far.

mod common;

use std::time::Duration;

use lomar::backend::{Backend, Precision};
use lomar::config::preset;
use lomar::cuda::nccl::{unique_id, NcclCollective};
use lomar::cuda::CudaBackend;
use lomar::dist::Collective;
use lomar::params::ParamLayout;

use common::{gpu_or_skip, sample_batch};

#[test]
fn nccl_on_one_gpu_averages_to_the_same_bits() {
    let test = "nccl_on_one_gpu_averages_to_the_same_bits";
    let Some(gpu) = gpu_or_skip(test) else {
        return;
    };
    drop(gpu);
    let id = match unique_id() {
        Ok(id) => id,
        Err(e) => {
            println!("{test}: skipped: {e:#}");
            return;
        }
    };
    let m = preset("tiny").unwrap();
    let params = ParamLayout::new(&m).init(3);
    let mut plain = CudaBackend::new(&m, params.clone(), Precision::Fp32).unwrap();
    let mut through = CudaBackend::new(&m, params, Precision::Fp32).unwrap();
    let mut comm = NcclCollective::new(&id, 0, 1, Duration::from_secs(60)).unwrap();
    for t in 1..=3 {
        let batch = sample_batch(&m, 4, 7 + t);
        for b in [&mut plain, &mut through] {
            b.zero_grads().unwrap();
            b.forward_backward(&batch, 1.0).unwrap();
        }
        through.average_grads(&mut comm).unwrap();
        assert_eq!(plain.grads().unwrap(), through.grads().unwrap(), "step {t}");
        let ms = comm.last_all_reduce_ms().unwrap().unwrap();
        assert!(ms >= 0.0);
        let step = common::adamw(t, 1e-3);
        plain.adamw_step(&step).unwrap();
        through.adamw_step(&step).unwrap();
    }
    assert_eq!(plain.params().unwrap(), through.params().unwrap());
    let mut values = [1.5f32, -2.0];
    comm.all_reduce_mean(&mut values).unwrap();
    assert_eq!(values, [1.5, -2.0]);
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
