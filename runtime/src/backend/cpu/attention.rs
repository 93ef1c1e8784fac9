//! Causal grouped-query attention on the CPU, two implementations that agree:
//! - `eager`: materialises the probabilities `[batch, head, seq, seq]` (HF's reference path);
//! - `flash`: online softmax over key blocks, keeping only the log-sum-exp per query row; the
//!   backward pass recomputes the probabilities. Memory is O(seq) per head instead of O(seq^2).
//!
//! A query row whose every key is masked (left padding) outputs zeros and passes no gradient.
//! Parallel tasks are (batch, head) in the forward passes and (batch, kv-head) in the backward
//! passes, so the key/value gradients of a group are written by exactly one task.

use rayon::prelude::*;

use super::math::{axpy, dot, exp, SharedMut};
use crate::backend::AttnShape;

const KEY_BLOCK: usize = 64;

struct Layout {
    s: AttnShape,
    stride: usize,
    out_stride: usize,
    scale: f32,
}

impl Layout {
    fn new(s: AttnShape) -> Self {
        Layout { s, stride: s.qkv_width(), out_stride: s.out_width(), scale: 1.0 / (s.head_dim as f32).sqrt() }
    }
    fn row(&self, b: usize, t: usize) -> usize {
        b * self.s.seq + t
    }
    fn q(&self, b: usize, t: usize, h: usize) -> usize {
        self.row(b, t) * self.stride + h * self.s.head_dim
    }
    fn k(&self, b: usize, t: usize, g: usize) -> usize {
        self.row(b, t) * self.stride + (self.s.n_head + g) * self.s.head_dim
    }
    fn v(&self, b: usize, t: usize, g: usize) -> usize {
        self.row(b, t) * self.stride + (self.s.n_head + self.s.n_kv_head + g) * self.s.head_dim
    }
    fn o(&self, b: usize, t: usize, h: usize) -> usize {
        self.row(b, t) * self.out_stride + h * self.s.head_dim
    }
    fn group(&self) -> usize {
        self.s.n_head / self.s.n_kv_head
    }
}

pub fn eager_fwd(out: &mut [f32], probs: &mut [f32], qkv: &[f32], mask: &[i32], s: AttnShape) {
    let l = Layout::new(s);
    let (t_len, d) = (s.seq, s.head_dim);
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs.par_chunks_mut(t_len * t_len).enumerate().for_each(|(bh, probs)| {
        let (b, h) = (bh / s.n_head, bh % s.n_head);
        let g = h / l.group();
        for i in 0..t_len {
            let q = &qkv[l.q(b, i, h)..][..d];
            let prow = &mut probs[i * t_len..(i + 1) * t_len];
            prow.fill(0.0);
            let mut max = f32::NEG_INFINITY;
            for j in 0..=i {
                if mask[l.row(b, j)] != 0 {
                    let sc = dot(q, &qkv[l.k(b, j, g)..][..d]) * l.scale;
                    prow[j] = sc;
                    max = max.max(sc);
                }
            }
            // SAFETY: task (b, h) alone writes head h of batch b's output rows.
            let o = unsafe { out_ptr.slice(l.o(b, i, h), d) };
            o.fill(0.0);
            if max == f32::NEG_INFINITY {
                continue;
            }
            let mut sum = 0.0;
            for j in 0..=i {
                if mask[l.row(b, j)] != 0 {
                    let e = exp(prow[j] - max);
                    prow[j] = e;
                    sum += e;
                }
            }
            let inv = 1.0 / sum;
            for j in 0..=i {
                prow[j] *= inv;
                if prow[j] != 0.0 {
                    axpy(o, prow[j], &qkv[l.v(b, j, g)..][..d]);
                }
            }
        }
    });
}

pub fn eager_bwd(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], probs: &[f32], s: AttnShape) {
    let l = Layout::new(s);
    let (t_len, d) = (s.seq, s.head_dim);
    let dptr = SharedMut(dqkv.as_mut_ptr());
    (0..s.batch * s.n_kv_head).into_par_iter().for_each(|bg| {
        let (b, g) = (bg / s.n_kv_head, bg % s.n_kv_head);
        // SAFETY (all slices below): task (b, g) alone touches the query heads of group g and the
        // key/value head g in batch b's rows.
        for t in 0..t_len {
            unsafe { dptr.slice(l.k(b, t, g), d) }.fill(0.0);
            unsafe { dptr.slice(l.v(b, t, g), d) }.fill(0.0);
        }
        let mut dp = vec![0.0f32; t_len];
        for h in g * l.group()..(g + 1) * l.group() {
            let probs = &probs[(b * s.n_head + h) * t_len * t_len..][..t_len * t_len];
            for i in 0..t_len {
                let prow = &probs[i * t_len..(i + 1) * t_len];
                let d_o = &dout[l.o(b, i, h)..][..d];
                let mut sum_pdp = 0.0;
                for j in 0..=i {
                    if prow[j] != 0.0 {
                        dp[j] = dot(d_o, &qkv[l.v(b, j, g)..][..d]);
                        sum_pdp += prow[j] * dp[j];
                        axpy(unsafe { dptr.slice(l.v(b, j, g), d) }, prow[j], d_o);
                    }
                }
                let dq = unsafe { dptr.slice(l.q(b, i, h), d) };
                dq.fill(0.0);
                let q = &qkv[l.q(b, i, h)..][..d];
                for j in 0..=i {
                    if prow[j] != 0.0 {
                        let ds = prow[j] * (dp[j] - sum_pdp) * l.scale;
                        axpy(dq, ds, &qkv[l.k(b, j, g)..][..d]);
                        axpy(unsafe { dptr.slice(l.k(b, j, g), d) }, ds, q);
                    }
                }
            }
        }
    });
}

