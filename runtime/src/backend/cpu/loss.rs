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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// `sum_i g_i . stats_i` in f64, the scalar whose gradient `token_stats_bwd` computes.
    fn weighted_stats(z: &[f32], t: &[i32], v: usize, g: &StatGrads) -> f64 {
        let all = StatsWanted { label_logprob: true, logsumexp: true, mean_logprob: true, entropy: true, argmax: false };
        let s = token_stats(z, t, v, all);
        (0..t.len())
            .map(|i| {
                g.label_logprob[i] as f64 * s.label_logprob[i] as f64
                    + g.logsumexp[i] as f64 * s.logsumexp[i] as f64
                    + g.mean_logprob[i] as f64 * s.mean_logprob[i] as f64
                    + g.entropy[i] as f64 * s.entropy[i] as f64
            })
            .sum()
    }

    #[test]
    fn statistics_match_their_definitions_and_the_chain_rule_matches_finite_differences() {
        let (rows, v) = (5, 9);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let z: Vec<f32> = (0..rows * v).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let t: Vec<i32> = vec![2, IGNORE_INDEX, 0, 8, 4];
        // definitions, in f64
        let s = token_stats(&z, &t, v, StatsWanted { label_logprob: true, logsumexp: true, mean_logprob: true, entropy: true, argmax: true });
        for r in [0, 2, 3, 4] {
            let row: Vec<f64> = z[r * v..(r + 1) * v].iter().map(|&x| x as f64).collect();
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            let logp: Vec<f64> = row.iter().map(|x| x - lse).collect();
            let ent = -logp.iter().map(|l| l.exp() * l).sum::<f64>();
            let arg = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert!((s.logsumexp[r] as f64 - lse).abs() < 1e-5);
            assert!((s.label_logprob[r] as f64 - logp[t[r] as usize]).abs() < 1e-5);
            assert!((s.mean_logprob[r] as f64 - logp.iter().sum::<f64>() / v as f64).abs() < 1e-5);
            assert!((s.entropy[r] as f64 - ent).abs() < 1e-5);
            assert_eq!(s.argmax[r] as usize, arg);
        }
        assert_eq!((s.label_logprob[1], s.entropy[1]), (0.0, 0.0), "ignored rows are 0");
        // the chain rule against central differences, all four statistics at once
        let mut gen = |_| (0..rows).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>();
        let g = StatGrads { label_logprob: gen(0), logsumexp: gen(1), mean_logprob: gen(2), entropy: gen(3) };
        let mut d = z.clone();
        token_stats_bwd(&mut d, &t, v, &g);
        assert!(d[v..2 * v].iter().all(|&x| x == 0.0), "ignored rows get no gradient");
        let h = 1e-2f32;
        for i in 0..z.len() {
            let mut zp = z.clone();
            zp[i] += h;
            let mut zm = z.clone();
            zm[i] -= h;
            let fd = (weighted_stats(&zp, &t, v, &g) - weighted_stats(&zm, &t, v, &g)) / (2.0 * h as f64);
            assert!((fd - d[i] as f64).abs() < 2e-3, "logit {i}: finite differences {fd} vs chain rule {}", d[i]);
        }
    }
}
