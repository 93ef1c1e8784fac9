//! The account's costs of the ops that run several launches or read held copies: a backward
//! pass's products with their operand pass, a norm's backward pass, the widening of a held copy.

use super::{Cost, Roofline, VBuf, NORM_FUSED_WIDTH};
use crate::backend::Activation;

impl Roofline {
    /// `matmul_bwd`'s launches (`act`: `act_matmul_bwd`'s, the activation's backward pass
    /// first, or inside the pass that writes the products' bf16 operand as the CUDA backend does
    /// it). The operands the products read: no input for a frozen weight, no weight without
    /// dinp; in bf16 with a bias, dout's cast comes with the bias gradient's column sums (one
    /// read; for GELU the pre-activation and the activation's gradient instead of dout); in bf16
    /// SwiGLU without a bias writes the bf16 operand in place of the cast. The activation's
    /// gradient is read as bf16 where its product wrote only its held copy, except by the
    /// activation's own kernel (widened first); an input gradient held `only` is written by its
    /// product as that copy alone.
    #[allow(clippy::too_many_arguments)] // as matmul_bwd
    pub(super) fn products_bwd_cost(
        &self,
        dinp: Option<&VBuf>,
        dw: bool,
        dbias: bool,
        dout: &VBuf,
        inp: &VBuf,
        w: &VBuf,
        (n, k, m): (usize, usize, usize),
        act: Option<(Activation, bool, &VBuf)>,
    ) {
        // the pre-activation read as bf16 (`held_input`): half the bytes
        let (pre16, dact) = (act.is_some_and(|a| a.1), act.map(|a| a.2));
        let act = act.map(|a| a.0);
        let pre = |vals: usize| if pre16 { vals.div_ceil(2) } else { vals };
        let need_dout = dinp.is_some() || dw;
        let operand_pass = self.bf16 && need_dout && !self.named_reused(dout);
        let swiglu = matches!(act, Some(Activation::SwiGlu { .. }));
        let fused = operand_pass && dbias && !swiglu;
        let act_cast = operand_pass && !dbias && swiglu;
        if let (Some(dact), false) = (dact, fused || act_cast) {
            // the activation's own kernel reads f32 (see `Cuda::widen_held`)
            self.widen(dact);
        }
        // the activation's gradient read as bf16 (`held_input`), else checked for a stale read
        let d16 = dact.is_some_and(|d| self.read_as_bf16(d));
        if let (Some(dact), false) = (dact, d16) {
            self.reads(&[dact]);
        }
        let dact_vals = |vals: usize| if d16 { vals.div_ceil(2) } else { vals };
        match act {
            Some(Activation::Gelu) if !fused => self.elementwise("activation", pre(n * m) + n * m, n * m),
            // SwiGLU: x [n, m] and dout [n, m / 2] read, the gradient [n, m] written
            Some(Activation::SwiGlu { .. }) if act_cast => {
                self.rec("activation", Cost { read: 4.0 * (pre(n * m) + dact_vals(n * m / 2)) as f64, written: 2.0 * (n * m) as f64, ..Cost::default() })
            }
            Some(Activation::SwiGlu { .. }) => self.elementwise("activation", pre(n * m) + n * m / 2, n * m),
            _ => {}
        }
        self.cast_operands(&[dout, w, inp], Some(1), &[need_dout && !fused && !act_cast, dinp.is_some(), dw]);
        if fused {
            let partials = n.div_ceil(crate::backend::REDUCE_BLOCK_ROWS) * m;
            let read = 4 * match act {
                Some(_) => pre(n * m) + dact_vals(n * m),
                None => n * m,
            };
            let family = if act.is_some() { "activation" } else { "bias gradient" };
            self.rec(family, Cost { read: read as f64, written: (4 * partials + 2 * n * m) as f64, ..Cost::default() });
            self.elementwise("bias gradient", partials + m, m);
        }
        if let Some(dinp) = dinp {
            if self.held_only_product(dinp, m) {
                // as the CUDA backend: the input gradient written as its held copy alone
                self.gemm_out((k, n, m), false, false, 2.0);
            } else {
                // the f32 values written (no longer stale)
                self.lock().stale.remove(&dinp.id);
                // in bf16, the sum over a misaligned width in two products (as the CUDA backend)
                let (main, rest) = if self.bf16 { crate::backend::aligned_split(m) } else { (m, 0) };
                for (len, acc) in [(main, false), (rest, true)].into_iter().filter(|p| p.0 > 0) {
                    self.gemm((k, n, len), acc, false);
                }
            }
        }
        if dw {
            self.gemm((k, m, n), true, false);
        }
        if dbias && !fused {
            self.column_sums("bias gradient", n * m, n, m, 1);
        }
    }

    /// As the CUDA backend's `widen_held`: when only `b`'s held copy was written, its widening
    /// into the f32 values, and the hold ends.
    pub(super) fn widen(&self, b: &VBuf) {
        let mut st = self.lock();
        if st.stale.remove(&b.id) {
            st.held.remove(&b.id);
            drop(st);
            self.rec("cast to f32", Cost { read: 2.0 * b.len as f64, written: 4.0 * b.len as f64, ..Cost::default() });
        }
    }

    /// A norm's backward pass over `rows` of width `c` with `stats` statistics per row: dx
    /// (accumulated) from dout, x, w, the statistics and dx; and the parameters' column sums
    /// (`nout` of them), which read dout, x and the statistics again in a kernel of their own,
    /// or, up to [`NORM_FUSED_WIDTH`], come from the same pass (partials written there; then
    /// their reduction). The fused pass reads dout as bf16 where its product wrote only its held
    /// copy; the two kernels read it widened.
    pub(super) fn norm_bwd_cost(&self, dout: &VBuf, rows: usize, c: usize, stats: usize, nout: usize) {
        if c > NORM_FUSED_WIDTH {
            self.widen(dout);
        }
        let d16 = self.read_as_bf16(dout);
        if !d16 {
            self.reads(&[dout]);
        }
        let dout_vals = if d16 { (rows * c).div_ceil(2) } else { rows * c };
        let (read, written) = (2 * rows * c + dout_vals + c + stats * rows, rows * c);
        if c > NORM_FUSED_WIDTH {
            self.elementwise("norm", read, written);
            return self.column_sums("norm", 2 * rows * c + stats * rows, rows, c, nout);
        }
        let partials = rows.div_ceil(crate::backend::REDUCE_BLOCK_ROWS) * nout * c;
        self.elementwise("norm", read, written + partials);
        self.elementwise("norm", partials + nout * c, nout * c);
    }
}
