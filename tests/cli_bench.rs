//! `lomar bench` on the CPU: the report's figures agree with each other and the JSON.

mod common;

use common::{lomar_err, lomar_ok};
use lomar::bench::flops::training_flops;
use lomar::config::preset;

#[test]
fn bench_reports_consistent_figures_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = lomar_ok(
        dir.path(),
        &[
            "bench",
            "--batch",
            "8",
            "--warmup",
            "1",
            "--timed-steps",
            "3",
            "--peak-tflops",
            "1",
            "--json",
            "bench.json",
        ],
    );
    assert!(stdout.contains("images/s"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("bench.json")).unwrap())
            .unwrap();
    let r = &json["report"];
    assert_eq!(r["timed_steps"], 3);
    assert_eq!(r["config"]["train"]["batch"], 8);
    let median_ms = r["step_ms"]["median"].as_f64().unwrap();
    assert!(median_ms > 0.0);
    let min = r["step_ms"]["min"].as_f64().unwrap();
    let max = r["step_ms"]["max"].as_f64().unwrap();
    assert!(min <= median_ms && median_ms <= max);
    let images_per_s = r["images_per_s"].as_f64().unwrap();
    assert!((images_per_s - 8.0 / (median_ms * 1e-3)).abs() < 1e-6 * images_per_s);
    let flops = training_flops(&preset("tiny").unwrap(), 8);
    assert_eq!(r["flops_per_step"].as_f64().unwrap(), flops);
    let tflops = r["achieved_tflops"].as_f64().unwrap();
    assert!((tflops - flops / (median_ms * 1e-3) / 1e12).abs() < 1e-9);
    // MFU against the 1 TFLOP/s peak given on the command line.
    assert!((r["mfu"].as_f64().unwrap() - tflops).abs() < 1e-9);
    assert!(r["phases"]["forward_backward_ms"].as_f64().unwrap() <= max);
    // Each end-to-end time is its step plus the wait for the batch, so the median is too.
    assert!(r["end_to_end_ms"]["median"].as_f64().unwrap() >= median_ms);
    assert!(stdout.contains("end2end"), "{stdout}");
    // The CPU has no device events.
    assert!(r["device_step_ms"].is_null());
    // The steps run back to back as pretrain runs them: on the CPU, in line, about the
    // phased step's time (a generous band: the machine is shared).
    let pipelined = r["pipelined_step_ms"].as_f64().unwrap();
    assert!(
        pipelined > 0.2 * median_ms && pipelined < 5.0 * max,
        "{pipelined} vs {median_ms}"
    );
    assert!(
        stdout.contains("PyTorch's side-by-side compares to this"),
        "{stdout}"
    );
}

#[test]
fn bench_refuses_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let err = lomar_err(dir.path(), &["bench", "--timed-steps", "0"]);
    assert!(
        err.contains("--timed-steps 0: bench needs at least one timed step"),
        "{err}"
    );
    let err = lomar_err(dir.path(), &["bench", "--peak-tflops=-3"]);
    assert!(
        err.contains("--peak-tflops -3: must be a finite number > 0"),
        "{err}"
    );
}
