//! The encoder-decoder ops on the CPU (`backend/seq2seq.rs`): attention with an additive bias
//! as per-sequence, per-head matrix products (sequences in parallel, each product on one
//! thread), the probabilities kept as `[batch, n_head, tq, tk]`; T5's position bias, gated GELU
//! and ReLU. Every sum runs in a fixed order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::math::{dot, exp, tanh};
use super::matmul::strided_scaled;
use super::pointwise::{GELU_C, GELU_K};
use super::Cpu;
use crate::backend::seq2seq::{BiasedShape, Cols, QkvCols, Seq2SeqOps};
use crate::backend::{dropout_keep, DropoutMask};
use gemm::Parallelism;

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_C * x * x * x)))
}

fn gelu_grad(x: f32) -> f32 {
    let t = tanh(GELU_K * (x + GELU_C * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)
}

/// Where head `h` of sequence `b`'s rows starts in a column block whose sequences have `len`
/// rows.
fn at(c: &Cols<Vec<f32>>, b: usize, len: usize, h: usize, d: usize) -> usize {
    b * len * c.ld + c.off + h * d
}

/// Softmax of one row of scores in place, over the keys `visible` keeps (the others get 0; a
/// row with none attends evenly to all, as transformers' additive mask makes it).
fn softmax_row(row: &mut [f32], visible: impl Fn(usize) -> bool) {
    let mut m = f32::NEG_INFINITY;
    let mut any = false;
    for (j, x) in row.iter_mut().enumerate() {
        if visible(j) {
            any = true;
            m = m.max(*x);
        } else {
            *x = f32::NEG_INFINITY;
        }
    }
    if !any {
        row.fill(1.0 / row.len() as f32);
        return;
    }
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = exp(*x - m) * (*x > f32::NEG_INFINITY) as u8 as f32;
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Applies dropout mask `m` to `x` in place, `x[i]` being element `first + i` of the mask's stream.
fn mask_in_place(x: &mut [f32], m: DropoutMask, first: usize) {
    for (i, v) in x.iter_mut().enumerate() {
        *v = if dropout_keep(m.key, (first + i) as u64, m.threshold) { *v * m.scale } else { 0.0 };
    }
}

/// `x` with dropout mask `m` applied ([`mask_in_place`] on a copy).
fn masked(x: &[f32], m: DropoutMask, first: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    mask_in_place(&mut out, m, first);
    out
}

impl Seq2SeqOps for Cpu {
    /// Per sequence (in parallel) and head: `S = scale Q K^T + bias` and `O = P V` as matrix
    /// products, the masked softmax between them. The probabilities are kept as `[batch,
    /// n_head, tq, tk]`.
    fn biased_attention_fwd(
        &self,
        out: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        q: Cols<Vec<f32>>,
        k: Cols<Vec<f32>>,
        v: Cols<Vec<f32>>,
        bias: Option<&Vec<f32>>,
        key_mask: Option<&Vec<i32>>,
        s: BiasedShape,
        scale: f32,
    ) {
        let (hd, d, tq, tk) = (s.inner(), s.head_dim, s.tq, s.tk);
        out.par_chunks_mut(tq * hd).zip(probs.par_chunks_mut(s.n_head * tq * tk)).enumerate().for_each(|(b, (o, p))| {
            let mask = key_mask.map(|m| &m[b * tk..(b + 1) * tk]);
            for h in 0..s.n_head {
                let ph = &mut p[h * tq * tk..(h + 1) * tq * tk];
                strided_scaled(
                    ph,
                    false,
                    (tq, tk, d),
                    tk,
                    &q.buf[at(&q, b, tq, h, d)..],
                    (q.ld, 1),
                    &k.buf[at(&k, b, tk, h, d)..],
                    (1, k.ld),
                    scale,
                    Parallelism::None,
                );
                for (i, row) in ph.chunks_exact_mut(tk).enumerate() {
                    if let Some(bb) = bias {
                        row.iter_mut().zip(&bb[(h * tq + i) * tk..(h * tq + i + 1) * tk]).for_each(|(x, b)| *x += b);
                    }
                    softmax_row(row, |j| !(s.causal && j > i) && mask.is_none_or(|m| m[j] != 0));
                }
                let dropped = s.dropout.map(|m| masked(ph, m, (b * s.n_head + h) * tq * tk));
                let pv = dropped.as_deref().unwrap_or(ph);
                strided_scaled(&mut o[h * d..], false, (tq, d, tk), hd, pv, (tk, 1), &v.buf[at(&v, b, tk, h, d)..], (v.ld, 1), 1.0, Parallelism::None);
            }
        });
    }

    /// Per sequence (in parallel) and head: `dP = dO V^T`, `dS = P (dP - rowsum(P dP))`,
    /// `dQ = scale dS K`, `dK = scale dS^T Q`, `dV = P^T dO` as matrix products; then the bias's
    /// gradient summed over the sequences in order.
    fn biased_attention_bwd(
        &self,
        (dq, dk, dv): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
        dbias: Option<&mut Vec<f32>>,
        ds: &mut Vec<f32>,
        dout: &Vec<f32>,
        (q, k, v): QkvCols<Vec<f32>>,
        probs: &Vec<f32>,
        s: BiasedShape,
        scale: f32,
    ) {
        let (hd, d, tq, tk, nh) = (s.inner(), s.head_dim, s.tq, s.tk, s.n_head);
        let per = nh * tq * tk;
        let grads = dq.par_chunks_mut(tq * hd).zip(dk.par_chunks_mut(tk * hd)).zip(dv.par_chunks_mut(tk * hd));
        grads.zip(ds.par_chunks_mut(per)).enumerate().for_each(|(b, (((dqb, dkb), dvb), dsb))| {
            let dob = &dout[b * tq * hd..(b + 1) * tq * hd];
            for h in 0..nh {
                let (ph, dsh) = (&probs[b * per + h * tq * tk..b * per + (h + 1) * tq * tk], &mut dsb[h * tq * tk..(h + 1) * tq * tk]);
                strided_scaled(dsh, false, (tq, tk, d), tk, &dob[h * d..], (hd, 1), &v.buf[at(&v, b, tk, h, d)..], (1, v.ld), 1.0, Parallelism::None);
                // with dropout: the values were weighed by the dropped probabilities, and the
                // gradient reaching the softmax is masked the same way
                let first = (b * nh + h) * tq * tk;
                let dropped = s.dropout.map(|m| masked(ph, m, first));
                if let Some(m) = s.dropout {
                    mask_in_place(dsh, m, first);
                }
                for (pr, dr) in ph.chunks_exact(tk).zip(dsh.chunks_exact_mut(tk)) {
                    let rowsum = dot(pr, dr);
                    dr.iter_mut().zip(pr).for_each(|(g, p)| *g = p * (*g - rowsum));
                }
                strided_scaled(&mut dqb[h * d..], false, (tq, d, tk), hd, dsh, (tk, 1), &k.buf[at(&k, b, tk, h, d)..], (k.ld, 1), scale, Parallelism::None);
                strided_scaled(&mut dkb[h * d..], false, (tk, d, tq), hd, dsh, (1, tk), &q.buf[at(&q, b, tq, h, d)..], (q.ld, 1), scale, Parallelism::None);
                let pv = dropped.as_deref().unwrap_or(ph);
                strided_scaled(&mut dvb[h * d..], false, (tk, d, tq), hd, pv, (1, tk), &dob[h * d..], (hd, 1), 1.0, Parallelism::None);
            }
        });
        if let Some(db) = dbias {
            // dbias[h, i, j] += sum_b dS[b, h, i, j]
            db.par_chunks_mut(tk).enumerate().for_each(|(hi, dbr)| {
                for b in 0..s.batch {
                    let at = b * per + hi * tk;
                    dbr.iter_mut().zip(&ds[at..at + tk]).for_each(|(o, g)| *o += g);
                }
            });
        }
    }

    fn position_bias_fwd(&self, out: &mut Vec<f32>, table: &Vec<f32>, buckets: &Vec<i32>, n_head: usize) {
        let n = buckets.len();
        for (h, o) in out.chunks_exact_mut(n).enumerate() {
            for (o, &bk) in o.iter_mut().zip(buckets) {
                *o = table[bk as usize * n_head + h];
            }
        }
    }

    fn position_bias_bwd(&self, dtable: &mut Vec<f32>, dbias: &Vec<f32>, buckets: &Vec<i32>, n_head: usize) {
        let n = buckets.len();
        for (h, g) in dbias.chunks_exact(n).enumerate() {
            for (g, &bk) in g.iter().zip(buckets) {
                dtable[bk as usize * n_head + h] += g;
            }
        }
    }

    fn geglu_fwd(&self, out: &mut Vec<f32>, x: &Vec<f32>, i: usize) {
        out.par_chunks_mut(i).zip(x.par_chunks(2 * i)).for_each(|(o, x)| {
            let (gate, up) = x.split_at(i);
            for k in 0..i {
                o[k] = gelu(gate[k]) * up[k];
            }
        });
    }

    fn geglu_bwd(&self, dx: &mut Vec<f32>, x: &Vec<f32>, dout: &Vec<f32>, i: usize) {
        dx.par_chunks_mut(2 * i).zip(x.par_chunks(2 * i)).zip(dout.par_chunks(i)).for_each(|((dx, x), d)| {
            let (gate, up) = x.split_at(i);
            let (dgate, dup) = dx.split_at_mut(i);
            for k in 0..i {
                dup[k] = d[k] * gelu(gate[k]);
                dgate[k] = d[k] * up[k] * gelu_grad(gate[k]);
            }
        });
    }

    fn gelu_erf_fwd(&self, out: &mut Vec<f32>, x: &Vec<f32>) {
        out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
    }

    fn gelu_erf_bwd(&self, dx: &mut Vec<f32>, x: &Vec<f32>, dout: &Vec<f32>) {
        // 1 / sqrt(2 pi)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        dx.par_chunks_mut(4096).zip(x.par_chunks(4096)).zip(dout.par_chunks(4096)).for_each(|((dx, x), d)| {
            for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(d) {
                let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
                *dx = d * (cdf + x * INV_SQRT_2PI * (-0.5 * x * x).exp());
            }
        });
    }

    fn relu_fwd(&self, out: &mut Vec<f32>, x: &Vec<f32>) {
        out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
            for (o, x) in o.iter_mut().zip(x) {
                *o = x.max(0.0);
            }
        });
    }

    fn relu_bwd(&self, dx: &mut Vec<f32>, x: &Vec<f32>, dout: &Vec<f32>) {
        dx.par_chunks_mut(4096).zip(x.par_chunks(4096)).zip(dout.par_chunks(4096)).for_each(|((dx, x), d)| {
            for ((dx, x), d) in dx.iter_mut().zip(x).zip(d) {
                *dx = if *x > 0.0 { *d } else { 0.0 };
            }
        });
    }
}
