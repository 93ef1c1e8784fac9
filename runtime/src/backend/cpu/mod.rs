//! The CPU backend: the reference implementation of the op set, multi-threaded with rayon and
//! written so that the inner loops vectorise. Matrix products go through the `gemm` crate.

mod attention;
mod dora;
mod loss;
pub mod math;
mod matmul;
mod norm;
mod optim;
mod pointwise;
mod seq2seq;

use crate::error::Result;

use super::{AdamWStep, AttnImpl, AttnShape, Backend, ColBlock, LossRows, StatGrads, StatsWanted, TokenStats};

/// The CPU backend. Buffers are plain `Vec`s.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        zeroed(n)
    }
    fn upload_vec(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        let mut v = zeroed(data.len())?;
        v.copy_from_slice(data);
        Ok(v)
    }
    fn upload_ids(&self, data: &[i32]) -> Result<Vec<i32>> {
        let mut v = zeroed(data.len())?;
        v.copy_from_slice(data);
        Ok(v)
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn host_mut<'a>(&self, buf: &'a mut Vec<f32>) -> Option<&'a mut [f32]> {
        Some(buf)
    }
    fn fill(&self, buf: &mut Vec<f32>, value: f32) {
        buf.fill(value)
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        dst.copy_from_slice(src)
    }
    fn copy_range(&self, dst: &mut Vec<f32>, dst_off: usize, src: &Vec<f32>, src_off: usize, n: usize) {
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n])
    }

    fn embedding_fwd(&self, out: &mut Vec<f32>, ids: &Vec<i32>, wte: &Vec<f32>, wpe: Option<(&Vec<f32>, &Vec<i32>)>, c: usize) {
        pointwise::embedding_fwd(out, ids, wte, wpe.map(|(w, p)| (w.as_slice(), p.as_slice())), c)
    }
    fn embedding_bwd(&self, dwte: &mut Vec<f32>, dwpe: Option<(&mut Vec<f32>, &Vec<i32>)>, ids: &Vec<i32>, dout: &Vec<f32>, c: usize) {
        pointwise::embedding_bwd(dwte, dwpe.map(|(w, p)| (w.as_mut_slice(), p.as_slice())), ids, dout, c)
    }

    fn layernorm_fwd(
        &self,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: Option<&Vec<f32>>,
        c: usize,
        eps: f32,
    ) {
        norm::layernorm_fwd(out, mean, rstd, x, w, b.map(|b| b.as_slice()), c, eps)
    }
    fn layernorm_bwd(
        &self,
        dx: &mut Vec<f32>,
        dw: &mut Vec<f32>,
        db: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        c: usize,
    ) {
        norm::layernorm_bwd(dx, dw, db.map(|b| b.as_mut_slice()), dout, x, w, mean, rstd, c)
    }
    fn rmsnorm_fwd(&self, out: &mut Vec<f32>, rstd: &mut Vec<f32>, x: &Vec<f32>, w: &Vec<f32>, c: usize, eps: f32) {
        norm::rmsnorm_fwd(out, rstd, x, w, c, eps)
    }
    fn rmsnorm_bwd(&self, dx: &mut Vec<f32>, dw: &mut Vec<f32>, dout: &Vec<f32>, x: &Vec<f32>, w: &Vec<f32>, rstd: &Vec<f32>, c: usize) {
        norm::rmsnorm_bwd(dx, dw, dout, x, w, rstd, c)
    }

    fn matmul_fwd(&self, out: &mut Vec<f32>, inp: &Vec<f32>, w: &Vec<f32>, bias: Option<&Vec<f32>>, n: usize, k: usize, m: usize) {
        matmul::matmul_fwd(out, inp, w, bias.map(|b| b.as_slice()), n, k, m)
    }
    fn matmul_bwd(
        &self,
        dinp: Option<&mut Vec<f32>>,
        dw: Option<&mut Vec<f32>>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        matmul::matmul_bwd(dinp.map(|d| d.as_mut_slice()), dw.map(|d| d.as_mut_slice()), dbias.map(|d| d.as_mut_slice()), dout, inp, w, n, k, m)
    }

    fn attention_fwd(&self, out: &mut Vec<f32>, stats: &mut Vec<f32>, qkv: &Vec<f32>, key_mask: &Vec<i32>, shape: AttnShape, imp: AttnImpl) {
        match imp {
            AttnImpl::Eager => attention::eager_fwd(out, stats, qkv, key_mask, shape, None),
            AttnImpl::Flash => attention::flash_fwd(out, stats, qkv, key_mask, shape, None),
        }
    }
    fn attention_bwd(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        out: &Vec<f32>,
        stats: &Vec<f32>,
        key_mask: &Vec<i32>,
        shape: AttnShape,
        imp: AttnImpl,
    ) {
        match imp {
            AttnImpl::Eager => attention::eager_bwd(dqkv, dout, qkv, out, stats, shape, None),
            AttnImpl::Flash => attention::flash_bwd(dqkv, dout, qkv, out, stats, key_mask, shape, None),
        }
    }
    fn kv_append(&self, k_cache: &mut Vec<f32>, v_cache: &mut Vec<f32>, qkv: &Vec<f32>, slot: usize, shape: AttnShape, max_len: usize) {
        attention::kv_append(k_cache, v_cache, qkv, slot, shape, max_len)
    }
    fn attention_decode(
        &self,
        out: &mut Vec<f32>,
        qkv: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        key_mask: &Vec<i32>,
        slot: usize,
        shape: AttnShape,
        max_len: usize,
    ) {
        attention::attention_decode(out, qkv, k_cache, v_cache, key_mask, slot, shape, max_len)
    }
    fn rope(&self, qkv: &mut Vec<f32>, positions: &Vec<i32>, shape: AttnShape, theta: f32, inverse: bool) {
        attention::rope(qkv, positions, shape, theta, inverse)
    }

    fn gelu_fwd(&self, out: &mut Vec<f32>, x: &Vec<f32>) {
        pointwise::gelu_fwd(out, x)
    }
    fn gelu_bwd(&self, dx: &mut Vec<f32>, x: &Vec<f32>, dout: &Vec<f32>) {
        pointwise::gelu_bwd(dx, x, dout)
    }
    fn swiglu_fwd(&self, out: &mut Vec<f32>, x: &Vec<f32>, i: usize) {
        pointwise::swiglu_fwd(out, x, i)
    }
    fn swiglu_bwd(&self, dx: &mut Vec<f32>, x: &Vec<f32>, dout: &Vec<f32>, i: usize) {
        pointwise::swiglu_bwd(dx, x, dout, i)
    }
    fn add(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) {
        pointwise::add(out, a, b)
    }
    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        pointwise::add_assign(dst, src)
    }
    /// 16 MiB: on the CPU a smaller chunk costs no speed once it has 512 rows (measured at
    /// vocab 8192), and saves the memory of the whole logits.
    fn logits_chunk_floats(&self) -> usize {
        1 << 22
    }
    /// On: two norm passes and an activation pass per layer cost the CPU step about nothing
    /// measurable and save `2 hidden + intermediate` floats per token and layer.
    fn recompute_activations(&self) -> bool {
        true
    }
    fn has_attention_dropout(&self) -> bool {
        true
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd_dropout(
        &self,
        out: &mut Vec<f32>,
        stats: &mut Vec<f32>,
        qkv: &Vec<f32>,
        key_mask: &Vec<i32>,
        shape: AttnShape,
        imp: AttnImpl,
        drop: super::DropoutMask,
    ) {
        match imp {
            AttnImpl::Eager => attention::eager_fwd(out, stats, qkv, key_mask, shape, Some(drop)),
            AttnImpl::Flash => attention::flash_fwd(out, stats, qkv, key_mask, shape, Some(drop)),
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_dropout(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        out: &Vec<f32>,
        stats: &Vec<f32>,
        key_mask: &Vec<i32>,
        shape: AttnShape,
        imp: AttnImpl,
        drop: super::DropoutMask,
    ) {
        match imp {
            AttnImpl::Eager => attention::eager_bwd(dqkv, dout, qkv, out, stats, shape, Some(drop)),
            AttnImpl::Flash => attention::flash_bwd(dqkv, dout, qkv, out, stats, key_mask, shape, Some(drop)),
        }
    }
    fn dropout(&self, x: &mut Vec<f32>, mask: super::DropoutMask) {
        pointwise::dropout(x, mask)
    }
    fn add_cols(&self, dst: &mut Vec<f32>, src: &Vec<f32>, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        pointwise::add_cols(dst, src, rows, width, ld, off, scale)
    }
    fn take_cols(&self, dst: &mut Vec<f32>, src: &Vec<f32>, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        pointwise::take_cols(dst, src, rows, width, ld, off, scale)
    }
    fn lora_up(&self, out: &mut Vec<f32>, t: &Vec<f32>, b: &Vec<f32>, blk: ColBlock, rank: usize, scale: f32, add: bool) {
        matmul::lora_up(out, t, b, blk, rank, scale, add)
    }
    fn lora_up_bwd(
        &self,
        (dt, add): (&mut Vec<f32>, bool),
        db: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        t: &Vec<f32>,
        b: &Vec<f32>,
        blk: ColBlock,
        rank: usize,
        scale: f32,
    ) {
        matmul::lora_up_bwd((dt, add), db.map(|d| d.as_mut_slice()), dout, t, b, blk, rank, scale)
    }
    fn lora_down_bwd(
        &self,
        dx: Option<&mut Vec<f32>>,
        da: Option<&mut Vec<f32>>,
        dt: &Vec<f32>,
        x: &Vec<f32>,
        a: &Vec<f32>,
        rows: usize,
        k: usize,
        rank: usize,
    ) {
        matmul::lora_down_bwd(dx.map(|d| d.as_mut_slice()), da.map(|d| d.as_mut_slice()), dt, x, a, rows, k, rank)
    }
    fn merges_adapters(&self) -> bool {
        true
    }
    fn lora_merge(&self, dst: &mut Vec<f32>, w: &Vec<f32>, parts: &[super::MergedPart<'_, Vec<f32>>], out: usize, k: usize) -> bool {
        matmul::lora_merge(dst, w, parts, out, k);
        true
    }
    fn dora_norm(&self, n: &mut Vec<f32>, w: &Vec<f32>, a: &Vec<f32>, b: &Vec<f32>, off: usize, cols: usize, k: usize, r: usize, scale: f32) {
        dora::norm(n, w, a, b, off, cols, k, r, scale)
    }
    fn dora_fwd(
        &self,
        out: &mut Vec<f32>,
        base: Option<&Vec<f32>>,
        bias: Option<&Vec<f32>>,
        u: &Vec<f32>,
        m: &Vec<f32>,
        n: &Vec<f32>,
        blk: ColBlock,
        scale: f32,
    ) {
        dora::fwd(out, base.map(|b| b.as_slice()), bias.map(|b| b.as_slice()), u, m, n, blk, scale)
    }
    fn dora_bwd(
        &self,
        dm: Option<(&mut Vec<f32>, &Vec<f32>, &Vec<f32>)>,
        gu: Option<&mut Vec<f32>>,
        gb: Option<(&mut Vec<f32>, f32)>,
        dout: &Vec<f32>,
        m: &Vec<f32>,
        n: &Vec<f32>,
        blk: ColBlock,
        scale: f32,
    ) {
        let dm = dm.map(|(d, b, u)| (d.as_mut_slice(), b.as_slice(), u.as_slice()));
        dora::bwd(dm, gu.map(|g| g.as_mut_slice()), gb.map(|(g, s)| (g.as_mut_slice(), s)), dout, m, n, blk, scale)
    }

    fn cross_entropy(&self, logits: &mut Vec<f32>, targets: &Vec<i32>, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows> {
        Ok(loss::cross_entropy(logits, targets, v, smoothing, grad_scale))
    }
    fn cross_entropy_into(
        &self,
        logits: &mut Vec<f32>,
        targets: &Vec<i32>,
        v: usize,
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut Vec<f32>,
        row0: usize,
    ) {
        loss::cross_entropy_rows(logits, targets, v, smoothing, grad_scale, &mut loss[row0..row0 + targets.len()])
    }

    fn token_stats(&self, logits: &Vec<f32>, targets: &Vec<i32>, v: usize, want: StatsWanted) -> Result<TokenStats> {
        Ok(loss::token_stats(logits, targets, v, want))
    }
    fn token_stats_bwd(&self, logits: &mut Vec<f32>, targets: &Vec<i32>, v: usize, stats: &TokenStats, grads: &StatGrads) {
        loss::token_stats_bwd(logits, targets, v, stats, grads)
    }
    fn sum_squares(&self, buf: &Vec<f32>) -> Result<f64> {
        Ok(optim::sum_squares(buf))
    }
    fn scale(&self, buf: &mut Vec<f32>, s: f32) {
        optim::scale(buf, s)
    }
    fn adamw(&self, p: &mut Vec<f32>, g: &Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, hp: AdamWStep, decay: bool) {
        optim::adamw(p, g, m, v, hp, decay)
    }
    fn adamw_range(&self, p: &mut Vec<f32>, g: &Vec<f32>, at: usize, m: &mut Vec<f32>, v: &mut Vec<f32>, hp: AdamWStep, decay: bool) -> Result<()> {
        let n = m.len();
        optim::adamw(&mut p[at..at + n], &g[at..at + n], m, v, hp, decay);
        Ok(())
    }
}

/// A zeroed vector of `n` elements whose allocation failing is an [`Error::OutOfMemory`], not an
/// abort (as `vec![0; n]` would be under a memory limit). Zeroed pages come from the system
/// lazily, as with `vec!`.
fn zeroed<T: Zeroable>(n: usize) -> Result<Vec<T>> {
    let oom = || {
        crate::error::Error::OutOfMemory(format!(
            "allocating {:.2} GiB of host memory failed",
            (n as f64 * std::mem::size_of::<T>() as f64) / (1u64 << 30) as f64
        ))
    };
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| oom())?;
    // SAFETY: the layout has a non-zero size; all-zero bits are a valid value of every
    // `Zeroable` type; the vector takes the allocation with the layout it was made with.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<T>();
        if ptr.is_null() {
            return Err(oom());
        }
        Ok(Vec::from_raw_parts(ptr, n, n))
    }
}

/// Element types whose all-zero bit pattern is the value zero.
trait Zeroable: Copy {}
impl Zeroable for f32 {}
impl Zeroable for i32 {}
