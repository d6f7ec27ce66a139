//! Linear layer `y = x·Wᵀ + b`, with `W` stored `[out, in]` as in PyTorch.
//! Shapes: x `[n, in]`, W `[out, in]`, b `[out]` → y `[n, out]`.

use super::super::gemm::{add_dyt_x, dy_w, x_wt, Start};
use super::super::real::Real;
use super::add_column_sums;

/// `(n, in, out)` from the slices, checking they agree.
fn dims<T>(x_len: usize, w: &[T], b: &[T]) -> (usize, usize, usize) {
    let d_out = b.len();
    assert!(
        d_out > 0 && w.len().is_multiple_of(d_out),
        "weight of {} values for {d_out} outputs",
        w.len()
    );
    let d_in = w.len() / d_out;
    assert!(
        d_in > 0 && x_len.is_multiple_of(d_in),
        "input of {x_len} values for rows of {d_in}"
    );
    (x_len / d_in, d_in, d_out)
}

/// y `[n, out]` = x `[n, in]` · W `[out, in]`ᵀ + b `[out]`; overwrites y. The bias is the
/// product's start (gemm.rs), not a pass of its own.
pub fn linear_forward<T: Real>(y: &mut [T], x: &[T], w: &[T], b: &[T]) {
    let (n, d_in, d_out) = dims(x.len(), w, b);
    assert_eq!(y.len(), n * d_out);
    x_wt(y, x, w, n, d_in, d_out, Start::Bias(b));
}

/// y `[n, out]` = residual `[n, out]` + b `[out]` + x `[n, in]` · W `[out, in]`ᵀ: a residual
/// branch's last layer, added to the branch's input as the product stores.
pub fn linear_forward_residual<T: Real>(y: &mut [T], residual: &[T], x: &[T], w: &[T], b: &[T]) {
    let (n, d_in, d_out) = dims(x.len(), w, b);
    assert_eq!(y.len(), n * d_out);
    assert_eq!(residual.len(), y.len());
    x_wt(y, x, w, n, d_in, d_out, Start::Residual(residual, b));
}

/// From dy `[n, out]`: dx `[n, in]` = dy·W (overwritten, skipped when `None`),
/// dW `[out, in]` += dyᵀ·x, db `[out]` += Σ_rows dy.
pub fn linear_backward<T: Real>(
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: &mut [T],
    dy: &[T],
    x: &[T],
    w: &[T],
) {
    let (n, d_in, d_out) = dims(x.len(), w, db);
    assert_eq!(dy.len(), n * d_out);
    assert_eq!(dw.len(), w.len());
    if let Some(dx) = dx {
        assert_eq!(dx.len(), x.len());
        dy_w(dx, dy, w, n, d_in, d_out);
    }
    add_dyt_x(dw, dy, x, n, d_in, d_out);
    add_column_sums(db, dy);
}
