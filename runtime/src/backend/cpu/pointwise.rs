//! Embedding lookup, activations (GELU tanh, SwiGLU) and residual adds on the CPU.

use rayon::prelude::*;

use super::math::{exp, sigmoid, tanh};

const ROWS_PER_TASK: usize = 16;

pub fn embedding_fwd(out: &mut [f32], ids: &[i32], wte: &[f32], wpe: Option<(&[f32], &[i32])>, c: usize) {
    out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let id = ids[r] as usize;
        o.copy_from_slice(&wte[id * c..(id + 1) * c]);
        if let Some((wpe, pos)) = wpe {
            let p = pos[r] as usize;
            for (o, w) in o.iter_mut().zip(&wpe[p * c..(p + 1) * c]) {
                *o += w;
            }
        }
    });
}

/// Scatter-add in row order (a negative index adds nothing). Columns are split between threads,
/// so each output element is summed in the same order whatever the thread count.
pub fn embedding_bwd(dwte: &mut [f32], dwpe: Option<(&mut [f32], &[i32])>, ids: &[i32], dout: &[f32], c: usize) {
    fn scatter(dst: &mut [f32], idx: &[i32], dout: &[f32], c: usize) {
        const COLS: usize = 64;
        let dst_ptr = super::math::SharedMut(dst.as_mut_ptr());
        (0..c.div_ceil(COLS)).into_par_iter().for_each(|blk| {
            let (c0, c1) = (blk * COLS, ((blk + 1) * COLS).min(c));
            for (r, &i) in idx.iter().enumerate().filter(|(_, &i)| i >= 0) {
                // SAFETY: task `blk` alone writes columns c0..c1 of every row.
                let d = unsafe { dst_ptr.slice(i as usize * c + c0, c1 - c0) };
                for (d, g) in d.iter_mut().zip(&dout[r * c + c0..r * c + c1]) {
                    *d += g;
                }
            }
        });
    }
    scatter(dwte, ids, dout, c);
    if let Some((dwpe, pos)) = dwpe {
        scatter(dwpe, pos, dout, c);
    }
}

pub(super) const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
pub(super) const GELU_C: f32 = 0.044_715;

pub fn gelu_fwd(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = 0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_C * x * x * x)));
        }
    });
}

pub fn gelu_bwd(dx: &mut [f32], x: &[f32], dout: &[f32]) {
    dx.par_chunks_mut(4096).zip(x.par_chunks(4096)).zip(dout.par_chunks(4096)).for_each(|((dx, x), d)| {
        for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(d) {
            let u = GELU_K * (x + GELU_C * x * x * x);
            let t = tanh(u);
            let sech2 = 1.0 - t * t;
            let grad = 0.5 * (1.0 + t) + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * GELU_C * x * x);
            *dx = grad * d;
        }
    });
}

pub fn swiglu_fwd(out: &mut [f32], x: &[f32], i: usize) {
    out.par_chunks_mut(i * ROWS_PER_TASK).zip(x.par_chunks(2 * i * ROWS_PER_TASK)).for_each(|(o, x)| {
        for (o, x) in o.chunks_exact_mut(i).zip(x.chunks_exact(2 * i)) {
            let (gate, up) = x.split_at(i);
            for k in 0..i {
                let g = gate[k];
                o[k] = g * sigmoid(g) * up[k];
            }
        }
    });
}

pub fn swiglu_bwd(dx: &mut [f32], x: &[f32], dout: &[f32], i: usize) {
    let n = 2 * i * ROWS_PER_TASK;
    dx.par_chunks_mut(n).zip(x.par_chunks(n)).zip(dout.par_chunks(i * ROWS_PER_TASK)).for_each(|((dx, x), d)| {
        for ((dx, x), d) in dx.chunks_exact_mut(2 * i).zip(x.chunks_exact(2 * i)).zip(d.chunks_exact(i)) {
            let (gate, up) = x.split_at(i);
            let (dgate, dup) = dx.split_at_mut(i);
            for k in 0..i {
                let g = gate[k];
                let s = 1.0 / (1.0 + exp(-g));
                let silu = g * s;
                dup[k] = d[k] * silu;
                dgate[k] = d[k] * up[k] * s * (1.0 + g * (1.0 - s));
            }
        }
    });
}

/// Dropout in place (see [`crate::backend::dropout_keep`]).
pub fn dropout(x: &mut [f32], mask: crate::backend::DropoutMask) {
    x.par_chunks_mut(4096).enumerate().for_each(|(c, chunk)| {
        for (j, v) in chunk.iter_mut().enumerate() {
            let i = (c * 4096 + j) as u64;
            *v = if crate::backend::dropout_keep(mask.key, i, mask.threshold) { *v * mask.scale } else { 0.0 };
        }
    });
}

/// `dst[r, off + j] += scale * src[r, j]` over `rows` rows of `dst` (`ld` wide) and `src`
/// (`width` wide); the product is rounded before the sum, as the CUDA kernel does.
pub fn add_cols(dst: &mut [f32], src: &[f32], rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
    if rows == 0 || width == 0 {
        return;
    }
    let per = rows_per_task(width);
    dst[..rows * ld].par_chunks_mut(ld * per).zip(src[..rows * width].par_chunks(width * per)).for_each(|(d, s)| {
        for (d, s) in d.chunks_mut(ld).zip(s.chunks(width)) {
            for (d, s) in d[off..off + width].iter_mut().zip(s) {
                *d += scale * s;
            }
        }
    });
}

/// `dst[r, j] = scale * src[r, off + j]`.
pub fn take_cols(dst: &mut [f32], src: &[f32], rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
    if rows == 0 || width == 0 {
        return;
    }
    let per = rows_per_task(width);
    dst[..rows * width].par_chunks_mut(width * per).zip(src[..rows * ld].par_chunks(ld * per)).for_each(|(d, s)| {
        for (d, s) in d.chunks_mut(width).zip(s.chunks(ld)) {
            for (d, s) in d.iter_mut().zip(&s[off..off + width]) {
                *d = scale * s;
            }
        }
    });
}

/// Rows per parallel task of the column-block ops: about 16K elements each.
fn rows_per_task(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst[..src.len()].par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d += s;
        }
    });
}

pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(4096).zip(a.par_chunks(4096)).zip(b.par_chunks(4096)).for_each(|((o, a), b)| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::backend::DropoutMask;

    /// Over many elements dropout keeps 1 - p of them and leaves the expectation unchanged; the
    /// mask is a function of the key (the same with 1 and 2 threads, another for another key).
    #[test]
    fn dropout_keeps_the_expected_share_and_the_mean() {
        let n = 1 << 20;
        for p in [0.1f32, 0.5, 0.9] {
            let mut x = vec![1.0f32; n];
            super::dropout(&mut x, DropoutMask::new(p, 12345));
            let kept = x.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((kept - (1.0 - p as f64)).abs() < 0.003, "p {p}: kept {kept}");
            assert!((mean - 1.0).abs() < 0.01 + 0.01 * p as f64 / (1.0 - p as f64), "p {p}: mean {mean}");
        }
        let masked = |threads: usize, key: u64| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut x: Vec<f32> = (0..100_003).map(|i| i as f32).collect();
                super::dropout(&mut x, DropoutMask::new(0.3, key));
                x
            })
        };
        assert_eq!(masked(1, 7), masked(2, 7));
        assert_ne!(masked(2, 7), masked(2, 8));
        let mut z = vec![1.5f32; 1000];
        super::dropout(&mut z, DropoutMask::new(0.0, 3));
        assert!(z.iter().all(|&v| v == 1.5), "p = 0 changes nothing");
    }
}
