//! Central finite differences in f64: the check every backward of the CPU reference
//! passes, shared by the LoMaR and MAE gradchecks.

use lomar::params::standard_normal;
use rand_chacha::ChaCha8Rng;

/// Central-difference step. In f64 the truncation error (h²) and the rounding error
/// (1e-16/h) both stay near 1e-10 of the function's scale.
pub const H: f64 = 1e-5;

pub fn randn(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f64> {
    (0..len).map(|_| standard_normal(rng) * std).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares analytic gradients with central differences of `f` at `coords` of every
/// input tensor: `|a - n| <= rel * max(|a|, |n|) + abs`, panicking at the first coordinate
/// outside the bound or when every checked gradient of an input is ~0.
pub struct FdCheck {
    pub rel: f64,
    pub abs: f64,
}

impl FdCheck {
    pub fn run(
        &self,
        name: &str,
        inputs: &mut [Vec<f64>],
        analytic: &[Vec<f64>],
        coords: impl Fn(usize, usize) -> Vec<usize>,
        f: impl Fn(&[Vec<f64>]) -> f64,
    ) {
        assert_eq!(inputs.len(), analytic.len());
        for t in 0..inputs.len() {
            assert_eq!(inputs[t].len(), analytic[t].len(), "{name} input {t}");
            let mut largest = 0.0f64;
            for i in coords(t, inputs[t].len()) {
                let orig = inputs[t][i];
                inputs[t][i] = orig + H;
                let up = f(inputs);
                inputs[t][i] = orig - H;
                let down = f(inputs);
                inputs[t][i] = orig;
                let numeric = (up - down) / (2.0 * H);
                let a = analytic[t][i];
                let bound = self.rel * a.abs().max(numeric.abs()) + self.abs;
                assert!(
                    (a - numeric).abs() <= bound,
                    "{name}, input {t}, coordinate {i}: analytic {a:e}, numeric {numeric:e}"
                );
                largest = largest.max(a.abs());
            }
            assert!(
                largest > 1e-6,
                "{name}, input {t}: every checked gradient is ~0, the check proves nothing"
            );
        }
    }
}
