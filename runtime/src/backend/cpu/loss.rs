//! Fused softmax cross-entropy: one pass over each row of logits computes the loss and, in the
//! same buffer, the gradient. Ignore index -100 and label smoothing as in `torch.nn.functional.
//! cross_entropy` (which equals HF's `LabelSmoother`).

use rayon::prelude::*;

use super::math;
use crate::backend::{LossRows, StatGrads, StatsWanted, TokenStats};

use crate::backend::IGNORE_INDEX;

pub fn cross_entropy(logits: &mut [f32], targets: &[i32], v: usize, smoothing: f32, grad_scale: Option<f32>) -> LossRows {
    let mut loss = vec![0.0f32; targets.len()];
    cross_entropy_rows(logits, targets, v, smoothing, grad_scale, &mut loss);
    let n_targets = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    LossRows { loss, n_targets }
}

/// [`cross_entropy`] writing the per-row losses into `loss` (one per target; 0 where ignored).
pub fn cross_entropy_rows(logits: &mut [f32], targets: &[i32], v: usize, smoothing: f32, grad_scale: Option<f32>, loss: &mut [f32]) {
    logits.par_chunks_mut(v).zip(loss.par_iter_mut()).zip(targets.par_iter()).for_each(|((z, loss), &y)| {
        if y == IGNORE_INDEX {
            *loss = 0.0;
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
}

/// The index of the largest value (the first one on ties), eight lanes at a time.
fn argmax(z: &[f32]) -> u32 {
    let (mut best, mut at) = ([f32::NEG_INFINITY; 8], [0u32; 8]);
    let mut c = z.chunks_exact(8);
    let mut base = 0u32;
    for v in &mut c {
        for i in 0..8 {
            let better = v[i] > best[i];
            best[i] = if better { v[i] } else { best[i] };
            at[i] = if better { base + i as u32 } else { at[i] };
        }
        base += 8;
    }
    let (mut m, mut k) = (f32::NEG_INFINITY, 0u32);
    for i in 0..8 {
        if best[i] > m || (best[i] == m && at[i] < k) {
            (m, k) = (best[i], at[i]);
        }
    }
    for (j, &x) in c.remainder().iter().enumerate() {
        if x > m {
            (m, k) = (x, base + j as u32);
        }
    }
    k
}

pub fn token_stats(logits: &[f32], targets: &[i32], v: usize, want: StatsWanted) -> TokenStats {
    let rows = targets.len();
    let needs_lse = want.label_logprob || want.logsumexp || want.mean_logprob || want.entropy;
    let per = |on: bool| if on { vec![0.0f32; rows] } else { Vec::new() };
    let mut out = TokenStats {
        label_logprob: per(want.label_logprob),
        logsumexp: per(want.logsumexp),
        mean_logprob: per(want.mean_logprob),
        entropy: per(want.entropy),
        argmax: if want.argmax { vec![0; rows] } else { Vec::new() },
        row_lse: per(needs_lse),
        row_mean_z: per(want.entropy),
    };
    // one row's values, computed in parallel, then scattered
    let vals: Vec<Option<[f32; 6]>> = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(z, &y)| {
            if y == IGNORE_INDEX {
                return None;
            }
            let mut r = [0.0f32; 6];
            // the argmax pass also gives the maximum
            let top = want.argmax.then(|| argmax(z));
            if let Some(k) = top {
                r[4] = f32::from_bits(k);
            }
            if needs_lse {
                let max = top.map_or_else(|| math::max(z), |k| z[k as usize]);
                let (sum, sum_zx) = if want.entropy { math::sum_exp_ro::<true>(z, max) } else { math::sum_exp_ro::<false>(z, max) };
                let lse = max + sum.ln();
                let ez = sum_zx / sum;
                r[0] = z[y as usize] - lse;
                r[1] = lse;
                if want.mean_logprob {
                    r[2] = math::sum(z) / v as f32 - lse;
                }
                r[3] = lse - ez;
                r[5] = ez;
            }
            Some(r)
        })
        .collect();
    for (i, r) in vals.into_iter().enumerate() {
        let Some(r) = r else { continue };
        let put = |x: &mut Vec<f32>, val: f32| {
            if !x.is_empty() {
                x[i] = val;
            }
        };
        put(&mut out.label_logprob, r[0]);
        put(&mut out.logsumexp, r[1]);
        put(&mut out.row_lse, r[1]);
        put(&mut out.mean_logprob, r[2]);
        put(&mut out.entropy, r[3]);
        put(&mut out.row_mean_z, r[5]);
        if want.argmax {
            out.argmax[i] = r[4].to_bits();
        }
    }
    out
}

/// With `p = softmax(z)`, per row: `d log p[y] = onehot(y) - p`, `d lse = p`,
/// `d mean(log p) = 1/v - p`, `d H = -p * (z - E_p[z])`, combined into one pass over the row
/// with the forward's `lse` and `E_p[z]`.
pub fn token_stats_bwd(logits: &mut [f32], targets: &[i32], v: usize, stats: &TokenStats, g: &StatGrads) {
    let at = |x: &Vec<f32>, i: usize| if x.is_empty() { 0.0 } else { x[i] };
    logits.par_chunks_mut(v).zip(targets.par_iter()).enumerate().for_each(|(i, (z, &y))| {
        let (g_lp, g_lse, g_mlp, g_h) = (at(&g.label_logprob, i), at(&g.logsumexp, i), at(&g.mean_logprob, i), at(&g.entropy, i));
        if y == IGNORE_INDEX || (g_lp == 0.0 && g_lse == 0.0 && g_mlp == 0.0 && g_h == 0.0) {
            z.fill(0.0);
            return;
        }
        let lse = stats.row_lse[i];
        let ez = at(&stats.row_mean_z, i);
        let a = g_lse - g_lp - g_mlp;
        let c = g_mlp / v as f32;
        if g_h == 0.0 {
            for x in z.iter_mut() {
                *x = math::exp(*x - lse) * a + c;
            }
        } else {
            for x in z.iter_mut() {
                *x = math::exp(*x - lse) * (a - g_h * (*x - ez)) + c;
            }
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
        let all = StatsWanted { label_logprob: true, logsumexp: true, mean_logprob: true, entropy: true, argmax: false };
        token_stats_bwd(&mut d, &t, v, &token_stats(&z, &t, v, all), &g);
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
