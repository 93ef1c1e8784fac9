//! Matrix products through cuBLASLt: the operands (f32, or bf16 copies in bf16 mode, the
//! weight's working copy when the fused AdamW step left one) and the forward and backward
//! products with the bias epilogue and the bias gradient.
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::blas::{Gemm, Ty};
use super::optim::AdamWTables;
use super::{device_error, Cuda, A};
use crate::backend::{Activation, Backend};

/// Scratch buffers reused across ops (grow-only): bf16 copies of matrix-product and attention
/// operands, the attention backward's row sums, the squared-norm partials.
pub(super) struct Scratch {
    pub(super) bf16: [CudaSlice<u16>; 3],
    pub(super) delta: CudaSlice<f32>,
    pub(super) partial: CudaSlice<f64>,
    pub(super) adamw: Option<AdamWTables>,
    /// A product's output with padded rows (`crate::backend::aligned_ld`).
    pub(super) padded: CudaSlice<f32>,
    /// The row-block partials of the column sums (`reduce_cols`).
    pub(super) colsum: CudaSlice<f32>,
    /// The (address, length) tables of the multi-tensor fill and sum of squares, as last uploaded.
    pub(super) tables: [Option<(Vec<u64>, CudaSlice<u64>)>; 2],
}

impl Cuda {
    /// `buf`, a grow-only scratch buffer, grown to at least `n` values; its pointer, or 0 after a
    /// failure (nothing runs after a failure, so the pointer is never used).
    pub(super) fn grown<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, buf: &mut CudaSlice<T>, n: usize) -> u64 {
        if buf.len() < n {
            match self.alloc::<T>(n) {
                Ok(b) => *buf = b,
                Err(e) => {
                    self.fail(e);
                    return 0;
                }
            }
        }
        self.ptr(buf)
    }

    /// Rounds `src` to bf16 into scratch slot `slot` (grown as needed); returns its pointer.
    pub(super) fn bf16_copy(&self, scratch: &mut Scratch, slot: usize, src: &CudaSlice<f32>) -> u64 {
        let n = src.len();
        let dst = self.grown(&mut scratch.bf16[slot], n);
        // four values per thread
        self.launch_n("cast_f32_bf16", n.div_ceil(4), &[A::P(dst), self.p(src), A::L(n as i64)]);
        dst
    }

    /// Rounds the `[rows, cols]` matrix `src` to bf16 into scratch slot `slot` with rows of stride
    /// `ld` (see [`crate::backend::aligned_ld`]); returns its pointer.
    fn bf16_copy_rows(&self, scratch: &mut Scratch, slot: usize, src: &CudaSlice<f32>, rows: usize, cols: usize, ld: usize) -> u64 {
        let dst = self.grown(&mut scratch.bf16[slot], rows * ld);
        let src_p = self.ptr(src);
        // rows go on the grid's y axis (at most 65535): taller matrices go in slices of rows
        for r0 in (0..rows).step_by(65535) {
            let r = (rows - r0).min(65535);
            let args = [A::P(dst + (r0 * ld * 2) as u64), A::P(src_p + (r0 * cols * 4) as u64), A::I(cols as i32), A::L(ld as i64)];
            self.launch("cast_f32_bf16_rows", (cols.div_ceil(1024).min(65535) as u32, r as u32, 1), (256, 1, 1), &args);
        }
        dst
    }

    /// The operand pointers for a product: the f32 buffers, or bf16 copies in bf16 mode (the
    /// weight's working copy when there is one: `weight` is the index of the weight operand). An
    /// operand that `need` says no product reads is not cast (its pointer is 0).
    pub(super) fn operands<const N: usize>(&self, scratch: &mut Scratch, bufs: [&CudaSlice<f32>; N], weight: usize, need: [bool; N]) -> ([u64; N], Ty) {
        let mut out = [0u64; N];
        for (i, b) in bufs.iter().enumerate().filter(|(i, _)| need[*i]) {
            out[i] = if self.0.bf16 {
                match (i == weight).then(|| self.weight_copy(b)).flatten().or_else(|| self.held_copy(b)).or_else(|| self.reused_copy(b)) {
                    Some(p) => p,
                    None => self.bf16_copy(scratch, i, b),
                }
            } else {
                self.ptr(b)
            };
        }
        (out, if self.0.bf16 { Ty::Bf16 } else { Ty::F32 })
    }

    pub(super) fn gemm(&self, g: Gemm) {
        if self.failed() {
            return;
        }
        // SAFETY: the callers derive every pointer and leading dimension from buffers whose sizes
        // the op's contract fixes.
        if let Err(e) = unsafe { self.0.lt.gemm(&self.0.stream, &g) } {
            self.fail(device_error("matmul", e));
        }
    }

    pub(super) fn matmul_fwd_op(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ([w_p, inp_p], ty) = self.operands(&mut scratch, [w, inp], 0, [true, true]);
        if self.held_only_product(out, w_p, inp_p, bias, (n, k, m)) {
            return;
        }
        // rows of a misaligned width are written padded, then copied out
        let ld = crate::backend::aligned_ld(m);
        let d = if ld == m { self.ptr(out) } else { self.grown(&mut scratch.padded, n * ld) };
        self.product_into(d, ld, w_p, inp_p, bias.map(|b| self.ptr(b)), (n, k, m), ty);
        if ld != m {
            let args = [self.p(out), A::P(d), A::L(n as i64), A::I(m as i32), A::I(ld as i32), A::I(0), A::F(1.0)];
            self.launch_n("take_cols_f32", (n * m).div_ceil(4), &args);
        }
    }

    /// `Backend::matmul_fwd_add`: for a width that is a multiple of 8, one product whose epilogue
    /// adds the skip connection (`out = (res + inp w^T) + bias`, `res` as cuBLASLt's `C` with
    /// beta 1), so no addition pass reads the branch's output again; otherwise the product, then
    /// the addition.
    pub(super) fn matmul_fwd_add_op(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        res: &CudaSlice<f32>,
        (n, k, m): (usize, usize, usize),
    ) {
        if crate::backend::aligned_ld(m) != m {
            self.matmul_fwd_op(out, inp, w, bias, n, k, m);
            return self.add_assign(out, res);
        }
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ([w_p, inp_p], ty) = self.operands(&mut scratch, [w, inp], 0, [true, true]);
        drop(scratch);
        let (d, c) = (self.ptr(out), self.ptr(res));
        self.gemm(Gemm { c, beta: 1.0, bias: bias.map(|b| self.ptr(b)), ..Gemm::forward(w_p, inp_p, d, (n, k, m), ty) });
    }

    /// `d[n, m] (rows of stride ld) = inp w^T (+ bias)` from operand pointers. A misaligned width
    /// runs in two parts, the outputs up to the last multiple of 8 and the few after them, so that
    /// every operand of each part starts 16-byte aligned (see `aligned_split`).
    pub(super) fn product_into(&self, d: u64, ld: usize, w_p: u64, inp_p: u64, bias: Option<u64>, dims: (usize, usize, usize), ty: Ty) {
        self.product_into_as(d, ld, w_p, inp_p, bias, dims, ty, Ty::F32);
    }

    /// [`Cuda::product_into`] writing `d` as `out` (bf16: the LM head's logits in bf16 mode).
    pub(super) fn product_into_as(&self, d: u64, ld: usize, w_p: u64, inp_p: u64, bias: Option<u64>, (n, k, m): (usize, usize, usize), ty: Ty, out: Ty) {
        let esize = if ty == Ty::Bf16 { 2 } else { 4 };
        let dsize = if out == Ty::Bf16 { 2 } else { 4 };
        let (main, rest) = crate::backend::aligned_split(m);
        for (at, cols) in [(0, main), (main, rest)] {
            if cols == 0 {
                continue;
            }
            self.gemm(Gemm {
                transa: true,
                transb: false,
                m: cols as u64,
                n: n as u64,
                k: k as u64,
                a: w_p + (at * k * esize) as u64,
                lda: k as i64,
                b: inp_p,
                ldb: k as i64,
                d: d + (at * dsize) as u64,
                c: 0,
                ldd: ld as i64,
                ty,
                out,
                alpha: 1.0,
                beta: 0.0,
                bias: bias.map(|b| b + (at * 4) as u64),
            });
        }
    }

    pub(super) fn matmul_bwd_op(
        &self,
        dinp: Option<&mut CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        dbias: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        self.products_bwd(dinp, 0.0, dw, dbias, dout, None, inp, w, (n, k, m))
    }

    /// `Backend::act_matmul_bwd`. In bf16 mode the pass that writes the products' bf16 operand
    /// computes `dpre` on the way, and `dpre` is left unwritten: for GELU with a bias gradient,
    /// the column-sum pass (`gelu_bwd_colsum_cast_partials`); for SwiGLU without one,
    /// `swiglu_bwd_bf16` instead of the cast. Otherwise the activation's kernel writes `dpre`
    /// first.
    #[allow(clippy::too_many_arguments)] // as Backend::act_matmul_bwd
    pub(super) fn act_matmul_bwd_op(
        &self,
        act: Activation,
        dinp: Option<&mut CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        dbias: Option<&mut CudaSlice<f32>>,
        dpre: &mut CudaSlice<f32>,
        (dact, pre): (&CudaSlice<f32>, &CudaSlice<f32>),
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        nkm: (usize, usize, usize),
    ) {
        let (colsum, cast) = self.operand_pass(Some(act), dinp.is_some() || dw.is_some(), dbias.is_some(), dpre);
        if colsum || cast {
            return self.products_bwd(dinp, 0.0, dw, dbias, dpre, Some((act, pre, dact)), inp, w, nkm);
        }
        match act {
            Activation::Gelu => self.gelu_bwd(dpre, pre, dact),
            Activation::SwiGlu { intermediate } => self.swiglu_bwd(dpre, pre, dact, intermediate),
        }
        self.products_bwd(dinp, 0.0, dw, dbias, dpre, None, inp, w, nkm)
    }

    /// How a backward pass makes the bf16 operand of `dout` (in bf16 mode, with a product to
    /// compute, unless `dout` has a shared copy already): `colsum`, in one pass with the bias
    /// gradient's column sums (for GELU computing the gradient through it on the way); `cast`,
    /// by SwiGLU's backward kernel without a bias (`swiglu_bwd_bf16`). Neither: a cast pass.
    fn operand_pass(&self, act: Option<Activation>, products: bool, bias: bool, dout: &CudaSlice<f32>) -> (bool, bool) {
        let pass = self.0.bf16 && products && !self.named_for_reuse(dout);
        let swiglu = matches!(act, Some(Activation::SwiGlu { .. }));
        (pass && bias && !swiglu, pass && !bias && swiglu)
    }

    /// [`Cuda::matmul_bwd_op`] with `dinp = dout @ w + dinp_beta * dinp` (1: accumulated), and
    /// with `act = Some((act, pre, dact))` `dout` the gradient through that activation, computed
    /// in the pass that writes the bf16 operand (only when [`Cuda::operand_pass`] says so;
    /// `dout` is then not read).
    #[allow(clippy::too_many_arguments)] // a backward pass's operands
    pub(super) fn products_bwd(
        &self,
        dinp: Option<&mut CudaSlice<f32>>,
        dinp_beta: f32,
        dw: Option<&mut CudaSlice<f32>>,
        dbias: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        act: Option<(Activation, &CudaSlice<f32>, &CudaSlice<f32>)>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        (n, k, m): (usize, usize, usize),
    ) {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        // a frozen weight's input gradient reads no input, a weight gradient alone no weight
        let need = [dinp.is_some() || dw.is_some(), dinp.is_some(), dw.is_some()];
        // in bf16 mode, the output gradient of a misaligned width is cast into padded rows (the
        // cast pass is needed anyway; see `aligned_ld`)
        let ld = if self.0.bf16 { crate::backend::aligned_ld(m) } else { m };
        // in bf16 mode with a bias, one read of dout gives both its bf16 operand and the bias
        // gradient's column sums (unless dout has a shared copy already); see operand_pass
        let (fused, act_cast) = self.operand_pass(act.map(|a| a.0), need[0], dbias.is_some(), dout);
        debug_assert!(act.is_none() || fused || act_cast, "an activation's gradient is only computed in the operand pass");
        let ([mut dout_p, w_p, inp_p], ty) = self.operands(&mut scratch, [dout, w, inp], 1, [need[0] && ld == m && !fused && !act_cast, need[1], need[2]]);
        let colsum_args = [self.p(dout), A::I(n as i32), A::I(m as i32)];
        if let (true, Some(db)) = (fused, dbias.as_deref()) {
            dout_p = self.grown(&mut scratch.bf16[0], n * ld);
            let (rows, cols, ld) = (colsum_args[1], colsum_args[2], A::L(ld as i64));
            match act {
                Some((_, pre, dact)) => {
                    let ((x16, pre), (d16, dact)) = (self.held_input(pre, "_x16"), self.held_input(dact, "_d16"));
                    let args = [pre, dact, A::P(dout_p), rows, cols, ld];
                    self.reduce_cols(&mut scratch, &format!("gelu_bwd_colsum_cast_partials{x16}{d16}"), [self.ptr(db), 0], (n, m), &args)
                }
                None => self.reduce_cols(&mut scratch, "colsum_cast_partials", [self.ptr(db), 0], (n, m), &[colsum_args[0], A::P(dout_p), rows, cols, ld]),
            }
        } else if let Some((Activation::SwiGlu { intermediate }, pre, dact)) = act {
            dout_p = self.grown(&mut scratch.bf16[0], n * ld);
            let ((x16, pre), (d16, dact)) = (self.held_input(pre, "_x16"), self.held_input(dact, "_d16"));
            let args = [A::P(dout_p), A::L(ld as i64), pre, dact, A::L(n as i64), A::I(intermediate as i32)];
            self.launch_n(&format!("swiglu_bwd_bf16{x16}{d16}"), (n * intermediate).div_ceil(4), &args);
        } else if need[0] && ld != m {
            dout_p = self.bf16_copy_rows(&mut scratch, 0, dout, n, m, ld);
        }
        // an input gradient held `only` (Backend::hold_operand_only) and overwritten by one
        // product: written as its bf16 copy alone; one accumulated into gets its f32 values first
        let dinp = match dinp {
            Some(d) if ty == Ty::Bf16 && dinp_beta == 0.0 && ld == m && self.held_only_gemm(d, Gemm::input_grad(w_p, dout_p, ld, (n, k, m), ty)) => None,
            Some(d) => {
                if dinp_beta != 0.0 {
                    self.widen_held(d);
                }
                Some((self.ptr(d), dinp_beta))
            }
            None => None,
        };
        self.products_from(dinp, dw.map(|d| self.ptr(d)), dout_p, ld, inp_p, w_p, (n, k, m), ty);
        if let (false, Some(db)) = (fused, dbias) {
            self.reduce_cols(&mut scratch, "colsum_partials", [self.ptr(db), 0], (n, m), &colsum_args);
        }
    }

    /// The backward products from operand pointers: `dinp = dout w + beta * dinp` and `dw +=
    /// dout^T inp`, each when given, with `dout` in rows of stride `ld` (over padded rows, the sum
    /// over the outputs in two aligned parts, as the forward).
    pub(super) fn products_from(
        &self,
        dinp: Option<(u64, f32)>,
        dw: Option<u64>,
        dout_p: u64,
        ld: usize,
        inp_p: u64,
        w_p: u64,
        (n, k, m): (usize, usize, usize),
        ty: Ty,
    ) {
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let esize = if ty == Ty::Bf16 { 2 } else { 4 };
        if let Some((d, dinp_beta)) = dinp {
            let (main, rest) = if ld == m { (m, 0) } else { crate::backend::aligned_split(m) };
            for (at, len, beta) in [(0, main, dinp_beta), (main, rest, 1.0)] {
                if len == 0 {
                    continue;
                }
                let g = Gemm::input_grad(w_p + (at * k * esize) as u64, dout_p + (at * esize) as u64, ld, (n, k, len), ty);
                self.gemm(Gemm { d, beta, ..g });
            }
        }
        if let Some(d) = dw {
            self.gemm(Gemm {
                transa: false,
                transb: true,
                m: k64,
                n: m64,
                k: n64,
                a: inp_p,
                lda: k as i64,
                b: dout_p,
                ldb: ld as i64,
                d,
                c: 0,
                ldd: k as i64,
                ty,
                out: Ty::F32,
                alpha: 1.0,
                beta: 1.0,
                bias: None,
            });
        }
    }
}
