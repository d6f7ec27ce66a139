//! Median wall time of one CPU training step: forward, backward and AdamW at batch 32.
//! Run: `cargo test --release --test cpu_step_time -- --ignored --nocapture`

use std::time::Instant;

use lomar::backend::{AdamWStep, Backend};
use lomar::config::preset;
use lomar::cpu::CpuBackend;
use lomar::params::ParamLayout;

mod common;

fn median_step_seconds(name: &str, batch_size: usize, steps: u64) -> f64 {
    let m = preset(name).unwrap();
    let mut backend = CpuBackend::new(&m, ParamLayout::new(&m).init(0)).unwrap();
    let batch = common::sample_batch(&m, batch_size, 1);
    let mut times = Vec::new();
    // One untimed step first: page faults of the first allocations.
    for t in 0..=steps {
        let start = Instant::now();
        backend.zero_grads().unwrap();
        let loss = backend.forward_backward(&batch, 1.0).unwrap();
        let step = AdamWStep {
            t: t + 1,
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
            grad_scale: 1.0,
        };
        backend.adamw_step(&step).unwrap();
        assert!(loss.is_finite());
        if t > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{name} batch {batch_size}: median step {:.1} ms over {steps} steps on {}",
        median * 1e3,
        backend.device_name()
    );
    median
}

#[test]
#[ignore = "timing, run on demand"]
fn step_time_tiny_batch_32() {
    median_step_seconds("tiny", 32, 20);
}

#[test]
#[ignore = "timing, run on demand"]
fn step_time_vit_tiny_batch_32() {
    median_step_seconds(
        "vit_tiny",
        32,
        std::env::var("STEPS").map_or(5, |s| s.parse().unwrap()),
    );
}
