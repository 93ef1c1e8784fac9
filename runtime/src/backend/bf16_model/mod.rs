//! A model of the CUDA backend's bf16 mode on the CPU: the CPU backend's ops, with every value
//! rounded to bf16 where that mode rounds it (docs/CUDA.md, "bf16 numerics"), and f32 everywhere
//! else. It runs the bf16 checks of `runtime cuda-check` on any machine (`--model`), so whether
//! the bf16 design keeps a training step and a 20-step loss curve within the stated limits of
//! the f32 CPU is known before a GPU runs it, and a GPU result far from the model's points at the
//! kernels, not at the rounding.
//!
//! What rounds, as the CUDA backend does it with its holds on (the default):
//! - every product operand (inputs, weights, output gradients, LoRA's `t`, `A`, `B` and `dt`);
//!   outputs and accumulations in f32, the bias added in f32, a bias gradient summed from the f32
//!   output gradient;
//! - a buffer held with [`Backend::hold_operand_only`] is written as bf16 alone by the op that
//!   computes it (a norm, an activation, the attention, a product overwriting its output when the
//!   product's output width, that of the output gradient for an input gradient, is a multiple of
//!   8), so every later reader sees it rounded;
//! - the attention reads its queries, keys and values in bf16 and, at head dims 64 and 128
//!   without dropout, rounds inside as the tensor-core kernels do ([`attention`]); its backward
//!   pass reads a held output in bf16 for `delta`;
//! - the fused LM head keeps its logits and their gradient in bf16.
//!
//! Left out: the order of the sums inside a product (cuBLASLt's, not the CPU's), the fallbacks in
//! which cuBLASLt has no plan for a bf16 output (that output is then f32), and speed: the
//! tensor-core attention's model is a plain loop, for the checks' shapes.

mod attention;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::Result;

use super::cpu::Cpu;
use super::seq2seq::{BiasedShape, Cols, QkvCols, Seq2SeqOps};
use super::{AdamWStep, AttnImpl, AttnShape, Backend, ColBlock, DropoutMask, GroupOp, LossRows, MergedPart, StatGrads, StatsWanted, TokenStats};

/// `x` rounded to bf16 (to nearest, ties to even, as the kernels' conversion does) and back.
pub(crate) fn round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `x` with every value [`round`]ed.
pub(crate) fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round(v)).collect()
}

fn round_in_place(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = round(*v));
}

/// The buffers held by [`Backend::hold_operand`] (`held`) and those of them held `only`, by
/// address.
#[derive(Default)]
struct Holds {
    held: HashSet<usize>,
    only: HashSet<usize>,
}

/// The CPU backend rounding where CUDA's bf16 mode rounds. Clones share their holds, as the CUDA
/// backend's clones do.
#[derive(Clone)]
pub struct Bf16Model {
    holds: Arc<Mutex<Holds>>,
    /// Whether holds are taken (`RUNTIME_CUDA_HOLDS=on`, the default); without them (`copies` or
    /// `off`, which give the same values) nothing is held `only` and the attention's output is
    /// read in f32 for `delta`.
    holds_on: bool,
}

impl Default for Bf16Model {
    fn default() -> Self {
        Bf16Model { holds: Arc::default(), holds_on: true }
    }
}

fn key(buf: &[f32]) -> Option<usize> {
    (!buf.is_empty()).then_some(buf.as_ptr() as usize)
}

