//! A backend decorator that times every op and counts matrix-product FLOPs, for the benchmark's
//! "where does the time go" table. It wraps any backend; the CPU ops are synchronous, so wall time
//! per call is the op's time; on a GPU each op is waited for, after waiting for what was queued
//! before it (the untimed ops: allocations, uploads), so an op's time is its own launches plus
//! one wait's round trip, which [`Profiled::idle_sync_seconds`] measures for the reader to take
//! off (times the calls, [`Profiled::calls`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::error::Result;

use super::{AdamWStep, AttnImpl, AttnShape, Backend, LossRows, StatGrads, StatsWanted, TokenStats};

#[derive(Default)]
struct Totals {
    secs: BTreeMap<&'static str, f64>,
    calls: BTreeMap<&'static str, u64>,
    matmul_flops: f64,
}

pub struct Profiled<B> {
    pub inner: B,
    totals: Mutex<Totals>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled { inner, totals: Mutex::new(Totals::default()) }
    }
    fn time<R>(&self, op: &'static str, flops: f64, f: impl FnOnce() -> R) -> R {
        // what was queued before (untimed ops) is not this op's
        let _ = self.inner.synchronize();
        let t = Instant::now();
        let r = f();
        // GPU ops are queued: wait for this one so its time is its own (a failure is sticky: the
        // next op that returns a `Result` reports it)
        let _ = self.inner.synchronize();
        let dt = t.elapsed().as_secs_f64();
        let mut tot = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        *tot.secs.entry(op).or_default() += dt;
        *tot.calls.entry(op).or_default() += 1;
        tot.matmul_flops += flops;
        r
    }
    /// Seconds per op name, and the matrix-product FLOPs, since the last reset.
    pub fn report(&self) -> (Vec<(&'static str, f64)>, f64) {
        let tot = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        (tot.secs.iter().map(|(k, v)| (*k, *v)).collect(), tot.matmul_flops)
    }
    /// Timed calls per op name since the last reset.
    pub fn calls(&self) -> Vec<(&'static str, u64)> {
        let tot = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        tot.calls.iter().map(|(k, v)| (*k, *v)).collect()
    }
    /// The median wall time of a wait for the device with nothing queued (over 101 waits): the
    /// part of every timed call that is the wait's round trip (0 on the CPU, whose wait returns
    /// at once).
    pub fn idle_sync_seconds(&self) -> f64 {
        let _ = self.inner.synchronize();
        let mut t: Vec<f64> = (0..101)
            .map(|_| {
                let t0 = Instant::now();
                let _ = self.inner.synchronize();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }
    pub fn reset(&self) {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner()) = Totals::default();
    }
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Ids = B::Ids;
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn zeros(&self, n: usize) -> Result<B::Buf> {
        self.inner.zeros(n)
    }
    fn upload(&self, data: &[f32]) -> Result<B::Buf> {
        self.inner.upload(data)
    }
    fn upload_vec(&self, data: Vec<f32>) -> Result<B::Buf> {
        self.inner.upload_vec(data)
    }
    fn upload_ids(&self, data: &[i32]) -> Result<B::Ids> {
        self.inner.upload_ids(data)
    }
    fn download(&self, buf: &B::Buf) -> Result<Vec<f32>> {
        self.inner.download(buf)
    }
    fn len(&self, buf: &B::Buf) -> usize {
        self.inner.len(buf)
    }
    fn host_mut<'a>(&self, buf: &'a mut B::Buf) -> Option<&'a mut [f32]> {
        self.inner.host_mut(buf)
    }
    fn fill(&self, buf: &mut B::Buf, value: f32) {
        self.time("fill", 0.0, || self.inner.fill(buf, value))
    }
    fn fill_multi(&self, bufs: &mut [&mut B::Buf], value: f32) {
        self.time("fill", 0.0, || self.inner.fill_multi(bufs, value))
    }
    fn copy(&self, dst: &mut B::Buf, src: &B::Buf) {
        self.inner.copy(dst, src)
    }
    fn copy_range(&self, dst: &mut B::Buf, dst_off: usize, src: &B::Buf, src_off: usize, n: usize) {
        self.time("copy", 0.0, || self.inner.copy_range(dst, dst_off, src, src_off, n))
    }
    fn embedding_fwd(&self, out: &mut B::Buf, ids: &B::Ids, wte: &B::Buf, wpe: Option<(&B::Buf, &B::Ids)>, c: usize) {
        self.time("embedding", 0.0, || self.inner.embedding_fwd(out, ids, wte, wpe, c))
    }
    fn embedding_bwd(&self, dwte: &mut B::Buf, dwpe: Option<(&mut B::Buf, &B::Ids)>, ids: &B::Ids, dout: &B::Buf, c: usize) {
        self.time("embedding", 0.0, || self.inner.embedding_bwd(dwte, dwpe, ids, dout, c))
    }
    fn layernorm_fwd(&self, out: &mut B::Buf, mean: &mut B::Buf, rstd: &mut B::Buf, x: &B::Buf, w: &B::Buf, b: Option<&B::Buf>, c: usize, eps: f32) {
        self.time("norm", 0.0, || self.inner.layernorm_fwd(out, mean, rstd, x, w, b, c, eps))
    }
    fn layernorm_bwd(
        &self,
        dx: &mut B::Buf,
        dw: &mut B::Buf,
        db: Option<&mut B::Buf>,
        dout: &B::Buf,
        x: &B::Buf,
        w: &B::Buf,
        mean: &B::Buf,
        rstd: &B::Buf,
        c: usize,
    ) {
        self.time("norm", 0.0, || self.inner.layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, c))
    }
    fn rmsnorm_fwd(&self, out: &mut B::Buf, rstd: &mut B::Buf, x: &B::Buf, w: &B::Buf, c: usize, eps: f32) {
        self.time("norm", 0.0, || self.inner.rmsnorm_fwd(out, rstd, x, w, c, eps))
    }
    fn rmsnorm_bwd(&self, dx: &mut B::Buf, dw: &mut B::Buf, dout: &B::Buf, x: &B::Buf, w: &B::Buf, rstd: &B::Buf, c: usize) {
        self.time("norm", 0.0, || self.inner.rmsnorm_bwd(dx, dw, dout, x, w, rstd, c))
    }
    fn matmul_fwd(&self, out: &mut B::Buf, inp: &B::Buf, w: &B::Buf, bias: Option<&B::Buf>, n: usize, k: usize, m: usize) {
        self.time("matmul", 2.0 * (n * k * m) as f64, || self.inner.matmul_fwd(out, inp, w, bias, n, k, m))
    }
    fn matmul_fwd_add(&self, out: &mut B::Buf, inp: &B::Buf, w: &B::Buf, bias: Option<&B::Buf>, res: &B::Buf, n: usize, k: usize, m: usize) {
        self.time("matmul", 2.0 * (n * k * m) as f64, || self.inner.matmul_fwd_add(out, inp, w, bias, res, n, k, m))
    }
    fn matmul_bwd(
        &self,
        dinp: Option<&mut B::Buf>,
        dw: Option<&mut B::Buf>,
        dbias: Option<&mut B::Buf>,
        dout: &B::Buf,
        inp: &B::Buf,
        w: &B::Buf,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let gemms = (usize::from(dinp.is_some()) + usize::from(dw.is_some())) as f64;
        self.time("matmul", gemms * 2.0 * (n * k * m) as f64, || self.inner.matmul_bwd(dinp, dw, dbias, dout, inp, w, n, k, m))
    }
    /// Timed whole as "matmul" (the CUDA backend fuses the activation's backward pass into the
    /// products' operand pass; on the CPU it is the activation's backward pass).
    fn act_matmul_bwd(
        &self,
        act: crate::backend::Activation,
        dinp: Option<&mut B::Buf>,
        dw: Option<&mut B::Buf>,
        dbias: Option<&mut B::Buf>,
        dpre: &mut B::Buf,
        dact: &B::Buf,
        pre: &B::Buf,
        inp: &B::Buf,
        w: &B::Buf,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let gemms = (usize::from(dinp.is_some()) + usize::from(dw.is_some())) as f64;
        self.time("matmul", gemms * 2.0 * (n * k * m) as f64, || self.inner.act_matmul_bwd(act, dinp, dw, dbias, dpre, dact, pre, inp, w, n, k, m))
    }
    fn attention_fwd(&self, out: &mut B::Buf, stats: &mut B::Buf, qkv: &B::Buf, key_mask: &B::Ids, shape: AttnShape, imp: AttnImpl) {
        self.time("attention", 0.0, || self.inner.attention_fwd(out, stats, qkv, key_mask, shape, imp))
    }
    fn attention_bwd(&self, dqkv: &mut B::Buf, dout: &B::Buf, qkv: &B::Buf, out: &B::Buf, stats: &B::Buf, key_mask: &B::Ids, shape: AttnShape, imp: AttnImpl) {
        self.time("attention", 0.0, || self.inner.attention_bwd(dqkv, dout, qkv, out, stats, key_mask, shape, imp))
    }
    fn kv_append(&self, k_cache: &mut B::Buf, v_cache: &mut B::Buf, qkv: &B::Buf, slot: usize, shape: AttnShape, max_len: usize) {
        self.time("attention", 0.0, || self.inner.kv_append(k_cache, v_cache, qkv, slot, shape, max_len))
    }
    fn attention_decode(
        &self,
        out: &mut B::Buf,
        qkv: &B::Buf,
        k_cache: &B::Buf,
        v_cache: &B::Buf,
        key_mask: &B::Ids,
        slot: usize,
        shape: AttnShape,
        max_len: usize,
    ) {
        self.time("attention", 0.0, || self.inner.attention_decode(out, qkv, k_cache, v_cache, key_mask, slot, shape, max_len))
    }
    fn rope(&self, qkv: &mut B::Buf, positions: &B::Ids, shape: AttnShape, theta: f32, inverse: bool) {
        self.time("rope", 0.0, || self.inner.rope(qkv, positions, shape, theta, inverse))
    }
    fn gelu_fwd(&self, out: &mut B::Buf, x: &B::Buf) {
        self.time("activation", 0.0, || self.inner.gelu_fwd(out, x))
    }
    fn gelu_bwd(&self, dx: &mut B::Buf, x: &B::Buf, dout: &B::Buf) {
        self.time("activation", 0.0, || self.inner.gelu_bwd(dx, x, dout))
    }
    fn swiglu_fwd(&self, out: &mut B::Buf, x: &B::Buf, i: usize) {
        self.time("activation", 0.0, || self.inner.swiglu_fwd(out, x, i))
    }
    fn swiglu_bwd(&self, dx: &mut B::Buf, x: &B::Buf, dout: &B::Buf, i: usize) {
        self.time("activation", 0.0, || self.inner.swiglu_bwd(dx, x, dout, i))
    }
    fn add(&self, out: &mut B::Buf, a: &B::Buf, b: &B::Buf) {
        self.time("residual", 0.0, || self.inner.add(out, a, b))
    }
    fn add_assign(&self, dst: &mut B::Buf, src: &B::Buf) {
        self.time("residual", 0.0, || self.inner.add_assign(dst, src))
    }
    fn logits_chunk_floats(&self) -> usize {
        self.inner.logits_chunk_floats()
    }
    fn recompute_activations(&self) -> bool {
        self.inner.recompute_activations()
    }
    fn has_attention_dropout(&self) -> bool {
        self.inner.has_attention_dropout()
    }
    fn attention_fwd_dropout(
        &self,
        out: &mut B::Buf,
        stats: &mut B::Buf,
        qkv: &B::Buf,
        key_mask: &B::Ids,
        shape: AttnShape,
        imp: AttnImpl,
        drop: crate::backend::DropoutMask,
    ) {
        self.time("attention", 0.0, || self.inner.attention_fwd_dropout(out, stats, qkv, key_mask, shape, imp, drop))
    }
    fn attention_bwd_dropout(
        &self,
        dqkv: &mut B::Buf,
        dout: &B::Buf,
        qkv: &B::Buf,
        out: &B::Buf,
        stats: &B::Buf,
        key_mask: &B::Ids,
        shape: AttnShape,
        imp: AttnImpl,
        drop: crate::backend::DropoutMask,
    ) {
        self.time("attention", 0.0, || self.inner.attention_bwd_dropout(dqkv, dout, qkv, out, stats, key_mask, shape, imp, drop))
    }
    fn dropout(&self, x: &mut B::Buf, mask: crate::backend::DropoutMask) {
        self.time("dropout", 0.0, || self.inner.dropout(x, mask))
    }
    fn add_cols(&self, dst: &mut B::Buf, src: &B::Buf, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        self.time("adapter", 0.0, || self.inner.add_cols(dst, src, rows, width, ld, off, scale))
    }
    fn take_cols(&self, dst: &mut B::Buf, src: &B::Buf, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        self.time("adapter", 0.0, || self.inner.take_cols(dst, src, rows, width, ld, off, scale))
    }
    fn lora_up(&self, out: &mut B::Buf, t: &B::Buf, b: &B::Buf, blk: crate::backend::ColBlock, rank: usize, scale: f32, add: bool) {
        let flops = 2.0 * (blk.rows * blk.width * rank) as f64;
        self.time("matmul", flops, || self.inner.lora_up(out, t, b, blk, rank, scale, add))
    }
    fn lora_up_bwd(
        &self,
        dt: (&mut B::Buf, bool),
        db: Option<&mut B::Buf>,
        dout: &B::Buf,
        t: &B::Buf,
        b: &B::Buf,
        blk: crate::backend::ColBlock,
        rank: usize,
        scale: f32,
    ) {
        let flops = 2.0 * (blk.rows * blk.width * rank) as f64 * (1 + db.is_some() as usize) as f64;
        self.time("matmul", flops, || self.inner.lora_up_bwd(dt, db, dout, t, b, blk, rank, scale))
    }
    fn lora_down_bwd(&self, dx: Option<&mut B::Buf>, da: Option<&mut B::Buf>, dt: &B::Buf, x: &B::Buf, a: &B::Buf, rows: usize, k: usize, rank: usize) {
        let flops = 2.0 * (rows * k * rank) as f64 * (dx.is_some() as usize + da.is_some() as usize) as f64;
        self.time("matmul", flops, || self.inner.lora_down_bwd(dx, da, dt, x, a, rows, k, rank))
    }
    fn merges_adapters(&self) -> bool {
        self.inner.merges_adapters()
    }
    fn lora_merge(&self, dst: &mut B::Buf, w: &B::Buf, parts: &[super::MergedPart<'_, B::Buf>], out: usize, k: usize) -> bool {
        let flops = parts.iter().map(|p| 2.0 * (p.cols * k * p.r) as f64).sum();
        self.time("matmul", flops, || self.inner.lora_merge(dst, w, parts, out, k))
    }
    fn dora_norm(&self, n: &mut B::Buf, w: &B::Buf, a: &B::Buf, b: &B::Buf, off: usize, cols: usize, k: usize, r: usize, scale: f32) {
        self.time("adapter", 0.0, || self.inner.dora_norm(n, w, a, b, off, cols, k, r, scale))
    }
    fn dora_fwd(
        &self,
        out: &mut B::Buf,
        base: Option<&B::Buf>,
        bias: Option<&B::Buf>,
        u: &B::Buf,
        m: &B::Buf,
        n: &B::Buf,
        blk: crate::backend::ColBlock,
        scale: f32,
    ) {
        self.time("adapter", 0.0, || self.inner.dora_fwd(out, base, bias, u, m, n, blk, scale))
    }
    fn dora_bwd(
        &self,
        dm: Option<(&mut B::Buf, &B::Buf, &B::Buf)>,
        gu: Option<&mut B::Buf>,
        gb: Option<(&mut B::Buf, f32)>,
        dout: &B::Buf,
        m: &B::Buf,
        n: &B::Buf,
        blk: crate::backend::ColBlock,
        scale: f32,
    ) {
        self.time("adapter", 0.0, || self.inner.dora_bwd(dm, gu, gb, dout, m, n, blk, scale))
    }
    fn cross_entropy(&self, logits: &mut B::Buf, targets: &B::Ids, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows> {
        self.time("cross_entropy", 0.0, || self.inner.cross_entropy(logits, targets, v, smoothing, grad_scale))
    }
    fn cross_entropy_into(&self, logits: &mut B::Buf, targets: &B::Ids, v: usize, smoothing: f32, grad_scale: Option<f32>, loss: &mut B::Buf, row0: usize) {
        self.time("cross_entropy", 0.0, || self.inner.cross_entropy_into(logits, targets, v, smoothing, grad_scale, loss, row0))
    }
    fn token_stats(&self, logits: &B::Buf, targets: &B::Ids, v: usize, want: StatsWanted) -> Result<TokenStats> {
        self.time("cross_entropy", 0.0, || self.inner.token_stats(logits, targets, v, want))
    }
    fn token_stats_bwd(&self, logits: &mut B::Buf, targets: &B::Ids, v: usize, stats: &TokenStats, grads: &StatGrads) {
        self.time("cross_entropy", 0.0, || self.inner.token_stats_bwd(logits, targets, v, stats, grads))
    }
    fn sum_squares(&self, buf: &B::Buf) -> Result<f64> {
        self.time("optimizer", 0.0, || self.inner.sum_squares(buf))
    }
    fn scale(&self, buf: &mut B::Buf, s: f32) {
        self.time("optimizer", 0.0, || self.inner.scale(buf, s))
    }
    fn adamw(&self, p: &mut B::Buf, g: &B::Buf, m: &mut B::Buf, v: &mut B::Buf, hp: AdamWStep, decay: bool) {
        self.time("optimizer", 0.0, || self.inner.adamw(p, g, m, v, hp, decay))
    }
    fn sum_squares_multi(&self, bufs: &[&B::Buf]) -> Result<Vec<f64>> {
        self.time("optimizer", 0.0, || self.inner.sum_squares_multi(bufs))
    }
    fn adamw_multi(&self, tensors: &mut [super::AdamWArgs<'_, Self>], hp: AdamWStep) {
        self.time("optimizer", 0.0, || self.inner.adamw_multi(tensors, hp))
    }
    #[allow(clippy::too_many_arguments)] // as Backend::adamw_range
    fn adamw_range(&self, p: &mut B::Buf, g: &B::Buf, at: usize, m: &mut B::Buf, v: &mut B::Buf, hp: AdamWStep, decay: bool) -> Result<()> {
        self.time("optimizer", 0.0, || self.inner.adamw_range(p, g, at, m, v, hp, decay))
    }
    fn check_head_dim(&self, head_dim: usize) -> Result<(), String> {
        self.inner.check_head_dim(head_dim)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn free_memory(&self) -> Option<u128> {
        self.inner.free_memory()
    }
    fn recover_out_of_memory(&self) -> Result<()> {
        self.inner.recover_out_of_memory()
    }
    fn head_loss_uses_scratch(&self, v: usize) -> bool {
        self.inner.head_loss_uses_scratch(v)
    }
    fn head_loss(
        &self,
        logits: &mut B::Buf,
        x: &B::Buf,
        w: &B::Buf,
        targets: &B::Ids,
        (n, k, v): (usize, usize, usize),
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut B::Buf,
        row0: usize,
        back: Option<(&mut B::Buf, Option<&mut B::Buf>)>,
    ) {
        let flops = 2.0 * (n * k * v) as f64 * if back.is_some() { 3.0 } else { 1.0 };
        self.time("lm_head", flops, || self.inner.head_loss(logits, x, w, targets, (n, k, v), smoothing, grad_scale, loss, row0, back))
    }
    fn keep_working_copy(&self, w: &B::Buf) {
        // a cast of a product operand, timed as the products' own casts are
        self.time("matmul", 0.0, || self.inner.keep_working_copy(w))
    }
    fn drop_working_copy(&self, w: &B::Buf) {
        self.inner.drop_working_copy(w)
    }
    fn begin_operand_reuse(&self, bufs: &[&B::Buf]) {
        self.inner.begin_operand_reuse(bufs)
    }
    fn end_operand_reuse(&self) {
        self.inner.end_operand_reuse()
    }
    fn hold_operand(&self, buf: &B::Buf) {
        self.inner.hold_operand(buf)
    }
    fn hold_operand_only(&self, buf: &B::Buf) {
        self.inner.hold_operand_only(buf)
    }
    fn release_operand(&self, buf: &B::Buf) {
        self.inner.release_operand(buf)
    }
    fn release_operands(&self) {
        self.inner.release_operands()
    }
    fn group_id(&self) -> Result<Vec<u8>> {
        self.inner.group_id()
    }
    fn group_join(&self, id: &[u8], rank: usize, world: usize) -> Result<()> {
        self.inner.group_join(id, rank, world)
    }
    fn group_op(&self, buf: &mut B::Buf, start: usize, len: usize, op: crate::backend::GroupOp) -> Result<()> {
        self.time("collective", 0.0, || self.inner.group_op(buf, start, len, op))
    }
}
