//! Matrix products on the CPU through the `gemm` crate (pure Rust, runtime CPU dispatch,
//! multi-threaded with rayon). Chosen over `matrixmultiply` by measurement at the model's shapes:
//! see `examples/gemm_choice.rs` and docs/BENCHMARKS.md. Strides express the transposes, so no
//! operand is ever copied.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::math::reduce_rows;
use crate::backend::{ColBlock, MergedPart};

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst[m, n] (= or +=) lhs[m, k] @ rhs[k, n]` with explicit row/column strides, on every thread.
#[allow(clippy::too_many_arguments)] // a strided GEMM's operands
fn strided(
    dst: &mut [f32],
    accumulate: bool,
    mnk: (usize, usize, usize),
    dst_rs: usize,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    strided_scaled(dst, accumulate, mnk, dst_rs, lhs, lhs_strides, rhs, rhs_strides, 1.0, parallelism())
}

/// [`strided`] with the product scaled, `dst (= or +=) scale * lhs @ rhs`, on the threads `par`
/// gives (`Parallelism::None` for many small products that the caller already runs in
/// parallel, as attention's per-sequence, per-head products).
#[allow(clippy::too_many_arguments)] // a strided GEMM's operands and its threading
pub(super) fn strided_scaled(
    dst: &mut [f32],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    dst_rs: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n, "gemm: destination too small");
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs, "gemm: lhs too small");
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs, "gemm: rhs too small");
    }
    // SAFETY: the bounds of all three operands were checked above; `dst` does not alias the inputs
    // (it is a distinct `&mut`).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// `out[n, m] = inp[n, k] @ w[m, k]^T + bias`.
pub fn matmul_fwd(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, k: usize, m: usize) {
    let out = &mut out[..n * m];
    if n <= SMALL_ROWS {
        return matvec(out, inp, w, bias, n, k, m);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(m).for_each(|row| row.copy_from_slice(&b[..m]));
    }
    strided(out, bias.is_some(), (n, m, k), m, inp, (k, 1), w, (1, k));
}

/// Up to this many rows (a decoding step's batch), the product is a few matrix-vector products.
const SMALL_ROWS: usize = 16;

/// `out[n, m] = inp[n, k] @ w[m, k]^T (+ bias)` for small `n`: memory-bound on the weights,
/// so each weight row is read once (in parallel over blocks of output columns) and dotted with
/// every input row while it is in cache.
fn matvec(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, k: usize, m: usize) {
    // enough blocks of output columns to balance the threads, few enough to keep the per-block
    // overhead small
    let block = ((m / (rayon::current_num_threads() * 4)).clamp(16, 256)) & !1;
    let blocks: Vec<Vec<f32>> = (0..m.div_ceil(block))
        .into_par_iter()
        .map(|blk| {
            let cols = blk * block..((blk + 1) * block).min(m);
            let mut acc = vec![0.0f32; n * cols.len()];
            let c = cols.len();
            if n < 4 {
                for (jj, j) in cols.clone().enumerate() {
                    let wr = &w[j * k..(j + 1) * k];
                    let b = bias.map_or(0.0, |b| b[j]);
                    for i in 0..n {
                        acc[i * c + jj] = super::math::dot(&inp[i * k..(i + 1) * k], wr) + b;
                    }
                }
                return acc;
            }
            let mut jj = 0;
            // pairs of weight rows against groups of four input rows: eight accumulator chains
            while jj + 2 <= c {
                let j = cols.start + jj;
                let (w0, w1) = (&w[j * k..(j + 1) * k], &w[(j + 1) * k..(j + 2) * k]);
                let (b0, b1) = bias.map_or((0.0, 0.0), |b| (b[j], b[j + 1]));
                let mut i = 0;
                while i + 4 <= n {
                    let d = dot_4x2(&inp[i * k..(i + 4) * k], k, w0, w1);
                    for r in 0..4 {
                        acc[(i + r) * c + jj] = d[r][0] + b0;
                        acc[(i + r) * c + jj + 1] = d[r][1] + b1;
                    }
                    i += 4;
                }
                for i in i..n {
                    let x = &inp[i * k..(i + 1) * k];
                    acc[i * c + jj] = super::math::dot(x, w0) + b0;
                    acc[i * c + jj + 1] = super::math::dot(x, w1) + b1;
                }
                jj += 2;
            }
            if jj < c {
                let j = cols.start + jj;
                let wr = &w[j * k..(j + 1) * k];
                let b = bias.map_or(0.0, |b| b[j]);
                for i in 0..n {
                    acc[i * c + jj] = super::math::dot(&inp[i * k..(i + 1) * k], wr) + b;
                }
            }
            acc
        })
        .collect();
    for (blk, acc) in blocks.iter().enumerate() {
        let c0 = blk * block;
        let width = acc.len() / n.max(1);
        for i in 0..n {
            out[i * m + c0..i * m + c0 + width].copy_from_slice(&acc[i * width..(i + 1) * width]);
        }
    }
}

/// Dot products of four consecutive rows of `x` (`[4, k]`) with two weight rows: eight
/// independent accumulator chains, so the FMA units are kept busy instead of waiting on one
/// chain's latency.
#[inline(always)]
fn dot_4x2(x: &[f32], k: usize, w0: &[f32], w1: &[f32]) -> [[f32; 2]; 4] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        use std::arch::x86_64::*;
        assert!(x.len() >= 4 * k && w0.len() >= k && w1.len() >= k);
        let body = k / 8 * 8;
        // SAFETY: AVX2 and FMA are enabled at compile time (the cfg above); every load reads
        // 8 floats at offset t + 8 <= body <= k within slices checked to hold k (x: 4k) floats.
        unsafe {
            let (xp, p0, p1) = (x.as_ptr(), w0.as_ptr(), w1.as_ptr());
            let mut a = [_mm256_setzero_ps(); 8];
            let mut t = 0;
            while t < body {
                let (v0, v1) = (_mm256_loadu_ps(p0.add(t)), _mm256_loadu_ps(p1.add(t)));
                for r in 0..4 {
                    let xv = _mm256_loadu_ps(xp.add(r * k + t));
                    a[2 * r] = _mm256_fmadd_ps(xv, v0, a[2 * r]);
                    a[2 * r + 1] = _mm256_fmadd_ps(xv, v1, a[2 * r + 1]);
                }
                t += 8;
            }
            // the eight horizontal sums at once: pairwise adds, then the two 128-bit halves
            let u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
            let sums = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1));
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
            let mut out = [[0.0f32; 2]; 4];
            for r in 0..4 {
                out[r] = [lanes[2 * r], lanes[2 * r + 1]];
                if body < k {
                    for t in body..k {
                        out[r][0] += x[r * k + t] * w0[t];
                        out[r][1] += x[r * k + t] * w1[t];
                    }
                }
            }
            out
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    {
        let row = |r: usize| &x[r * k..(r + 1) * k];
        std::array::from_fn(|r| [super::math::dot(row(r), w0), super::math::dot(row(r), w1)])
    }
}

/// `dinp = dout @ w`, `dw += dout^T @ inp`, `dbias += colsum(dout)`.
#[allow(clippy::too_many_arguments)] // see Backend::matmul_bwd
pub fn matmul_bwd(
    dinp: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    m: usize,
) {
    if let Some(dinp) = dinp {
        strided(dinp, false, (n, k, m), k, dout, (m, 1), w, (k, 1));
    }
    if let Some(dw) = dw {
        strided(dw, true, (m, k, n), k, dout, (1, m), inp, (k, 1));
    }
    if let Some(db) = dbias {
        reduce_rows(n, m, &mut [db], |rows, acc| {
            for r in rows {
                for (a, d) in acc[0].iter_mut().zip(&dout[r * m..(r + 1) * m]) {
                    *a += d;
                }
            }
        });
    }
}

/// `out[r, off + j] (+)= scale * (t b^T)[r, j]`: LoRA's up-projection straight into its columns
/// (added when `add`).
#[allow(clippy::too_many_arguments)] // as Backend::lora_up
pub fn lora_up(out: &mut [f32], t: &[f32], b: &[f32], blk: ColBlock, rank: usize, scale: f32, add: bool) {
    if blk.rows == 0 || blk.width == 0 {
        return;
    }
    strided_scaled(&mut out[blk.off..], add, (blk.rows, blk.width, rank), blk.ld, t, (rank, 1), b, (1, rank), scale, parallelism());
}

/// `dt (+)= scale * dout[:, off..] b` (added when `add`) and `db += scale * dout[:, off..]^T t`.
#[allow(clippy::too_many_arguments)] // as Backend::lora_up_bwd
pub fn lora_up_bwd((dt, add): (&mut [f32], bool), db: Option<&mut [f32]>, dout: &[f32], t: &[f32], b: &[f32], blk: ColBlock, rank: usize, scale: f32) {
    if blk.rows == 0 || blk.width == 0 {
        // an empty sum: dt written as zeros (it has `rows` rows even when the block is empty)
        if !add {
            dt.fill(0.0);
        }
        return;
    }
    let g = &dout[blk.off..];
    strided_scaled(dt, add, (blk.rows, rank, blk.width), rank, g, (blk.ld, 1), b, (rank, 1), scale, parallelism());
    if let Some(db) = db {
        strided_scaled(db, true, (blk.width, rank, blk.rows), rank, g, (1, blk.ld), t, (rank, 1), scale, parallelism());
    }
}

/// `dx += dt a` and `da += dt^T x` (each when given).
#[allow(clippy::too_many_arguments)] // as Backend::lora_down_bwd
pub fn lora_down_bwd(dx: Option<&mut [f32]>, da: Option<&mut [f32]>, dt: &[f32], x: &[f32], a: &[f32], rows: usize, k: usize, rank: usize) {
    if let Some(dx) = dx {
        strided(dx, true, (rows, k, rank), k, dt, (rank, 1), a, (k, 1));
    }
    if let Some(da) = da {
        strided(da, true, (rank, k, rows), k, dt, (1, rank), x, (k, 1));
    }
}

/// `dst = w` (`[out, k]`), plus `scale * b a` on each part's rows: LoRA's merged weight, in one
/// pass over it (blocks of rows copied and then added to while they are in cache, each block's
/// products on one thread).
pub fn lora_merge(dst: &mut [f32], w: &[f32], parts: &[MergedPart<'_, Vec<f32>>], out: usize, k: usize) {
    const BLOCK: usize = 32;
    if k == 0 {
        return;
    }
    let blocks = dst[..out * k].par_chunks_mut(BLOCK * k).zip(w[..out * k].par_chunks(BLOCK * k));
    blocks.enumerate().for_each(|(i, (d, w))| {
        d.copy_from_slice(w);
        let (j0, j1) = (i * BLOCK, i * BLOCK + d.len() / k);
        for p in parts {
            let (lo, hi) = (p.off.max(j0), (p.off + p.cols).min(j1));
            if lo < hi {
                let b = &p.b[(lo - p.off) * p.r..];
                strided_scaled(&mut d[(lo - j0) * k..], true, (hi - lo, k, p.r), k, b, (p.r, 1), p.a, (k, 1), p.scale, Parallelism::None);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_lora_block_writes_zeros_or_adds_nothing() {
        let blk = ColBlock { rows: 3, width: 0, ld: 4, off: 4 };
        let (dout, t, b) = (vec![1.0; 12], vec![1.0; 6], vec![0.0; 0]);
        let mut dt = vec![7.0; 6];
        lora_up_bwd((&mut dt, true), None, &dout, &t, &b, blk, 2, 1.0);
        assert_eq!(dt, vec![7.0; 6]);
        lora_up_bwd((&mut dt, false), None, &dout, &t, &b, blk, 2, 1.0);
        assert_eq!(dt, vec![0.0; 6]);
    }

    fn naive(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
        // a[n,k] @ b[m,k]^T
        let mut out = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            }
        }
        out
    }

    fn rand_vec(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn forward_and_backward_match_naive() {
        let (n, k, m) = (37, 19, 23);
        let inp = rand_vec(n * k, 1);
        let w = rand_vec(m * k, 2);
        let bias = rand_vec(m, 3);
        let dout = rand_vec(n * m, 4);
        let mut out = vec![0.0; n * m];
        matmul_fwd(&mut out, &inp, &w, Some(&bias), n, k, m);
        let want = naive(&inp, &w, n, k, m);
        for i in 0..n * m {
            assert!((out[i] - want[i] - bias[i % m]).abs() < 1e-5);
        }
        let mut dinp = vec![0.0; n * k];
        let mut dw = vec![1.0; m * k];
        let mut db = vec![1.0; m];
        matmul_bwd(Some(&mut dinp), Some(&mut dw), Some(&mut db), &dout, &inp, &w, n, k, m);
        // dinp = dout @ w  ==  dout[n,m] @ (w^T)[k,m]^T
        let wt: Vec<f32> = (0..k * m).map(|i| w[(i % m) * k + i / m]).collect();
        let want = naive(&dout, &wt, n, m, k);
        assert!(dinp.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
        let doutt: Vec<f32> = (0..m * n).map(|i| dout[(i % n) * m + i / n]).collect();
        let inpt: Vec<f32> = (0..k * n).map(|i| inp[(i % n) * k + i / n]).collect();
        let want = naive(&doutt, &inpt, m, n, k);
        assert!(dw.iter().zip(&want).all(|(a, b)| (a - 1.0 - b).abs() < 1e-5));
        for j in 0..m {
            let s: f32 = (0..n).map(|r| dout[r * m + j]).sum();
            assert!((db[j] - 1.0 - s).abs() < 1e-5);
        }
    }

    #[test]
    fn the_few_rows_path_matches_naive() {
        // decoding batches take the matrix-vector path; widths not a multiple of its blocks
        for (n, k, m) in [(1, 37, 70), (3, 64, 33), (8, 19, 96), (16, 40, 31)] {
            let inp = rand_vec(n * k, 5);
            let w = rand_vec(m * k, 6);
            let bias = rand_vec(m, 7);
            let mut out = vec![f32::NAN; n * m];
            matmul_fwd(&mut out, &inp, &w, Some(&bias), n, k, m);
            let want = naive(&inp, &w, n, k, m);
            for i in 0..n * m {
                assert!((out[i] - want[i] - bias[i % m]).abs() < 1e-5, "n {n}: {} vs {}", out[i], want[i] + bias[i % m]);
            }
            matmul_fwd(&mut out, &inp, &w, None, n, k, m);
            assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
        }
    }
}
