//! Matrix products on the CPU through the `gemm` crate (pure Rust, runtime CPU dispatch,
//! multi-threaded with rayon). Chosen over `matrixmultiply` by measurement at the model's shapes:
//! see `examples/gemm_choice.rs` and docs/BENCHMARKS.md. Strides express the transposes, so no
//! operand is ever copied.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::math::reduce_rows;

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst[m, n] (= or +=) lhs[m, k] @ rhs[k, n]` with explicit row/column strides.
#[allow(clippy::too_many_arguments)] // a strided GEMM's operands
fn strided(
    dst: &mut [f32],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    dst_rs: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
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
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// `out[n, m] = inp[n, k] @ w[m, k]^T + bias`.
pub fn matmul_fwd(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, k: usize, m: usize) {
    let out = &mut out[..n * m];
    if let Some(b) = bias {
        out.par_chunks_mut(m).for_each(|row| row.copy_from_slice(&b[..m]));
    }
    strided(out, bias.is_some(), (n, m, k), m, inp, (k, 1), w, (1, k));
}

/// `dinp = dout @ w`, `dw += dout^T @ inp`, `dbias += colsum(dout)`.
#[allow(clippy::too_many_arguments)] // see Backend::matmul_bwd
pub fn matmul_bwd(dinp: Option<&mut [f32]>, dw: &mut [f32], dbias: Option<&mut [f32]>, dout: &[f32], inp: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    if let Some(dinp) = dinp {
        strided(dinp, false, (n, k, m), k, dout, (m, 1), w, (k, 1));
    }
    strided(dw, true, (m, k, n), k, dout, (1, m), inp, (k, 1));
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

#[cfg(test)]
mod tests {
    use super::*;

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
        matmul_bwd(Some(&mut dinp), &mut dw, Some(&mut db), &dout, &inp, &w, n, k, m);
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
}
