//! Causal grouped-query attention on the CPU, two implementations that agree:
//! - `eager`: materialises the probabilities `[batch, head, seq, seq]` (HF's reference path) and
//!   reads them back in the backward pass;
//! - `flash`: online softmax over key blocks, keeping only the log-sum-exp per query row; the
//!   backward pass recomputes the probabilities block by block. Memory is O(seq) per head.
//!
//! Both work on tiles (64 queries x 128 keys) whose products go through single-threaded GEMM
//! calls, skip tiles above the causal diagonal, and run one task per (batch, head) forward and per
//! (batch, kv-head) backward, so a key/value gradient is only ever written by one task.
//! A query row whose every key is masked (left padding) outputs zeros and passes no gradient.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::math::{self, exp, SharedMut};
use crate::backend::{dropout_keep, AttnShape, DropoutMask};

const Q_BLOCK: usize = 64;
const K_BLOCK: usize = 128;

/// A strided matrix operand: base pointer, row stride, column stride.
#[derive(Clone, Copy)]
struct M(*const f32, usize, usize);

/// `dst[m, n] = (accumulate ? dst : 0) + alpha * lhs[m, k] @ rhs[k, n]`, single-threaded.
///
/// # Safety
/// Every operand must be valid for the given sizes and strides, and `dst` must not alias them.
#[allow(clippy::too_many_arguments)] // a strided GEMM's operands
unsafe fn mm(dst: *mut f32, dst_rs: usize, accumulate: bool, alpha: f32, (m, n, k): (usize, usize, usize), lhs: M, rhs: M) {
    if m == 0 || n == 0 {
        return;
    }
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        Parallelism::None,
    );
}

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

