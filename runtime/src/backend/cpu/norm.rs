//! LayerNorm (GPT-2) and RMSNorm (Llama family), forward and backward, parallel over rows.
//! Parameter gradients are reduced over fixed row blocks so results do not depend on threads.

use rayon::prelude::*;

use super::math::{dot, reduce_rows, sum};

#[allow(clippy::too_many_arguments)] // see Backend::layernorm_fwd
pub fn layernorm_fwd(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, c: usize, eps: f32) {
    out.par_chunks_mut(c).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).zip(x.par_chunks(c)).for_each(|((o, (mu, rs)), x)| {
        let m = sum(x) / c as f32;
        // two passes, as the definition: the variance of (x - mean)
        let mut centered = [0.0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for v in &mut chunks {
            for i in 0..8 {
                centered[i] += (v[i] - m) * (v[i] - m);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|v| (v - m) * (v - m)).sum();
        let var = (sum(&centered) + tail) / c as f32;
        let s = 1.0 / (var + eps).sqrt();
        *mu = m;
        *rs = s;
        match b {
            Some(b) => {
                for i in 0..c {
                    o[i] = (x[i] - m) * s * w[i] + b[i];
                }
            }
            None => {
                for i in 0..c {
                    o[i] = (x[i] - m) * s * w[i];
                }
            }
        }
    });
}

#[allow(clippy::too_many_arguments)] // see Backend::layernorm_bwd
pub fn layernorm_bwd(dx: &mut [f32], dw: &mut [f32], db: Option<&mut [f32]>, dout: &[f32], x: &[f32], w: &[f32], mean: &[f32], rstd: &[f32], c: usize) {
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dx)| {
        let (m, s) = (mean[r], rstd[r]);
        let (x, d) = (&x[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
        let mut dnorm_mean = 0.0;
        let mut dnorm_norm_mean = 0.0;
        for i in 0..c {
            let n = (x[i] - m) * s;
            let dn = w[i] * d[i];
            dnorm_mean += dn;
            dnorm_norm_mean += dn * n;
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
        for i in 0..c {
            let n = (x[i] - m) * s;
            dx[i] += (w[i] * d[i] - dnorm_mean - n * dnorm_norm_mean) * s;
        }
    });
    let rows = mean.len();
    let param_grads = |range: std::ops::Range<usize>, acc: &mut [Vec<f32>]| {
        for r in range {
            let (m, s) = (mean[r], rstd[r]);
            let (x, d) = (&x[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
            for i in 0..c {
                acc[0][i] += d[i] * (x[i] - m) * s;
            }
            if acc.len() > 1 {
                for i in 0..c {
                    acc[1][i] += d[i];
                }
            }
        }
    };
    match db {
        Some(db) => reduce_rows(rows, c, &mut [dw, db], param_grads),
        None => reduce_rows(rows, c, &mut [dw], param_grads),
    }
}

pub fn rmsnorm_fwd(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c).zip(rstd.par_iter_mut()).zip(x.par_chunks(c)).for_each(|((o, rs), x)| {
        let ms = dot(x, x) / c as f32;
        let s = 1.0 / (ms + eps).sqrt();
        *rs = s;
        for i in 0..c {
            o[i] = w[i] * (x[i] * s);
        }
    });
}

#[allow(clippy::too_many_arguments)] // see Backend::rmsnorm_bwd
pub fn rmsnorm_bwd(dx: &mut [f32], dw: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], rstd: &[f32], c: usize) {
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dx)| {
        let s = rstd[r];
        let (x, d) = (&x[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
        let mut dn_n = 0.0;
        for i in 0..c {
            dn_n += w[i] * d[i] * x[i] * s;
        }
        dn_n /= c as f32;
        for i in 0..c {
            dx[i] += s * (w[i] * d[i] - x[i] * s * dn_n);
        }
    });
    reduce_rows(rstd.len(), c, &mut [dw], |range, acc| {
        for r in range {
            let s = rstd[r];
            let (x, d) = (&x[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
            for i in 0..c {
                acc[0][i] += d[i] * x[i] * s;
            }
        }
    });
}
