//! The tensor-core attention's rounding (`kernels/attention_tc.cu`, head dims 64 and 128 in bf16
//! mode), on the CPU: scores from bf16 queries and keys summed in f32, the online softmax over
//! key tiles of 64 with its running maximum in base 2, the unnormalised probabilities rounded to
//! bf16 before they multiply the values (the row sums are of the unrounded ones); in the backward
//! pass the normalised probabilities and `dS = P (dP - delta)` rounded to bf16 before their
//! products, with `dout` in bf16.

use crate::backend::AttnShape;

/// The kernels' key tile.
const TILE: usize = 64;

/// Offsets of one row's query head `h`, and its key and value heads (grouped-query attention).
struct Heads {
    s: AttnShape,
}

impl Heads {
    fn q(&self, row: usize, h: usize) -> usize {
        row * self.s.qkv_width() + h * self.s.head_dim
    }
    fn k(&self, row: usize, h: usize) -> usize {
        let g = h / (self.s.n_head / self.s.n_kv_head);
        row * self.s.qkv_width() + (self.s.n_head + g) * self.s.head_dim
    }
    fn v(&self, row: usize, h: usize) -> usize {
        self.k(row, h) + self.s.n_kv_head * self.s.head_dim
    }
    fn o(&self, row: usize, h: usize) -> usize {
        row * self.s.out_width() + h * self.s.head_dim
    }
    /// Whether query `i` of sequence `b` sees key `j`: causal, and the key not masked out.
    fn visible(&self, mask: &[i32], b: usize, i: usize, j: usize) -> bool {
        j <= i && mask[b * self.s.seq + j] != 0
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| x.mul_add(*y, s))
}

/// `1 / sqrt(d)` and the same times `log2 e`, as the kernels form them.
fn scales(d: usize) -> (f32, f32) {
    let scale = 1.0 / (d as f32).sqrt();
    (scale, scale * std::f32::consts::LOG2_E)
}

/// The forward pass on `qkv` already rounded to bf16, with `round` the rounding to bf16 (the
/// identity: the f32 online softmax): writes `out` and the log-sum-exp per row (`lse[(b *
/// n_head + h) * seq + i]`, `+inf` for a row that sees no key).
pub(super) fn forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], mask: &[i32], s: AttnShape, round: fn(f32) -> f32) {
    let l = Heads { s };
    let (d, (_, sl2)) = (s.head_dim, scales(s.head_dim));
    let mut o = vec![0f32; d];
    let mut sc = vec![0f32; TILE];
    for b in 0..s.batch {
        for h in 0..s.n_head {
            for i in 0..s.seq {
                let q = &qkv[l.q(b * s.seq + i, h)..][..d];
                let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
                o.fill(0.0);
                for j0 in (0..=i).step_by(TILE) {
                    let j1 = (j0 + TILE).min(i + 1);
                    let mut mx = f32::NEG_INFINITY;
                    for j in j0..j1 {
                        sc[j - j0] = if l.visible(mask, b, i, j) { dot(q, &qkv[l.k(b * s.seq + j, h)..][..d]) } else { f32::NEG_INFINITY };
                        mx = mx.max(sc[j - j0]);
                    }
                    let mn = m.max(mx * sl2);
                    let base = if mn == f32::NEG_INFINITY { 0.0 } else { mn };
                    let corr = (m - base).exp2();
                    m = mn;
                    let mut tile_sum = 0f32;
                    o.iter_mut().for_each(|x| *x *= corr);
                    for j in j0..j1 {
                        let p = sc[j - j0].mul_add(sl2, -base).exp2();
                        tile_sum += p;
                        let pr = round(p);
                        let v = &qkv[l.v(b * s.seq + j, h)..][..d];
                        o.iter_mut().zip(v).for_each(|(x, y)| *x = pr.mul_add(*y, *x));
                    }
                    sum = sum.mul_add(corr, tile_sum);
                }
                let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
                out[l.o(b * s.seq + i, h)..][..d].iter_mut().zip(&o).for_each(|(y, x)| *y = x * inv);
                lse[(b * s.n_head + h) * s.seq + i] = if sum == 0.0 { f32::INFINITY } else { m * std::f32::consts::LN_2 + sum.ln() };
            }
        }
    }
}

