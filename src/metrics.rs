//! What a run reports: one JSON line per optimiser step in `metrics.jsonl`, and a progress
//! line on the terminal.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

/// One optimiser step, as written to `metrics.jsonl`. A non-finite value is written as
/// `null`.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// Optimiser steps completed, counting this one.
    pub step: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate this step applied.
    pub lr: f64,
    /// Global L2 norm of the accumulated gradient, before clipping.
    pub grad_norm: f64,
    pub images_per_s: f64,
    /// Seconds since this process started training.
    pub elapsed_s: f64,
}

/// Appends records to a JSONL file, flushed per line so a crash loses nothing written.
pub struct MetricsLog {
    out: BufWriter<File>,
}

impl MetricsLog {
    /// `append` keeps earlier records (a resumed run); otherwise the file starts empty.
    pub fn open(path: &Path, append: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(MetricsLog {
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush().context("cannot write the metrics file")
    }
}

/// `1h02m03s`, `4m05s` or `6s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// The terminal line for a logged step; `eta` is the time the remaining steps should take.
pub fn progress_line(r: &StepRecord, total_steps: u64, eta: Duration) -> String {
    format!(
        "step {:>width$}/{total_steps} | loss {:.4} | lr {:.3e} | grad norm {:.3} | {:.1} img/s | elapsed {} | eta {}",
        r.step,
        r.loss,
        r.lr,
        r.grad_norm,
        r.images_per_s,
        format_duration(Duration::from_secs_f64(r.elapsed_s)),
        format_duration(eta),
        width = total_steps.to_string().len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_one_json_object_per_line_and_resumes_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let record = |step, loss| StepRecord {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 0.5,
            images_per_s: 100.0,
            elapsed_s: 2.0,
        };
        MetricsLog::open(&path, false)
            .unwrap()
            .write(&record(1, 0.25))
            .unwrap();
        MetricsLog::open(&path, true)
            .unwrap()
            .write(&record(2, f64::NAN))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["step"], 1);
        assert_eq!(lines[0]["loss"], 0.25);
        assert!(lines[1]["loss"].is_null());
        MetricsLog::open(&path, false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_secs(6)), "6s");
        assert_eq!(format_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
    }
}
