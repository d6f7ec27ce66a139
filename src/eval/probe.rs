//! How good frozen features are: a linear probe and a k-NN classifier on a held-out split.
//!
//! - Split: per class, a seeded shuffle puts `test_fraction` of the images in the test set
//!   (stratified, so every class is represented in both sets alike).
//! - Both classifiers see the features standardised with the training set's per-dimension
//!   mean and standard deviation.
//! - Linear probe: multinomial logistic regression, mean cross-entropy plus
//!   `weight_decay/2 · |W|²` (no decay on the bias), minimised with L-BFGS in f64.
//! - k-NN: cosine similarity to every training image, the `k` most similar vote with weight
//!   `exp(similarity / temperature)` (DINO's weighted k-NN).
//!
//! With `repeats > 1` both are evaluated on that many splits and the accuracies averaged,
//! which narrows the noise of a small test set.
//!
//! Everything is deterministic; the probe's matrix products are the model's linear layer.

use std::collections::VecDeque;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::cpu::ops::linear;
use crate::eval::features::Features;

/// L-BFGS history length.
const HISTORY: usize = 10;

/// How to probe.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeOptions {
    /// Fraction of each class held out for testing, in (0, 1).
    pub test_fraction: f64,
    /// Seed of the (first) split.
    pub seed: u64,
    /// Splits to average over, seeded `seed, seed + 1, ...`.
    pub repeats: usize,
    /// L2 penalty on the probe's weights.
    pub weight_decay: f64,
    /// L-BFGS iterations at most.
    pub max_iter: usize,
    /// Neighbours that vote.
    pub k: usize,
    /// Temperature of the neighbours' vote weights.
    pub temperature: f64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            test_fraction: 0.2,
            seed: 0,
            repeats: 1,
            weight_decay: 1e-4,
            max_iter: 1000,
            k: 20,
            temperature: 0.07,
        }
    }
}

impl ProbeOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            bail!("test_fraction = {}: must be in (0, 1)", self.test_fraction);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "weight_decay = {}: must be a finite number >= 0",
                self.weight_decay
            );
        }
        if self.repeats == 0 {
            bail!("repeats = 0: must be at least 1");
        }
        if self.max_iter == 0 {
            bail!("max_iter = 0: must be at least 1");
        }
        if self.k == 0 {
            bail!("k = 0: must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "temperature = {}: must be a finite number > 0",
                self.temperature
            );
        }
        Ok(())
    }
}

/// Top-1 accuracies, as fractions: means over the splits, with their sample standard
/// deviations (0 for one split).
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeReport {
    /// Splits evaluated, with seeds `seed, seed + 1, ...`.
    pub repeats: usize,
    /// Images per split (the same for every seed: the split is stratified).
    pub train: usize,
    pub test: usize,
    pub classes: usize,
    /// Predicting the most frequent training class for every test image.
    pub majority_top1: f64,
    pub linear_top1: f64,
    pub linear_top1_sd: f64,
    pub linear_train_top1: f64,
    /// Most L-BFGS iterations the linear probe took on a split.
    pub iterations: usize,
    pub knn_top1: f64,
    pub knn_top1_sd: f64,
    /// Neighbours that voted (`k`, or every training image if there are fewer).
    pub k: usize,
}

/// One split's results.
struct SplitScores {
    majority: f64,
    linear: f64,
    linear_train: f64,
    iterations: usize,
    knn: f64,
}

