//! Scalar building blocks written so that LLVM vectorises the loops that call them: a branch-free
//! `exp` (a polynomial and an exponent-bit shift, about 1 ulp), and dot/axpy with split accumulators.

/// `e^x` for f32, accurate to about 2 ulp on the whole range; 0 below -87.3 (where `e^x` leaves
/// f32's normal range: no subnormal result, whose arithmetic is slow on x86, ever comes out) and
/// about 1.6e38 above 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let normal = (x >= -87.3) as u8 as f32;
    let x = x.clamp(-87.3, 88.0);
    // n = round(x / ln 2) with the 1.5 * 2^23 trick: adding it leaves n in the low mantissa bits,
    // so both the float n and the integer n come without a rounding call or a float-to-int cast
    // (Rust's saturating cast would keep the loop from vectorising)
    let t = x * LOG2E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    // exp(r) on [-ln2/2, ln2/2], Cephes' expf polynomial
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((ni + 127) as u32) << 23) * normal
}

/// `tanh(x) = 1 - 2 / (e^{2x} + 1)`.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Dot product with eight independent accumulators.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Sum with eight independent accumulators (so the loop vectorises).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut c = x.chunks_exact(8);
    for v in &mut c {
        for i in 0..8 {
            acc[i] += v[i];
        }
    }
    let tail: f32 = c.remainder().iter().sum();
    tail + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Maximum with eight independent lanes (`-inf` for an empty slice; NaN is not propagated).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut c = x.chunks_exact(8);
    for v in &mut c {
        for i in 0..8 {
            acc[i] = if v[i] > acc[i] { v[i] } else { acc[i] };
        }
    }
    let m = c.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    acc.iter().fold(m, |m, &v| if v > m { v } else { m })
}

/// `sum(exp(x - shift))`, optionally storing each `exp(x - shift)` back into `x`.
#[inline(always)]
pub fn sum_exp<const STORE: bool>(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut c = x.chunks_exact_mut(8);
    for v in &mut c {
        for i in 0..8 {
            let e = exp(v[i] - shift);
            if STORE {
                v[i] = e;
            }
            acc[i] += e;
        }
    }
    let mut tail = 0.0;
    for v in c.into_remainder() {
        let e = exp(*v - shift);
        if STORE {
            *v = e;
        }
        tail += e;
    }
    tail + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `sum(exp(x - shift))` and `sum(exp(x - shift) * x)` of a read-only row, eight lanes each.
#[inline(always)]
pub fn sum_exp_ro<const TIMES_X: bool>(x: &[f32], shift: f32) -> (f32, f32) {
    let (mut acc, mut accx) = ([0.0f32; 8], [0.0f32; 8]);
    let mut c = x.chunks_exact(8);
    for v in &mut c {
        for i in 0..8 {
            let e = exp(v[i] - shift);
            acc[i] += e;
            if TIMES_X {
                accx[i] += e * v[i];
            }
        }
    }
    let (mut tail, mut tailx) = (0.0, 0.0);
    for &v in c.remainder() {
        let e = exp(v - shift);
        tail += e;
        tailx += e * v;
    }
    let fold = |a: [f32; 8]| ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    (tail + fold(acc), if TIMES_X { tailx + fold(accx) } else { 0.0 })
}

/// `y += a * x`.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// A raw pointer that may cross threads. Used where parallel tasks write provably disjoint parts
/// of one buffer (e.g. the heads of a fused attention activation); each use says why it is disjoint.
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// `off..off + len` must be in bounds and not aliased by any other live slice.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // the caller guarantees disjointness, see the type's comment
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }

    /// The pointer `off` elements in (a method, so closures capture the `Sync` wrapper).
    ///
    /// # Safety
    /// `off` must be in bounds.
    #[inline(always)]
    pub unsafe fn at(&self, off: usize) -> *mut f32 {
        self.0.add(off)
    }
}

/// Sums per-block partial vectors in a fixed order: rows are split into a fixed number of blocks
/// (independent of the thread count), so the result is the same on any machine.
pub fn reduce_rows<F>(rows: usize, width: usize, outs: &mut [&mut [f32]], f: F)
where
    F: Fn(std::ops::Range<usize>, &mut [Vec<f32>]) + Sync,
{
    use rayon::prelude::*;
    const BLOCKS: usize = 16;
    let per = rows.div_ceil(BLOCKS).max(1);
    let n_out = outs.len();
    let partials: Vec<Vec<Vec<f32>>> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![vec![0.0f32; width]; n_out];
            f(b * per..((b + 1) * per).min(rows), &mut acc);
            acc
        })
        .collect();
    for part in &partials {
        for (o, p) in outs.iter_mut().zip(part) {
            for (o, p) in o.iter_mut().zip(p) {
                *o += p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        // below -87.3 the result is 0, never a subnormal (slow on x86)
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(-87.31), 0.0);
        assert!(exp(-87.3).is_normal());
        let mut x = -120.0f32;
        while x < -80.0 {
            let e = exp(x);
            assert!(e == 0.0 || e.is_normal(), "exp({x}) = {e:e}");
            x += 0.001;
        }
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn tanh_matches_std() {
        for i in -400..400 {
            let x = i as f32 * 0.05;
            assert!((tanh(x) - x.tanh()).abs() < 2e-7, "tanh({x})");
        }
    }
}
