//! Every matrix product of the CPU backend goes through here: f32 on our AVX-512 kernel
//! (gemm/avx512.rs) where the CPU has AVX-512, everything else onto the `gemm` crate.
//!
//! [`Mat`] is a strided read-only view, so a head's q, k or v columns inside a qkv row and
//! transposes are views, never copies. The three row-major helpers are the products a
//! linear layer needs.

use gemm::Parallelism;

#[cfg(target_arch = "x86_64")]
mod avx512;

use super::real::Real;

/// A read-only matrix inside a slice: element `(i, j)` sits at `i*rs + j*cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// `[rows, cols]` whose rows start `row_stride` elements apart, e.g. one head's
    /// columns of a `[T, 3D]` qkv block.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        let m = Mat {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: 1,
        };
        assert!(
            rows == 0 || cols == 0 || last_index(rows, cols, m.rs, m.cs) < data.len(),
            "a {rows}x{cols} view with row stride {row_stride} overruns a slice of {}",
            data.len()
        );
        m
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// Offset of the last element of a non-empty strided matrix.
fn last_index(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs
}

/// `(m, k, n)` of `dst = a · b`, checking that the inner dimensions agree and that `dst`
/// at row stride `dst_rs` holds the product.
fn product_dims<T>(dst: &[T], dst_rs: usize, a: Mat<T>, b: Mat<T>) -> (usize, usize, usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, k,
        "inner dimensions differ: {m}x{k} · {}x{n}",
        b.rows
    );
    assert!(
        m == 0 || n == 0 || last_index(m, n, dst_rs, 1) < dst.len(),
        "a {m}x{n} product with row stride {dst_rs} overruns a destination of {}",
        dst.len()
    );
    (m, k, n)
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]` on the `gemm` crate and all cores, with `dst`
/// row-major at row stride `dst_rs`. Overwrites `dst` unless `accumulate`.
pub fn matmul<T: Real>(dst: &mut [T], dst_rs: usize, a: Mat<T>, b: Mat<T>, accumulate: bool) {
    let (m, k, n) = product_dims(dst, dst_rs, a, b);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every element of `a`, `b` and `dst` inside its slice,
    // `dst` is borrowed mutably so it aliases neither input, and `T` is f32 or f64, the
    // types `gemm` dispatches on.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// `dst[m, n] (+)= a · b` in f32 on all cores (see [`Real::product`]).
pub fn product_f32(dst: &mut [f32], dst_rs: usize, a: Mat<f32>, b: Mat<f32>, accumulate: bool) {
    let (m, k, n) = product_dims(dst, dst_rs, a, b);
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && k > 0 && avx512::available() {
        let end = last_index(m, n, dst_rs, 1) + 1;
        avx512::matmul(&mut dst[..end], dst_rs, a, b, accumulate);
        return;
    }
    matmul(dst, dst_rs, a, b, accumulate);
}

/// `dst[m, n] (+)= a · b` in f64 on all cores (see [`Real::product`]).
pub fn product_f64(dst: &mut [f64], dst_rs: usize, a: Mat<f64>, b: Mat<f64>, accumulate: bool) {
    matmul(dst, dst_rs, a, b, accumulate);
}

/// `y[n, out] (+)= x[n, in] · w[out, in]ᵀ`: a linear layer's forward.
pub fn x_wt<T: Real>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    n: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    let (x, w) = (Mat::new(x, n, d_in), Mat::new(w, d_out, d_in));
    T::product(y, d_out, x, w.t(), accumulate);
}

/// `dx[n, in] = dy[n, out] · w[out, in]`: a linear layer's input gradient.
pub fn dy_w<T: Real>(dx: &mut [T], dy: &[T], w: &[T], n: usize, d_in: usize, d_out: usize) {
    let (dy, w) = (Mat::new(dy, n, d_out), Mat::new(w, d_out, d_in));
    T::product(dx, d_in, dy, w, false);
}

/// `dw[out, in] += dy[n, out]ᵀ · x[n, in]`: a linear layer's weight gradient.
pub fn add_dyt_x<T: Real>(dw: &mut [T], dy: &[T], x: &[T], n: usize, d_in: usize, d_out: usize) {
    let (dy, x) = (Mat::new(dy, n, d_out), Mat::new(x, n, d_in));
    T::product(dw, d_in, dy.t(), x, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element `(i, j)` at `i*rs + j*cs`, spelled out rather than derived by `t()`.
    fn view(data: &[f64], rows: usize, cols: usize, rs: usize, cs: usize) -> Mat<'_, f64> {
        Mat {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// Textbook triple loop.
    fn naive(a: Mat<f64>, b: Mat<f64>) -> Vec<f64> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| a.data[i * a.rs + l * a.cs] * b.data[l * b.rs + j * b.cs])
                    .sum();
            }
        }
        c
    }

    fn filled(len: usize, seed: f64) -> Vec<f64> {
        (0..len).map(|i| ((i as f64 + seed) * 0.7).sin()).collect()
    }

    #[test]
    fn helpers_match_the_textbook_product() {
        let (n, d_in, d_out) = (7, 5, 3);
        let x = filled(n * d_in, 1.0);
        let w = filled(d_out * d_in, 2.0);
        let dy = filled(n * d_out, 3.0);

        let mut y = vec![1.0; n * d_out];
        x_wt(&mut y, &x, &w, n, d_in, d_out, true);
        let want: Vec<f64> = naive(view(&x, n, d_in, d_in, 1), view(&w, d_in, d_out, 1, d_in))
            .iter()
            .map(|v| v + 1.0)
            .collect();
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));

        let mut dx = vec![f64::NAN; n * d_in];
        dy_w(&mut dx, &dy, &w, n, d_in, d_out);
        let want = naive(
            view(&dy, n, d_out, d_out, 1),
            view(&w, d_out, d_in, d_in, 1),
        );
        assert!(dx.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));

        let mut dw = vec![0.5; d_out * d_in];
        add_dyt_x(&mut dw, &dy, &x, n, d_in, d_out);
        let want: Vec<f64> = naive(view(&dy, d_out, n, 1, d_out), view(&x, n, d_in, d_in, 1))
            .iter()
            .map(|v| v + 0.5)
            .collect();
        assert!(dw.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    #[test]
    fn strided_views_pick_one_block_of_columns() {
        // Columns 2..4 of a [3, 6] matrix times its own columns 4..6, transposed.
        let a = filled(18, 4.0);
        let mut c = vec![0.0; 3 * 3];
        matmul(
            &mut c,
            3,
            Mat::strided(&a[2..], 3, 2, 6),
            Mat::strided(&a[4..], 3, 2, 6).t(),
            false,
        );
        let want = naive(view(&a[2..], 3, 2, 6, 1), view(&a[4..], 2, 3, 1, 6));
        assert!(c.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    #[test]
    fn f32_products_match_f64_at_every_edge_for_any_thread_count() {
        // Rows past one task and not a multiple of a tile, columns not a multiple of a
        // panel, k past one block; `a` row-major, and transposed as in a weight gradient;
        // `b` row-major (read in place), and transposed as in a forward (packed).
        for (m, k, n, a_transposed, b_transposed) in [
            (203, 300, 100, false, false),
            (203, 300, 100, false, true),
            (70, 517, 64, true, false),
            (70, 517, 64, true, true),
            (5, 3, 7, false, false),
            (5, 3, 7, true, true),
        ] {
            let a64 = filled(m * k, 5.0);
            let b64 = filled(k * n, 6.0);
            let c64 = filled(m * n, 7.0);
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let (a32, b32) = (f32s(&a64), f32s(&b64));
            let (a, a_ref) = if a_transposed {
                (Mat::new(&a32, k, m).t(), view(&a64, m, k, 1, m))
            } else {
                (Mat::new(&a32, m, k), view(&a64, m, k, k, 1))
            };
            let (b, b_ref) = if b_transposed {
                (Mat::new(&b32, n, k).t(), view(&b64, k, n, 1, k))
            } else {
                (Mat::new(&b32, k, n), view(&b64, k, n, n, 1))
            };
            let product = |threads: usize, accumulate: bool| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = f32s(&c64);
                pool.install(|| product_f32(&mut c, n, a, b, accumulate));
                c
            };
            let want = naive(a_ref, b_ref);
            for accumulate in [false, true] {
                let got = product(1, accumulate);
                assert_eq!(got, product(3, accumulate), "{m}x{k}x{n}");
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    let w = if accumulate { w + c64[i] } else { w };
                    assert!(
                        (g as f64 - w).abs() < 1e-5 * k as f64,
                        "{m}x{k}x{n} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn a_view_past_the_slice_is_refused() {
        let a = [0.0f32; 10];
        Mat::strided(&a, 3, 2, 5);
    }
}