impl Bf16Model {
    pub fn new() -> Self {
        Self::default()
    }
    /// The model of `RUNTIME_CUDA_HOLDS=copies` (or `off`): every hold ignored.
    pub fn without_holds() -> Self {
        Bf16Model { holds_on: false, ..Self::default() }
    }
    fn holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn is_held(&self, buf: &[f32]) -> bool {
        key(buf).is_some_and(|k| self.holds().held.contains(&k))
    }
    /// After an op that computes `out` (held-aware): rounds it when it is held `only`.
    fn computed(&self, out: &mut [f32]) {
        if key(out).is_some_and(|k| self.holds().only.contains(&k)) {
            round_in_place(out);
        }
    }
    /// A product overwriting `out`: rounded when held `only` and `width` (the product's output
    /// width; for an input gradient, the output gradient's) is a multiple of 8 (the bf16-output
    /// form; otherwise CUDA writes f32 and reads that).
    fn product_out(&self, out: &mut [f32], width: usize) {
        if super::aligned_ld(width) == width {
            self.computed(out);
        }
    }
    /// A write by an op that is not held-aware: CUDA widens a held-only buffer first and ends its
    /// hold, so what it holds from then on is f32.
    fn written(&self, buf: &[f32]) {
        if let Some(k) = key(buf) {
            let mut h = self.holds();
            h.held.remove(&k);
            h.only.remove(&k);
        }
    }
    /// The attention's output as its backward pass reads it for `delta`: its bf16 copy when held
    /// (None: `out` itself).
    fn held_output(&self, out: &[f32]) -> Option<Vec<f32>> {
        self.is_held(out).then(|| rounded(out))
    }
}

/// Whether the tensor-core kernels run the attention (bf16 mode, head dims 64 and 128, no
/// dropout on the probabilities).
fn tensor_cores(s: &AttnShape) -> bool {
    matches!(s.head_dim, 64 | 128)
}

/// `delta[(b * n_head + h) * seq + i] = dout . out` of each row and head.
fn row_deltas(dout: &[f32], out: &[f32], s: AttnShape) -> Vec<f32> {
    let d = s.head_dim;
    let mut delta = vec![0f32; s.batch * s.n_head * s.seq];
    for b in 0..s.batch {
        for h in 0..s.n_head {
            for i in 0..s.seq {
                let at = (b * s.seq + i) * s.out_width() + h * d;
                delta[(b * s.n_head + h) * s.seq + i] = dout[at..at + d].iter().zip(&out[at..at + d]).map(|(x, y)| x * y).sum();
            }
        }
    }
    delta
}

type Buf = Vec<f32>;
type Ids = Vec<i32>;

impl Backend for Bf16Model {
    type Buf = Buf;
    type Ids = Ids;

