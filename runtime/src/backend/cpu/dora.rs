//! DoRA's ops (PEFT's `DoraLinearLayer`): the weight norm of `W + scale * B A` per output row, the
//! magnitude-rescaled output, and its backward pass. The CUDA twins are in `kernels/dora.cu`,
//! with the same per-element order of operations.

use rayon::prelude::*;

use super::math::reduce_rows;
use crate::backend::ColBlock;

/// `n[j] = ||w[off + j, :] + scale * (b a)[j, :]||`: each element in f32 (the rank summed in
/// order), the squares summed in f64 in column order.
#[allow(clippy::too_many_arguments)] // as Backend::dora_norm
pub fn norm(n: &mut [f32], w: &[f32], a: &[f32], b: &[f32], off: usize, cols: usize, k: usize, r: usize, scale: f32) {
    n[..cols].par_iter_mut().enumerate().for_each(|(j, out)| {
        let row = &w[(off + j) * k..(off + j + 1) * k];
        let bj = &b[j * r..(j + 1) * r];
        let mut acc = 0.0f64;
        for (i, &wi) in row.iter().enumerate() {
            let mut ba = 0.0f32;
            for (q, &bq) in bj.iter().enumerate() {
                ba += bq * a[q * k + i];
            }
            let v = wi + scale * ba;
            acc += v as f64 * v as f64;
        }
        *out = acc.sqrt() as f32;
    });
}

/// `out[r, off + j] += (s - 1) * base + s * (scale * u[r, j])`, `s = m[j] / n[j]`, `base` the
/// base output without bias (`None`: `out - bias[off + j]`).
#[allow(clippy::too_many_arguments)] // as Backend::dora_fwd
pub fn fwd(out: &mut [f32], base: Option<&[f32]>, bias: Option<&[f32]>, u: &[f32], m: &[f32], n: &[f32], blk: ColBlock, scale: f32) {
    let ColBlock { rows, width, ld, off } = blk;
    if rows == 0 || width == 0 {
        return;
    }
    let s: Vec<f32> = (0..width).map(|j| m[j] / n[j]).collect();
    out[..rows * ld].par_chunks_mut(ld).enumerate().for_each(|(r, o)| {
        for j in 0..width {
            let y = o[off + j];
            let bv = match base {
                Some(b) => b[r * ld + off + j],
                None => y - bias.map_or(0.0, |b| b[off + j]),
            };
            o[off + j] = y + ((s[j] - 1.0) * bv + s[j] * (scale * u[r * width + j]));
        }
    });
}

/// The backward pass of [`fwd`] (see `Backend::dora_bwd`).
#[allow(clippy::too_many_arguments)] // as Backend::dora_bwd
pub fn bwd(
    dm: Option<(&mut [f32], &[f32], &[f32])>,
    gu: Option<&mut [f32]>,
    gb: Option<(&mut [f32], f32)>,
    dout: &[f32],
    m: &[f32],
    n: &[f32],
    blk: ColBlock,
    scale: f32,
) {
    let ColBlock { rows, width, ld, off } = blk;
    if rows == 0 || width == 0 {
        return;
    }
    if let Some((dm, base, u)) = dm {
        reduce_rows(rows, width, &mut [&mut dm[..width]], |range, acc| {
            for r in range {
                for j in 0..width {
                    let g = dout[r * ld + off + j];
                    acc[0][j] += g * (base[r * ld + off + j] + scale * u[r * width + j]) / n[j];
                }
            }
        });
    }
    let s: Vec<f32> = (0..width).map(|j| m[j] / n[j]).collect();
    if let Some(gu) = gu {
        gu[..rows * width].par_chunks_mut(width).enumerate().for_each(|(r, o)| {
            for (j, o) in o.iter_mut().enumerate() {
                *o = (scale * s[j]) * dout[r * ld + off + j];
            }
        });
    }
    if let Some((gb, shift)) = gb {
        gb[..rows * ld].par_chunks_mut(ld).enumerate().for_each(|(r, o)| {
            for j in 0..width {
                o[off + j] = (s[j] - shift) * dout[r * ld + off + j];
            }
        });
    }
}
