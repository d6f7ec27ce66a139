//! Moving a relative position bias table from the window it was trained on to a larger
//! token grid, as BEiT does when the window changes at fine-tuning time.
//!
//! A table `[(2K-1)² + 3, h]` holds, per head, a `(2K-1)×(2K-1)` grid of offsets
//! `(dy, dx)` in `[-(K-1), K-1]²`, then the three cls rows. For a `G×G` grid the offsets
//! span `[-(G-1), G-1]²`: the offset grid is resampled to `(2G-1)×(2G-1)` per head with
//! PyTorch's bicubic interpolation (`F.interpolate(mode="bicubic", align_corners=False)`,
//! the kernel timm's `resize_rel_pos_bias_table_simple` uses), and the cls rows are kept.

/// PyTorch's cubic convolution constant.
const CUBIC_A: f64 = -0.75;

/// The table `[(2K-1)² + 3, heads]` of a `from`×`from` window resized for a `to`×`to`
/// grid: `[(2·to-1)² + 3, heads]`. Equal sides return the table unchanged.
pub fn resize_table(table: &[f32], heads: usize, from: usize, to: usize) -> Vec<f32> {
    let (src, dst) = (2 * from - 1, 2 * to - 1);
    assert_eq!(
        table.len(),
        (src * src + 3) * heads,
        "table of a {from}-wide window"
    );
    if from == to {
        return table.to_vec();
    }
    let taps_y = bicubic_taps(src, dst);
    let taps_x = &taps_y;
    let mut out = vec![0.0f32; (dst * dst + 3) * heads];
    for (oy, ty) in taps_y.iter().enumerate() {
        for (ox, tx) in taps_x.iter().enumerate() {
            for h in 0..heads {
                let mut acc = 0.0f64;
                for &(iy, wy) in ty {
                    let row: f64 = tx
                        .iter()
                        .map(|&(ix, wx)| wx * table[(iy * src + ix) * heads + h] as f64)
                        .sum();
                    acc += wy * row;
                }
                out[(oy * dst + ox) * heads + h] = acc as f32;
            }
        }
    }
    out[dst * dst * heads..].copy_from_slice(&table[src * src * heads..]);
    out
}

/// For each of `dst` output positions, the four `(source index, weight)` pairs of
/// PyTorch's bicubic upsampling from `src` positions: source coordinate
/// `(o + 0.5)·src/dst - 0.5`, taps clamped to the edge.
fn bicubic_taps(src: usize, dst: usize) -> Vec<[(usize, f64); 4]> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| {
            let x = (o as f64 + 0.5) * scale - 0.5;
            let base = x.floor();
            let t = x - base;
            let weights = [
                cubic_far(t + 1.0),
                cubic_near(t),
                cubic_near(1.0 - t),
                cubic_far(2.0 - t),
            ];
            std::array::from_fn(|i| {
                let at = (base as i64 - 1 + i as i64).clamp(0, src as i64 - 1) as usize;
                (at, weights[i])
            })
        })
        .collect()
}

/// Keys' cubic kernel for `|x| <= 1`.
fn cubic_near(x: f64) -> f64 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

/// Keys' cubic kernel for `1 < |x| < 2`.
fn cubic_far(x: f64) -> f64 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table whose head `h` holds `f(h, dy, dx)` at every offset and `cls[h][i]` in its
    /// three cls rows.
    fn table_of(k: usize, heads: usize, f: impl Fn(usize, f64, f64) -> f64) -> Vec<f32> {
        let span = 2 * k - 1;
        let mut t = vec![0.0f32; (span * span + 3) * heads];
        for y in 0..span {
            for x in 0..span {
                for h in 0..heads {
                    let (dy, dx) = (y as f64 - (k - 1) as f64, x as f64 - (k - 1) as f64);
                    t[(y * span + x) * heads + h] = f(h, dy, dx) as f32;
                }
            }
        }
        for (i, v) in t[span * span * heads..].iter_mut().enumerate() {
            *v = 100.0 + i as f32;
        }
        t
    }

    #[test]
    fn the_same_side_is_the_identity() {
        let t = table_of(3, 2, |h, dy, dx| h as f64 + dy * dy - 0.5 * dx);
        assert_eq!(resize_table(&t, 2, 3, 3), t);
    }

    #[test]
    fn weights_sum_to_one_so_constants_stay_constant() {
        for (src, dst) in [(7, 15), (13, 27), (3, 9)] {
            for taps in bicubic_taps(src, dst) {
                let sum: f64 = taps.iter().map(|t| t.1).sum();
                assert!((sum - 1.0).abs() < 1e-12, "{src}->{dst}: {sum}");
            }
        }
        let t = table_of(4, 3, |h, _, _| h as f64 - 1.5);
        let r = resize_table(&t, 3, 4, 8);
        assert_eq!(r.len(), (15 * 15 + 3) * 3);
        for (i, v) in r[..15 * 15 * 3].iter().enumerate() {
            assert!((v - ((i % 3) as f32 - 1.5)).abs() < 1e-6, "{i}: {v}");
        }
    }

    /// Keys' kernel with a = -0.75 weighs the four taps of a half-way point
    /// -3/32, 19/32, 19/32, -3/32; taps beyond the edge read the edge.
    #[test]
    fn the_kernel_is_pytorchs_bicubic() {
        let taps = bicubic_taps(4, 2);
        let want = [-3.0 / 32.0, 19.0 / 32.0, 19.0 / 32.0, -3.0 / 32.0];
        for (o, first) in [(0, [0, 0, 1, 2]), (1, [1, 2, 3, 3])] {
            for i in 0..4 {
                assert_eq!(taps[o][i].0, first[i], "output {o}, tap {i}");
                assert!((taps[o][i].1 - want[i]).abs() < 1e-15, "{:?}", taps[o]);
            }
        }
    }

    /// The zero offset lands exactly on the old zero offset, so it keeps its bias, and
    /// a table symmetric in the offsets stays symmetric.
    #[test]
    fn the_centre_is_kept_and_symmetry_is_preserved() {
        let (k, g, heads) = (4, 9, 2);
        let (src, dst) = (2 * k - 1, 2 * g - 1);
        let t = table_of(k, heads, |h, dy, dx| {
            (h as f64 + 1.0) * (dy * dy + 0.3 * dx.abs())
        });
        let r = resize_table(&t, heads, k, g);
        let at = |y: usize, x: usize, h: usize| r[(y * dst + x) * heads + h];
        for h in 0..heads {
            let centre = (k - 1) * src + (k - 1);
            assert_eq!(at(g - 1, g - 1, h), t[centre * heads + h]);
            for y in 0..dst {
                for x in 0..dst {
                    let mirrored = at(dst - 1 - y, dst - 1 - x, h);
                    assert!((at(y, x, h) - mirrored).abs() < 1e-5, "({y},{x})");
                }
            }
        }
    }

    #[test]
    fn the_cls_rows_are_kept() {
        let t = table_of(3, 4, |h, dy, dx| h as f64 * dy * dx);
        let r = resize_table(&t, 4, 3, 7);
        assert_eq!(r[13 * 13 * 4..], t[5 * 5 * 4..]);
    }
}
