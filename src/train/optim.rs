//! AdamW and the learning-rate schedule (docs/DESIGN.md §1.4). The update here is the CPU
//! backend's and the reference the fused GPU kernel is tested against.

use rayon::prelude::*;

use crate::backend::AdamWStep;
use crate::config::TrainConfig;
use crate::cpu::simd::wide;

/// Learning rate at optimiser step `step` (0-based): linear warm-up to the peak, then a
/// half-cycle cosine down to `min_lr` at the last step.
pub fn learning_rate(train: &TrainConfig, step: u64) -> f64 {
    let peak = train.peak_lr();
    if step < train.warmup_steps {
        return peak * step as f64 / train.warmup_steps as f64;
    }
    let span = (train.steps - train.warmup_steps).max(1) as f64;
    let progress = ((step - train.warmup_steps) as f64 / span).min(1.0);
    train.min_lr + (peak - train.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The factor global-norm clipping multiplies every gradient by: `clip / norm` when the
/// norm exceeds `clip`, else 1.
pub fn clip_scale(clip: Option<f64>, grad_norm: f64) -> f32 {
    clip.map_or(1.0, |c| (c / grad_norm).min(1.0)) as f32
}

/// PyTorch's AdamW: decoupled decay `p -= lr*wd*p` where `decay_mask` is 1, then the
/// bias-corrected Adam update. Gradients are multiplied by `step.grad_scale` first.
pub fn adamw_update(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    decay_mask: &[f32],
    step: &AdamWStep,
) {
    let bc1 = 1.0 - (step.beta1 as f64).powi(step.t as i32);
    let bc2 = 1.0 - (step.beta2 as f64).powi(step.t as i32);
    let step_size = (step.lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let decay = step.lr * step.weight_decay;
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n && decay_mask.len() == n);
    // Every value on its own, so chunks on any number of threads give the same bits.
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(decay_mask.par_chunks(CHUNK))
        .for_each(|((((params, grads), m), v), decay_mask)| {
            wide(
                #[inline(always)]
                || {
                    for i in 0..params.len() {
                        let g = grads[i] * step.grad_scale;
                        m[i] = step.beta1 * m[i] + (1.0 - step.beta1) * g;
                        v[i] = step.beta2 * v[i] + (1.0 - step.beta2) * g * g;
                        let p = params[i] * (1.0 - decay * decay_mask[i]);
                        params[i] =
                            p - step_size * m[i] / ((v[i].sqrt() * inv_sqrt_bc2) + step.eps);
                    }
                },
            )
        });
}

/// Parameters per task of the update.
const CHUNK: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_follows_the_cosine() {
        let t = TrainConfig {
            batch: 256,
            steps: 110,
            warmup_steps: 10,
            min_lr: 1e-6,
            ..TrainConfig::default()
        };
        assert_eq!(learning_rate(&t, 0), 0.0);
        assert!((learning_rate(&t, 5) - 0.75e-4).abs() < 1e-12);
        assert!((learning_rate(&t, 10) - 1.5e-4).abs() < 1e-12);
        let mid = 1e-6 + (1.5e-4 - 1e-6) * 0.5;
        assert!((learning_rate(&t, 60) - mid).abs() < 1e-12);
        assert!((learning_rate(&t, 110) - 1e-6).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        // One scalar, decayed; step t = 2 from known moments.
        let (mut p, g, mut m, mut v) = ([1.0f32], [0.5f32], [0.1f32], [0.01f32]);
        let s = AdamWStep {
            t: 2,
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
            grad_scale: 1.0,
        };
        adamw_update(&mut p, &g, &mut m, &mut v, &[1.0], &s);
        let m_want = 0.9 * 0.1 + 0.1 * 0.5;
        let v_want = 0.95 * 0.01 + 0.05 * 0.25;
        let mhat = m_want / (1.0 - 0.81);
        let vhat = v_want / (1.0 - 0.9025);
        let p_want = 1.0 * (1.0 - 0.01 * 0.05) - 0.01 * mhat / (f64::sqrt(vhat) + 1e-8);
        assert!((m[0] as f64 - m_want).abs() < 1e-7);
        assert!((v[0] as f64 - v_want).abs() < 1e-7);
        assert!((p[0] as f64 - p_want).abs() < 1e-6, "{} vs {p_want}", p[0]);
    }
}
