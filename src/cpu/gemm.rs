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

/// Where a product's destination starts before `a · b` is added to it. A linear layer's
/// bias and a residual branch's input enter this way instead of in passes of their own
/// over the output.
#[derive(Clone, Copy)]
pub enum Start<'a, T> {
    /// `dst = a·b`.
    Zero,
    /// `dst += a·b`.
    Dst,
    /// `dst[i, :] = bias + (a·b)[i, :]`.
    Bias(&'a [T]),
    /// `dst[i, :] = (x[i, :] + bias) + (a·b)[i, :]`, `x` laid out as `dst`.
    Residual(&'a [T], &'a [T]),
}

impl<T: Real> Start<'_, T> {
    /// Writes the start into the `m × n` destination for a product that can only add
    /// (the `gemm` crate); `(x + bias) + sum` keeps the fused kernel's order. Returns
    /// whether the product must add to it.
    fn write_into(self, dst: &mut [T], dst_rs: usize, m: usize, n: usize) -> bool {
        let rows = (0..m).map(|i| i * dst_rs);
        match self {
            Start::Zero => return false,
            Start::Dst => {}
            Start::Bias(bias) => rows.for_each(|at| dst[at..at + n].copy_from_slice(&bias[..n])),
            Start::Residual(x, bias) => rows.for_each(|at| {
                for ((d, &x), &b) in dst[at..at + n].iter_mut().zip(&x[at..]).zip(bias) {
                    *d = x + b;
                }
            }),
        }
        true
    }

    /// Checks that a bias has `n` values and a residual covers the `m × n` destination.
    fn check(&self, dst_rs: usize, m: usize, n: usize) {
        if let Start::Bias(bias) | Start::Residual(_, bias) = self {
            assert!(
                bias.len() >= n,
                "a bias of {} values for {n} columns",
                bias.len()
            );
        }
        if let Start::Residual(x, _) = self {
            assert!(
                m == 0 || n == 0 || last_index(m, n, dst_rs, 1) < x.len(),
                "a residual of {} values for a {m}x{n} product",
                x.len()
            );
        }
    }
}

/// `dst[m, n] = start + a[m, k] · b[k, n]` on the `gemm` crate and all cores, with `dst`
/// row-major at row stride `dst_rs`.
pub fn matmul<T: Real>(dst: &mut [T], dst_rs: usize, a: Mat<T>, b: Mat<T>, start: Start<T>) {
    let (m, k, n) = product_dims(dst, dst_rs, a, b);
    start.check(dst_rs, m, n);
    if m == 0 || n == 0 {
        return;
    }
    let accumulate = start.write_into(dst, dst_rs, m, n);
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

/// `dst[m, n] = start + a · b` in f32 on all cores (see [`Real::product`]).
pub fn product_f32(dst: &mut [f32], dst_rs: usize, a: Mat<f32>, b: Mat<f32>, start: Start<f32>) {
    let (m, k, n) = product_dims(dst, dst_rs, a, b);
    start.check(dst_rs, m, n);
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && k > 0 && avx512::available() {
        let end = last_index(m, n, dst_rs, 1) + 1;
        avx512::matmul(&mut dst[..end], dst_rs, a, b, start);
        return;
    }
    matmul(dst, dst_rs, a, b, start);
}

/// `dst[m, n] = start + a · b` in f64 on all cores (see [`Real::product`]).
pub fn product_f64(dst: &mut [f64], dst_rs: usize, a: Mat<f64>, b: Mat<f64>, start: Start<f64>) {
    matmul(dst, dst_rs, a, b, start);
}

/// `y[n, out] = start + x[n, in] · w[out, in]ᵀ`: a linear layer's forward.
pub fn x_wt<T: Real>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    n: usize,
    d_in: usize,
    d_out: usize,
    start: Start<T>,
) {
    let (x, w) = (Mat::new(x, n, d_in), Mat::new(w, d_out, d_in));
    T::product(y, d_out, x, w.t(), start);
}

/// `dx[n, in] = dy[n, out] · w[out, in]`: a linear layer's input gradient.
pub fn dy_w<T: Real>(dx: &mut [T], dy: &[T], w: &[T], n: usize, d_in: usize, d_out: usize) {
    let (dy, w) = (Mat::new(dy, n, d_out), Mat::new(w, d_out, d_in));
    T::product(dx, d_in, dy, w, Start::Zero);
}

/// `dw[out, in] += dy[n, out]ᵀ · x[n, in]`: a linear layer's weight gradient.
pub fn add_dyt_x<T: Real>(dw: &mut [T], dy: &[T], x: &[T], n: usize, d_in: usize, d_out: usize) {
    let (dy, x) = (Mat::new(dy, n, d_out), Mat::new(x, n, d_in));
    T::product(dw, d_in, dy.t(), x, Start::Dst);
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
        x_wt(&mut y, &x, &w, n, d_in, d_out, Start::Dst);
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
            Start::Zero,
        );
        let want = naive(view(&a[2..], 3, 2, 6, 1), view(&a[4..], 2, 3, 1, 6));
        assert!(c.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    #[test]
    fn f32_products_match_f64_at_every_edge_for_any_thread_count() {
        // Rows past one task and not a multiple of a tile, columns not a multiple of a
        // panel, k past one block; `a` row-major, and transposed as in a weight gradient;
        // `b` row-major, and transposed as in a forward or a head's keys (packed through
        // 16 × 16 register transposes, with ragged rows and columns beside them).
        for (m, k, n, a_transposed, b_transposed) in [
            (50, 64, 50, false, true),
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
            let bias64 = filled(n, 8.0);
            let x64 = filled(m * n, 9.0);
            let (bias32, x32) = (f32s(&bias64), f32s(&x64));
            let product = |threads: usize, start: Start<f32>| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = f32s(&c64);
                pool.install(|| product_f32(&mut c, n, a, b, start));
                c
            };
            let want = naive(a_ref, b_ref);
            // Each start beside the value it puts under element `i` of the product.
            type StartValue<'a> = &'a dyn Fn(usize) -> f64;
            let starts: [(Start<f32>, StartValue); 4] = [
                (Start::Zero, &|_| 0.0),
                (Start::Dst, &|i| c64[i]),
                (Start::Bias(&bias32), &|i| bias64[i % n]),
                (Start::Residual(&x32, &bias32), &|i| x64[i] + bias64[i % n]),
            ];
            for (start, start_at) in starts {
                let got = product(1, start);
                assert_eq!(got, product(3, start), "{m}x{k}x{n}");
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    let w = w + start_at(i);
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
