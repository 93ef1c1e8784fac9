//! The CUDA backend: the op set on an NVIDIA GPU through cudarc, with the kernels of `kernels/`
//! (compiled by NVRTC for the device at start) and cuBLASLt for matrix products.
//!
//! Buffers are f32 on the device, so the model code, the checkpoints and the CPU backend see the
//! same numbers. With `bf16` (HF's `bf16 = true`, mixed precision) the matrix products and the
//! attention read bf16 copies of their operands (rounded to nearest even) and accumulate in f32;
//! the weights the optimizer updates stay f32 (the master copy), as do the AdamW moments.
//!
//! cudarc loads the driver, NVRTC and cuBLASLt at run time, so this module builds and links on
//! machines with no GPU and no CUDA toolkit; [`probe`] checks the libraries and the device before
//! the first CUDA call (cudarc panics when a library is missing).
//!
//! Every op is queued on one stream; only `download` and the ops that return host values
//! (`cross_entropy`, `token_stats`, `sum_squares`) wait for it. A CUDA failure inside an op (a
//! kernel fault, the device running out of memory) ends the process with a message naming the
//! op: the trait's ops have no error path, and nothing downstream could use a half-done step.

mod adapter;
mod attention;
pub mod blas;
mod failure;
mod group;
use failure::Failure;
mod held;
pub mod kernels;
mod launch;
mod loss;
mod memory;
use memory::device_error;
mod norm;
mod open;
mod optim;
mod probe;
mod products;
use products::Scratch;
mod reduce;
mod seq2seq;

pub(crate) use held::{holds_setting, HOLDS_ENV};
pub use kernels::required_kernels;
pub use probe::{probe, DeviceInfo};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};

use super::{AdamWStep, AttnImpl, AttnShape, Backend, ColBlock, LossRows, StatGrads, StatsWanted, TokenStats};
use crate::error::Result;
use blas::Lt;
use launch::A;

struct Inner {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    lt: Lt,
    bf16: bool,
    /// The shared memory a block may have (the opt-in granted to `cross_entropy_bf16_staged`) and
    /// a multiprocessor has; zero when the device did not say.
    smem: super::SharedMemory,
    /// On (the default): the attention backward in bf16 mode uses the two-kernel form (dq and
    /// dk/dv apart, no atomics) instead of FlashAttention-2's single kernel with atomic dq.
    deterministic: std::sync::atomic::AtomicBool,
    scratch: Mutex<Scratch>,
    /// bf16 mode: the bf16 working copy of each parameter that the fused AdamW step writes, by
    /// the parameter's device address. See [`Cuda::weight_copy`] for when an entry is trusted.
    weights16: Mutex<HashMap<u64, CudaSlice<u16>>>,
    /// bf16 mode: the operands named by `begin_operand_reuse` and their copies.
    reuse: Mutex<Vec<held::Reused>>,
    /// bf16 mode: the saved activations named by `hold_operand` and their copies.
    held: Mutex<held::Held>,
    /// The first device failure of an op that cannot return it; sticky: every later op does
    /// nothing, and every op that returns a `Result` returns it.
    failure: Mutex<Option<Failure>>,
    /// Whether `failure` is set: read before every launch, so without a lock.
    failed: std::sync::atomic::AtomicBool,
    /// The joined device communicator (`Backend::group_join`), if any.
    group: Mutex<Option<group::Group>>,
}

/// The CUDA backend; cloning it shares the device, the stream and the compiled kernels.
#[derive(Clone)]
pub struct Cuda(Arc<Inner>);

/// `sum_squares_partial`'s grid (fixed, so the sum's order is too).
const SUMSQ_BLOCKS: usize = 512;

impl Cuda {
    pub fn info(&self) -> &DeviceInfo {
        &self.0.info
    }

    pub fn bf16(&self) -> bool {
        self.0.bf16
    }

