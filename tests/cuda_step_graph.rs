//! The whole training step on the GPU (`Backend::train_step`): the captured CUDA graphs
//! compute exactly what plain launches compute, bit for bit; the reports arrive one step
//! late and in order; a NaN raises the device's divergence flag and leaves the parameters
//! and moments untouched; and the first step's loss and gradient norm agree with the CPU's.
//! Each for LoMaR and for MAE, whose passes sit behind the same captured call. Skips
//! without a GPU.

mod common;

use common::{gpu_or_skip, sample_batch, step_settings, train_steps, MicroList};
use lomar::backend::{Backend, Moments, Precision, StepReport};
use lomar::config::{mae_recipe, preset, ModelConfig};
use lomar::cpu::CpuBackend;
use lomar::cuda::CudaBackend;
use lomar::data::batch::Batch;
use lomar::dist::Solo;
use lomar::params::ParamLayout;

const MICRO: usize = 2;

/// `steps` steps of `MICRO` micro-batches on one process (`common::train_steps`).
fn run(b: &mut dyn Backend, batches: &[Batch], steps: u64) -> (Vec<StepReport>, Vec<f32>, Moments) {
    train_steps(b, batches, MICRO, steps, &mut Solo)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The tiny LoMaR model and the tiny MAE.
fn models() -> Vec<(&'static str, ModelConfig)> {
    let tiny = preset("tiny").unwrap();
    vec![("lomar", tiny.clone()), ("mae", mae_recipe(tiny))]
}

fn batches(m: &ModelConfig) -> Vec<Batch> {
    (0..2 * MICRO as u64)
        .map(|s| sample_batch(m, 2, 40 + s))
        .collect()
}

#[test]
fn graph_replay_matches_plain_launches_bit_for_bit() {
    let test = "graph_replay_matches_plain_launches_bit_for_bit";
    if gpu_or_skip(test).is_none() {
        return;
    }
    if std::env::var("LOMAR_CUDA_SYNC").is_ok_and(|v| !v.is_empty() && v != "0") {
        println!("{test}: skipped: LOMAR_CUDA_SYNC turns the graphs off");
        return;
    }
    for (name, m) in models() {
        let params = ParamLayout::new(&m).init(3);
        let batches = batches(&m);
        for precision in [Precision::Fp32, Precision::Bf16] {
            let case = format!("{name} {precision}");
            let mut results = Vec::new();
            for graphs in [true, false] {
                let mut b = CudaBackend::new(&m, params.clone(), precision).unwrap();
                b.set_step_graphs(graphs);
                results.push(run(&mut b, &batches, 4));
            }
            let (graphed, plain) = (&results[0], &results[1]);
            assert_eq!(graphed.0.len(), 4, "{case}: one report per step");
            for (g, p) in graphed.0.iter().zip(&plain.0) {
                assert!(!g.diverged && g.loss.is_finite(), "{case}: {g:?}");
                assert_eq!(
                    (g.step, g.loss.to_bits(), g.grad_norm.to_bits()),
                    (p.step, p.loss.to_bits(), p.grad_norm.to_bits()),
                    "{case}: report {g:?} vs {p:?}"
                );
            }
            assert!(bits(&graphed.1) == bits(&plain.1), "{case}: parameters");
            assert!(
                bits(&graphed.2.m) == bits(&plain.2.m) && bits(&graphed.2.v) == bits(&plain.2.v),
                "{case}: moments"
            );
            assert!(bits(&graphed.1) != bits(&params), "{case}: no update");
        }
    }
}

#[test]
fn a_nan_on_the_gpu_raises_the_flag_and_leaves_the_state_untouched() {
    let test = "a_nan_on_the_gpu_raises_the_flag_and_leaves_the_state_untouched";
    if gpu_or_skip(test).is_none() {
        return;
    }
    for (name, m) in models() {
        let layout = ParamLayout::new(&m);
        let mut params = layout.init(3);
        // The prediction head's weight (LoMaR's head, MAE's decoder_pred).
        params[layout.ranges().head_w.start + 5] = f32::NAN;
        let batches = batches(&m);
        for graphs in [true, false] {
            let mut b = CudaBackend::new(&m, params.clone(), Precision::Bf16).unwrap();
            b.set_step_graphs(graphs);
            let (reports, after, moments) = run(&mut b, &batches, 2);
            assert_eq!(reports.len(), 2);
            assert!(
                reports.iter().all(|r| r.diverged && r.loss.is_nan()),
                "{name}, graphs {graphs}: {reports:?}"
            );
            assert!(
                bits(&after) == bits(&params),
                "{name}, graphs {graphs}: parameters moved"
            );
            assert!(
                moments.m.iter().chain(&moments.v).all(|&x| x == 0.0),
                "{name}, graphs {graphs}: moments moved"
            );
        }
    }
}

#[test]
fn the_first_step_reports_the_cpu_loss_and_norm() {
    let test = "the_first_step_reports_the_cpu_loss_and_norm";
    if gpu_or_skip(test).is_none() {
        return;
    }
    for (name, m) in models() {
        let params = ParamLayout::new(&m).init(3);
        let batches = batches(&m);
        let mut cpu = CpuBackend::new(&m, params.clone()).unwrap();
        let want = run_in_line(&mut cpu, &batches);
        let mut gpu = CudaBackend::new(&m, params, Precision::Fp32).unwrap();
        let (got, ..) = run(&mut gpu, &batches, 1);
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        assert!(
            rel(got[0].loss, want.loss) < 1e-4,
            "{name}: {got:?} vs {want:?}"
        );
        assert!(
            rel(got[0].grad_norm, want.grad_norm) < 1e-4,
            "{name}: {got:?} vs {want:?}"
        );
    }
}

/// One step on a backend that reports in line (the CPU).
fn run_in_line(b: &mut dyn Backend, batches: &[Batch]) -> StepReport {
    let mut list = MicroList::new(&batches[..MICRO]);
    b.train_step(&mut list, &step_settings(1), &mut Solo)
        .unwrap()
        .unwrap()
}
