//! `lomar plot`: the loss curve of a run, from its `metrics.jsonl`, as a PNG: the loss of
//! every step (light) and its running mean (dark) against the step, on axes with round
//! ticks.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::eval::draw::font::{text_width, GLYPH_HEIGHT};
use crate::eval::draw::{Canvas, Rgb, BLACK, WHITE};

const RAW: Rgb = [158, 190, 226];
const MEAN: Rgb = [20, 70, 160];
const GRID: Rgb = [232, 232, 232];

/// (step, loss) of every step with a finite loss, in step order; a step logged twice (a
/// resumed run redoing it) keeps its last record.
pub fn read_losses(path: &Path) -> Result<Vec<(f64, f64)>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read metrics file {}", path.display()))?;
    let mut by_step = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a JSON record", path.display(), n + 1))?;
        let Some(step) = record["step"].as_u64() else {
            bail!("{} line {}: no `step` number", path.display(), n + 1);
        };
        // A diverged step logs its loss as null.
        if let Some(loss) = record["loss"].as_f64().filter(|l| l.is_finite()) {
            by_step.insert(step, loss);
        }
    }
    if by_step.is_empty() {
        bail!("{}: no step with a finite loss to plot", path.display());
    }
    Ok(by_step.into_iter().map(|(s, l)| (s as f64, l)).collect())
}

/// The mean of each value and the `window - 1` before it (fewer at the start).
pub fn running_mean(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Round tick positions covering `[lo, hi]`: multiples of 1, 2 or 5 × 10^k, about
/// `target` of them. Returns the ticks' step and the first and last tick, which enclose
/// the range.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> (f64, f64, f64) {
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    let raw = span / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() * step;
    let mut last = (hi / step).ceil() * step;
    if last <= first {
        last = first + step;
    }
    (step, first, last)
}

/// A tick label with as many decimals as the tick step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// How the plot looks.
#[derive(Clone, Copy, Debug)]
pub struct PlotOptions {
    pub width: usize,
    pub height: usize,
    /// Steps in the running mean; 0 picks about a fiftieth of the run.
    pub smooth: usize,
}

/// The loss curve of `points` (step, loss), titled `title`.
pub fn plot_losses(points: &[(f64, f64)], title: &str, opts: PlotOptions) -> Canvas {
    let (left, right, top, bottom) = (70i64, 20i64, 40i64, 50i64);
    let mut c = Canvas::new(opts.width, opts.height, WHITE);
    let plot_w = (opts.width as i64 - left - right).max(1) as f64;
    let plot_h = (opts.height as i64 - top - bottom).max(1) as f64;

    let steps: Vec<f64> = points.iter().map(|p| p.0).collect();
    let losses: Vec<f64> = points.iter().map(|p| p.1).collect();
    let (min_step, max_step) = (steps[0], steps[steps.len() - 1]);
    let (min_loss, max_loss) = losses
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &l| {
            (a.min(l), b.max(l))
        });
    let (x_step, x0, x1) = nice_ticks(min_step, max_step, 8);
    let (y_step, y0, y1) = nice_ticks(min_loss, max_loss, 6);
    let to_px = |s: f64, l: f64| {
        (
            left as f64 + (s - x0) / (x1 - x0) * plot_w,
            top as f64 + (y1 - l) / (y1 - y0) * plot_h,
        )
    };

    // Grid, ticks and labels.
    let ticks = |first: f64, last: f64, step: f64| {
        let n = ((last - first) / step).round() as i64;
        (0..=n).map(move |i| first + i as f64 * step)
    };
    let (axis_x, axis_y) = (left, top + plot_h as i64);
    for v in ticks(y0, y1, y_step) {
        let y = to_px(x0, v).1.round() as i64;
        c.fill_rect(left + 1, y, plot_w as usize, 1, GRID);
        c.fill_rect(left - 5, y, 5, 1, BLACK);
        let label = tick_label(v, y_step);
        c.text(
            left - 8 - text_width(&label) as i64,
            y - 3,
            &label,
            1,
            BLACK,
        );
    }
    for v in ticks(x0, x1, x_step) {
        let x = to_px(v, y0).0.round() as i64;
        c.fill_rect(x, top, 1, plot_h as usize, GRID);
        c.fill_rect(x, axis_y + 1, 1, 5, BLACK);
        let label = tick_label(v, x_step);
        c.text(
            x - text_width(&label) as i64 / 2,
            axis_y + 10,
            &label,
            1,
            BLACK,
        );
    }
    c.fill_rect(axis_x, top, 1, plot_h as usize + 1, BLACK);
    c.fill_rect(axis_x, axis_y, plot_w as usize + 1, 1, BLACK);
    c.text(left + plot_w as i64 / 2 - 10, axis_y + 28, "step", 1, BLACK);
    c.text(8, top - 14, "loss", 1, BLACK);
    c.text(left, 10, title, 2, BLACK);

    // The curves.
    let window = if opts.smooth == 0 {
        (points.len() / 50).max(1)
    } else {
        opts.smooth
    };
    let raw: Vec<(f64, f64)> = points.iter().map(|&(s, l)| to_px(s, l)).collect();
    let mean: Vec<(f64, f64)> = steps
        .iter()
        .zip(running_mean(&losses, window))
        .map(|(&s, l)| to_px(s, l))
        .collect();
    c.polyline(&raw, 1.0, RAW);
    c.polyline(&mean, 2.0, MEAN);

    // Legend, top right.
    let legend = format!("mean of {window} steps");
    let lx = left + plot_w as i64 - text_width(&legend) as i64 - 30;
    let ly = top + 8;
    c.fill_rect(lx, ly + 3, 20, 1, RAW);
    c.text(lx + 26, ly, "loss", 1, BLACK);
    c.fill_rect(lx, ly + 3 + 2 * GLYPH_HEIGHT as i64, 20, 2, MEAN);
    c.text(lx + 26, ly + 2 * GLYPH_HEIGHT as i64, &legend, 1, BLACK);
    c
}