    /// On (the default), every op gives the same bits run after run. Off, the tensor-core
    /// attention backward (bf16 mode, head dims 64 and 128) adds dq with atomics in
    /// FlashAttention-2's single backward kernel, which does 5 matrix products per tile instead of
    /// 7, and the order of the additions varies. On an H200 the deterministic two-kernel form was
    /// the faster one at every measured shape (docs/BENCHMARKS.md), so training never turns it off
    /// (`full_determinism` has nothing left to select); `cuda-check` does, to keep checking and
    /// timing the single-kernel form against it.
    pub fn set_deterministic(&self, on: bool) {
        self.0.deterministic.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn deterministic(&self) -> bool {
        self.0.deterministic.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of device memory in use and in total.
    pub fn memory_used(&self) -> (usize, usize) {
        let (free, total) = self.0.ctx.mem_get_info().unwrap_or((0, 0));
        (total - free, total)
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<i32>;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        let buf = self.alloc(n)?;
        self.forget_for_new(&buf);
        Ok(buf)
    }
    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        let buf = self.dev(data)?;
        self.forget_for_new(&buf);
        Ok(buf)
    }
    fn upload_ids(&self, data: &[i32]) -> Result<CudaSlice<i32>> {
        self.dev(data)
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.host(buf)
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn fill(&self, buf: &mut CudaSlice<f32>, value: f32) {
        self.forget_weight(buf);
        self.launch_n("fill_f32", buf.len(), &[self.p(buf), A::F(value), A::L(buf.len() as i64)]);
    }
    fn copy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) {
        self.forget_weight(dst);
        if !src.is_empty() && !self.failed() {
            if let Err(e) = self.0.stream.memcpy_dtod(src, dst) {
                self.fail(device_error("copy", e));
            }
        }
    }
    fn copy_range(&self, dst: &mut CudaSlice<f32>, dst_off: usize, src: &CudaSlice<f32>, src_off: usize, n: usize) {
        self.forget_weight(dst);
        if n > 0 && !self.failed() {
            let (from, mut to) = (src.slice(src_off..src_off + n), dst.slice_mut(dst_off..dst_off + n));
            if let Err(e) = self.0.stream.memcpy_dtod(&from, &mut to) {
                self.fail(device_error("copy_range", e));
            }
        }
    }

    fn embedding_fwd(&self, out: &mut CudaSlice<f32>, ids: &CudaSlice<i32>, wte: &CudaSlice<f32>, wpe: Option<(&CudaSlice<f32>, &CudaSlice<i32>)>, c: usize) {
        self.embedding_fwd_op(out, ids, wte, wpe, c)
    }
    fn embedding_bwd(
        &self,
        dwte: &mut CudaSlice<f32>,
        dwpe: Option<(&mut CudaSlice<f32>, &CudaSlice<i32>)>,
        ids: &CudaSlice<i32>,
        dout: &CudaSlice<f32>,
        c: usize,
    ) {
        self.embedding_bwd_op(dwte, dwpe, ids, dout, c)
    }

    fn layernorm_fwd(
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
        self.layernorm_fwd_op(out, mean, rstd, x, w, b, c, eps)
    }
    fn layernorm_bwd(
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
        self.layernorm_bwd_op(dx, dw, db, dout, x, w, mean, rstd, c)
    }
    fn rmsnorm_fwd(&self, out: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: &CudaSlice<f32>, c: usize, eps: f32) {
        self.rmsnorm_fwd_op(out, rstd, x, w, c, eps)
    }
    fn rmsnorm_bwd(
        &self,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        c: usize,
    ) {
        self.rmsnorm_bwd_op(dx, dw, dout, x, w, rstd, c)
    }

    fn matmul_fwd(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, w: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, n: usize, k: usize, m: usize) {
        self.matmul_fwd_op(out, inp, w, bias, n, k, m)
    }
    fn matmul_bwd(
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
        self.matmul_bwd_op(dinp, dw, dbias, dout, inp, w, n, k, m)
    }

    fn act_matmul_bwd(
        &self,
        act: super::Activation,
        dinp: Option<&mut CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        dbias: Option<&mut CudaSlice<f32>>,
        dpre: &mut CudaSlice<f32>,
        dact: &CudaSlice<f32>,
        pre: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        self.act_matmul_bwd_op(act, dinp, dw, dbias, dpre, (dact, pre), inp, w, (n, k, m))
    }
    fn attention_fwd(
        &self,
        out: &mut CudaSlice<f32>,
        stats: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        _imp: AttnImpl,
    ) {
        self.attention_fwd_op(out, stats, qkv, key_mask, shape, _imp, None)
    }
    fn has_attention_dropout(&self) -> bool {
        true
    }
    fn attention_fwd_dropout(
        &self,
        out: &mut CudaSlice<f32>,
        stats: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        imp: AttnImpl,
        drop: crate::backend::DropoutMask,
    ) {
        self.attention_fwd_op(out, stats, qkv, key_mask, shape, imp, Some(drop))
    }
    fn attention_bwd_dropout(
        &self,
        dqkv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        stats: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        imp: AttnImpl,
        drop: crate::backend::DropoutMask,
    ) {
        self.attention_bwd_op(dqkv, dout, qkv, out, stats, key_mask, shape, imp, Some(drop))
    }
    fn attention_bwd(
        &self,
        dqkv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        stats: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        _imp: AttnImpl,
    ) {
        self.attention_bwd_op(dqkv, dout, qkv, out, stats, key_mask, shape, _imp, None)
    }
    fn kv_append(&self, k_cache: &mut CudaSlice<f32>, v_cache: &mut CudaSlice<f32>, qkv: &CudaSlice<f32>, slot: usize, shape: AttnShape, max_len: usize) {
        self.kv_append_op(k_cache, v_cache, qkv, slot, shape, max_len)
    }
    fn attention_decode(
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
        self.attention_decode_op(out, qkv, k_cache, v_cache, key_mask, slot, shape, max_len)
    }
    fn rope(&self, qkv: &mut CudaSlice<f32>, positions: &CudaSlice<i32>, shape: AttnShape, theta: f32, inverse: bool) {
        self.rope_op(qkv, positions, shape, theta, inverse)
    }

    fn gelu_fwd(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>) {
        let (out32, out16) = self.held_outputs(out);
        let (x16, xp) = self.held_input(x, "_x16");
        self.launch_n(&format!("gelu_fwd{x16}"), x.len().div_ceil(4), &[out32, out16, xp, A::L(x.len() as i64)]);
    }
    fn gelu_bwd(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>) {
        self.widen_held(dout);
        let (x16, xp) = self.held_input(x, "_x16");
        self.launch_n(&format!("gelu_bwd{x16}"), x.len().div_ceil(4), &[self.p(dx), xp, self.p(dout), A::L(x.len() as i64)]);
    }
    fn swiglu_fwd(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, i: usize) {
        let rows = x.len() / (2 * i);
        let (out32, out16) = self.held_outputs(out);
        let (x16, xp) = self.held_input(x, "_x16");
        self.launch_n(&format!("swiglu_fwd{x16}"), (rows * i).div_ceil(4), &[out32, out16, xp, A::L(rows as i64), A::I(i as i32)]);
    }
    fn swiglu_bwd(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>, i: usize) {
        let rows = x.len() / (2 * i);
        self.widen_held(dout);
        let (x16, xp) = self.held_input(x, "_x16");
        self.launch_n(&format!("swiglu_bwd{x16}"), (rows * i).div_ceil(4), &[self.p(dx), xp, self.p(dout), A::L(rows as i64), A::I(i as i32)]);
    }
    fn matmul_fwd_add(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        res: &CudaSlice<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        self.matmul_fwd_add_op(out, inp, w, bias, res, (n, k, m))
    }
    fn add(&self, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>, b: &CudaSlice<f32>) {
        self.launch_n("add_f32", a.len().div_ceil(4), &[self.p(out), self.p(a), self.p(b), A::L(a.len() as i64)]);
    }

    fn dropout(&self, x: &mut CudaSlice<f32>, mask: crate::backend::DropoutMask) {
        self.forget_weight(x);
        let args = [self.p(x), A::L(mask.key as i64), A::L(mask.threshold as i64), A::F(mask.scale), A::L(x.len() as i64)];
        self.launch_n("dropout_f32", x.len(), &args);
    }
    fn add_cols(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        self.forget_weight(dst);
        let args = [self.p(dst), self.p(src), A::L(rows as i64), A::I(width as i32), A::I(ld as i32), A::I(off as i32), A::F(scale)];
        self.launch_n("add_cols_f32", rows * width, &args);
    }
    fn take_cols(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        let args = [self.p(dst), self.p(src), A::L(rows as i64), A::I(width as i32), A::I(ld as i32), A::I(off as i32), A::F(scale)];
        self.launch_n("take_cols_f32", (rows * width).div_ceil(4), &args);
    }
    fn lora_up(&self, out: &mut CudaSlice<f32>, t: &CudaSlice<f32>, b: &CudaSlice<f32>, blk: ColBlock, rank: usize, scale: f32, add: bool) {
        self.lora_up_op(out, t, b, blk, rank, scale, add)
    }
    fn lora_up_bwd(
        &self,
        dt: (&mut CudaSlice<f32>, bool),
        db: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        t: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        blk: ColBlock,
        rank: usize,
        scale: f32,
    ) {
        self.lora_up_bwd_op(dt, db, dout, t, b, blk, rank, scale)
    }
    fn lora_down_bwd(
        &self,
        dx: Option<&mut CudaSlice<f32>>,
        da: Option<&mut CudaSlice<f32>>,
        dt: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        rank: usize,
    ) {
        self.products_bwd(dx, 1.0, da, None, dt, None, x, a, (rows, k, rank))
    }
    fn dora_norm(
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
        self.dora_norm_op(n, w, a, b, off, cols, k, r, scale)
    }
    fn dora_fwd(
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
        self.dora_fwd_op(out, base, bias, u, m, n, blk, scale)
    }
    fn dora_bwd(
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
        self.dora_bwd_op(dm, gu, gb, dout, m, n, blk, scale)
    }

    fn cross_entropy(&self, logits: &mut CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows> {
        self.cross_entropy_op(logits, targets, v, smoothing, grad_scale)
    }
    fn cross_entropy_into(
        &self,
        logits: &mut CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        v: usize,
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut CudaSlice<f32>,
        row0: usize,
    ) {
        self.cross_entropy_into_op(logits, targets, v, smoothing, grad_scale, loss, row0)
    }

    fn token_stats(&self, logits: &CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, want: StatsWanted) -> Result<TokenStats> {
        self.token_stats_op(logits, targets, v, want)
    }
    fn token_stats_bwd(&self, logits: &mut CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, stats: &TokenStats, grads: &StatGrads) {
        self.token_stats_bwd_op(logits, targets, v, stats, grads)
    }

    fn sum_squares(&self, buf: &CudaSlice<f32>) -> Result<f64> {
        self.sum_squares_op(buf)
    }
    fn sum_squares_multi(&self, bufs: &[&CudaSlice<f32>]) -> Result<Vec<f64>> {
        self.sum_squares_multi_op(bufs)
    }
    fn fill_multi(&self, bufs: &mut [&mut CudaSlice<f32>], value: f32) {
        self.fill_multi_op(bufs, value)
    }
    fn scale(&self, buf: &mut CudaSlice<f32>, s: f32) {
        self.forget_weight(buf);
        self.launch_n("scale_f32", buf.len(), &[self.p(buf), A::F(s), A::L(buf.len() as i64)]);
    }
    fn adamw(&self, p: &mut CudaSlice<f32>, g: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, hp: AdamWStep, decay: bool) {
        self.adamw_multi(&mut [(p, g, m, v, decay)], hp);
    }
    fn adamw_multi(&self, tensors: &mut [super::AdamWArgs<'_, Self>], hp: AdamWStep) {
        self.adamw_multi_op(tensors, hp, true)
    }
    fn adamw_range(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        at: usize,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        hp: AdamWStep,
        decay: bool,
    ) -> Result<()> {
        self.adamw_range_op(p, g, at, m, v, hp, decay)
    }

    fn check_head_dim(&self, head_dim: usize) -> std::result::Result<(), String> {
        if head_dim > 128 {
            return Err(format!("head dim {head_dim}: the CUDA attention kernels support head dims up to 128"));
        }
        Ok(())
    }
    fn recover_out_of_memory(&self) -> Result<()> {
        self.recover_out_of_memory_op()
    }
    fn head_loss_uses_scratch(&self, v: usize) -> bool {
        // bf16 logits live in a scratch of their own, and so do padded rows (head_loss_op)
        !self.0.bf16 && crate::backend::aligned_ld(v) == v
    }
    fn synchronize(&self) -> Result<()> {
        Cuda::synchronize(self)
    }
    fn head_loss(
        &self,
        logits: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        nkv: (usize, usize, usize),
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut CudaSlice<f32>,
        row0: usize,
        back: Option<(&mut CudaSlice<f32>, Option<&mut CudaSlice<f32>>)>,
    ) {
        self.head_loss_op(logits, x, w, targets, nkv, (smoothing, grad_scale), loss, row0, back)
    }
    fn keep_working_copy(&self, w: &CudaSlice<f32>) {
        self.keep_working_copy_op(w)
    }
    fn drop_working_copy(&self, w: &CudaSlice<f32>) {
        let key = self.ptr(w);
        self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }
    fn begin_operand_reuse(&self, bufs: &[&CudaSlice<f32>]) {
        self.begin_operand_reuse_op(bufs)
    }
    fn end_operand_reuse(&self) {
        self.begin_operand_reuse_op(&[])
    }
    fn hold_operand(&self, buf: &CudaSlice<f32>) {
        self.hold_operand_op(buf, false)
    }
    fn hold_operand_only(&self, buf: &CudaSlice<f32>) {
        self.hold_operand_op(buf, true)
    }
    fn release_operand(&self, buf: &CudaSlice<f32>) {
        self.release_operand_op(buf)
    }
    fn release_operands(&self) {
        self.release_operands_op()
    }
    fn free_memory(&self) -> Option<u128> {
        self.0.ctx.mem_get_info().ok().map(|(free, _)| free as u128)
    }
    fn logits_chunk_floats(&self) -> usize {
        super::DEVICE_LOGITS_CHUNK_FLOATS
    }
    fn group_id(&self) -> Result<Vec<u8>> {
        self.group_id_op()
    }
    fn group_join(&self, id: &[u8], rank: usize, world: usize) -> Result<()> {
        self.group_join_op(id, rank, world)
    }
    fn group_op(&self, buf: &mut CudaSlice<f32>, start: usize, len: usize, op: super::GroupOp) -> Result<()> {
        self.group_op_op(buf, start, len, op)
    }
}
