//! Attention on the device: the kernels for a head dim and precision (tensor-core FlashAttention-2
//! in bf16 at head dims 64 and 128, the tiled FMA kernels otherwise), the forward and backward
//! launches, the KV cache of generation, and RoPE.
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::{device_error, Cuda, Scratch, A};
use crate::backend::{AttnImpl, AttnShape, Backend, DropoutMask};

/// Query and key rows per attention tile.
const ATTN_TILE: usize = 64;

impl Cuda {
    /// The attention kernels' instantiation for a head dim: `_d32`, `_d64` or `_d128`.
    /// Above 128 is a failure (`check_head_dim` refuses such a model before any op runs).
    pub(super) fn head_dim_suffix(&self, d: usize) -> &'static str {
        match d {
            0..=32 => "d32",
            33..=64 => "d64",
            65..=128 => "d128",
            _ => {
                self.fail(device_error("attention", format!("head dim {d} is above 128, the largest the kernels support")));
                "d128"
            }
        }
    }

    /// The qkv operand of the attention kernels (f32, or a bf16 copy) and the kernels' type name.
    pub(super) fn attn_qkv(&self, scratch: &mut Scratch, qkv: &CudaSlice<f32>) -> (u64, &'static str) {
        if self.0.bf16 {
            // a held qkv's copy serves the forward and the backward pass (made at the first)
            (self.held_copy(qkv).unwrap_or_else(|| self.bf16_copy(scratch, 0, qkv)), "bf16")
        } else {
            (self.ptr(qkv), "f32")
        }
    }

    /// The attention kernels for a shape: name suffix, and per kernel (forward, dq, dk/dv) the
    /// rows per block and the threads per block. In bf16 mode, head dims 64 and 128 take the
    /// tensor-core kernels of `kernels/attention_tc.cu`; everything else the tiled FMA kernels of
    /// `kernels/attention.cu` (64 rows, 128 threads).
    pub(super) fn attn_kernels(&self, ty: &str, head_dim: usize) -> (String, [(usize, u32); 3]) {
        match (self.0.bf16, head_dim) {
            (true, 64) => ("tc_d64".into(), [(128, 128), (128, 256), (64, 128)]),
            (true, 128) => ("tc_d128".into(), [(128, 256), (128, 256), (64, 128)]),
            _ => (format!("{ty}_{}", self.head_dim_suffix(head_dim)), [(ATTN_TILE, 128); 3]),
        }
    }

    pub(super) fn shape_args(s: AttnShape) -> [A; 5] {
        [A::I(s.batch as i32), A::I(s.seq as i32), A::I(s.n_head as i32), A::I(s.n_kv_head as i32), A::I(s.head_dim as i32)]
    }

    /// The kernels and launch shapes of a pass: with dropout on the probabilities, the tiled FMA
    /// kernels' dropout variants (the tensor-core kernels do not implement it), else
    /// [`Cuda::attn_kernels`]'s choice.
    fn attn_kernels_for(&self, ty: &str, head_dim: usize, drop: Option<DropoutMask>) -> (String, [(usize, u32); 3]) {
        match drop {
            Some(_) => (format!("drop_{ty}_{}", self.head_dim_suffix(head_dim)), [(ATTN_TILE, 128); 3]),
            None => self.attn_kernels(ty, head_dim),
        }
    }

    /// The dropout mask's launch arguments (key, threshold, scale).
    fn drop_args(drop: Option<DropoutMask>) -> Vec<A> {
        drop.map_or(Vec::new(), |d| vec![A::L(d.key as i64), A::L(d.threshold as i64), A::F(d.scale)])
    }

    #[allow(clippy::too_many_arguments)] // the op's operands and the dropout mask
    pub(super) fn attention_fwd_op(
        &self,
        out: &mut CudaSlice<f32>,
        stats: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        _imp: AttnImpl,
        drop: Option<DropoutMask>,
    ) {
        // both implementations run the tiled kernel on the GPU; with `eager` the statistics
        // buffer is larger than needed and only its first `batch * n_head * seq` values are used
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (q, ty) = self.attn_qkv(&mut scratch, qkv);
        let (suffix, [(rows, threads), _, _]) = self.attn_kernels_for(ty, shape.head_dim, drop);
        // a held output's bf16 copy is written beside it (alone when held `only`: the output
        // projection and the backward pass's delta read the copy)
        let (out32, out16) = self.held_outputs(out);
        let mut args = vec![out32, out16, self.p(stats), A::P(q), self.p(key_mask)];
        args.extend(Self::shape_args(shape));
        args.extend(Self::drop_args(drop));
        let grid = (shape.seq.div_ceil(rows) as u32, shape.n_head as u32, shape.batch as u32);
        self.launch(&format!("attention_fwd_{suffix}"), grid, (threads, 1, 1), &args);
    }

    pub(super) fn attention_bwd_op(
        &self,
        dqkv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        stats: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        _imp: AttnImpl,
        drop: Option<DropoutMask>,
    ) {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let n_delta = shape.batch * shape.n_head * shape.seq;
        if scratch.delta.len() < n_delta {
            match self.alloc(n_delta) {
                Ok(b) => scratch.delta = b,
                Err(e) => return self.fail(e),
            }
        }
        let delta = self.ptr(&scratch.delta);
        let (q, ty) = self.attn_qkv(&mut scratch, qkv);
        let (suffix, [_, (dq_rows, dq_threads), (kv_rows, kv_threads)]) = self.attn_kernels_for(ty, shape.head_dim, drop);
        let tc = suffix.starts_with("tc_");
        // the output's held copy (written by the forward pass), and dout's when its product
        // wrote only that (Backend::hold_operand_only): the tensor-core kernels read dout as
        // bf16 and the delta kernel both; otherwise dout is widened first
        let out16 = self.held_made(out);
        let (d16, held_dout) = self.held_input(dout, "_d16");
        let dout_held = !d16.is_empty() && tc && out16.is_some();
        if !dout_held {
            self.widen_held(dout);
        }
        // otherwise the tensor-core kernels read the bf16 copy the delta kernel writes as it reads dout
        let dout16 = if tc && !dout_held { self.grown(&mut scratch.bf16[1], dout.len()) } else { 0 };
        let (b, t, h, d) = (shape.batch as i32, shape.seq as i32, shape.n_head as i32, shape.head_dim as i32);
        let (kernel, dout_arg, out_arg) = match out16 {
            Some(o) if dout_held => ("attention_bwd_delta_d16_o16", held_dout, A::P(o)),
            Some(o) => ("attention_bwd_delta_o16", self.p(dout), A::P(o)),
            None => ("attention_bwd_delta", self.p(dout), self.p(out)),
        };
        let grid = (shape.seq as u32, shape.n_head as u32, shape.batch as u32);
        self.launch(kernel, grid, (32, 1, 1), &[A::P(delta), dout_arg, out_arg, A::P(dout16), A::I(b), A::I(t), A::I(h), A::I(d)]);
        let dout_p = if dout_held {
            held_dout
        } else if dout16 != 0 {
            A::P(dout16)
        } else {
            self.p(dout)
        };
        let mut args = vec![self.p(dqkv), dout_p, A::P(q), self.p(stats), A::P(delta), self.p(key_mask)];
        args.extend(Self::shape_args(shape));
        args.extend(Self::drop_args(drop));
        let (h, kv, b) = (shape.n_head as u32, shape.n_kv_head as u32, shape.batch as u32);
        if suffix.starts_with("tc_") && !self.deterministic() {
            // one kernel: dk, dv written, dq added atomically into zeroed query columns
            self.fill(dqkv, 0.0);
            self.launch(&format!("attention_bwd_dkdvq_{suffix}"), (shape.seq.div_ceil(kv_rows) as u32, kv, b), (kv_threads, 1, 1), &args);
            return;
        }
        let (dq_name, kv_name) = match suffix.strip_prefix("drop_") {
            Some(rest) => (format!("attention_bwd_dq_drop_{rest}"), format!("attention_bwd_dkdv_drop_{rest}")),
            None => (format!("attention_bwd_dq_{suffix}"), format!("attention_bwd_dkdv_{suffix}")),
        };
        self.launch(&dq_name, (shape.seq.div_ceil(dq_rows) as u32, h, b), (dq_threads, 1, 1), &args);
        self.launch(&kv_name, (shape.seq.div_ceil(kv_rows) as u32, kv, b), (kv_threads, 1, 1), &args);
    }

    pub(super) fn kv_append_op(
        &self,
        k_cache: &mut CudaSlice<f32>,
        v_cache: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        slot: usize,
        shape: AttnShape,
        max_len: usize,
    ) {
        let mut args = vec![self.p(k_cache), self.p(v_cache), self.p(qkv), A::I(slot as i32)];
        args.extend(Self::shape_args(shape));
        args.push(A::I(max_len as i32));
        self.launch("kv_append", (shape.rows() as u32, 1, 1), (128, 1, 1), &args);
    }

    pub(super) fn attention_decode_op(
        &self,
        out: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        k_cache: &CudaSlice<f32>,
        v_cache: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        slot: usize,
        shape: AttnShape,
        max_len: usize,
    ) {
        let args = [
            self.p(out),
            self.p(qkv),
            self.p(k_cache),
            self.p(v_cache),
            self.p(key_mask),
            A::I(slot as i32),
            A::I(shape.batch as i32),
            A::I(shape.n_head as i32),
            A::I(shape.n_kv_head as i32),
            A::I(shape.head_dim as i32),
            A::I(max_len as i32),
        ];
        self.launch("attention_decode", (shape.n_head as u32, shape.batch as u32, 1), (128, 1, 1), &args);
    }

    pub(super) fn rope_op(&self, qkv: &mut CudaSlice<f32>, positions: &CudaSlice<i32>, shape: AttnShape, theta: f32, inverse: bool) {
        let args = [
            self.p(qkv),
            self.p(positions),
            A::I(shape.rows() as i32),
            A::I(shape.n_head as i32),
            A::I(shape.n_kv_head as i32),
            A::I(shape.head_dim as i32),
            A::F(theta),
            A::I(inverse as i32),
        ];
        self.launch("rope", (shape.rows() as u32, 1, 1), (128, 1, 1), &args);
    }
}
