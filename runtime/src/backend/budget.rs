//! A backend decorator with a memory budget: every buffer counts its bytes against a fixed
//! total while it lives, and an allocation past the total fails with [`Error::OutOfMemory`], as
//! a device's allocator does when it runs out. It lets the CPU stand in for a device of a given
//! size, so the out-of-memory paths (the error reaching the caller as a value, and
//! `auto_find_batch_size` retrying with a smaller batch) are exercised without a GPU.
//!
//! The budget is not advertised: [`Backend::free_memory`] is the inner backend's, so a planner
//! sees what it would see on a device whose memory turned out smaller than planned for (another
//! process, fragmentation, an estimate that was off), which is when a run meets the error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{AdamWArgs, AdamWStep, AttnImpl, AttnShape, Backend, LossRows, StatGrads, StatsWanted, TokenStats};
use crate::error::{Error, Result};

/// A buffer of the inner backend and the bytes it holds against the budget (given back when
/// it is dropped).
pub struct Held<T> {
    pub buf: T,
    bytes: usize,
    used: Arc<AtomicUsize>,
}

impl<T> Drop for Held<T> {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// `inner` with at most `limit` bytes of buffers alive at once. Clones share the budget.
#[derive(Clone)]
pub struct Budget<B> {
    pub inner: B,
    limit: usize,
    used: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl<B: Backend> Budget<B> {
    pub fn new(inner: B, limit_bytes: usize) -> Self {
        Budget { inner, limit: limit_bytes, used: Arc::new(AtomicUsize::new(0)), peak: Arc::new(AtomicUsize::new(0)) }
    }

    /// The most bytes held at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Bytes held by live buffers.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// Reserves `bytes`, then makes the buffer; the reservation is given back if either fails.
    fn hold<T>(&self, bytes: usize, make: impl FnOnce() -> Result<T>) -> Result<Held<T>> {
        let before = self.used.fetch_add(bytes, Ordering::SeqCst);
        if before + bytes > self.limit {
            self.used.fetch_sub(bytes, Ordering::SeqCst);
            let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
            return Err(Error::OutOfMemory(format!(
                "out of memory: allocating {:.2} MiB with {:.2} MiB of the {:.2} MiB budget in use",
                mib(bytes),
                mib(before),
                mib(self.limit)
            )));
        }
        self.peak.fetch_max(before + bytes, Ordering::SeqCst);
        match make() {
            Ok(buf) => Ok(Held { buf, bytes, used: self.used.clone() }),
            Err(e) => {
                self.used.fetch_sub(bytes, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}

type Buf<B> = Held<<B as Backend>::Buf>;
type Ids<B> = Held<<B as Backend>::Ids>;

fn inner_mut<T>(h: Option<&mut Held<T>>) -> Option<&mut T> {
    h.map(|h| &mut h.buf)
}

impl<B: Backend> Backend for Budget<B> {
    type Buf = Buf<B>;
    type Ids = Ids<B>;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn zeros(&self, n: usize) -> Result<Buf<B>> {
        self.hold(4 * n, || self.inner.zeros(n))
    }
    fn upload(&self, data: &[f32]) -> Result<Buf<B>> {
        self.hold(4 * data.len(), || self.inner.upload(data))
    }
    fn upload_ids(&self, data: &[i32]) -> Result<Ids<B>> {
        self.hold(4 * data.len(), || self.inner.upload_ids(data))
    }
    fn download(&self, buf: &Buf<B>) -> Result<Vec<f32>> {
        self.inner.download(&buf.buf)
    }
    fn len(&self, buf: &Buf<B>) -> usize {
        self.inner.len(&buf.buf)
    }
    fn host_mut<'a>(&self, buf: &'a mut Buf<B>) -> Option<&'a mut [f32]> {
        self.inner.host_mut(&mut buf.buf)
    }
    fn fill(&self, buf: &mut Buf<B>, value: f32) {
        self.inner.fill(&mut buf.buf, value)
    }
    fn fill_multi(&self, bufs: &mut [&mut Buf<B>], value: f32) {
        self.inner.fill_multi(&mut bufs.iter_mut().map(|b| &mut b.buf).collect::<Vec<_>>(), value)
    }
    fn copy(&self, dst: &mut Buf<B>, src: &Buf<B>) {
        self.inner.copy(&mut dst.buf, &src.buf)
    }
    fn copy_range(&self, dst: &mut Buf<B>, dst_off: usize, src: &Buf<B>, src_off: usize, n: usize) {
        self.inner.copy_range(&mut dst.buf, dst_off, &src.buf, src_off, n)
    }
    fn embedding_fwd(&self, out: &mut Buf<B>, ids: &Ids<B>, wte: &Buf<B>, wpe: Option<(&Buf<B>, &Ids<B>)>, c: usize) {
        self.inner.embedding_fwd(&mut out.buf, &ids.buf, &wte.buf, wpe.map(|(w, p)| (&w.buf, &p.buf)), c)
    }
    fn embedding_bwd(&self, dwte: &mut Buf<B>, dwpe: Option<(&mut Buf<B>, &Ids<B>)>, ids: &Ids<B>, dout: &Buf<B>, c: usize) {
        self.inner.embedding_bwd(&mut dwte.buf, dwpe.map(|(w, p)| (&mut w.buf, &p.buf)), &ids.buf, &dout.buf, c)
    }
    fn layernorm_fwd(&self, out: &mut Buf<B>, mean: &mut Buf<B>, rstd: &mut Buf<B>, x: &Buf<B>, w: &Buf<B>, b: Option<&Buf<B>>, c: usize, eps: f32) {
        self.inner.layernorm_fwd(&mut out.buf, &mut mean.buf, &mut rstd.buf, &x.buf, &w.buf, b.map(|b| &b.buf), c, eps)
    }
    fn layernorm_bwd(
        &self,
        dx: &mut Buf<B>,
        dw: &mut Buf<B>,
        db: Option<&mut Buf<B>>,
        dout: &Buf<B>,
        x: &Buf<B>,
        w: &Buf<B>,
        mean: &Buf<B>,
        rstd: &Buf<B>,
        c: usize,
    ) {
        self.inner.layernorm_bwd(&mut dx.buf, &mut dw.buf, inner_mut(db), &dout.buf, &x.buf, &w.buf, &mean.buf, &rstd.buf, c)
    }
    fn rmsnorm_fwd(&self, out: &mut Buf<B>, rstd: &mut Buf<B>, x: &Buf<B>, w: &Buf<B>, c: usize, eps: f32) {
        self.inner.rmsnorm_fwd(&mut out.buf, &mut rstd.buf, &x.buf, &w.buf, c, eps)
    }
    fn rmsnorm_bwd(&self, dx: &mut Buf<B>, dw: &mut Buf<B>, dout: &Buf<B>, x: &Buf<B>, w: &Buf<B>, rstd: &Buf<B>, c: usize) {
        self.inner.rmsnorm_bwd(&mut dx.buf, &mut dw.buf, &dout.buf, &x.buf, &w.buf, &rstd.buf, c)
    }
    fn matmul_fwd(&self, out: &mut Buf<B>, inp: &Buf<B>, w: &Buf<B>, bias: Option<&Buf<B>>, n: usize, k: usize, m: usize) {
        self.inner.matmul_fwd(&mut out.buf, &inp.buf, &w.buf, bias.map(|b| &b.buf), n, k, m)
    }
    fn matmul_fwd_add(&self, out: &mut Buf<B>, inp: &Buf<B>, w: &Buf<B>, bias: Option<&Buf<B>>, res: &Buf<B>, n: usize, k: usize, m: usize) {
        self.inner.matmul_fwd_add(&mut out.buf, &inp.buf, &w.buf, bias.map(|b| &b.buf), &res.buf, n, k, m)
    }
    fn matmul_bwd(
        &self,
        dinp: Option<&mut Buf<B>>,
        dw: Option<&mut Buf<B>>,
        dbias: Option<&mut Buf<B>>,
        dout: &Buf<B>,
        inp: &Buf<B>,
        w: &Buf<B>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        self.inner.matmul_bwd(inner_mut(dinp), inner_mut(dw), inner_mut(dbias), &dout.buf, &inp.buf, &w.buf, n, k, m)
    }
    fn act_matmul_bwd(
        &self,
        act: crate::backend::Activation,
        dinp: Option<&mut Buf<B>>,
        dw: Option<&mut Buf<B>>,
        dbias: Option<&mut Buf<B>>,
        dpre: &mut Buf<B>,
        dact: &Buf<B>,
        pre: &Buf<B>,
        inp: &Buf<B>,
        w: &Buf<B>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let (dinp, dw, dbias) = (inner_mut(dinp), inner_mut(dw), inner_mut(dbias));
        self.inner.act_matmul_bwd(act, dinp, dw, dbias, &mut dpre.buf, &dact.buf, &pre.buf, &inp.buf, &w.buf, n, k, m)
    }
    fn attention_fwd(&self, out: &mut Buf<B>, stats: &mut Buf<B>, qkv: &Buf<B>, key_mask: &Ids<B>, shape: AttnShape, imp: AttnImpl) {
        self.inner.attention_fwd(&mut out.buf, &mut stats.buf, &qkv.buf, &key_mask.buf, shape, imp)
    }
    fn attention_bwd(&self, dqkv: &mut Buf<B>, dout: &Buf<B>, qkv: &Buf<B>, out: &Buf<B>, stats: &Buf<B>, key_mask: &Ids<B>, shape: AttnShape, imp: AttnImpl) {
        self.inner.attention_bwd(&mut dqkv.buf, &dout.buf, &qkv.buf, &out.buf, &stats.buf, &key_mask.buf, shape, imp)
    }
    fn kv_append(&self, k_cache: &mut Buf<B>, v_cache: &mut Buf<B>, qkv: &Buf<B>, slot: usize, shape: AttnShape, max_len: usize) {
        self.inner.kv_append(&mut k_cache.buf, &mut v_cache.buf, &qkv.buf, slot, shape, max_len)
    }
    fn attention_decode(
        &self,
        out: &mut Buf<B>,
        qkv: &Buf<B>,
        k_cache: &Buf<B>,
        v_cache: &Buf<B>,
        key_mask: &Ids<B>,
        slot: usize,
        shape: AttnShape,
        max_len: usize,
    ) {
        self.inner.attention_decode(&mut out.buf, &qkv.buf, &k_cache.buf, &v_cache.buf, &key_mask.buf, slot, shape, max_len)
    }
    fn rope(&self, qkv: &mut Buf<B>, positions: &Ids<B>, shape: AttnShape, theta: f32, inverse: bool) {
        self.inner.rope(&mut qkv.buf, &positions.buf, shape, theta, inverse)
    }
    fn gelu_fwd(&self, out: &mut Buf<B>, x: &Buf<B>) {
        self.inner.gelu_fwd(&mut out.buf, &x.buf)
    }
    fn gelu_bwd(&self, dx: &mut Buf<B>, x: &Buf<B>, dout: &Buf<B>) {
        self.inner.gelu_bwd(&mut dx.buf, &x.buf, &dout.buf)
    }
    fn swiglu_fwd(&self, out: &mut Buf<B>, x: &Buf<B>, i: usize) {
        self.inner.swiglu_fwd(&mut out.buf, &x.buf, i)
    }
    fn swiglu_bwd(&self, dx: &mut Buf<B>, x: &Buf<B>, dout: &Buf<B>, i: usize) {
        self.inner.swiglu_bwd(&mut dx.buf, &x.buf, &dout.buf, i)
    }
    fn add(&self, out: &mut Buf<B>, a: &Buf<B>, b: &Buf<B>) {
        self.inner.add(&mut out.buf, &a.buf, &b.buf)
    }
    fn add_assign(&self, dst: &mut Buf<B>, src: &Buf<B>) {
        self.inner.add_assign(&mut dst.buf, &src.buf)
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
        out: &mut Buf<B>,
        stats: &mut Buf<B>,
        qkv: &Buf<B>,
        key_mask: &Ids<B>,
        shape: AttnShape,
        imp: AttnImpl,
        drop: crate::backend::DropoutMask,
    ) {
        self.inner.attention_fwd_dropout(&mut out.buf, &mut stats.buf, &qkv.buf, &key_mask.buf, shape, imp, drop)
    }
    fn attention_bwd_dropout(
        &self,
        dqkv: &mut Buf<B>,
        dout: &Buf<B>,
        qkv: &Buf<B>,
        out: &Buf<B>,
        stats: &Buf<B>,
        key_mask: &Ids<B>,
        shape: AttnShape,
        imp: AttnImpl,
        drop: crate::backend::DropoutMask,
    ) {
        self.inner.attention_bwd_dropout(&mut dqkv.buf, &dout.buf, &qkv.buf, &out.buf, &stats.buf, &key_mask.buf, shape, imp, drop)
    }
    fn dropout(&self, x: &mut Buf<B>, mask: crate::backend::DropoutMask) {
        self.inner.dropout(&mut x.buf, mask)
    }
    fn add_cols(&self, dst: &mut Buf<B>, src: &Buf<B>, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        self.inner.add_cols(&mut dst.buf, &src.buf, rows, width, ld, off, scale)
    }
    fn take_cols(&self, dst: &mut Buf<B>, src: &Buf<B>, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        self.inner.take_cols(&mut dst.buf, &src.buf, rows, width, ld, off, scale)
    }
    fn lora_up(&self, out: &mut Buf<B>, t: &Buf<B>, b: &Buf<B>, blk: crate::backend::ColBlock, rank: usize, scale: f32, add: bool) {
        self.inner.lora_up(&mut out.buf, &t.buf, &b.buf, blk, rank, scale, add)
    }
    fn lora_up_bwd(
        &self,
        dt: (&mut Buf<B>, bool),
        db: Option<&mut Buf<B>>,
        dout: &Buf<B>,
        t: &Buf<B>,
        b: &Buf<B>,
        blk: crate::backend::ColBlock,
        rank: usize,
        scale: f32,
    ) {
        self.inner.lora_up_bwd((&mut dt.0.buf, dt.1), db.map(|d| &mut d.buf), &dout.buf, &t.buf, &b.buf, blk, rank, scale)
    }
    fn lora_down_bwd(&self, dx: Option<&mut Buf<B>>, da: Option<&mut Buf<B>>, dt: &Buf<B>, x: &Buf<B>, a: &Buf<B>, rows: usize, k: usize, rank: usize) {
        self.inner.lora_down_bwd(dx.map(|d| &mut d.buf), da.map(|d| &mut d.buf), &dt.buf, &x.buf, &a.buf, rows, k, rank)
    }
    fn merges_adapters(&self) -> bool {
        self.inner.merges_adapters()
    }
    fn lora_merge(&self, dst: &mut Buf<B>, w: &Buf<B>, parts: &[super::MergedPart<'_, Buf<B>>], out: usize, k: usize) -> bool {
        let inner: Vec<_> = parts.iter().map(|p| super::MergedPart { a: &p.a.buf, b: &p.b.buf, off: p.off, cols: p.cols, r: p.r, scale: p.scale }).collect();
        self.inner.lora_merge(&mut dst.buf, &w.buf, &inner, out, k)
    }
    fn dora_norm(&self, n: &mut Buf<B>, w: &Buf<B>, a: &Buf<B>, b: &Buf<B>, off: usize, cols: usize, k: usize, r: usize, scale: f32) {
        self.inner.dora_norm(&mut n.buf, &w.buf, &a.buf, &b.buf, off, cols, k, r, scale)
    }
    fn dora_fwd(
        &self,
        out: &mut Buf<B>,
        base: Option<&Buf<B>>,
        bias: Option<&Buf<B>>,
        u: &Buf<B>,
        m: &Buf<B>,
        n: &Buf<B>,
        blk: crate::backend::ColBlock,
        scale: f32,
    ) {
        self.inner.dora_fwd(&mut out.buf, base.map(|b| &b.buf), bias.map(|b| &b.buf), &u.buf, &m.buf, &n.buf, blk, scale)
    }
    fn dora_bwd(
        &self,
        dm: Option<(&mut Buf<B>, &Buf<B>, &Buf<B>)>,
        gu: Option<&mut Buf<B>>,
        gb: Option<(&mut Buf<B>, f32)>,
        dout: &Buf<B>,
        m: &Buf<B>,
        n: &Buf<B>,
        blk: crate::backend::ColBlock,
        scale: f32,
    ) {
        let dm = dm.map(|(d, b, u)| (&mut d.buf, &b.buf, &u.buf));
        self.inner.dora_bwd(dm, gu.map(|g| &mut g.buf), gb.map(|(g, s)| (&mut g.buf, s)), &dout.buf, &m.buf, &n.buf, blk, scale)
    }
    fn cross_entropy(&self, logits: &mut Buf<B>, targets: &Ids<B>, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows> {
        self.inner.cross_entropy(&mut logits.buf, &targets.buf, v, smoothing, grad_scale)
    }
    fn cross_entropy_into(&self, logits: &mut Buf<B>, targets: &Ids<B>, v: usize, smoothing: f32, grad_scale: Option<f32>, loss: &mut Buf<B>, row0: usize) {
        self.inner.cross_entropy_into(&mut logits.buf, &targets.buf, v, smoothing, grad_scale, &mut loss.buf, row0)
    }
    fn token_stats(&self, logits: &Buf<B>, targets: &Ids<B>, v: usize, want: StatsWanted) -> Result<TokenStats> {
        self.inner.token_stats(&logits.buf, &targets.buf, v, want)
    }
    fn token_stats_bwd(&self, logits: &mut Buf<B>, targets: &Ids<B>, v: usize, stats: &TokenStats, grads: &StatGrads) {
        self.inner.token_stats_bwd(&mut logits.buf, &targets.buf, v, stats, grads)
    }
    fn sum_squares(&self, buf: &Buf<B>) -> Result<f64> {
        self.inner.sum_squares(&buf.buf)
    }
    fn sum_squares_multi(&self, bufs: &[&Buf<B>]) -> Result<Vec<f64>> {
        let inner: Vec<&B::Buf> = bufs.iter().map(|b| &b.buf).collect();
        self.inner.sum_squares_multi(&inner)
    }
    fn scale(&self, buf: &mut Buf<B>, s: f32) {
        self.inner.scale(&mut buf.buf, s)
    }
    fn adamw(&self, p: &mut Buf<B>, g: &Buf<B>, m: &mut Buf<B>, v: &mut Buf<B>, hp: AdamWStep, decay: bool) {
        self.inner.adamw(&mut p.buf, &g.buf, &mut m.buf, &mut v.buf, hp, decay)
    }
    // (`adamw_range` is the default's: its two temporaries count against the budget, as the
    // CUDA backend's range update allocates them)
    fn adamw_multi(&self, tensors: &mut [AdamWArgs<'_, Self>], hp: AdamWStep) {
        let mut inner: Vec<AdamWArgs<'_, B>> = tensors.iter_mut().map(|(p, g, m, v, decay)| (&mut p.buf, &g.buf, &mut m.buf, &mut v.buf, *decay)).collect();
        self.inner.adamw_multi(&mut inner, hp)
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
        logits: &mut Buf<B>,
        x: &Buf<B>,
        w: &Buf<B>,
        targets: &Ids<B>,
        nkv: (usize, usize, usize),
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut Buf<B>,
        row0: usize,
        back: Option<(&mut Buf<B>, Option<&mut Buf<B>>)>,
    ) {
        let back = back.map(|(dx, dw)| (&mut dx.buf, dw.map(|d| &mut d.buf)));
        self.inner.head_loss(&mut logits.buf, &x.buf, &w.buf, &targets.buf, nkv, smoothing, grad_scale, &mut loss.buf, row0, back)
    }
    fn keep_working_copy(&self, w: &Buf<B>) {
        self.inner.keep_working_copy(&w.buf)
    }
    fn drop_working_copy(&self, w: &Buf<B>) {
        self.inner.drop_working_copy(&w.buf)
    }
    fn begin_operand_reuse(&self, bufs: &[&Buf<B>]) {
        let inner: Vec<&B::Buf> = bufs.iter().map(|b| &b.buf).collect();
        self.inner.begin_operand_reuse(&inner)
    }
    fn end_operand_reuse(&self) {
        self.inner.end_operand_reuse()
    }
    fn hold_operand(&self, buf: &Buf<B>) {
        self.inner.hold_operand(&buf.buf)
    }
    fn hold_operand_only(&self, buf: &Buf<B>) {
        self.inner.hold_operand_only(&buf.buf)
    }
    fn release_operand(&self, buf: &Buf<B>) {
        self.inner.release_operand(&buf.buf)
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
    fn group_op(&self, buf: &mut Buf<B>, start: usize, len: usize, op: crate::backend::GroupOp) -> Result<()> {
        self.inner.group_op(&mut buf.buf, start, len, op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn buffers_count_while_they_live_and_an_allocation_past_the_budget_is_out_of_memory() {
        let be = Budget::new(Cpu, 4000);
        let a = be.zeros(500).unwrap();
        let ids = be.upload_ids(&[1; 250]).unwrap();
        assert_eq!(be.used(), 3000);
        let err = be.zeros(300).err().expect("3000 + 1200 bytes exceed 4000");
        assert!(matches!(err, Error::OutOfMemory(_)), "{err:?}");
        assert!(err.to_string().contains("budget"), "{err}");
        assert_eq!(be.used(), 3000, "a refused allocation holds nothing");
        drop(a);
        assert_eq!(be.used(), 1000);
        let b = be.upload(&[2.0; 750]).unwrap();
        assert_eq!(be.download(&b).unwrap(), vec![2.0; 750]);
        drop((b, ids));
        assert_eq!(be.used(), 0);
        assert_eq!(be.peak(), 4000, "the high-water mark: 1000 + 3000 bytes");
    }
}