/// The backward pass: `dout` and `qkv` already rounded to bf16, `delta[(b * n_head + h) * seq +
/// i]` the rows' `dout . out`, `round` as in [`forward`]; writes `dqkv`.
#[allow(clippy::too_many_arguments)] // the pass's inputs, its statistics and the rounding
pub(super) fn backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], delta: &[f32], lse: &[f32], mask: &[i32], s: AttnShape, round: fn(f32) -> f32) {
    let l = Heads { s };
    let (d, (scale, sl2)) = (s.head_dim, scales(s.head_dim));
    dqkv.fill(0.0);
    for b in 0..s.batch {
        for h in 0..s.n_head {
            for i in 0..s.seq {
                let at = (b * s.n_head + h) * s.seq + i;
                let l2 = lse[at] * std::f32::consts::LOG2_E;
                let (qi, oi) = (l.q(b * s.seq + i, h), l.o(b * s.seq + i, h));
                for j in (0..=i).filter(|&j| l.visible(mask, b, i, j)) {
                    let (kj, vj) = (l.k(b * s.seq + j, h), l.v(b * s.seq + j, h));
                    let p = dot(&qkv[qi..][..d], &qkv[kj..][..d]).mul_add(sl2, -l2).exp2();
                    let dp = dot(&dout[oi..][..d], &qkv[vj..][..d]);
                    let (ds, pr) = (round(p * (dp - delta[at])), round(p));
                    for x in 0..d {
                        dqkv[qi + x] += scale * ds * qkv[kj + x];
                        dqkv[kj + x] += scale * ds * qkv[qi + x];
                        dqkv[vj + x] += pr * dout[oi + x];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::backend::{AttnImpl, Backend};
    use rand::{RngExt, SeedableRng};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    /// Without the rounding, the tiled online softmax and its backward pass are the CPU's flash
    /// attention (grouped-query heads, padding, a row that sees no key, more keys than a tile),
    /// and with it they stay within bf16's reach of it.
    #[test]
    fn without_rounding_the_model_is_the_cpu_attention() {
        let s = AttnShape { batch: 2, seq: 150, n_head: 4, n_kv_head: 2, head_dim: 64 };
        let qkv = rand(s.rows() * s.qkv_width(), 1);
        let dout = rand(s.rows() * s.out_width(), 2);
        // the first sequence's first 5 keys masked: its first 5 rows see no key
        let mask: Vec<i32> = (0..s.rows()).map(|r| i32::from(r >= 5)).collect();
        let (mut out, mut lse) = (vec![0f32; s.rows() * s.out_width()], vec![0f32; s.stats_len(AttnImpl::Flash)]);
        let (mut out_c, mut lse_c, mut dqkv_c) = (out.clone(), lse.clone(), vec![0f32; qkv.len()]);
        Cpu.attention_fwd(&mut out_c, &mut lse_c, &qkv, &mask, s, AttnImpl::Flash);
        Cpu.attention_bwd(&mut dqkv_c, &dout, &qkv, &out_c, &lse_c, &mask, s, AttnImpl::Flash);
        let close = |a: &[f32], b: &[f32], tol: f32| {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            a.iter().zip(b).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() / scale }).fold(0f32, f32::max) <= tol
        };
        for (round, tol) in [((|x| x) as fn(f32) -> f32, 1e-5), (super::super::round, 1e-2)] {
            forward(&mut out, &mut lse, &qkv, &mask, s, round);
            let delta = super::super::row_deltas(&dout, &out, s);
            let mut dqkv = vec![f32::NAN; qkv.len()];
            backward(&mut dqkv, &dout, &qkv, &delta, &lse, &mask, s, round);
            assert!(close(&out, &out_c, tol) && close(&dqkv, &dqkv_c, tol), "tolerance {tol}");
            assert!(lse[..5].iter().all(|x| *x == f32::INFINITY) && out[..5 * s.out_width()].iter().all(|x| *x == 0.0));
            assert!(close(&lse[5..], &lse_c[5..], tol));
        }
    }
}
