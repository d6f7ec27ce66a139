//! MAE's fixed 2-D sin-cos position embedding (docs/DESIGN.md §7.2): computed from the
//! grid and the width, never trained, so it is no parameter and no file holds it.
//!
//! Shape `[1 + G², D]`, row 0 (cls) zeros, row `1 + i·G + j` for the patch in grid row
//! `i`, column `j`. The first `D/2` channels encode the column `j`, the last `D/2` the row
//! `i`; each half is `D/4` sines then `D/4` cosines of `pos · ω_k`,
//! `ω_k = 10000^(-k / (D/4))`.

/// The embedding of a `grid × grid` patch grid at width `width` (a multiple of 4).
pub fn sincos_pos_embed(width: usize, grid: usize) -> Vec<f64> {
    assert!(
        width.is_multiple_of(4),
        "width {width} is not a multiple of 4"
    );
    let quarter = width / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut table = vec![0.0; (1 + grid * grid) * width];
    for (n, row) in table.chunks_exact_mut(width).skip(1).enumerate() {
        let (i, j) = (n / grid, n % grid);
        for (half, pos) in row.chunks_exact_mut(2 * quarter).zip([j, i]) {
            let (sin, cos) = half.split_at_mut(quarter);
            for ((s, c), w) in sin.iter_mut().zip(cos).zip(&omega) {
                let angle = pos as f64 * w;
                (*s, *c) = (angle.sin(), angle.cos());
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_column_then_row_layout() {
        let (d, g) = (16, 3);
        let t = sincos_pos_embed(d, g);
        assert_eq!(t.len(), 10 * d);
        assert!(t[..d].iter().all(|&v| v == 0.0));
        // Patch (row 2, column 1) is row 1 + 2·3 + 1 = 8; ω = 1, 0.1, 0.01, 0.001.
        let row = &t[8 * d..][..d];
        for (k, w) in [1.0, 0.1, 0.01, 0.001f64].iter().enumerate() {
            assert!((row[k] - (1.0 * w).sin()).abs() < 1e-15);
            assert!((row[4 + k] - (1.0 * w).cos()).abs() < 1e-15);
            assert!((row[8 + k] - (2.0 * w).sin()).abs() < 1e-15);
            assert!((row[12 + k] - (2.0 * w).cos()).abs() < 1e-15);
        }
    }
}
