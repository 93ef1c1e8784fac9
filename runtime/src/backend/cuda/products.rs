//! Matrix products through cuBLASLt: the operands (f32, or bf16 copies in bf16 mode, the
//! weight's working copy when the fused AdamW step left one) and the forward and backward
//! products with the bias epilogue and the bias gradient.
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::blas::{Gemm, Ty};
use super::{device_error, Cuda, Scratch, A};

impl Cuda {
    /// Rounds `src` to bf16 into scratch slot `slot` (grown as needed); returns its pointer.
    pub(super) fn bf16_copy(&self, scratch: &mut Scratch, slot: usize, src: &CudaSlice<f32>) -> u64 {
        let n = src.len();
        if scratch.bf16[slot].len() < n {
            match self.alloc::<u16>(n) {
                Ok(b) => scratch.bf16[slot] = b,
                // nothing runs after a failure, so the pointer is never used
                Err(e) => {
                    self.fail(e);
                    return 0;
                }
            }
        }
        let dst = self.ptr(&scratch.bf16[slot]);
        self.launch_n("cast_f32_bf16", n, &[A::P(dst), self.p(src), A::L(n as i64)]);
        dst
    }

    /// The bf16 working copy of a parameter, when the last write to it was the fused AdamW step.
    ///
    /// An entry is written by `adamw_multi` together with its parameter. Any other write drops it:
    /// `copy`, `fill` and `scale` drop their destination's entry, and `zeros` and `upload` drop
    /// every entry, because they are how a parameter buffer comes to exist and a new buffer may
    /// reuse a freed parameter's address. The copy equals what the cast kernel would produce
    /// (both round to nearest even), so a hit changes the speed, never the numbers.
    pub(super) fn weight_copy(&self, w: &CudaSlice<f32>) -> Option<u64> {
        let map = self.0.weights16.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&self.ptr(w)).filter(|c| c.len() == w.len()).map(|c| self.ptr(c))
    }

    pub(super) fn forget_weight(&self, buf: &CudaSlice<f32>) {
        if self.0.bf16 {
            self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.ptr(buf));
        }
    }

    pub(super) fn forget_all_weights(&self) {
        if self.0.bf16 {
            self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// The operand pointers for a product: the f32 buffers, or bf16 copies in bf16 mode (the
    /// weight's working copy when there is one: `weight` is the index of the weight operand). An
    /// operand that `need` says no product reads is not cast (its pointer is 0).
    pub(super) fn operands<const N: usize>(&self, scratch: &mut Scratch, bufs: [&CudaSlice<f32>; N], weight: usize, need: [bool; N]) -> ([u64; N], Ty) {
        let mut out = [0u64; N];
        for (i, b) in bufs.iter().enumerate().filter(|(i, _)| need[*i]) {
            out[i] = if self.0.bf16 {
                match (i == weight).then(|| self.weight_copy(b)).flatten() {
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
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let bias = bias.map(|b| self.ptr(b));
        let d = self.ptr(out);
        self.gemm(Gemm {
            transa: true,
            transb: false,
            m: m64,
            n: n64,
            k: k64,
            a: w_p,
            lda: k as i64,
            b: inp_p,
            ldb: k as i64,
            d,
            ldd: m as i64,
            ty,
            beta: 0.0,
            bias,
        });
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
        self.products_bwd(dinp, 0.0, dw, dbias, dout, inp, w, n, k, m)
    }

    /// [`Cuda::matmul_bwd_op`] with `dinp = dout @ w + dinp_beta * dinp` (1: accumulated).
    pub(super) fn products_bwd(
        &self,
        dinp: Option<&mut CudaSlice<f32>>,
        dinp_beta: f32,
        dw: Option<&mut CudaSlice<f32>>,
        dbias: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        // a frozen weight's input gradient reads no input, a weight gradient alone no weight
        let need = [dinp.is_some() || dw.is_some(), dinp.is_some(), dw.is_some()];
        let ([dout_p, w_p, inp_p], ty) = self.operands(&mut scratch, [dout, w, inp], 1, need);
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        if let Some(dinp) = dinp {
            let d = self.ptr(dinp);
            self.gemm(Gemm {
                transa: false,
                transb: false,
                m: k64,
                n: n64,
                k: m64,
                a: w_p,
                lda: k as i64,
                b: dout_p,
                ldb: m as i64,
                d,
                ldd: k as i64,
                ty,
                beta: dinp_beta,
                bias: None,
            });
        }
        if let Some(dw) = dw {
            let d = self.ptr(dw);
            self.gemm(Gemm {
                transa: false,
                transb: true,
                m: k64,
                n: m64,
                k: n64,
                a: inp_p,
                lda: k as i64,
                b: dout_p,
                ldb: m as i64,
                d,
                ldd: k as i64,
                ty,
                beta: 1.0,
                bias: None,
            });
        }
        if let Some(db) = dbias {
            self.launch("colsum_acc", (m.div_ceil(32) as u32, 1, 1), (32, 8, 1), &[self.p(db), self.p(dout), A::I(n as i32), A::I(m as i32)]);
        }
    }
}
