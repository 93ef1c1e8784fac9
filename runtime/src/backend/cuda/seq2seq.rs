//! The encoder-decoder ops on the device (`kernels/seq2seq.cu`): attention with an additive bias
//! as one block per query row (forward, and the backward's rows) and per key row (the
//! backward's key and value gradients), every sum in index order in one thread, so the results
//! do not depend on the launch; T5's position bias and its gradient; the feed-forward
//! activations. Checked against f64 references under emulation (`tests/emulation.rs`).
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::{Cuda, A};
use crate::backend::seq2seq::{BiasedShape, Cols, QkvCols, Seq2SeqOps};

/// Threads per block of the attention kernels (their `__launch_bounds__`).
const ROW_THREADS: u32 = 128;

impl Cuda {
    /// A column block's pointer, row width and column offset.
    fn cols(&self, c: Cols<CudaSlice<f32>>) -> [A; 3] {
        [self.p(c.buf), A::I(c.ld as i32), A::I(c.off as i32)]
    }

    /// The dropout arguments of a shape: on/off, key, threshold, scale.
    fn biased_drop_args(s: &BiasedShape) -> [A; 4] {
        match s.dropout {
            Some(m) => [A::I(1), A::L(m.key as i64), A::L(m.threshold as i64), A::F(m.scale)],
            None => [A::I(0), A::L(0), A::L(0), A::F(1.0)],
        }
    }

    /// One block per row of `rows` (at most 2^31 - 1, the grid's x limit).
    fn rows_grid(rows: usize) -> (u32, u32, u32) {
        (rows.min(i32::MAX as usize) as u32, 1, 1)
    }
}

impl Seq2SeqOps for Cuda {
    fn biased_attention_fwd(
        &self,
        out: &mut CudaSlice<f32>,
        probs: &mut CudaSlice<f32>,
        q: Cols<CudaSlice<f32>>,
        k: Cols<CudaSlice<f32>>,
        v: Cols<CudaSlice<f32>>,
        bias: Option<&CudaSlice<f32>>,
        key_mask: Option<&CudaSlice<i32>>,
        s: BiasedShape,
        scale: f32,
    ) {
        let mut args = vec![self.p(out), self.p(probs)];
        args.extend(self.cols(q));
        args.extend(self.cols(k));
        args.extend(self.cols(v));
        args.extend([self.opt(bias), self.opt(key_mask)]);
        args.extend([A::I(s.tq as i32), A::I(s.tk as i32), A::I(s.n_head as i32), A::I(s.head_dim as i32), A::I(s.causal as i32), A::F(scale)]);
        args.extend(Self::biased_drop_args(&s));
        self.launch("biased_attention_fwd", Self::rows_grid(s.batch * s.n_head * s.tq), (ROW_THREADS, 1, 1), &args);
    }

    fn biased_attention_bwd(
        &self,
        (dq, dk, dv): (&mut CudaSlice<f32>, &mut CudaSlice<f32>, &mut CudaSlice<f32>),
        dbias: Option<&mut CudaSlice<f32>>,
        ds: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        (q, k, v): QkvCols<CudaSlice<f32>>,
        probs: &CudaSlice<f32>,
        s: BiasedShape,
        scale: f32,
    ) {
        let geo = [A::I(s.tq as i32), A::I(s.tk as i32), A::I(s.n_head as i32), A::I(s.head_dim as i32), A::F(scale)];
        let mut rows = vec![self.p(dq), self.p(ds), self.p(dout), self.p(probs)];
        rows.extend(self.cols(k));
        rows.extend(self.cols(v));
        rows.extend(geo);
        rows.extend(Self::biased_drop_args(&s));
        self.launch("biased_attention_bwd_rows", Self::rows_grid(s.batch * s.n_head * s.tq), (ROW_THREADS, 1, 1), &rows);
        let mut keys = vec![self.p(dk), self.p(dv), self.p(ds), self.p(dout), self.p(probs)];
        keys.extend(self.cols(q));
        keys.extend(geo);
        keys.extend(Self::biased_drop_args(&s));
        self.launch("biased_attention_bwd_keys", Self::rows_grid(s.batch * s.n_head * s.tk), (ROW_THREADS, 1, 1), &keys);
        if let Some(db) = dbias {
            let n = s.n_head * s.tq * s.tk;
            self.launch_n("biased_attention_bias_grad", n, &[self.p(db), self.p(ds), A::I(s.batch as i32), A::L(n as i64)]);
        }
    }

    fn position_bias_fwd(&self, out: &mut CudaSlice<f32>, table: &CudaSlice<f32>, buckets: &CudaSlice<i32>, n_head: usize) {
        let n = buckets.len();
        self.launch_n("position_bias_fwd", n * n_head, &[self.p(out), self.p(table), self.p(buckets), A::L(n as i64), A::I(n_head as i32)]);
    }

    fn position_bias_bwd(&self, dtable: &mut CudaSlice<f32>, dbias: &CudaSlice<f32>, buckets: &CudaSlice<i32>, n_head: usize) {
        let (n, num_buckets) = (buckets.len(), dtable.len() / n_head.max(1));
        self.forget_weight(dtable);
        let args = [self.p(dtable), self.p(dbias), self.p(buckets), A::L(n as i64), A::I(n_head as i32), A::I(num_buckets as i32)];
        self.launch_n("position_bias_bwd", num_buckets * n_head, &args);
    }

    fn geglu_fwd(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, i: usize) {
        let rows = out.len() / i.max(1);
        self.launch_n("geglu_fwd", rows * i, &[self.p(out), self.p(x), A::L(rows as i64), A::I(i as i32)]);
    }

    fn geglu_bwd(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>, i: usize) {
        let rows = dout.len() / i.max(1);
        self.launch_n("geglu_bwd", rows * i, &[self.p(dx), self.p(x), self.p(dout), A::L(rows as i64), A::I(i as i32)]);
    }

    fn gelu_erf_fwd(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>) {
        self.launch_n("gelu_erf_fwd", x.len(), &[self.p(out), self.p(x), A::L(x.len() as i64)]);
    }

    fn gelu_erf_bwd(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>) {
        self.launch_n("gelu_erf_bwd", x.len(), &[self.p(dx), self.p(x), self.p(dout), A::L(x.len() as i64)]);
    }

    fn relu_fwd(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>) {
        self.launch_n("relu_fwd", x.len(), &[self.p(out), self.p(x), A::L(x.len() as i64)]);
    }

    fn relu_bwd(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>) {
        self.launch_n("relu_bwd", x.len(), &[self.p(dx), self.p(x), self.p(dout), A::L(x.len() as i64)]);
    }
}