    fn name(&self) -> &'static str {
        "bf16-model"
    }
    fn zeros(&self, n: usize) -> Result<Buf> {
        let b = Cpu.zeros(n)?;
        self.written(&b);
        Ok(b)
    }
    fn upload(&self, data: &[f32]) -> Result<Buf> {
        let b = Cpu.upload(data)?;
        self.written(&b);
        Ok(b)
    }
    fn upload_vec(&self, data: Vec<f32>) -> Result<Buf> {
        let b = Cpu.upload_vec(data)?;
        self.written(&b);
        Ok(b)
    }
    fn upload_ids(&self, data: &[i32]) -> Result<Ids> {
        Cpu.upload_ids(data)
    }
    fn download(&self, buf: &Buf) -> Result<Vec<f32>> {
        Cpu.download(buf)
    }
    fn len(&self, buf: &Buf) -> usize {
        buf.len()
    }
    fn host_mut<'a>(&self, buf: &'a mut Buf) -> Option<&'a mut [f32]> {
        self.written(buf);
        Some(buf)
    }
    fn fill(&self, buf: &mut Buf, value: f32) {
        self.written(buf);
        Cpu.fill(buf, value)
    }
    fn copy(&self, dst: &mut Buf, src: &Buf) {
        self.written(dst);
        Cpu.copy(dst, src)
    }
    fn copy_range(&self, dst: &mut Buf, dst_off: usize, src: &Buf, src_off: usize, n: usize) {
        self.written(dst);
        Cpu.copy_range(dst, dst_off, src, src_off, n)
    }
    fn embedding_fwd(&self, out: &mut Buf, ids: &Ids, wte: &Buf, wpe: Option<(&Buf, &Ids)>, c: usize) {
        self.written(out);
        Cpu.embedding_fwd(out, ids, wte, wpe, c)
    }
    fn embedding_bwd(&self, dwte: &mut Buf, dwpe: Option<(&mut Buf, &Ids)>, ids: &Ids, dout: &Buf, c: usize) {
        Cpu.embedding_bwd(dwte, dwpe, ids, dout, c)
    }
    fn layernorm_fwd(&self, out: &mut Buf, mean: &mut Buf, rstd: &mut Buf, x: &Buf, w: &Buf, b: Option<&Buf>, c: usize, eps: f32) {
        Cpu.layernorm_fwd(out, mean, rstd, x, w, b, c, eps);
        self.computed(out);
    }
    fn layernorm_bwd(&self, dx: &mut Buf, dw: &mut Buf, db: Option<&mut Buf>, dout: &Buf, x: &Buf, w: &Buf, mean: &Buf, rstd: &Buf, c: usize) {
        Cpu.layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, c)
    }
    fn rmsnorm_fwd(&self, out: &mut Buf, rstd: &mut Buf, x: &Buf, w: &Buf, c: usize, eps: f32) {
        Cpu.rmsnorm_fwd(out, rstd, x, w, c, eps);
        self.computed(out);
    }
    fn rmsnorm_bwd(&self, dx: &mut Buf, dw: &mut Buf, dout: &Buf, x: &Buf, w: &Buf, rstd: &Buf, c: usize) {
        Cpu.rmsnorm_bwd(dx, dw, dout, x, w, rstd, c)
    }
    fn matmul_fwd(&self, out: &mut Buf, inp: &Buf, w: &Buf, bias: Option<&Buf>, n: usize, k: usize, m: usize) {
        Cpu.matmul_fwd(out, &rounded(inp), &rounded(w), bias, n, k, m);
        self.product_out(out, m);
    }
    fn matmul_fwd_add(&self, out: &mut Buf, inp: &Buf, w: &Buf, bias: Option<&Buf>, res: &Buf, n: usize, k: usize, m: usize) {
        self.written(out);
        Cpu.matmul_fwd_add(out, &rounded(inp), &rounded(w), bias, res, n, k, m)
    }
    fn matmul_bwd(&self, dinp: Option<&mut Buf>, dw: Option<&mut Buf>, dbias: Option<&mut Buf>, dout: &Buf, inp: &Buf, w: &Buf, n: usize, k: usize, m: usize) {
        // the bias gradient from the f32 output gradient, the products from its bf16 copy
        if let Some(db) = dbias {
            Cpu.matmul_bwd(None, None, Some(db), dout, inp, w, n, k, m);
        }
        // (an operand no asked-for product reads is passed as it is)
        let d = rounded(dout);
        let (ri, rw) = (dw.is_some().then(|| rounded(inp)), dinp.is_some().then(|| rounded(w)));
        let (inp, w) = (ri.as_ref().unwrap_or(inp), rw.as_ref().unwrap_or(w));
        match dinp {
            Some(dx) => {
                Cpu.matmul_bwd(Some(&mut *dx), dw, None, &d, inp, w, n, k, m);
                self.product_out(dx, m);
            }
            None => Cpu.matmul_bwd(None, dw, None, &d, inp, w, n, k, m),
        }
    }
    fn attention_fwd(&self, out: &mut Buf, stats: &mut Buf, qkv: &Buf, key_mask: &Ids, shape: AttnShape, imp: AttnImpl) {
        let q = rounded(qkv);
        if tensor_cores(&shape) {
            attention::forward(out, stats, &q, key_mask, shape, round);
        } else {
            Cpu.attention_fwd(out, stats, &q, key_mask, shape, imp);
        }
        self.computed(out);
    }
    fn attention_bwd(&self, dqkv: &mut Buf, dout: &Buf, qkv: &Buf, out: &Buf, stats: &Buf, key_mask: &Ids, shape: AttnShape, imp: AttnImpl) {
        let (q, held) = (rounded(qkv), self.held_output(out));
        let o = held.as_ref().unwrap_or(out);
        if tensor_cores(&shape) {
            let delta = row_deltas(dout, o, shape);
            attention::backward(dqkv, &rounded(dout), &q, &delta, stats, key_mask, shape, round);
        } else {
            Cpu.attention_bwd(dqkv, dout, &q, o, stats, key_mask, shape, imp);
        }
    }
    fn kv_append(&self, k_cache: &mut Buf, v_cache: &mut Buf, qkv: &Buf, slot: usize, shape: AttnShape, max_len: usize) {
        Cpu.kv_append(k_cache, v_cache, qkv, slot, shape, max_len)
    }
    fn attention_decode(&self, out: &mut Buf, qkv: &Buf, k_cache: &Buf, v_cache: &Buf, key_mask: &Ids, slot: usize, shape: AttnShape, max_len: usize) {
        Cpu.attention_decode(out, qkv, k_cache, v_cache, key_mask, slot, shape, max_len)
    }
    fn rope(&self, qkv: &mut Buf, positions: &Ids, shape: AttnShape, theta: f32, inverse: bool) {
        Cpu.rope(qkv, positions, shape, theta, inverse)
    }
    fn gelu_fwd(&self, out: &mut Buf, x: &Buf) {
        Cpu.gelu_fwd(out, x);
        self.computed(out);
    }
    fn gelu_bwd(&self, dx: &mut Buf, x: &Buf, dout: &Buf) {
        Cpu.gelu_bwd(dx, x, dout)
    }
    fn swiglu_fwd(&self, out: &mut Buf, x: &Buf, i: usize) {
        Cpu.swiglu_fwd(out, x, i);
        self.computed(out);
    }
    fn swiglu_bwd(&self, dx: &mut Buf, x: &Buf, dout: &Buf, i: usize) {
        Cpu.swiglu_bwd(dx, x, dout, i)
    }
    fn add(&self, out: &mut Buf, a: &Buf, b: &Buf) {
        self.written(out);
        Cpu.add(out, a, b)
    }
    fn add_assign(&self, dst: &mut Buf, src: &Buf) {
        self.written(dst);
        Cpu.add_assign(dst, src)
    }
    fn logits_chunk_floats(&self) -> usize {
        Cpu.logits_chunk_floats()
    }
    /// As CUDA: the activations are kept (and held) rather than recomputed.
    fn recompute_activations(&self) -> bool {
        false
    }
    fn has_attention_dropout(&self) -> bool {
        true
    }
    /// The tiled FMA kernels (dropout has no tensor-core form): only the inputs rounded.
    fn attention_fwd_dropout(&self, out: &mut Buf, stats: &mut Buf, qkv: &Buf, key_mask: &Ids, shape: AttnShape, imp: AttnImpl, drop: DropoutMask) {
        Cpu.attention_fwd_dropout(out, stats, &rounded(qkv), key_mask, shape, imp, drop);
        self.computed(out);
    }
    fn attention_bwd_dropout(
        &self,
        dqkv: &mut Buf,
        dout: &Buf,
        qkv: &Buf,
        out: &Buf,
        stats: &Buf,
        key_mask: &Ids,
        shape: AttnShape,
        imp: AttnImpl,
        drop: DropoutMask,
    ) {
        let held = self.held_output(out);
        Cpu.attention_bwd_dropout(dqkv, dout, &rounded(qkv), held.as_ref().unwrap_or(out), stats, key_mask, shape, imp, drop)
    }
    fn dropout(&self, x: &mut Buf, mask: DropoutMask) {
        self.written(x);
        Cpu.dropout(x, mask)
    }
    fn add_cols(&self, dst: &mut Buf, src: &Buf, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        self.written(dst);
        Cpu.add_cols(dst, src, rows, width, ld, off, scale)
    }
    fn take_cols(&self, dst: &mut Buf, src: &Buf, rows: usize, width: usize, ld: usize, off: usize, scale: f32) {
        self.written(dst);
        Cpu.take_cols(dst, src, rows, width, ld, off, scale)
    }
    fn lora_up(&self, out: &mut Buf, t: &Buf, b: &Buf, blk: ColBlock, rank: usize, scale: f32, add: bool) {
        self.written(out);
        Cpu.lora_up(out, &rounded(t), &rounded(b), blk, rank, scale, add)
    }
    fn lora_up_bwd(&self, dt: (&mut Buf, bool), db: Option<&mut Buf>, dout: &Buf, t: &Buf, b: &Buf, blk: ColBlock, rank: usize, scale: f32) {
        Cpu.lora_up_bwd(dt, db, &rounded(dout), &rounded(t), &rounded(b), blk, rank, scale)
    }
    fn lora_down_bwd(&self, dx: Option<&mut Buf>, da: Option<&mut Buf>, dt: &Buf, x: &Buf, a: &Buf, rows: usize, k: usize, rank: usize) {
        if let Some(dx) = dx.as_deref() {
            self.written(dx);
        }
        Cpu.lora_down_bwd(dx, da, &rounded(dt), &rounded(x), &rounded(a), rows, k, rank)
    }
    /// As CUDA: a bf16 product would round the adapters' share of a merged weight away.
    fn merges_adapters(&self) -> bool {
        false
    }
    fn lora_merge(&self, _dst: &mut Buf, _w: &Buf, _parts: &[MergedPart<'_, Buf>], _out: usize, _k: usize) -> bool {
        false
    }
    fn dora_norm(&self, n: &mut Buf, w: &Buf, a: &Buf, b: &Buf, off: usize, cols: usize, k: usize, r: usize, scale: f32) {
        Cpu.dora_norm(n, w, a, b, off, cols, k, r, scale)
    }
    fn dora_fwd(&self, out: &mut Buf, base: Option<&Buf>, bias: Option<&Buf>, u: &Buf, m: &Buf, n: &Buf, blk: ColBlock, scale: f32) {
        self.written(out);
        Cpu.dora_fwd(out, base, bias, u, m, n, blk, scale)
    }
    fn dora_bwd(
        &self,
        dm: Option<(&mut Buf, &Buf, &Buf)>,
        gu: Option<&mut Buf>,
        gb: Option<(&mut Buf, f32)>,
        dout: &Buf,
        m: &Buf,
        n: &Buf,
        blk: ColBlock,
        scale: f32,
    ) {
        Cpu.dora_bwd(dm, gu, gb, dout, m, n, blk, scale)
    }
    fn cross_entropy(&self, logits: &mut Buf, targets: &Ids, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows> {
        self.written(logits);
        Cpu.cross_entropy(logits, targets, v, smoothing, grad_scale)
    }
    fn cross_entropy_into(&self, logits: &mut Buf, targets: &Ids, v: usize, smoothing: f32, grad_scale: Option<f32>, loss: &mut Buf, row0: usize) {
        self.written(logits);
        Cpu.cross_entropy_into(logits, targets, v, smoothing, grad_scale, loss, row0)
    }
    /// As CUDA's bf16 mode: the logits are kept in memory of its own (in bf16).
    fn head_loss_uses_scratch(&self, _v: usize) -> bool {
        false
    }
    /// The logits `bf16(x w^T)` from bf16 operands, the loss from them in f32, their gradient
    /// rounded to bf16 before the backward products.
    fn head_loss(
        &self,
        _logits: &mut Buf,
        x: &Buf,
        w: &Buf,
        targets: &Ids,
        (n, k, v): (usize, usize, usize),
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut Buf,
        row0: usize,
        back: Option<(&mut Buf, Option<&mut Buf>)>,
    ) {
        let (x, w) = (rounded(x), rounded(w));
        let mut logits = vec![0f32; n * v];
        Cpu.matmul_fwd(&mut logits, &x, &w, None, n, k, v);
        round_in_place(&mut logits);
        Cpu.cross_entropy_into(&mut logits, targets, v, smoothing, grad_scale, loss, row0);
        // as CUDA: no backward pass without the loss gradient's scale
        if let (Some((dx, dw)), Some(_)) = (back, grad_scale) {
            round_in_place(&mut logits);
            self.written(dx);
            Cpu.matmul_bwd(Some(dx), dw, None, &logits, &x, &w, n, k, v);
        }
    }
    fn token_stats(&self, logits: &Buf, targets: &Ids, v: usize, want: StatsWanted) -> Result<TokenStats> {
        Cpu.token_stats(logits, targets, v, want)
    }
    fn token_stats_bwd(&self, logits: &mut Buf, targets: &Ids, v: usize, stats: &TokenStats, grads: &StatGrads) {
        self.written(logits);
        Cpu.token_stats_bwd(logits, targets, v, stats, grads)
    }
    fn sum_squares(&self, buf: &Buf) -> Result<f64> {
        Cpu.sum_squares(buf)
    }
    fn sum_squares_multi(&self, bufs: &[&Buf]) -> Result<Vec<f64>> {
        Cpu.sum_squares_multi(bufs)
    }
    fn scale(&self, buf: &mut Buf, s: f32) {
        self.written(buf);
        Cpu.scale(buf, s)
    }
    /// f32 master weights and moments; the products round the updated weight (CUDA's working
    /// copy is that rounding).
    fn adamw(&self, p: &mut Buf, g: &Buf, m: &mut Buf, v: &mut Buf, hp: AdamWStep, decay: bool) {
        Cpu.adamw(p, g, m, v, hp, decay)
    }
    fn adamw_multi(&self, tensors: &mut [super::AdamWArgs<'_, Self>], hp: AdamWStep) {
        Cpu.adamw_multi(tensors, hp)
    }
    fn adamw_range(&self, p: &mut Buf, g: &Buf, at: usize, m: &mut Buf, v: &mut Buf, hp: AdamWStep, decay: bool) -> Result<()> {
        Cpu.adamw_range(p, g, at, m, v, hp, decay)
    }
    /// CUDA's limit (its attention kernels take head dims up to 128).
    fn check_head_dim(&self, head_dim: usize) -> Result<(), String> {
        if head_dim > 128 {
            return Err(format!("head dim {head_dim}: the CUDA attention kernels (and this model of them) support head dims up to 128"));
        }
        Cpu.check_head_dim(head_dim)
    }
    /// (A buffer held `only` before is held plainly from here on, as on CUDA.)
    fn hold_operand(&self, buf: &Buf) {
        if let Some(k) = key(buf).filter(|_| self.holds_on) {
            let mut h = self.holds();
            h.held.insert(k);
            h.only.remove(&k);
        }
    }
    fn hold_operand_only(&self, buf: &Buf) {
        if let Some(k) = key(buf).filter(|_| self.holds_on) {
            let mut h = self.holds();
            h.held.insert(k);
            h.only.insert(k);
        }
    }
    fn release_operand(&self, buf: &Buf) {
        self.written(buf)
    }
    fn release_operands(&self) {
        *self.holds() = Holds::default();
    }
    fn group_id(&self) -> Result<Vec<u8>> {
        Cpu.group_id()
    }
    fn group_op(&self, buf: &mut Buf, start: usize, len: usize, op: GroupOp) -> Result<()> {
        Cpu.group_op(buf, start, len, op)
    }
}

/// The encoder-decoder ops run in f32 in bf16 mode too (only the products round).
impl Seq2SeqOps for Bf16Model {
    fn biased_attention_fwd(
        &self,
        out: &mut Buf,
        probs: &mut Buf,
        q: Cols<Buf>,
        k: Cols<Buf>,
        v: Cols<Buf>,
        bias: Option<&Buf>,
        key_mask: Option<&Ids>,
        shape: BiasedShape,
        scale: f32,
    ) {
        self.written(out);
        Cpu.biased_attention_fwd(out, probs, q, k, v, bias, key_mask, shape, scale)
    }
    fn biased_attention_bwd(
        &self,
        grads: (&mut Buf, &mut Buf, &mut Buf),
        dbias: Option<&mut Buf>,
        ds: &mut Buf,
        dout: &Buf,
        qkv: QkvCols<Buf>,
        probs: &Buf,
        shape: BiasedShape,
        scale: f32,
    ) {
        Cpu.biased_attention_bwd(grads, dbias, ds, dout, qkv, probs, shape, scale)
    }
    fn position_bias_fwd(&self, out: &mut Buf, table: &Buf, buckets: &Ids, n_head: usize) {
        self.written(out);
        Cpu.position_bias_fwd(out, table, buckets, n_head)
    }
    fn position_bias_bwd(&self, dtable: &mut Buf, dbias: &Buf, buckets: &Ids, n_head: usize) {
        Cpu.position_bias_bwd(dtable, dbias, buckets, n_head)
    }
    fn geglu_fwd(&self, out: &mut Buf, x: &Buf, i: usize) {
        self.written(out);
        Cpu.geglu_fwd(out, x, i)
    }
    fn geglu_bwd(&self, dx: &mut Buf, x: &Buf, dout: &Buf, i: usize) {
        Cpu.geglu_bwd(dx, x, dout, i)
    }
    fn gelu_erf_fwd(&self, out: &mut Buf, x: &Buf) {
        self.written(out);
        Cpu.gelu_erf_fwd(out, x)
    }
    fn gelu_erf_bwd(&self, dx: &mut Buf, x: &Buf, dout: &Buf) {
        Cpu.gelu_erf_bwd(dx, x, dout)
    }
    fn relu_fwd(&self, out: &mut Buf, x: &Buf) {
        self.written(out);
        Cpu.relu_fwd(out, x)
    }
    fn relu_bwd(&self, dx: &mut Buf, x: &Buf, dout: &Buf) {
        Cpu.relu_bwd(dx, x, dout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // not bf16 values: most have low mantissa bits set
        (0..n).map(|i| ((i as f32 + 0.37) * (seed as f32 + 1.13)).sin() * 1.234_567).collect()
    }

    /// Products read rounded operands; a product's output is rounded only while held `only` and
    /// of a width that is a multiple of 8, and a norm's while held `only`; a release, or a write
    /// by an op that is not held-aware, ends that; without holds nothing is held.
    #[test]
    fn outputs_held_only_are_rounded_and_operands_always() {
        let (n, k) = (3, 8);
        for (m, holds) in [(Bf16Model::new(), true), (Bf16Model::without_holds(), false)] {
            for width in [16, 12] {
                let (x, w) = (m.upload(&values(n * k, 1)).unwrap(), m.upload(&values(width * k, 2)).unwrap());
                let mut want = vec![0f32; n * width];
                Cpu.matmul_fwd(&mut want, &rounded(&x), &rounded(&w), None, n, k, width);
                assert_ne!(want, rounded(&want), "the product's output has bits below bf16's");
                let mut out = m.zeros(n * width).unwrap();
                m.matmul_fwd(&mut out, &x, &w, None, n, k, width);
                assert_eq!(out, want, "the operands rounded, the output f32");
                m.hold_operand(&out);
                m.matmul_fwd(&mut out, &x, &w, None, n, k, width);
                assert_eq!(out, want, "held, not only: f32");
                m.hold_operand_only(&out);
                m.matmul_fwd(&mut out, &x, &w, None, n, k, width);
                assert_eq!(out, if holds && width % 8 == 0 { rounded(&want) } else { want.clone() }, "held only, width {width}");
                m.hold_operand(&out);
                m.matmul_fwd(&mut out, &x, &w, None, n, k, width);
                assert_eq!(out, want, "held again, plainly");
                m.hold_operand_only(&out);
                m.release_operand(&out);
                m.matmul_fwd(&mut out, &x, &w, None, n, k, width);
                assert_eq!(out, want, "released");
            }
            let (x, w) = (m.upload(&values(4 * 10, 3)).unwrap(), m.upload(&values(10, 4)).unwrap());
            let (mut out, mut rstd) = (m.zeros(40).unwrap(), m.zeros(4).unwrap());
            let mut want = vec![0f32; 40];
            Cpu.rmsnorm_fwd(&mut want, &mut rstd.clone(), &x, &w, 10, 1e-6);
            m.hold_operand_only(&out);
            m.fill(&mut out, 0.0);
            m.rmsnorm_fwd(&mut out, &mut rstd, &x, &w, 10, 1e-6);
            assert_eq!(out, want, "a fill ended the hold");
            m.hold_operand_only(&out);
            m.rmsnorm_fwd(&mut out, &mut rstd, &x, &w, 10, 1e-6);
            assert_eq!(out, if holds { rounded(&want) } else { want.clone() });
            m.release_operands();
            m.rmsnorm_fwd(&mut out, &mut rstd, &x, &w, 10, 1e-6);
            assert_eq!(out, want);
        }
    }
}
