//! The encoder-decoder ops on the CPU (`backend/seq2seq.rs`): attention with an additive bias
//! and the probabilities kept (`[batch, tq, n_head, tk]`, so each query row's heads are one
//! contiguous block and rows are computed in parallel), T5's position bias, gated GELU and ReLU.
//! Every sum runs in a fixed order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::math::{dot, exp, tanh};
use super::pointwise::{GELU_C, GELU_K};
use super::Cpu;
use crate::backend::seq2seq::{BiasedShape, Cols, QkvCols, Seq2SeqOps};

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_C * x * x * x)))
}

fn gelu_grad(x: f32) -> f32 {
    let t = tanh(GELU_K * (x + GELU_C * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)
}

/// Head `h`'s slice of row `r` of a column block.
fn head<'a>(c: &Cols<'a, Vec<f32>>, r: usize, h: usize, d: usize) -> &'a [f32] {
    let s = r * c.ld + c.off + h * d;
    &c.buf[s..s + d]
}

/// Whether query `i` of sequence `b` sees key `j`.
fn visible(mask: Option<&Vec<i32>>, s: BiasedShape, b: usize, i: usize, j: usize) -> bool {
    !(s.causal && j > i) && mask.is_none_or(|m| m[b * s.tk + j] != 0)
}

impl Seq2SeqOps for Cpu {
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
        let (hd, d, tk) = (s.inner(), s.head_dim, s.tk);
        out.par_chunks_mut(hd).zip(probs.par_chunks_mut(s.n_head * tk)).enumerate().for_each(|(row, (o, p))| {
            let (b, i) = (row / s.tq, row % s.tq);
            o.fill(0.0);
            for h in 0..s.n_head {
                let p = &mut p[h * tk..(h + 1) * tk];
                let qh = head(&q, row, h, d);
                let any = (0..tk).any(|j| visible(key_mask, s, b, i, j));
                let mut m = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = if !any {
                        0.0
                    } else if visible(key_mask, s, b, i, j) {
                        scale * dot(qh, head(&k, b * tk + j, h, d)) + bias.map_or(0.0, |bb| bb[(h * s.tq + i) * tk + j])
                    } else {
                        f32::NEG_INFINITY
                    };
                    m = m.max(*pj);
                }
                let mut sum = 0.0;
                for pj in p.iter_mut() {
                    *pj = exp(*pj - m) * (*pj > f32::NEG_INFINITY) as u8 as f32;
                    sum += *pj;
                }
                let oh = &mut o[h * d..(h + 1) * d];
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj /= sum;
                    if *pj != 0.0 {
                        for (o, x) in oh.iter_mut().zip(head(&v, b * tk + j, h, d)) {
                            *o += *pj * x;
                        }
                    }
                }
            }
        });
    }

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
        let (hd, d, tk, nh) = (s.inner(), s.head_dim, s.tk, s.n_head);
        // per query row: dS = P * (dP - rowsum(P * dP)) with dP = dout v^T, then dq = scale dS k
        dq.par_chunks_mut(hd).zip(ds.par_chunks_mut(nh * tk)).enumerate().for_each(|(row, (dqr, dsr))| {
            let b = row / s.tq;
            let dor = &dout[row * hd..(row + 1) * hd];
            dqr.fill(0.0);
            for h in 0..nh {
                let (p, dsh) = (&probs[(row * nh + h) * tk..(row * nh + h + 1) * tk], &mut dsr[h * tk..(h + 1) * tk]);
                let doh = &dor[h * d..(h + 1) * d];
                let mut rowsum = 0.0;
                for j in 0..tk {
                    dsh[j] = if p[j] != 0.0 { dot(doh, head(&v, b * tk + j, h, d)) } else { 0.0 };
                    rowsum += p[j] * dsh[j];
                }
                let dqh = &mut dqr[h * d..(h + 1) * d];
                for j in 0..tk {
                    dsh[j] = p[j] * (dsh[j] - rowsum);
                    if dsh[j] != 0.0 {
                        for (o, x) in dqh.iter_mut().zip(head(&k, b * tk + j, h, d)) {
                            *o += scale * dsh[j] * x;
                        }
                    }
                }
            }
        });
        // per key row: dk = scale dS^T q, dv = P^T dout (queries summed in order)
        dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)).enumerate().for_each(|(krow, (dkr, dvr))| {
            let (b, j) = (krow / tk, krow % tk);
            dkr.fill(0.0);
            dvr.fill(0.0);
            for i in 0..s.tq {
                let row = b * s.tq + i;
                for h in 0..nh {
                    let at = (row * nh + h) * tk + j;
                    let (p, g) = (probs[at], ds[at]);
                    if p != 0.0 {
                        for (o, x) in dvr[h * d..(h + 1) * d].iter_mut().zip(&dout[row * hd + h * d..row * hd + (h + 1) * d]) {
                            *o += p * x;
                        }
                    }
                    if g != 0.0 {
                        for (o, x) in dkr[h * d..(h + 1) * d].iter_mut().zip(head(&q, row, h, d)) {
                            *o += scale * g * x;
                        }
                    }
                }
            }
        });
        if let Some(db) = dbias {
            // dbias[h, i, j] += sum_b dS[b, i, h, j]
            db.par_chunks_mut(tk).enumerate().for_each(|(hi, dbr)| {
                let (h, i) = (hi / s.tq, hi % s.tq);
                for b in 0..s.batch {
                    let at = ((b * s.tq + i) * nh + h) * tk;
                    for (o, g) in dbr.iter_mut().zip(&ds[at..at + tk]) {
                        *o += g;
                    }
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