/// `lomar plot`: reads `metrics`, writes the loss curve to `out`.
pub fn plot_file(metrics: &Path, out: &Path, opts: PlotOptions) -> Result<usize> {
    if opts.width < 200 || opts.height < 150 {
        bail!(
            "--width {} --height {}: the plot needs at least 200 × 150 pixels",
            opts.width,
            opts.height
        );
    }
    let points = read_losses(metrics)?;
    let name = metrics
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let parent = metrics
        .parent()
        .and_then(|p| p.file_name())
        .map_or(String::new(), |n| format!("{}/", n.to_string_lossy()));
    let title = format!("training loss: {parent}{name}");
    plot_losses(&points, &title, opts).save_png(out)?;
    Ok(points.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_enclose_the_range() {
        assert_eq!(nice_ticks(0.0, 1000.0, 8), (200.0, 0.0, 1000.0));
        assert_eq!(nice_ticks(1.0, 1000.0, 8), (200.0, 0.0, 1000.0));
        let (step, first, last) = nice_ticks(0.37, 2.38, 6);
        assert_eq!(step, 0.5);
        assert_eq!((first, last), (0.0, 2.5));
        // One point still gets a range.
        let (step, first, last) = nice_ticks(3.0, 3.0, 6);
        assert!(step > 0.0 && first <= 3.0 && last > first);
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(400.0, 200.0), "400");
        assert_eq!(tick_label(0.02, 0.01), "0.02");
    }

    #[test]
    fn running_mean_averages_the_trailing_window() {
        assert_eq!(
            running_mean(&[1.0, 3.0, 5.0, 7.0], 2),
            vec![1.0, 2.0, 4.0, 6.0]
        );
        assert_eq!(running_mean(&[2.0, 4.0], 1), vec![2.0, 4.0]);
    }

    #[test]
    fn metrics_are_read_in_step_order_skipping_non_finite_losses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        fs::write(
            &path,
            "{\"step\":2,\"loss\":1.5}\n{\"step\":1,\"loss\":2.0}\n\n{\"step\":3,\"loss\":null}\n{\"step\":2,\"loss\":1.25}\n",
        )
        .unwrap();
        assert_eq!(read_losses(&path).unwrap(), vec![(1.0, 2.0), (2.0, 1.25)]);
        fs::write(&path, "{\"step\":1,\"loss\":null}\n").unwrap();
        let err = read_losses(&path).unwrap_err().to_string();
        assert!(err.contains("no step with a finite loss"), "{err}");
        fs::write(&path, "{\"step\":1,\"loss\":1}\nnot json\n").unwrap();
        let err = read_losses(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn the_curve_falls_from_top_left_to_bottom_right() {
        let points: Vec<(f64, f64)> = (1..=200)
            .map(|s| (s as f64, 2.0 * (-(s as f64) / 40.0).exp() + 0.4))
            .collect();
        let opts = PlotOptions {
            width: 400,
            height: 300,
            smooth: 5,
        };
        let c = plot_losses(&points, "t", opts);
        assert_eq!((c.width(), c.height()), (400, 300));
        // Where the mean curve is drawn in each column of the plot area.
        let curve_row = |x: usize| (40..250).find(|&y| c.get(x, y) == MEAN);
        let early = curve_row(90).expect("curve near the start");
        let late = curve_row(360).expect("curve near the end");
        assert!(early + 100 < late, "early row {early}, late row {late}");
    }
}
