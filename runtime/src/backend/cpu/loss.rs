//! Fused softmax cross-entropy: one pass over each row of logits computes the loss and, in the
//! same buffer, the gradient. Ignore index -100 and label smoothing as in `torch.nn.functional.
//! cross_entropy` (which equals HF's `LabelSmoother`).

use rayon::prelude::*;

use super::math;
use crate::backend::LossRows;

pub const IGNORE_INDEX: i32 = -100;

pub fn cross_entropy(logits: &mut [f32], targets: &[i32], v: usize, smoothing: f32, grad_scale: Option<f32>) -> LossRows {
    let mut loss = vec![0.0f32; targets.len()];
    logits.par_chunks_mut(v).zip(loss.par_iter_mut()).zip(targets.par_iter()).for_each(|((z, loss), &y)| {
        if y == IGNORE_INDEX {
            if grad_scale.is_some() {
                z.fill(0.0);
            }
            return;
        }
        let y = y as usize;
        let max = math::max(z);
        let mean = math::sum(z) / v as f32;
        let zy = z[y];
        let sum = if grad_scale.is_some() { math::sum_exp::<true>(z, max) } else { math::sum_exp::<false>(z, max) };
        let lse = max + sum.ln();
        *loss = (1.0 - smoothing) * (lse - zy) + smoothing * (lse - mean);
        if let Some(scale) = grad_scale {
            let inv = scale / sum;
            let off = scale * smoothing / v as f32;
            for p in z.iter_mut() {
                *p = *p * inv - off;
            }
            z[y] -= scale * (1.0 - smoothing);
        }
    });
    let n_targets = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    LossRows { loss, n_targets }
}
