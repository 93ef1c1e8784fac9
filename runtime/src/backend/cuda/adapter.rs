//! Adapters on the device: LoRA's up-projection into its columns of a map's output (a cuBLASLt
//! product into a scratch buffer, then the column-block add; the backward pass the column-block
//! take, then the products), and DoRA (`kernels/dora.cu`): the weight norm of `W + scale B A` per
//! output row, the magnitude-rescaled output, and its backward pass.
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::{Backend, Cuda, A};
use crate::backend::ColBlock;

impl Cuda {
    /// The LoRA scratch, grown to `n` values and taken out of the shared scratch while in use
    /// (the products lock it); `None` after a failure.
    fn lora_scratch(&self, n: usize) -> Option<CudaSlice<f32>> {
        let taken = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner()).lora.take();
        match taken {
            Some(b) if b.len() >= n => Some(b),
            _ => match self.alloc::<f32>(n) {
                Ok(b) => Some(b),
                Err(e) => {
                    self.fail(e);
                    None
                }
            },
        }
    }

    fn put_lora_scratch(&self, b: CudaSlice<f32>) {
        self.0.scratch.lock().unwrap_or_else(|e| e.into_inner()).lora = Some(b);
    }

    pub(super) fn lora_up_op(&self, out: &mut CudaSlice<f32>, t: &CudaSlice<f32>, b: &CudaSlice<f32>, blk: ColBlock, rank: usize, scale: f32) {
        let Some(mut u) = self.lora_scratch(blk.rows * blk.width) else { return };
        self.matmul_fwd_op(&mut u, t, b, None, blk.rows, rank, blk.width);
        self.add_cols(out, &u, blk.rows, blk.width, blk.ld, blk.off, scale);
        self.put_lora_scratch(u);
    }

    pub(super) fn lora_up_bwd_op(
        &self,
        dt: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        t: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        blk: ColBlock,
        rank: usize,
        scale: f32,
    ) {
        let Some(mut g) = self.lora_scratch(blk.rows * blk.width) else { return };
        self.take_cols(&mut g, dout, blk.rows, blk.width, blk.ld, blk.off, scale);
        self.matmul_bwd_op(Some(dt), db, None, &g, t, b, blk.rows, rank, blk.width);
        self.put_lora_scratch(g);
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
