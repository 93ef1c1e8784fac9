//! AdamW and the reductions the optimizer step needs (global gradient norm, scaling).

use rayon::prelude::*;

use crate::backend::{AdamWScalars, AdamWStep};

pub fn sum_squares(x: &[f32]) -> f64 {
    // fixed chunking keeps the summation order independent of the thread count
    x.par_chunks(1 << 14).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).collect::<Vec<_>>().iter().sum()
}

pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// `torch.optim.AdamW` (single-tensor path): decoupled decay, `exp_avg.lerp_(g, 1 - beta1)`,
/// `denom = sqrt(exp_avg_sq) / sqrt(1 - beta2^t) + eps`, `p -= lr / (1 - beta1^t) * exp_avg / denom`.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWStep, decay: bool) {
    let AdamWScalars { step_size, bc2_sqrt, decay_mul, w1, w2 } = hp.scalars();
    let decay_mul = if decay { decay_mul } else { 1.0 };
    p.par_chunks_mut(1 << 14).zip(g.par_chunks(1 << 14)).zip(m.par_chunks_mut(1 << 14).zip(v.par_chunks_mut(1 << 14))).for_each(|((p, g), (m, v))| {
        for i in 0..p.len() {
            // the clipped gradient, rounded to f32 as torch's in-place `grad.mul_(coef)` leaves it
            let g = g[i] * hp.grad_scale;
            p[i] *= decay_mul;
            m[i] += w1 * (g - m[i]);
            v[i] = v[i] * hp.beta2 + w2 * (g * g);
            let denom = v[i].sqrt() / bc2_sqrt + hp.eps;
            p[i] -= step_size * (m[i] / denom);
        }
    });
}
