//! e^x in f32 for GELU's backward and the softmax: branch-free, so the loops over it
//! vectorise (libm's `expf` is a call per value), and within half an f32 ulp plus the
//! final rounding of the true value.
//!
//! `e^x = 2^n · e^r` with `n = round(x / ln 2)` and `|r| <= ln 2 / 2`, evaluated in f64:
//! the Taylor polynomial of degree 9 leaves a relative error below 2e-10 there, and `2^n`
//! is written into the exponent bits. `x` is clamped to `[-104, 89]`, beyond which the
//! f32 result is 0 or +inf anyway; NaN stays NaN.

/// 1.5·2⁵²: adding and subtracting it rounds an f64 below 2⁵¹ to the nearest integer.
const ROUND: f64 = 6_755_399_441_055_744.0;

/// `1/k!` for k = 0..=9, the Taylor coefficients of e^r.
const TAYLOR: [f64; 10] = [
    1.0,
    1.0,
    0.5,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
];

/// e^x, correctly rounded but for rare ties (see the module).
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-104.0, 89.0) as f64;
    let n = (x * std::f64::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * std::f64::consts::LN_2;
    let poly = TAYLOR.iter().rev().fold(0.0, |acc, &c| acc * r + c);
    // n + 1023 is in 0..2048, so adding ROUND puts it in the low mantissa bits.
    let scale = f64::from_bits((n + 1023.0 + ROUND).to_bits() << 52);
    (poly * scale) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_one_ulp_of_the_f64_exp_everywhere() {
        let mut worst = 0.0f64;
        for i in -1_000_000..=1_000_000 {
            let x = i as f32 * 8.8e-5;
            let exact = (x as f64).exp();
            let ulp = (exact as f32).max(f32::MIN_POSITIVE) * f32::EPSILON;
            worst = worst.max((exp_f32(x) as f64 - exact).abs() / ulp as f64);
        }
        assert!(worst <= 1.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(-104.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // Subnormal results round as the true value does.
        assert_eq!(exp_f32(-100.0), (-100.0f64).exp() as f32);
    }
}