/// Evaluates both classifiers on `repeats` seeded splits.
pub fn probe(features: &Features, opts: &ProbeOptions) -> Result<ProbeReport> {
    opts.validate()?;
    let classes = features.classes.len();
    let (train, test) = stratified_split(&features.labels, classes, opts.test_fraction, opts.seed);
    if train.is_empty() || test.is_empty() {
        bail!(
            "{} images are too few to hold out {} of each class for testing; use more images",
            features.len(),
            opts.test_fraction
        );
    }
    let mut present = vec![false; classes];
    features
        .labels
        .iter()
        .for_each(|&l| present[l as usize] = true);
    let present = present.iter().filter(|&&p| p).count();
    if present < 2 {
        bail!("the images hold {present} class; a probe needs at least 2");
    }
    let k = opts.k.min(train.len());
    let scores: Vec<SplitScores> = (0..opts.repeats as u64)
        .map(|r| probe_split(features, opts, opts.seed + r, k))
        .collect();
    let mean_sd = |f: fn(&SplitScores) -> f64| {
        let n = scores.len() as f64;
        let mean = scores.iter().map(f).sum::<f64>() / n;
        let var = scores.iter().map(|s| (f(s) - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        (mean, var.sqrt())
    };
    let (linear_top1, linear_top1_sd) = mean_sd(|s| s.linear);
    let (knn_top1, knn_top1_sd) = mean_sd(|s| s.knn);
    Ok(ProbeReport {
        repeats: opts.repeats,
        train: train.len(),
        test: test.len(),
        classes,
        majority_top1: mean_sd(|s| s.majority).0,
        linear_top1,
        linear_top1_sd,
        linear_train_top1: mean_sd(|s| s.linear_train).0,
        iterations: scores.iter().map(|s| s.iterations).max().unwrap_or(0),
        knn_top1,
        knn_top1_sd,
        k,
    })
}

/// Both classifiers on the split of `seed`, which holds at least one image each side.
fn probe_split(features: &Features, opts: &ProbeOptions, seed: u64, k: usize) -> SplitScores {
    let classes = features.classes.len();
    let (train, test) = stratified_split(&features.labels, classes, opts.test_fraction, seed);
    let d = features.dim;
    let rows = |idx: &[usize]| -> Vec<f64> {
        idx.iter()
            .flat_map(|&i| features.values[i * d..][..d].iter().map(|&v| v as f64))
            .collect()
    };
    let labels = |idx: &[usize]| -> Vec<u32> { idx.iter().map(|&i| features.labels[i]).collect() };
    let (mut x_train, mut x_test) = (rows(&train), rows(&test));
    let (y_train, y_test) = (labels(&train), labels(&test));
    let (mean, inv_std) = moments(&x_train, d);
    standardise(&mut x_train, &mean, &inv_std);
    standardise(&mut x_test, &mean, &inv_std);

    let probe = LinearProbe::fit(
        &x_train,
        &y_train,
        d,
        classes,
        opts.weight_decay,
        opts.max_iter,
    );
    let mut counts = vec![0usize; classes];
    y_train.iter().for_each(|&y| counts[y as usize] += 1);
    let majority = (0..classes).max_by_key(|&c| (counts[c], usize::MAX - c));
    let majority = majority.unwrap_or(0) as u32;
    SplitScores {
        majority: accuracy(&vec![majority; y_test.len()], &y_test),
        linear: accuracy(&probe.predict(&x_test), &y_test),
        linear_train: accuracy(&probe.predict(&x_train), &y_train),
        iterations: probe.iterations,
        knn: accuracy(
            &knn_predict(&x_train, &y_train, &x_test, d, classes, k, opts.temperature),
            &y_test,
        ),
    }
}

/// `(train, test)` indices: per class, `round(count · test_fraction)` of a seeded shuffle
/// go to the test set. Both lists are sorted.
pub fn stratified_split(
    labels: &[u32],
    classes: usize,
    test_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in 0..classes as u32 {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        members.shuffle(&mut rng);
        let held = (members.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&members[..held]);
        train.extend_from_slice(&members[held..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// Per-dimension mean and `1 / std` of rows `[n, d]`; a constant dimension gets
/// `1 / std = 0`, so it standardises to zero.
fn moments(x: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = (x.len() / d) as f64;
    let mut mean = vec![0.0; d];
    x.chunks_exact(d)
        .for_each(|r| mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v / n));
    let mut var = vec![0.0; d];
    x.chunks_exact(d).for_each(|r| {
        for ((s, &v), &m) in var.iter_mut().zip(r).zip(&mean) {
            *s += (v - m) * (v - m) / n;
        }
    });
    let inv_std = var
        .iter()
        .map(|&v| if v > 1e-12 { 1.0 / v.sqrt() } else { 0.0 })
        .collect();
    (mean, inv_std)
}

fn standardise(x: &mut [f64], mean: &[f64], inv_std: &[f64]) {
    for row in x.chunks_exact_mut(mean.len()) {
        for ((v, &m), &s) in row.iter_mut().zip(mean).zip(inv_std) {
            *v = (*v - m) * s;
        }
    }
}

fn accuracy(predicted: &[u32], truth: &[u32]) -> f64 {
    let right = predicted.iter().zip(truth).filter(|(p, t)| p == t).count();
    right as f64 / truth.len() as f64
}

/// The index of the largest value, the first one on ties.
fn argmax(v: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Multinomial logistic regression: logits `z = W x + b`, W `[C, D]`, b `[C]`.
pub struct LinearProbe {
    d: usize,
    classes: usize,
    /// `[C·D + C]`: W row-major, then b.
    theta: Vec<f64>,
    pub iterations: usize,
}

impl LinearProbe {
    /// Minimises the regularised mean cross-entropy of rows `x` `[n, d]` with labels `y`.
    pub fn fit(
        x: &[f64],
        y: &[u32],
        d: usize,
        classes: usize,
        weight_decay: f64,
        max_iter: usize,
    ) -> LinearProbe {
        let objective = |theta: &[f64], grad: &mut [f64]| {
            cross_entropy(theta, grad, x, y, d, classes, weight_decay)
        };
        let (theta, iterations) = lbfgs(objective, vec![0.0; classes * (d + 1)], max_iter);
        LinearProbe {
            d,
            classes,
            theta,
            iterations,
        }
    }

    /// Logits `[n, C]` of rows `x` `[n, d]`.
    fn logits(&self, x: &[f64]) -> Vec<f64> {
        logits(&self.theta, x, self.d, self.classes)
    }

    pub fn predict(&self, x: &[f64]) -> Vec<u32> {
        self.logits(x)
            .chunks_exact(self.classes)
            .map(argmax)
            .collect()
    }
}

/// Logits `[n, C]` = x `[n, d]` · Wᵀ + b, with the model's linear layer.
fn logits(theta: &[f64], x: &[f64], d: usize, classes: usize) -> Vec<f64> {
    let (w, b) = theta.split_at(classes * d);
    let mut z = vec![0.0; x.len() / d * classes];
    linear::linear_forward(&mut z, x, w, b);
    z
}

/// Mean cross-entropy of rows `x` `[n, d]` plus `wd/2 · |W|²`; writes its gradient.
fn cross_entropy(
    theta: &[f64],
    grad: &mut [f64],
    x: &[f64],
    y: &[u32],
    d: usize,
    classes: usize,
    wd: f64,
) -> f64 {
    let n = y.len() as f64;
    let mut z = logits(theta, x, d, classes);
    // z becomes dL/dz = (softmax(z) - onehot(y)) / n, row by row.
    let losses: Vec<f64> = z
        .par_chunks_mut(classes)
        .zip(y.par_iter())
        .map(|(z, &label)| {
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|&v| (v - max).exp()).sum();
            let loss = max + sum.ln() - z[label as usize];
            for (c, v) in z.iter_mut().enumerate() {
                *v = ((*v - max).exp() / sum - f64::from(c == label as usize)) / n;
            }
            loss
        })
        .collect();
    let (w, _) = theta.split_at(classes * d);
    let (gw, gb) = grad.split_at_mut(classes * d);
    gw.iter_mut().zip(w).for_each(|(g, &v)| *g = wd * v);
    gb.fill(0.0);
    linear::linear_backward(None, gw, gb, &z, x, w);
    losses.iter().sum::<f64>() / n + 0.5 * wd * w.iter().map(|v| v * v).sum::<f64>()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimises a smooth function `f(x, grad) -> value` from `x` with L-BFGS and a
/// backtracking (Armijo) line search; returns the minimiser and the iterations taken.
/// Stops when the largest gradient entry is below 1e-6, when a step no longer lowers the
/// value measurably, or after `max_iter` iterations.
pub fn lbfgs(
    f: impl Fn(&[f64], &mut [f64]) -> f64,
    mut x: Vec<f64>,
    max_iter: usize,
) -> (Vec<f64>, usize) {
    let n = x.len();
    let mut g = vec![0.0; n];
    let mut fx = f(&x, &mut g);
    let mut history: VecDeque<(Vec<f64>, Vec<f64>, f64)> = VecDeque::new();
    let (mut x_new, mut g_new) = (vec![0.0; n], vec![0.0; n]);
    for it in 0..max_iter {
        if g.iter().all(|v| v.abs() < 1e-6) {
            return (x, it);
        }
        // Two-loop recursion: dir = -H·g with H the inverse-Hessian estimate.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(q, &y)| *q -= a * y);
            alphas.push(a);
        }
        let gamma = history
            .back()
            .map_or(1.0, |(s, y, _)| dot(s, y) / dot(y, y));
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(q, &s)| *q += (a - b) * s);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &dir);
        if slope >= 0.0 {
            dir = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
            history.clear();
        }
        // The first step has no curvature estimate: keep it at unit length.
        let mut step = if history.is_empty() {
            (1.0 / dot(&g, &g).sqrt()).min(1.0)
        } else {
            1.0
        };
        let f_new = loop {
            for ((xn, &xv), &dv) in x_new.iter_mut().zip(&x).zip(&dir) {
                *xn = xv + step * dv;
            }
            let value = f(&x_new, &mut g_new);
            if value <= fx + 1e-4 * step * slope {
                break Some(value);
            }
            step *= 0.5;
            if step < 1e-20 {
                break None;
            }
        };
        let Some(f_new) = f_new else {
            return (x, it);
        };
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 {
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back((s, y, 1.0 / sy));
        }
        let stalled = fx - f_new <= 1e-12 * fx.abs().max(1.0);
        std::mem::swap(&mut x, &mut x_new);
        std::mem::swap(&mut g, &mut g_new);
        fx = f_new;
        if stalled {
            return (x, it + 1);
        }
    }
    (x, max_iter)
}

/// Rows scaled to unit length (a zero row stays zero).
fn unit_rows(x: &[f64], d: usize) -> Vec<f64> {
    x.chunks_exact(d)
        .flat_map(|r| {
            let norm = dot(r, r).sqrt();
            let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            r.iter().map(move |v| v * inv)
        })
        .collect()
}

/// Weighted k-NN labels of `test` rows among `train` rows (cosine similarity).
fn knn_predict(
    train: &[f64],
    y_train: &[u32],
    test: &[f64],
    d: usize,
    classes: usize,
    k: usize,
    temperature: f64,
) -> Vec<u32> {
    let (train, test) = (unit_rows(train, d), unit_rows(test, d));
    test.par_chunks(d)
        .map(|t| {
            let mut sims: Vec<(f64, usize)> = train
                .chunks_exact(d)
                .enumerate()
                .map(|(i, r)| (dot(r, t), i))
                .collect();
            // Most similar first; equal similarities in training order.
            let order =
                |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            sims.select_nth_unstable_by(k - 1, order);
            let mut votes = vec![0.0; classes];
            for &(s, i) in &sims[..k] {
                votes[y_train[i] as usize] += (s / temperature).exp();
            }
            argmax(&votes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::standard_normal;

    #[test]
    fn the_split_is_stratified_seeded_and_disjoint() {
        let labels: Vec<u32> = (0..103).map(|i| (i % 3) as u32).collect();
        let (train, test) = stratified_split(&labels, 3, 0.2, 5);
        assert_eq!(train.len() + test.len(), 103);
        assert!(train.iter().all(|i| !test.contains(i)));
        for c in 0..3 {
            let held = test.iter().filter(|&&i| labels[i] == c).count();
            let all = labels.iter().filter(|&&l| l == c).count();
            assert_eq!(held, (all as f64 * 0.2).round() as usize);
        }
        assert_eq!(stratified_split(&labels, 3, 0.2, 5), (train.clone(), test));
        assert_ne!(stratified_split(&labels, 3, 0.2, 6).0, train);
    }

    #[test]
    fn the_cross_entropy_gradient_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (n, d, c) = (17, 4, 3);
        let x: Vec<f64> = (0..n * d).map(|_| standard_normal(&mut rng)).collect();
        let y: Vec<u32> = (0..n).map(|i| (i * 7 % c) as u32).collect();
        let theta: Vec<f64> = (0..c * (d + 1))
            .map(|_| standard_normal(&mut rng))
            .collect();
        let mut g = vec![0.0; theta.len()];
        cross_entropy(&theta, &mut g, &x, &y, d, c, 0.3);
        let mut scratch = vec![0.0; theta.len()];
        for i in 0..theta.len() {
            let (mut up, mut down) = (theta.clone(), theta.clone());
            up[i] += 1e-5;
            down[i] -= 1e-5;
            let fd = (cross_entropy(&up, &mut scratch, &x, &y, d, c, 0.3)
                - cross_entropy(&down, &mut scratch, &x, &y, d, c, 0.3))
                / 2e-5;
            assert!((fd - g[i]).abs() < 1e-8, "{i}: {fd} vs {}", g[i]);
        }
    }

    #[test]
    fn lbfgs_finds_the_minimum_of_an_ill_conditioned_quadratic() {
        let scales = [1.0, 10.0, 100.0, 1000.0];
        let f = |x: &[f64], g: &mut [f64]| {
            let mut v = 0.0;
            for i in 0..4 {
                let e = x[i] - i as f64;
                g[i] = scales[i] * e;
                v += 0.5 * scales[i] * e * e;
            }
            v
        };
        let (x, iterations) = lbfgs(f, vec![5.0; 4], 200);
        assert!(iterations < 200, "{iterations}");
        for (i, v) in x.iter().enumerate() {
            assert!((v - i as f64).abs() < 1e-6, "{i}: {v}");
        }
    }

    /// Three well-separated clusters in 5-D: both classifiers get them all, while a
    /// label that is noise scores near chance.
    #[test]
    fn separable_classes_are_found_and_noise_is_not() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (n, d) = (300, 5);
        let mut values = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let c = i % 3;
            for j in 0..d {
                let centre = if j == c { 4.0 } else { 0.0 };
                values.push((centre + standard_normal(&mut rng)) as f32);
            }
            labels.push(c as u32);
        }
        let classes = vec!["a".into(), "b".into(), "c".into()];
        let feats = Features {
            dim: d,
            values: values.clone(),
            labels,
            classes: classes.clone(),
        };
        let report = probe(&feats, &ProbeOptions::default()).unwrap();
        assert_eq!((report.train, report.test, report.k), (240, 60, 20));
        assert_eq!((report.linear_top1_sd, report.knn_top1_sd), (0.0, 0.0));
        assert!(report.linear_top1 > 0.97, "{report:?}");
        assert!(report.knn_top1 > 0.97, "{report:?}");
        let noise = Features {
            dim: d,
            values,
            labels: (0..n)
                .map(|_| rand::Rng::gen_range(&mut rng, 0..3))
                .collect(),
            classes,
        };
        let report = probe(&noise, &ProbeOptions::default()).unwrap();
        assert!(report.linear_top1 < 0.55, "{report:?}");
        assert!(report.knn_top1 < 0.55, "{report:?}");
    }

    /// Repeats average the single-split reports of consecutive seeds.
    #[test]
    fn repeats_average_consecutive_splits() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, d) = (120, 4);
        let feats = Features {
            dim: d,
            values: (0..n * d)
                .map(|i| (standard_normal(&mut rng) + (i / d % 2) as f64) as f32)
                .collect(),
            labels: (0..n).map(|i| (i % 2) as u32).collect(),
            classes: vec!["a".into(), "b".into()],
        };
        let single = |seed| {
            let opts = ProbeOptions {
                seed,
                k: 5,
                ..ProbeOptions::default()
            };
            probe(&feats, &opts).unwrap()
        };
        let runs: Vec<ProbeReport> = (7..10).map(single).collect();
        let opts = ProbeOptions {
            seed: 7,
            repeats: 3,
            k: 5,
            ..ProbeOptions::default()
        };
        let averaged = probe(&feats, &opts).unwrap();
        let linear: Vec<f64> = runs.iter().map(|r| r.linear_top1).collect();
        let knn: Vec<f64> = runs.iter().map(|r| r.knn_top1).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / 3.0;
        let sd = |v: &[f64]| (v.iter().map(|x| (x - mean(v)).powi(2)).sum::<f64>() / 2.0).sqrt();
        assert!((averaged.linear_top1 - mean(&linear)).abs() < 1e-12);
        assert!((averaged.knn_top1 - mean(&knn)).abs() < 1e-12);
        assert!((averaged.linear_top1_sd - sd(&linear)).abs() < 1e-12);
        assert!((averaged.knn_top1_sd - sd(&knn)).abs() < 1e-12);
        assert!(
            linear.iter().chain(&knn).any(|&a| a != linear[0]),
            "{runs:?}"
        );
    }
}