/// Scores of a tile: `s[r, c] = scale * q[i0 + r] . k[j0 + c]`, or `-inf` where the key is in the
/// future or masked. `s` has row stride `ld`.
#[allow(clippy::too_many_arguments)] // the tile's coordinates
fn scores(l: &Layout, qkv: &[f32], mask: &[i32], s: &mut [f32], ld: usize, b: usize, h: usize, (i0, i1): (usize, usize), (j0, j1): (usize, usize)) {
    let (g, d) = (h / l.group(), l.s.head_dim);
    // SAFETY: the q rows i0..i1 and k rows j0..j1 of head h / group g lie inside `qkv`; `s` holds
    // (i1 - i0) rows of stride ld >= j1 - j0.
    unsafe {
        mm(
            s.as_mut_ptr(),
            ld,
            false,
            l.scale,
            (i1 - i0, j1 - j0, d),
            M(qkv.as_ptr().add(l.q(b, i0, h)), l.stride, 1),
            M(qkv.as_ptr().add(l.k(b, j0, g)), 1, l.stride),
        );
    }
    // the causal limit is a suffix of each row; padded keys are looked up only when the row of
    // the batch has any (so the common unpadded case is a fill)
    let padded = mask[l.row(b, j0)..l.row(b, j1)].contains(&0);
    for r in 0..i1 - i0 {
        let lim = (i0 + r + 1).saturating_sub(j0).min(j1 - j0);
        let row = &mut s[r * ld..r * ld + (j1 - j0)];
        row[lim..].fill(f32::NEG_INFINITY);
        if padded {
            for (c, x) in row[..lim].iter_mut().enumerate() {
                if mask[l.row(b, j0 + c)] == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Attention dropout on a tile row: probabilities of query `i` against keys `j0..` of head
/// `(b, h)` are kept with the mask's hash of their index in `[batch, head, seq, seq]` and scaled.
fn drop_row(row: &mut [f32], d: Option<DropoutMask>, s: &AttnShape, b: usize, h: usize, i: usize, j0: usize) {
    let Some(d) = d else { return };
    let base = (((b * s.n_head + h) * s.seq + i) * s.seq + j0) as u64;
    for (c, x) in row.iter_mut().enumerate() {
        *x = if dropout_keep(d.key, base + c as u64, d.threshold) { *x * d.scale } else { 0.0 };
    }
}

/// `x = exp(x - shift)`, with `-inf` (a masked score) giving exactly 0; returns the sum.
#[inline(always)]
fn exp_row(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut c = x.chunks_exact_mut(8);
    for v in &mut c {
        for i in 0..8 {
            let e = exp(v[i] - shift);
            v[i] = if v[i] == f32::NEG_INFINITY { 0.0 } else { e };
            acc[i] += v[i];
        }
    }
    let mut tail = 0.0;
    for v in c.into_remainder() {
        let e = exp(*v - shift);
        *v = if *v == f32::NEG_INFINITY { 0.0 } else { e };
        tail += *v;
    }
    tail + acc.iter().sum::<f32>()
}

/// `drop`: dropout on the probabilities (training); `probs` keeps them undropped.
pub fn eager_fwd(out: &mut [f32], probs: &mut [f32], qkv: &[f32], mask: &[i32], s: AttnShape, drop: Option<DropoutMask>) {
    let l = Layout::new(s);
    let (t_len, d) = (s.seq, s.head_dim);
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs.par_chunks_mut(t_len * t_len).enumerate().for_each(|(bh, p)| {
        let (b, h) = (bh / s.n_head, bh % s.n_head);
        let g = h / l.group();
        let mut dropped = if drop.is_some() { vec![0.0f32; Q_BLOCK * t_len] } else { Vec::new() };
        for i0 in (0..t_len).step_by(Q_BLOCK) {
            let i1 = (i0 + Q_BLOCK).min(t_len);
            let tile = &mut p[i0 * t_len..i1 * t_len];
            scores(&l, qkv, mask, tile, t_len, b, h, (i0, i1), (0, i1));
            for r in 0..i1 - i0 {
                let row = &mut tile[r * t_len..(r + 1) * t_len];
                row[i1..].fill(0.0);
                let row = &mut row[..i1];
                let max = math::max(row);
                if max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let inv = 1.0 / exp_row(row, max);
                row.iter_mut().for_each(|x| *x *= inv);
            }
            let pv: &[f32] = if drop.is_some() {
                let n = (i1 - i0) * t_len;
                dropped[..n].copy_from_slice(tile);
                for r in 0..i1 - i0 {
                    drop_row(&mut dropped[r * t_len..r * t_len + i1], drop, &s, b, h, i0 + r, 0);
                }
                &dropped[..n]
            } else {
                tile
            };
            // SAFETY: task (b, h) alone writes head h of batch b's output rows; P and V in bounds.
            unsafe {
                mm(
                    out_ptr.at(l.o(b, i0, h)),
                    l.out_stride,
                    false,
                    1.0,
                    (i1 - i0, d, i1),
                    M(pv.as_ptr(), t_len, 1),
                    M(qkv.as_ptr().add(l.v(b, 0, g)), l.stride, 1),
                );
            }
        }
    });
}

/// `drop`: dropout on the probabilities (training); the log-sum-exp is of the undropped ones.
pub fn flash_fwd(out: &mut [f32], lse: &mut [f32], qkv: &[f32], mask: &[i32], s: AttnShape, drop: Option<DropoutMask>) {
    let l = Layout::new(s);
    let (t_len, d) = (s.seq, s.head_dim);
    let out_ptr = SharedMut(out.as_mut_ptr());
    lse.par_chunks_mut(t_len).enumerate().for_each(|(bh, lse)| {
        let (b, h) = (bh / s.n_head, bh % s.n_head);
        let g = h / l.group();
        let mut sc = vec![0.0f32; Q_BLOCK * K_BLOCK];
        let mut acc = vec![0.0f32; Q_BLOCK * d];
        let mut m = [0.0f32; Q_BLOCK];
        let mut sum = [0.0f32; Q_BLOCK];
        for i0 in (0..t_len).step_by(Q_BLOCK) {
            let i1 = (i0 + Q_BLOCK).min(t_len);
            let nq = i1 - i0;
            m.fill(f32::NEG_INFINITY);
            sum.fill(0.0);
            acc.fill(0.0);
            for j0 in (0..i1).step_by(K_BLOCK) {
                let j1 = (j0 + K_BLOCK).min(i1);
                let nk = j1 - j0;
                scores(&l, qkv, mask, &mut sc, K_BLOCK, b, h, (i0, i1), (j0, j1));
                for r in 0..nq {
                    let row = &mut sc[r * K_BLOCK..r * K_BLOCK + nk];
                    let bmax = math::max(row);
                    if bmax == f32::NEG_INFINITY {
                        row.fill(0.0);
                        continue;
                    }
                    let new_m = m[r].max(bmax);
                    if m[r] != f32::NEG_INFINITY && new_m != m[r] {
                        let corr = exp(m[r] - new_m);
                        sum[r] *= corr;
                        acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= corr);
                    }
                    m[r] = new_m;
                    sum[r] += exp_row(row, new_m);
                    drop_row(row, drop, &s, b, h, i0 + r, j0);
                }
                // SAFETY: acc is nq x d; the tile is nq x nk with stride K_BLOCK; V rows in bounds.
                unsafe {
                    mm(acc.as_mut_ptr(), d, true, 1.0, (nq, d, nk), M(sc.as_ptr(), K_BLOCK, 1), M(qkv.as_ptr().add(l.v(b, j0, g)), l.stride, 1));
                }
            }
            for r in 0..nq {
                // SAFETY: task (b, h) alone writes head h of batch b's output rows.
                let o = unsafe { out_ptr.slice(l.o(b, i0 + r, h), d) };
                if sum[r] == 0.0 {
                    o.fill(0.0);
                    lse[i0 + r] = f32::INFINITY;
                    continue;
                }
                let inv = 1.0 / sum[r];
                for (o, a) in o.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                    *o = a * inv;
                }
                lse[i0 + r] = m[r] + sum[r].ln();
            }
        }
    });
}

/// The part of the backward pass shared by both implementations, for one tile whose
/// probabilities `p` (row stride `ld`) are known: accumulates dV, dQ and dK.
#[allow(clippy::too_many_arguments)] // the tile's coordinates, inputs and scratch
unsafe fn tile_bwd(
    l: &Layout,
    dq: SharedMut,
    qkv: &[f32],
    dout: &[f32],
    di: &[f32],
    p: &[f32],
    ld: usize,
    dp: &mut [f32],
    b: usize,
    h: usize,
    (i0, i1): (usize, usize),
    (j0, j1): (usize, usize),
    (drop, pd): (Option<DropoutMask>, &mut [f32]),
) {
    let (g, d) = (h / l.group(), l.s.head_dim);
    let (nq, nk) = (i1 - i0, j1 - j0);
    let dq_base = dq.0;
    // with dropout, dV takes the dropped probabilities (in `pd`, row stride K_BLOCK)
    let (pv, pv_ld) = if drop.is_some() {
        for r in 0..nq {
            let row = &mut pd[r * K_BLOCK..r * K_BLOCK + nk];
            row.copy_from_slice(&p[r * ld..r * ld + nk]);
            drop_row(row, drop, &l.s, b, h, i0 + r, j0);
        }
        (pd.as_ptr(), K_BLOCK)
    } else {
        (p.as_ptr(), ld)
    };
    // dV[j] += P^T @ dO
    mm(dq_base.add(l.v(b, j0, g)), l.stride, true, 1.0, (nk, d, nq), M(pv, 1, pv_ld), M(dout.as_ptr().add(l.o(b, i0, h)), l.out_stride, 1));
    // dP = dO @ V^T
    mm(
        dp.as_mut_ptr(),
        K_BLOCK,
        false,
        1.0,
        (nq, nk, d),
        M(dout.as_ptr().add(l.o(b, i0, h)), l.out_stride, 1),
        M(qkv.as_ptr().add(l.v(b, j0, g)), 1, l.stride),
    );
    // the dropout's backward pass: dP = mask * dP_dropped
    for r in 0..nq {
        drop_row(&mut dp[r * K_BLOCK..r * K_BLOCK + nk], drop, &l.s, b, h, i0 + r, j0);
    }
    // dS = P * (dP - D) * scale, in place in dp
    for r in 0..nq {
        let (prow, drow) = (&p[r * ld..r * ld + nk], &mut dp[r * K_BLOCK..r * K_BLOCK + nk]);
        for (x, &pv) in drow.iter_mut().zip(prow) {
            *x = pv * (*x - di[r]) * l.scale;
        }
    }
    // dQ += dS @ K ; dK += dS^T @ Q
    mm(dq_base.add(l.q(b, i0, h)), l.stride, true, 1.0, (nq, d, nk), M(dp.as_ptr(), K_BLOCK, 1), M(qkv.as_ptr().add(l.k(b, j0, g)), l.stride, 1));
    mm(dq_base.add(l.k(b, j0, g)), l.stride, true, 1.0, (nk, d, nq), M(dp.as_ptr(), 1, K_BLOCK), M(qkv.as_ptr().add(l.q(b, i0, h)), l.stride, 1));
}

/// Zeroes the gradient regions a (batch, kv-group) task owns: its query heads and its k/v head.
fn zero_group(l: &Layout, dptr: SharedMut, b: usize, g: usize) {
    let d = l.s.head_dim;
    for t in 0..l.s.seq {
        // SAFETY: task (b, g) owns these regions (see the module comment).
        unsafe {
            dptr.slice(l.k(b, t, g), d).fill(0.0);
            dptr.slice(l.v(b, t, g), d).fill(0.0);
            for h in g * l.group()..(g + 1) * l.group() {
                dptr.slice(l.q(b, t, h), d).fill(0.0);
            }
        }
    }
}

/// `D[i] = dO[i] . O[i]` for the rows of a query block.
fn row_dots(l: &Layout, dout: &[f32], out: &[f32], b: usize, h: usize, (i0, i1): (usize, usize), di: &mut [f32]) {
    let d = l.s.head_dim;
    for (r, x) in di[..i1 - i0].iter_mut().enumerate() {
        let o = l.o(b, i0 + r, h);
        *x = super::math::dot(&dout[o..o + d], &out[o..o + d]);
    }
}

#[allow(clippy::too_many_arguments)] // the op's inputs and saved statistics
pub fn eager_bwd(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], out: &[f32], probs: &[f32], s: AttnShape, drop: Option<DropoutMask>) {
    let l = Layout::new(s);
    let t_len = s.seq;
    let dptr = SharedMut(dqkv.as_mut_ptr());
    (0..s.batch * s.n_kv_head).into_par_iter().for_each(|bg| {
        let (b, g) = (bg / s.n_kv_head, bg % s.n_kv_head);
        zero_group(&l, dptr, b, g);
        let mut dp = vec![0.0f32; Q_BLOCK * K_BLOCK];
        let mut pd = vec![0.0f32; if drop.is_some() { Q_BLOCK * K_BLOCK } else { 0 }];
        let mut di = [0.0f32; Q_BLOCK];
        for h in g * l.group()..(g + 1) * l.group() {
            let p = &probs[(b * s.n_head + h) * t_len * t_len..][..t_len * t_len];
            for i0 in (0..t_len).step_by(Q_BLOCK) {
                let i1 = (i0 + Q_BLOCK).min(t_len);
                row_dots(&l, dout, out, b, h, (i0, i1), &mut di);
                for j0 in (0..i1).step_by(K_BLOCK) {
                    let j1 = (j0 + K_BLOCK).min(i1);
                    // SAFETY: task (b, g) owns the gradient regions tile_bwd writes.
                    unsafe { tile_bwd(&l, dptr, qkv, dout, &di, &p[i0 * t_len + j0..], t_len, &mut dp, b, h, (i0, i1), (j0, j1), (drop, &mut pd)) };
                }
            }
        }
    });
}

#[allow(clippy::too_many_arguments)] // the op's inputs and saved statistics
pub fn flash_bwd(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], out: &[f32], lse: &[f32], mask: &[i32], s: AttnShape, drop: Option<DropoutMask>) {
    let l = Layout::new(s);
    let t_len = s.seq;
    let dptr = SharedMut(dqkv.as_mut_ptr());
    (0..s.batch * s.n_kv_head).into_par_iter().for_each(|bg| {
        let (b, g) = (bg / s.n_kv_head, bg % s.n_kv_head);
        zero_group(&l, dptr, b, g);
        let mut p = vec![0.0f32; Q_BLOCK * K_BLOCK];
        let mut dp = vec![0.0f32; Q_BLOCK * K_BLOCK];
        let mut pd = vec![0.0f32; if drop.is_some() { Q_BLOCK * K_BLOCK } else { 0 }];
        let mut di = [0.0f32; Q_BLOCK];
        for h in g * l.group()..(g + 1) * l.group() {
            let lse = &lse[(b * s.n_head + h) * t_len..][..t_len];
            for i0 in (0..t_len).step_by(Q_BLOCK) {
                let i1 = (i0 + Q_BLOCK).min(t_len);
                row_dots(&l, dout, out, b, h, (i0, i1), &mut di);
                for j0 in (0..i1).step_by(K_BLOCK) {
                    let j1 = (j0 + K_BLOCK).min(i1);
                    scores(&l, qkv, mask, &mut p, K_BLOCK, b, h, (i0, i1), (j0, j1));
                    for r in 0..i1 - i0 {
                        let row = &mut p[r * K_BLOCK..r * K_BLOCK + (j1 - j0)];
                        if lse[i0 + r] == f32::INFINITY {
                            row.fill(0.0);
                        } else {
                            exp_row(row, lse[i0 + r]);
                        }
                    }
                    // SAFETY: task (b, g) owns the gradient regions tile_bwd writes.
                    unsafe { tile_bwd(&l, dptr, qkv, dout, &di, &p, K_BLOCK, &mut dp, b, h, (i0, i1), (j0, j1), (drop, &mut pd)) };
                }
            }
        }
    });
}

