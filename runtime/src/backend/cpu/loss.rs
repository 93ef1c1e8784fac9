//! Fused softmax cross-entropy: one pass over each row of logits computes the loss and, in the
//! same buffer, the gradient. Ignore index -100 and label smoothing as in `torch.nn.functional.
//! cross_entropy` (which equals HF's `LabelSmoother`).

use rayon::prelude::*;

use super::math;
use crate::backend::{LossRows, StatGrads, StatsWanted, TokenStats};

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

/// `sum exp(z - shift) * z`, for the entropy's `E_p[z]`.
fn sum_exp_times(z: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = z.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += math::exp(c[i] - shift) * c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&x| math::exp(x - shift) * x).sum::<f32>()
}

fn argmax(z: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in z.iter().enumerate() {
        if x > z[best] {
            best = i;
        }
    }
    best as u32
}

pub fn token_stats(logits: &[f32], targets: &[i32], v: usize, want: StatsWanted) -> TokenStats {
    let rows = targets.len();
    let per = |on: bool| if on { vec![0.0f32; rows] } else { Vec::new() };
    let mut out = TokenStats {
        label_logprob: per(want.label_logprob),
        logsumexp: per(want.logsumexp),
        mean_logprob: per(want.mean_logprob),
        entropy: per(want.entropy),
        argmax: if want.argmax { vec![0; rows] } else { Vec::new() },
    };
    let needs_lse = want.label_logprob || want.logsumexp || want.mean_logprob || want.entropy;
    // one row's values, computed in parallel, then scattered
    let vals: Vec<Option<[f32; 5]>> = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(z, &y)| {
            if y == IGNORE_INDEX {
                return None;
            }
            let mut r = [0.0f32; 5];
            if needs_lse {
                let max = math::max(z);
                let mut sum = 0.0f32;
                for &x in z {
                    sum += math::exp(x - max);
                }
                let ez = if want.entropy { sum_exp_times(z, max) / sum } else { 0.0 };
                let lse = max + sum.ln();
                r[0] = z[y as usize] - lse;
                r[1] = lse;
                if want.mean_logprob {
                    r[2] = math::sum(z) / v as f32 - lse;
                }
                r[3] = lse - ez;
            }
            if want.argmax {
                r[4] = f32::from_bits(argmax(z));
            }
            Some(r)
        })
        .collect();
    for (i, r) in vals.into_iter().enumerate() {
        let Some(r) = r else { continue };
        if want.label_logprob {
            out.label_logprob[i] = r[0];
        }
        if want.logsumexp {
            out.logsumexp[i] = r[1];
        }
        if want.mean_logprob {
            out.mean_logprob[i] = r[2];
        }
        if want.entropy {
            out.entropy[i] = r[3];
        }
        if want.argmax {
            out.argmax[i] = r[4].to_bits();
        }
    }
    out
}

/// With `p = softmax(z)`, per row: `d log p[y] = onehot(y) - p`, `d lse = p`,
/// `d mean(log p) = 1/v - p`, `d H = -p * (z - E_p[z])`, combined into one pass over the row.
pub fn token_stats_bwd(logits: &mut [f32], targets: &[i32], v: usize, g: &StatGrads) {
    let at = |x: &Vec<f32>, i: usize| if x.is_empty() { 0.0 } else { x[i] };
    logits.par_chunks_mut(v).zip(targets.par_iter()).enumerate().for_each(|(i, (z, &y))| {
        let (g_lp, g_lse, g_mlp, g_h) = (at(&g.label_logprob, i), at(&g.logsumexp, i), at(&g.mean_logprob, i), at(&g.entropy, i));
        if y == IGNORE_INDEX || (g_lp == 0.0 && g_lse == 0.0 && g_mlp == 0.0 && g_h == 0.0) {
            z.fill(0.0);
            return;
        }
        let max = math::max(z);
        let mut sum = 0.0f32;
        for &x in z.iter() {
            sum += math::exp(x - max);
        }
        let ez = if g_h != 0.0 { sum_exp_times(z, max) / sum } else { 0.0 };
        let lse = max + sum.ln();
        let a = g_lse - g_lp - g_mlp;
        let c = g_mlp / v as f32;
        for x in z.iter_mut() {
            let p = math::exp(*x - lse);
            *x = p * (a - g_h * (*x - ez)) + c;
        }
        z[y as usize] += g_lp;
    });
}
