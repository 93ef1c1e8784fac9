//! Normalisation and embedding on the device: LayerNorm and RMSNorm forward and backward (the
//! parameter gradients reduced in a fixed order), and the embedding lookup and its row-order
//! backward.
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::{Cuda, A};
use crate::backend::NORM_FUSED_WIDTH;

impl Cuda {
    pub(super) fn layernorm_fwd_op(
        &self,
        out: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        c: usize,
        eps: f32,
    ) {
        let rows = x.len() / c;
        let (out32, out16) = self.held_outputs(out);
        let args = [out32, out16, self.p(mean), self.p(rstd), self.p(x), self.p(w), self.opt(b), A::I(rows as i32), A::I(c as i32), A::F(eps)];
        self.launch("layernorm_fwd", (rows as u32, 1, 1), (256, 1, 1), &args);
    }

    pub(super) fn layernorm_bwd_op(
        &self,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        c: usize,
    ) {
        let rows = x.len() / c;
        let (r, ci) = (A::I(rows as i32), A::I(c as i32));
        let nout = 1 + db.is_some() as usize;
        let outs = [self.ptr(dw), db.map_or(0, |d| self.ptr(d))];
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if c <= NORM_FUSED_WIDTH {
            // dout read as bf16 when only its held copy was written (Backend::hold_operand_only)
            let (d16, dout_p) = self.held_input(dout, "_d16");
            let args = [self.p(dx), A::I(nout as i32), dout_p, self.p(x), self.p(w), self.p(mean), self.p(rstd), r, ci];
            return self.reduce_cols_per_row_block(&mut scratch, &format!("layernorm_bwd_fused{d16}"), outs, (rows, c), &args);
        }
        self.widen_held(dout);
        self.launch("layernorm_bwd_dx", (rows as u32, 1, 1), (256, 1, 1), &[self.p(dx), self.p(dout), self.p(x), self.p(w), self.p(mean), self.p(rstd), r, ci]);
        let args = [A::I(nout as i32), self.p(dout), self.p(x), self.p(mean), self.p(rstd), r, ci];
        self.reduce_cols(&mut scratch, "layernorm_bwd_params", outs, (rows, c), &args);
    }

    pub(super) fn rmsnorm_fwd_op(&self, out: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: &CudaSlice<f32>, c: usize, eps: f32) {
        let rows = x.len() / c;
        let (out32, out16) = self.held_outputs(out);
        let args = [out32, out16, self.p(rstd), self.p(x), self.p(w), A::I(rows as i32), A::I(c as i32), A::F(eps)];
        self.launch("rmsnorm_fwd", (rows as u32, 1, 1), (256, 1, 1), &args);
    }

    pub(super) fn rmsnorm_bwd_op(
        &self,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        c: usize,
    ) {
        let rows = x.len() / c;
        let (r, ci) = (A::I(rows as i32), A::I(c as i32));
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if c <= NORM_FUSED_WIDTH {
            let (d16, dout_p) = self.held_input(dout, "_d16");
            let args = [self.p(dx), dout_p, self.p(x), self.p(w), self.p(rstd), r, ci];
            return self.reduce_cols_per_row_block(&mut scratch, &format!("rmsnorm_bwd_fused{d16}"), [self.ptr(dw), 0], (rows, c), &args);
        }
        self.widen_held(dout);
        self.launch("rmsnorm_bwd_dx", (rows as u32, 1, 1), (256, 1, 1), &[self.p(dx), self.p(dout), self.p(x), self.p(w), self.p(rstd), r, ci]);
        self.reduce_cols(&mut scratch, "rmsnorm_bwd_params", [self.ptr(dw), 0], (rows, c), &[self.p(dout), self.p(x), self.p(rstd), r, ci]);
    }

    pub(super) fn embedding_fwd_op(
        &self,
        out: &mut CudaSlice<f32>,
        ids: &CudaSlice<i32>,
        wte: &CudaSlice<f32>,
        wpe: Option<(&CudaSlice<f32>, &CudaSlice<i32>)>,
        c: usize,
    ) {
        let rows = ids.len();
        let args = [self.p(out), self.p(ids), self.p(wte), self.opt(wpe.map(|w| w.0)), self.opt(wpe.map(|w| w.1)), A::I(rows as i32), A::I(c as i32)];
        self.launch("embedding_fwd", (rows as u32, 1, 1), (256, 1, 1), &args);
    }

    pub(super) fn embedding_bwd_op(
        &self,
        dwte: &mut CudaSlice<f32>,
        dwpe: Option<(&mut CudaSlice<f32>, &CudaSlice<i32>)>,
        ids: &CudaSlice<i32>,
        dout: &CudaSlice<f32>,
        c: usize,
    ) {
        let rows = ids.len();
        // the table rows are split into buckets by index (kernels/embedding.cu)
        const EMBEDDING_BUCKETS: u32 = 128;
        let grid = (c.div_ceil(256) as u32, EMBEDDING_BUCKETS, 1);
        self.launch("embedding_bwd", grid, (256, 1, 1), &[self.p(dwte), self.p(ids), self.p(dout), A::I(rows as i32), A::I(c as i32)]);
        if let Some((dwpe, pos)) = dwpe {
            self.launch("embedding_bwd", grid, (256, 1, 1), &[self.p(dwpe), self.p(pos), self.p(dout), A::I(rows as i32), A::I(c as i32)]);
        }
    }
}