/// Generation: copies each row's key and value heads into the caches at `slot`.
pub fn kv_append(k_cache: &mut [f32], v_cache: &mut [f32], qkv: &[f32], slot: usize, s: AttnShape, max_len: usize) {
    let l = Layout::new(s);
    let kvd = s.n_kv_head * s.head_dim;
    for b in 0..s.batch {
        for t in 0..s.seq {
            let dst = (b * max_len + slot + t) * kvd;
            k_cache[dst..dst + kvd].copy_from_slice(&qkv[l.k(b, t, 0)..][..kvd]);
            v_cache[dst..dst + kvd].copy_from_slice(&qkv[l.v(b, t, 0)..][..kvd]);
        }
    }
}

/// Generation: one query per row against its cache (keys `0..=slot` with mask 1).
#[allow(clippy::too_many_arguments)] // see Backend::attention_decode
pub fn attention_decode(out: &mut [f32], qkv: &[f32], k_cache: &[f32], v_cache: &[f32], mask: &[i32], slot: usize, s: AttnShape, max_len: usize) {
    let l = Layout::new(s);
    let (d, kvd) = (s.head_dim, s.n_kv_head * s.head_dim);
    out.par_chunks_mut(d).enumerate().for_each(|(bh, o)| {
        let (b, h) = (bh / s.n_head, bh % s.n_head);
        let g = h / l.group();
        let q = &qkv[l.q(b, 0, h)..][..d];
        let mut scores: Vec<f32> =
            (0..=slot)
                .map(|j| {
                    if mask[b * max_len + j] != 0 {
                        super::math::dot(q, &k_cache[(b * max_len + j) * kvd + g * d..][..d]) * l.scale
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
        o.fill(0.0);
        let max = math::max(&scores);
        if max == f32::NEG_INFINITY {
            return;
        }
        let inv = 1.0 / exp_row(&mut scores, max);
        for (j, p) in scores.iter().enumerate() {
            if *p != 0.0 {
                super::math::axpy(o, p * inv, &v_cache[(b * max_len + j) * kvd + g * d..][..d]);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition, one query row at a time, in f64.
    fn naive(qkv: &[f32], mask: &[i32], s: AttnShape) -> Vec<f32> {
        let l = Layout::new(s);
        let d = s.head_dim;
        let mut out = vec![0.0f32; s.rows() * s.out_width()];
        for b in 0..s.batch {
            for h in 0..s.n_head {
                let g = h / l.group();
                for i in 0..s.seq {
                    let keys: Vec<usize> = (0..=i).filter(|&j| mask[l.row(b, j)] != 0).collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let sc: Vec<f64> = keys
                        .iter()
                        .map(|&j| (0..d).map(|x| qkv[l.q(b, i, h) + x] as f64 * qkv[l.k(b, j, g) + x] as f64).sum::<f64>() * l.scale as f64)
                        .collect();
                    let max = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - max).exp()).sum();
                    for x in 0..d {
                        out[l.o(b, i, h) + x] = keys.iter().zip(&sc).map(|(&j, s)| (s - max).exp() / z * qkv[l.v(b, j, g) + x] as f64).sum::<f64>() as f32;
                    }
                }
            }
        }
        out
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn eager_and_flash_match_the_definition_and_each_other() {
        // shapes that do not divide the tiles, GQA, odd head dims, left and right padding
        for (batch, seq, n_head, n_kv_head, head_dim) in [(2, 37, 4, 2, 10), (1, 200, 3, 1, 16), (3, 130, 2, 2, 8)] {
            let s = AttnShape { batch, seq, n_head, n_kv_head, head_dim };
            let qkv: Vec<f32> = rand(s.rows() * s.qkv_width(), seq as u64).iter().map(|x| x * 2.0).collect();
            let mut mask = vec![1i32; s.rows()];
            for t in 0..seq / 3 {
                mask[t] = 0; // row 0: left padding (its first queries see no key at all)
                if batch > 1 {
                    mask[2 * seq - 1 - t] = 0; // row 1: right padding
                }
            }
            let want = naive(&qkv, &mask, s);
            let (mut oe, mut of) = (vec![0.0; want.len()], vec![0.0; want.len()]);
            let mut probs = vec![0.0; s.stats_len(crate::backend::AttnImpl::Eager)];
            let mut lse = vec![0.0; s.stats_len(crate::backend::AttnImpl::Flash)];
            eager_fwd(&mut oe, &mut probs, &qkv, &mask, s, None);
            flash_fwd(&mut of, &mut lse, &qkv, &mask, s, None);
            for (name, got) in [("eager", &oe), ("flash", &of)] {
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err < 2e-5, "{name} forward {s:?}: max error {err}");
            }
            let dout = rand(want.len(), 99);
            let (mut de, mut df) = (vec![0.0; qkv.len()], vec![0.0; qkv.len()]);
            eager_bwd(&mut de, &dout, &qkv, &oe, &probs, s, None);
            flash_bwd(&mut df, &dout, &qkv, &of, &lse, &mask, s, None);
            let err = de.iter().zip(&df).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 2e-5, "backward {s:?}: eager and flash differ by {err}");
            // a direction check of the backward pass: <dout, dOut/dx . v> by finite differences
            let dir = rand(qkv.len(), 7);
            let h = 1e-3f32;
            let plus: Vec<f32> = qkv.iter().zip(&dir).map(|(x, d)| x + h * d).collect();
            let minus: Vec<f32> = qkv.iter().zip(&dir).map(|(x, d)| x - h * d).collect();
            let f = |x: &[f32]| naive(x, &mask, s).iter().zip(&dout).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
            let fd = (f(&plus) - f(&minus)) / (2.0 * h as f64);
            let an: f64 = df.iter().zip(&dir).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((fd - an).abs() < 1e-2 * an.abs().max(1.0), "backward {s:?}: directional derivative {an} vs finite difference {fd}");

            // with dropout on the probabilities: both draw the same masks across their different
            // tilings, forward and backward, and the directional derivative still holds
            let drop = Some(crate::backend::DropoutMask::new(0.3, 11));
            eager_fwd(&mut oe, &mut probs, &qkv, &mask, s, drop);
            flash_fwd(&mut of, &mut lse, &qkv, &mask, s, drop);
            let err = oe.iter().zip(&of).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 2e-5 && oe != want, "forward with dropout {s:?}: eager and flash differ by {err}");
            eager_bwd(&mut de, &dout, &qkv, &oe, &probs, s, drop);
            flash_bwd(&mut df, &dout, &qkv, &of, &lse, &mask, s, drop);
            let err = de.iter().zip(&df).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 2e-5, "backward with dropout {s:?}: eager and flash differ by {err}");
            let fwd = |x: &[f32]| {
                let (mut o, mut st) = (vec![0.0; want.len()], vec![0.0; s.stats_len(crate::backend::AttnImpl::Flash)]);
                flash_fwd(&mut o, &mut st, x, &mask, s, drop);
                o.iter().zip(&dout).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
            };
            let fd = (fwd(&plus) - fwd(&minus)) / (2.0 * h as f64);
            let an: f64 = df.iter().zip(&dir).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((fd - an).abs() < 1e-2 * an.abs().max(1.0), "backward with dropout {s:?}: directional derivative {an} vs finite difference {fd}");
        }
    }
}
