//! What a run reports: one JSON line per optimiser step in `metrics.jsonl`, and a progress
//! line on the terminal.

use std::fs::{self, File};
use std::io::{BufWriter, ErrorKind, Write};
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
    /// Image files found unusable and skipped so far (image-folder data only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_files: Option<u64>,
}

/// Appends records to a JSONL file, flushed per line so a crash loses nothing written.
pub struct MetricsLog {
    out: BufWriter<File>,
}

impl MetricsLog {
    /// A fresh run (`resumed_at` = `None`) starts an empty file. A run resumed after step
    /// `s` keeps the records of steps up to `s` and drops later ones, which a crash after
    /// the checkpoint left behind and the resumed run is about to redo.
    pub fn open(path: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let kept = match resumed_at {
            Some(s) => records_through(path, s)?,
            None => String::new(),
        };
        let file = File::create(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        let mut out = BufWriter::new(file);
        out.write_all(kept.as_bytes())?;
        Ok(MetricsLog { out })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush().context("cannot write the metrics file")
    }
}

/// The lines of an existing metrics file whose step is at most `last`.
fn records_through(path: &Path, last: u64) -> Result<String> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read metrics file {}", path.display()))
        }
    };
    let mut kept = String::new();
    for line in text.lines() {
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64());
        if step.is_some_and(|s| s <= last) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    Ok(kept)
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
        "step {:>width$}/{total_steps} | loss {:.4} | lr {:.3e} | grad norm {:.3} | {:.1} img/s{} | elapsed {} | eta {}",
        r.step,
        r.loss,
        r.lr,
        r.grad_norm,
        r.images_per_s,
        r.skipped_files
            .map_or(String::new(), |n| format!(" | skipped {n} files")),
        format_duration(Duration::from_secs_f64(r.elapsed_s)),
        format_duration(eta),
        width = total_steps.to_string().len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_one_json_object_per_line_and_a_resume_replaces_redone_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let record = |step, loss| StepRecord {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 0.5,
            images_per_s: 100.0,
            elapsed_s: 2.0,
            skipped_files: None,
        };
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=3 {
            log.write(&record(step, 0.25)).unwrap();
        }
        drop(log);
        // Resumed after step 1: steps 2 and 3 are redone.
        MetricsLog::open(&path, Some(1))
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
        assert!(lines[0].get("skipped_files").is_none());
        assert_eq!(lines[0]["loss"], 0.25);
        assert!(lines[1]["loss"].is_null());
        MetricsLog::open(&path, None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn skipped_files_show_in_the_line_and_the_record_only_for_image_folders() {
        let mut r = StepRecord {
            step: 7,
            loss: 0.5,
            lr: 1e-3,
            grad_norm: 1.0,
            images_per_s: 10.0,
            elapsed_s: 3.0,
            skipped_files: Some(2),
        };
        let line = progress_line(&r, 100, Duration::from_secs(9));
        assert!(line.contains("img/s | skipped 2 files | elapsed"), "{line}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["skipped_files"], 2);
        r.skipped_files = None;
        assert!(!progress_line(&r, 100, Duration::ZERO).contains("skipped"));
        assert!(serde_json::to_value(&r)
            .unwrap()
            .get("skipped_files")
            .is_none());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_secs(6)), "6s");
        assert_eq!(format_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
    }
}
