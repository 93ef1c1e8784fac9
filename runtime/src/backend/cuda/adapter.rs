//! Adapters on the device: LoRA's up-projection into its columns of a map's output and its
//! backward pass (cuBLASLt products that read and write the column block in place), and DoRA (`kernels/dora.cu`): the weight norm of `W + scale B A` per
//! output row, the magnitude-rescaled output, and its backward pass.
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::blas::{Gemm, Ty};
use super::{Cuda, A};
use crate::backend::{Backend, ColBlock};

impl Cuda {
    /// `out[:, off..off + width] (+)= scale * t b^T`: one product written straight into the block's
    /// columns (`ldd` the map's width, accumulated with `beta = 1` when `add`).
    pub(super) fn lora_up_op(&self, out: &mut CudaSlice<f32>, t: &CudaSlice<f32>, b: &CudaSlice<f32>, blk: ColBlock, rank: usize, scale: f32, add: bool) {
        // nothing to do, as on the CPU (and no zero-size layout for cuBLASLt to refuse)
        if blk.rows == 0 || blk.width == 0 {
            return;
        }
        self.forget_weight(out);
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ([b_p, t_p], ty) = self.operands(&mut scratch, [b, t], 0, [true, true]);
        self.gemm(Gemm {
            transa: true,
            transb: false,
            m: blk.width as u64,
            n: blk.rows as u64,
            k: rank as u64,
            a: b_p,
            lda: rank as i64,
            b: t_p,
            ldb: rank as i64,
            d: self.ptr(out) + (blk.off * 4) as u64,
            c: 0,
            ldd: blk.ld as i64,
            ty,
            out: Ty::F32,
            alpha: scale,
            beta: if add { 1.0 } else { 0.0 },
            bias: None,
        });
    }

    /// With `g = scale * dout[:, off..off + width]`: `dt (+)= g b` and `db += g^T t`, each product
    /// reading the block's columns of `dout` in place (its bf16 copy in bf16 mode: the one the
    /// map's own backward product made when the caller named `dout` for reuse).
    pub(super) fn lora_up_bwd_op(
        &self,
        (dt, add): (&mut CudaSlice<f32>, bool),
        db: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        t: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        blk: ColBlock,
        rank: usize,
        scale: f32,
    ) {
        if blk.rows == 0 || blk.width == 0 {
            // as on the CPU: an empty sum, dt written as zeros
            if !add {
                Backend::fill(self, dt, 0.0);
            }
            return;
        }
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ([dout_p, b_p, t_p], ty) = self.operands(&mut scratch, [dout, b, t], 1, [true, true, db.is_some()]);
        let esize = if ty == Ty::Bf16 { 2 } else { 4 };
        let g_p = dout_p + (blk.off * esize) as u64;
        let (rows, width, r) = (blk.rows as u64, blk.width as u64, rank as u64);
        self.gemm(Gemm {
            transa: false,
            transb: false,
            m: r,
            n: rows,
            k: width,
            a: b_p,
            lda: rank as i64,
            b: g_p,
            ldb: blk.ld as i64,
            d: self.ptr(dt),
            c: 0,
            ldd: rank as i64,
            ty,
            out: Ty::F32,
            alpha: scale,
            beta: if add { 1.0 } else { 0.0 },
            bias: None,
        });
        if let Some(db) = db {
            self.gemm(Gemm {
                transa: false,
                transb: true,
                m: r,
                n: width,
                k: rows,
                a: t_p,
                lda: rank as i64,
                b: g_p,
                ldb: blk.ld as i64,
                d: self.ptr(db),
                c: 0,
                ldd: rank as i64,
                ty,
                out: Ty::F32,
                alpha: scale,
                beta: 1.0,
                bias: None,
            });
        }
    }

    pub(super) fn dora_norm_op(
        &self,
        n: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        off: usize,
        cols: usize,
        k: usize,
        r: usize,
        scale: f32,
    ) {
        if cols == 0 {
            return;
        }
        self.forget_weight(n);
        let args = [self.p(n), self.p(w), self.p(a), self.p(b), A::I(off as i32), A::I(k as i32), A::I(r as i32), A::F(scale)];
        self.launch("dora_norm", (cols as u32, 1, 1), (256, 1, 1), &args);
    }
    pub(super) fn dora_fwd_op(
        &self,
        out: &mut CudaSlice<f32>,
        base: Option<&CudaSlice<f32>>,
        bias: Option<&CudaSlice<f32>>,
        u: &CudaSlice<f32>,
        m: &CudaSlice<f32>,
        n: &CudaSlice<f32>,
        blk: ColBlock,
        scale: f32,
    ) {
        self.forget_weight(out);
        let g = [A::L(blk.rows as i64), A::I(blk.width as i32), A::I(blk.ld as i32), A::I(blk.off as i32), A::F(scale)];
        let args = [self.p(out), self.opt(base), self.opt(bias), self.p(u), self.p(m), self.p(n), g[0], g[1], g[2], g[3], g[4]];
        self.launch_n("dora_fwd", blk.rows * blk.width, &args);
    }
    pub(super) fn dora_bwd_op(
        &self,
        dm: Option<(&mut CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>)>,
        gu: Option<&mut CudaSlice<f32>>,
        gb: Option<(&mut CudaSlice<f32>, f32)>,
        dout: &CudaSlice<f32>,
        m: &CudaSlice<f32>,
        n: &CudaSlice<f32>,
        blk: ColBlock,
        scale: f32,
    ) {
        let (rows, width, ld, off) = (blk.rows, blk.width, blk.ld, blk.off);
        if let Some((dm, base, u)) = dm {
            self.forget_weight(dm);
            let args =
                [self.p(dout), self.p(base), self.p(u), self.p(n), A::I(rows as i32), A::I(width as i32), A::I(ld as i32), A::I(off as i32), A::F(scale)];
            let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
            self.reduce_cols(&mut scratch, "dora_dmag", [self.ptr(dm), 0], (rows, width), &args);
        }
        if gu.is_none() && gb.is_none() {
            return;
        }
        let gu = gu.map(|g| {
            self.forget_weight(g);
            self.p(g)
        });
        let (gb, shift) = gb.map_or((A::P(0), 0.0), |(g, s)| {
            self.forget_weight(g);
            (self.p(g), s)
        });
        let args = [
            gu.unwrap_or(A::P(0)),
            gb,
            A::F(shift),
            self.p(dout),
            self.p(m),
            self.p(n),
            A::L(rows as i64),
            A::I(width as i32),
            A::I(ld as i32),
            A::I(off as i32),
            A::F(scale),
        ];
        self.launch_n("dora_grads", rows * width, &args);
    }
}