pub fn flash_fwd(out: &mut [f32], lse: &mut [f32], qkv: &[f32], mask: &[i32], s: AttnShape) {
    let l = Layout::new(s);
    let (t_len, d) = (s.seq, s.head_dim);
    let out_ptr = SharedMut(out.as_mut_ptr());
    lse.par_chunks_mut(t_len).enumerate().for_each(|(bh, lse)| {
        let (b, h) = (bh / s.n_head, bh % s.n_head);
        let g = h / l.group();
        let mut scores = [0.0f32; KEY_BLOCK];
        for i in 0..t_len {
            let q = &qkv[l.q(b, i, h)..][..d];
            // SAFETY: task (b, h) alone writes head h of batch b's output rows.
            let acc = unsafe { out_ptr.slice(l.o(b, i, h), d) };
            acc.fill(0.0);
            let (mut m, mut sum) = (f32::NEG_INFINITY, 0.0f32);
            for j0 in (0..=i).step_by(KEY_BLOCK) {
                let j1 = (j0 + KEY_BLOCK).min(i + 1);
                let mut block_max = f32::NEG_INFINITY;
                for j in j0..j1 {
                    scores[j - j0] = if mask[l.row(b, j)] != 0 {
                        let sc = dot(q, &qkv[l.k(b, j, g)..][..d]) * l.scale;
                        block_max = block_max.max(sc);
                        sc
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                if block_max == f32::NEG_INFINITY {
                    continue;
                }
                let new_m = m.max(block_max);
                if m != f32::NEG_INFINITY && new_m != m {
                    let corr = exp(m - new_m);
                    sum *= corr;
                    acc.iter_mut().for_each(|a| *a *= corr);
                }
                m = new_m;
                for j in j0..j1 {
                    if scores[j - j0] != f32::NEG_INFINITY {
                        let p = exp(scores[j - j0] - m);
                        sum += p;
                        axpy(acc, p, &qkv[l.v(b, j, g)..][..d]);
                    }
                }
            }
            if sum == 0.0 {
                lse[i] = f32::INFINITY;
                continue;
            }
            let inv = 1.0 / sum;
            acc.iter_mut().for_each(|a| *a *= inv);
            lse[i] = m + sum.ln();
        }
    });
}

#[allow(clippy::too_many_arguments)] // the op's inputs and saved statistics
pub fn flash_bwd(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], out: &[f32], lse: &[f32], mask: &[i32], s: AttnShape) {
    let l = Layout::new(s);
    let (t_len, d) = (s.seq, s.head_dim);
    let dptr = SharedMut(dqkv.as_mut_ptr());
    (0..s.batch * s.n_kv_head).into_par_iter().for_each(|bg| {
        let (b, g) = (bg / s.n_kv_head, bg % s.n_kv_head);
        // SAFETY (all slices below): as in `eager_bwd`, task (b, g) owns group g of batch b.
        for t in 0..t_len {
            unsafe { dptr.slice(l.k(b, t, g), d) }.fill(0.0);
            unsafe { dptr.slice(l.v(b, t, g), d) }.fill(0.0);
        }
        for h in g * l.group()..(g + 1) * l.group() {
            let lse = &lse[(b * s.n_head + h) * t_len..][..t_len];
            for i in 0..t_len {
                let dq = unsafe { dptr.slice(l.q(b, i, h), d) };
                dq.fill(0.0);
                if lse[i] == f32::INFINITY {
                    continue;
                }
                let d_o = &dout[l.o(b, i, h)..][..d];
                let di = dot(d_o, &out[l.o(b, i, h)..][..d]);
                let q = &qkv[l.q(b, i, h)..][..d];
                for j in 0..=i {
                    if mask[l.row(b, j)] == 0 {
                        continue;
                    }
                    let k = &qkv[l.k(b, j, g)..][..d];
                    let p = exp(dot(q, k) * l.scale - lse[i]);
                    let dp = dot(d_o, &qkv[l.v(b, j, g)..][..d]);
                    axpy(unsafe { dptr.slice(l.v(b, j, g), d) }, p, d_o);
                    let ds = p * (dp - di) * l.scale;
                    axpy(dq, ds, k);
                    axpy(unsafe { dptr.slice(l.k(b, j, g), d) }, ds, q);
                }
            }
        }
    });
}

/// Rotary embedding in place on the query and key heads (HF's `rotate_half` layout: dimension `i`
/// pairs with `i + head_dim / 2`). `inverse` applies the transpose rotation (the backward pass).
pub fn rope(qkv: &mut [f32], positions: &[i32], s: AttnShape, theta: f32, inverse: bool) {
    let (d, half) = (s.head_dim, s.head_dim / 2);
    // as transformers computes it, in f32: inv_freq = 1 / theta^(2i / d); angle = pos * inv_freq
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
    let heads = s.n_head + s.n_kv_head;
    qkv.par_chunks_mut(s.qkv_width()).zip(positions.par_iter()).for_each(|(row, &pos)| {
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        for i in 0..half {
            let a = pos as f32 * inv_freq[i];
            cos[i] = a.cos();
            sin[i] = if inverse { -a.sin() } else { a.sin() };
        }
        for head in row[..heads * d].chunks_exact_mut(d) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    });
}
