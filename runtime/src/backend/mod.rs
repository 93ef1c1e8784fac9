//! The op set. Model code (`model::decoder`) is written once against [`Backend`]; the CPU backend
//! is the reference implementation and the CUDA backend implements the same trait.
//!
//! Conventions: activations are row-major `[rows, width]` with `rows = batch * seq`. Linear weights
//! are `[out, in]` (a GPT-2 `Conv1D` is transposed when loaded). Gradients of parameters are always
//! *accumulated* (`+=`), so gradient accumulation needs no extra pass; gradients of activations are
//! overwritten unless the method says otherwise. A buffer may be longer than an op's sizes say;
//! the op then reads and writes only its leading elements (the chunked LM head reuses one set of
//! chunk buffers for a shorter last chunk).
//!
//! Errors: every op that allocates or waits for the device returns a `Result` (allocation,
//! upload, download, the losses and norms that come back to the host, `synchronize`). The
//! compute ops return nothing: a device failure inside one (a kernel launch, a scratch
//! allocation) is recorded, every later op does nothing, and the failure is returned by the next
//! op that returns a `Result`. Out of memory is [`Error::OutOfMemory`], so a caller can retry
//! with less (`auto_find_batch_size`).

use crate::error::{Error, Result};

mod adamw;
mod align;
pub mod bf16_model;
pub mod budget;
pub mod cpu;
pub mod cuda;
pub mod device;
mod dropout;
pub mod profiled;
pub mod roofline;
pub mod seq2seq;
mod shapes;
mod stats;

pub use adamw::{AdamWArgs, AdamWScalars, AdamWStep};
pub use align::{aligned_ld, aligned_split, loss_row_staged, SharedMemory};
pub use dropout::{dropout_keep, DropoutMask};
pub use shapes::{ColBlock, GroupOp, MergedPart, DEVICE_LOGITS_CHUNK_FLOATS, NORM_FUSED_WIDTH, REDUCE_BLOCK_ROWS};
pub use stats::{StatGrads, StatsWanted, TokenStats};

/// An MLP's activation: GELU (tanh approximation) on `[rows, i]`, or SwiGLU on a packed
/// `[rows, 2i]` (gate, then up) giving `[rows, i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    SwiGlu { intermediate: usize },
}

/// The target that takes no part in the loss ops (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i32 = -100;

/// Shape of one attention call. The fused `qkv` activation holds, per row, the query heads, then
/// the key heads, then the value heads: `(n_head + 2 * n_kv_head) * head_dim` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }
    pub fn out_width(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
    /// Floats of the per-row statistics an attention implementation keeps for its backward pass.
    pub fn stats_len(&self, imp: AttnImpl) -> usize {
        match imp {
            AttnImpl::Eager => self.batch * self.n_head * self.seq * self.seq,
            AttnImpl::Flash => self.batch * self.n_head * self.seq,
        }
    }
}

/// `attn_implementation`: `eager` materialises the probabilities (HF's reference path); `sdpa` and
/// `flash_attention_2` select the tiled kernel that keeps only the log-sum-exp per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnImpl {
    Eager,
    Flash,
}

impl AttnImpl {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "eager" => Some(AttnImpl::Eager),
            "sdpa" | "flash_attention_2" | "flash" => Some(AttnImpl::Flash),
            _ => None,
        }
    }
}

/// Per-row results of the fused cross-entropy.
#[derive(Clone, Debug, Default)]
pub struct LossRows {
    /// Loss per row (0 for ignored rows), before any normalisation.
    pub loss: Vec<f32>,
    /// Number of rows whose target is not the ignore index.
    pub n_targets: usize,
}

pub trait Backend: Send + Sync + 'static {
    /// A device buffer of f32.
    type Buf: Send + Sync;
    /// A device buffer of i32 (token ids, positions, targets, masks).
    type Ids: Send + Sync;

    fn name(&self) -> &'static str;
    /// A new buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// [`Backend::upload`] of a vector the caller gives up (the CPU backend keeps it, no copy).
    fn upload_vec(&self, data: Vec<f32>) -> Result<Self::Buf> {
        self.upload(&data)
    }
    fn upload_ids(&self, data: &[i32]) -> Result<Self::Ids>;
    /// Waits for the queued ops that write `buf` and copies it to the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// The buffer's elements, when they live in host memory (the CPU backend's): a collective
    /// then reduces them in place instead of copying them out and back.
    fn host_mut<'a>(&self, _buf: &'a mut Self::Buf) -> Option<&'a mut [f32]> {
        None
    }
    fn fill(&self, buf: &mut Self::Buf, value: f32);
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// `dst[dst_off..dst_off + n] = src[src_off..src_off + n]`.
    fn copy_range(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, n: usize);

    /// `out[r] = wte[ids[r]] (+ wpe[pos[r]])`, width `c`.
    fn embedding_fwd(&self, out: &mut Self::Buf, ids: &Self::Ids, wte: &Self::Buf, wpe: Option<(&Self::Buf, &Self::Ids)>, c: usize);
    /// `dwte[ids[r]] += dout[r]` (and `dwpe[pos[r]] += dout[r]`), in row order (deterministic).
    /// A row whose id is negative adds nothing (an embedding's `padding_idx`, which gets no
    /// gradient from a lookup).
    fn embedding_bwd(&self, dwte: &mut Self::Buf, dwpe: Option<(&mut Self::Buf, &Self::Ids)>, ids: &Self::Ids, dout: &Self::Buf, c: usize);

    /// LayerNorm over rows of width `c`; keeps `mean` and `rstd` per row.
    #[allow(clippy::too_many_arguments)] // the op's inputs and saved statistics, as llm.c passes them
    fn layernorm_fwd(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        c: usize,
        eps: f32,
    );
    /// Accumulates into `dx`, `dw`, `db`.
    #[allow(clippy::too_many_arguments)] // as above
    fn layernorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        c: usize,
    );
    /// RMSNorm (Llama) over rows of width `c`; keeps `rstd` per row.
    #[allow(clippy::too_many_arguments)] // as above
    fn rmsnorm_fwd(&self, out: &mut Self::Buf, rstd: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, c: usize, eps: f32);
    /// Accumulates into `dx` and `dw`.
    #[allow(clippy::too_many_arguments)] // as above
    fn rmsnorm_bwd(&self, dx: &mut Self::Buf, dw: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf, w: &Self::Buf, rstd: &Self::Buf, c: usize);

    /// `out[n, m] = inp[n, k] @ w[m, k]^T + bias[m]`.
    #[allow(clippy::too_many_arguments)] // a GEMM's operands and sizes
    fn matmul_fwd(&self, out: &mut Self::Buf, inp: &Self::Buf, w: &Self::Buf, bias: Option<&Self::Buf>, n: usize, k: usize, m: usize);
    /// `out = res + (inp @ w^T + bias)`, a residual branch's product and its skip connection (the
    /// same value as [`Backend::matmul_fwd`] then [`Backend::add_assign`]; a backend may add `res`
    /// in the product, in another order).
    #[allow(clippy::too_many_arguments)] // as matmul_fwd, and the skip connection
    fn matmul_fwd_add(&self, out: &mut Self::Buf, inp: &Self::Buf, w: &Self::Buf, bias: Option<&Self::Buf>, res: &Self::Buf, n: usize, k: usize, m: usize) {
        self.matmul_fwd(out, inp, w, bias, n, k, m);
        self.add_assign(out, res);
    }
    /// `dinp = dout @ w` (overwritten), `dw += dout^T @ inp`, `dbias += colsum(dout)`; each
    /// only when asked for (a frozen weight has no `dw`, and its product is not computed).
    #[allow(clippy::too_many_arguments)] // as above
    fn matmul_bwd(
        &self,
        dinp: Option<&mut Self::Buf>,
        dw: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        k: usize,
        m: usize,
    );
    /// The backward pass of a product whose output `pre` went through the activation `act`, from
    /// the gradient `dact` of the activation: `dpre` = the activation's backward pass
    /// ([`Backend::gelu_bwd`], [`Backend::swiglu_bwd`]), then [`Backend::matmul_bwd`] from `dpre`.
    /// `dpre` is scratch: a backend that fuses the two may leave it unwritten (the CUDA backend in
    /// bf16 mode writes only the products' bf16 operand, with the bias gradient for GELU).
    #[allow(clippy::too_many_arguments)] // as matmul_bwd, with the activation's tensors
    fn act_matmul_bwd(
        &self,
        act: Activation,
        dinp: Option<&mut Self::Buf>,
        dw: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dpre: &mut Self::Buf,
        dact: &Self::Buf,
        pre: &Self::Buf,
        inp: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        k: usize,
        m: usize,
    ) {
        match act {
            Activation::Gelu => self.gelu_bwd(dpre, pre, dact),
            Activation::SwiGlu { intermediate } => self.swiglu_bwd(dpre, pre, dact, intermediate),
        }
        self.matmul_bwd(dinp, dw, dbias, dpre, inp, w, n, k, m);
    }

    /// Causal (grouped-query) attention with a key padding mask (`1` = attend). Writes `out`
    /// (`[rows, n_head * head_dim]`) and the statistics its backward pass needs.
    #[allow(clippy::too_many_arguments)] // the op's inputs, outputs and saved statistics
    fn attention_fwd(&self, out: &mut Self::Buf, stats: &mut Self::Buf, qkv: &Self::Buf, key_mask: &Self::Ids, shape: AttnShape, imp: AttnImpl);
    /// Logits one chunk of the LM head should hold (`Model::head_chunk_rows`); 128 MiB of f32.
    fn logits_chunk_floats(&self) -> usize {
        1 << 25
    }
    /// Whether models on this backend recompute norm outputs and activations in the backward
    /// pass rather than keep them (`Model::recompute_activations`): less memory, more passes.
    fn recompute_activations(&self) -> bool {
        false
    }
    /// Whether [`Backend::attention_fwd_dropout`] and [`Backend::attention_bwd_dropout`] apply
    /// dropout to the attention probabilities (their defaults here are the plain passes).
    fn has_attention_dropout(&self) -> bool {
        false
    }
    /// [`Backend::attention_fwd`] with dropout on the probabilities (`stats` keep the undropped
    /// softmax); the mask's element index is `((b * n_head + h) * seq + i) * seq + j`.
    #[allow(clippy::too_many_arguments)] // as attention_fwd, and the mask
    fn attention_fwd_dropout(
        &self,
        out: &mut Self::Buf,
        stats: &mut Self::Buf,
        qkv: &Self::Buf,
        key_mask: &Self::Ids,
        shape: AttnShape,
        imp: AttnImpl,
        _drop: DropoutMask,
    ) {
        self.attention_fwd(out, stats, qkv, key_mask, shape, imp)
    }
    /// [`Backend::attention_bwd`] of a pass with dropout on the probabilities (the same mask).
    #[allow(clippy::too_many_arguments)] // as attention_bwd, and the mask
    fn attention_bwd_dropout(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        stats: &Self::Buf,
        key_mask: &Self::Ids,
        shape: AttnShape,
        imp: AttnImpl,
        _drop: DropoutMask,
    ) {
        self.attention_bwd(dqkv, dout, qkv, out, stats, key_mask, shape, imp)
    }
    /// Writes `dqkv` (overwritten).
    #[allow(clippy::too_many_arguments)] // as above
    fn attention_bwd(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        stats: &Self::Buf,
        key_mask: &Self::Ids,
        shape: AttnShape,
        imp: AttnImpl,
    );
    /// Generation: writes the key and value heads of `qkv` (`shape.seq` tokens per sequence: one
    /// new token, or a whole prompt) into the caches `[batch, max_len, n_kv_head * head_dim]` at
    /// slots `slot..slot + shape.seq`.
    #[allow(clippy::too_many_arguments)] // the caches, the new token and where it goes
    fn kv_append(&self, k_cache: &mut Self::Buf, v_cache: &mut Self::Buf, qkv: &Self::Buf, slot: usize, shape: AttnShape, max_len: usize);
    /// Generation: each row's query (from `qkv`) attends to its cached keys `0..=slot` whose
    /// `key_mask[row * max_len + j]` is 1. Writes `out` (`[batch, n_head * head_dim]`).
    #[allow(clippy::too_many_arguments)] // as above
    fn attention_decode(
        &self,
        out: &mut Self::Buf,
        qkv: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        key_mask: &Self::Ids,
        slot: usize,
        shape: AttnShape,
        max_len: usize,
    );
    /// Rotary embedding (HF's `rotate_half` convention) applied in place to the query and key
    /// heads of `qkv`; `inverse` rotates back (the backward pass).
    fn rope(&self, qkv: &mut Self::Buf, positions: &Self::Ids, shape: AttnShape, theta: f32, inverse: bool);

    /// GELU, tanh approximation (`gelu_new`).
    fn gelu_fwd(&self, out: &mut Self::Buf, x: &Self::Buf);
    fn gelu_bwd(&self, dx: &mut Self::Buf, x: &Self::Buf, dout: &Self::Buf);
    /// SwiGLU on a packed `[rows, 2 * i]` input (gate, then up): `out = silu(gate) * up`.
    fn swiglu_fwd(&self, out: &mut Self::Buf, x: &Self::Buf, i: usize);
    fn swiglu_bwd(&self, dx: &mut Self::Buf, x: &Self::Buf, dout: &Self::Buf, i: usize);
    /// `out = a + b`.
    fn add(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf);
    /// `dst += src` over `src`'s length (the same sums as [`Backend::add`] with the operands swapped).
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) {
        self.add_cols(dst, src, 1, self.len(src), self.len(src), 0, 1.0)
    }
    /// Dropout in place, counter-based: element `i` is kept when [`dropout_keep`]`(key, i,
    /// threshold)` and then multiplied by `scale`, zeroed otherwise (see [`DropoutMask`]). The
    /// same call on a gradient is dropout's backward pass.
    fn dropout(&self, x: &mut Self::Buf, mask: DropoutMask);
    /// Accumulates `scale * src` (`[rows, width]`) into columns `off..off + width` of `dst`
    /// (`[rows, ld]`): `dst[r, off + j] += scale * src[r, j]`. With `width == ld` it is an axpy.
    #[allow(clippy::too_many_arguments)] // the two operands and the column block's geometry
    fn add_cols(&self, dst: &mut Self::Buf, src: &Self::Buf, rows: usize, width: usize, ld: usize, off: usize, scale: f32);
    /// Writes `scale` times columns `off..off + width` of `src` (`[rows, ld]`) to `dst`
    /// (`[rows, width]`): `dst[r, j] = scale * src[r, off + j]`.
    #[allow(clippy::too_many_arguments)] // the two operands and the column block's geometry
    fn take_cols(&self, dst: &mut Self::Buf, src: &Self::Buf, rows: usize, width: usize, ld: usize, off: usize, scale: f32);

    /// LoRA's up-projection into its columns of a map's output: `out[r, off + j] += scale * (t
    /// b^T)[r, j]` over block `blk` of `out`, with `t` `[rows, rank]` and `b` `[width, rank]`
    /// (`=` instead of `+=` unless `add`: a held LM head's blocks of logits).
    #[allow(clippy::too_many_arguments)] // the product's operands, its block and its mode
    fn lora_up(&self, out: &mut Self::Buf, t: &Self::Buf, b: &Self::Buf, blk: ColBlock, rank: usize, scale: f32, add: bool);
    /// Its backward pass, with `g = scale * dout[:, off..off + width]`: `dt = g b` (`[rows,
    /// rank]`; added to when `dt.1`, overwritten otherwise) and `db += g^T t` (when given).
    #[allow(clippy::too_many_arguments)] // the two gradients, the forward's operands and the block
    fn lora_up_bwd(
        &self,
        dt: (&mut Self::Buf, bool),
        db: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        t: &Self::Buf,
        b: &Self::Buf,
        blk: ColBlock,
        rank: usize,
        scale: f32,
    );
    /// LoRA's down-projection's backward pass: `dx += dt a` and `da += dt^T x`, each when given,
    /// with `dt` `[rows, rank]`, `a` `[rank, k]`, `x` and `dx` `[rows, k]` (as
    /// [`Backend::matmul_bwd`], but the input gradient accumulated).
    #[allow(clippy::too_many_arguments)] // the two gradients, the operands and the sizes
    fn lora_down_bwd(
        &self,
        dx: Option<&mut Self::Buf>,
        da: Option<&mut Self::Buf>,
        dt: &Self::Buf,
        x: &Self::Buf,
        a: &Self::Buf,
        rows: usize,
        k: usize,
        rank: usize,
    );
    /// Whether this backend runs plain LoRA adapters over many rows as one product with the
    /// merged weight ([`Backend::lora_merge`]). Only one whose products are f32 may: a bf16
    /// product would round the adapters' small share of `W + scale B A` away. Default: no.
    fn merges_adapters(&self) -> bool {
        false
    }
    /// LoRA's merged weight `[out, k]`: `dst = w`, plus `scale * b a` on each part's rows `off..off
    /// + cols` (`b` `[cols, r]`, `a` `[r, k]`). Returns false, writing nothing, on a backend that
    /// does not merge ([`Backend::merges_adapters`]).
    fn lora_merge(&self, _dst: &mut Self::Buf, _w: &Self::Buf, _parts: &[MergedPart<'_, Self::Buf>], _out: usize, _k: usize) -> bool {
        false
    }
    /// DoRA's weight norm of the adapter on rows `off..off + cols` of `w` (`[_, k]`): `n[j] =
    /// ||w[off + j, :] + scale * (b a)[j, :]||`, with `a` `[r, k]` and `b` `[cols, r]`; each
    /// element in f32 (the rank summed in order), the squares summed in f64.
    #[allow(clippy::too_many_arguments)] // the three matrices and their geometry
    fn dora_norm(&self, n: &mut Self::Buf, w: &Self::Buf, a: &Self::Buf, b: &Self::Buf, off: usize, cols: usize, k: usize, r: usize, scale: f32);
    /// DoRA's output on block `blk` of `out` (after the base map and before any other adapter of
    /// these columns): with `s_j = m[j] / n[j]`, `out[r, off + j] += (s_j - 1) * base[r, off + j]
    /// + s_j * (scale * u[r, j])`, `u` (`[rows, width]`) the adapter's `x A^T B^T` and `base` the
    /// base map's output without bias (`[rows, ld]`); `None`: `out` itself less `bias[off + j]`.
    #[allow(clippy::too_many_arguments)] // the output, the two branches and the magnitudes
    fn dora_fwd(
        &self,
        out: &mut Self::Buf,
        base: Option<&Self::Buf>,
        bias: Option<&Self::Buf>,
        u: &Self::Buf,
        m: &Self::Buf,
        n: &Self::Buf,
        blk: ColBlock,
        scale: f32,
    );
    /// DoRA's backward pass on block `blk`, with `g = dout[r, off + j]` and `s_j = m[j] / n[j]`,
    /// each output when asked for: `dm[j] += sum_r g * (base[r, off + j] + scale * u[r, j]) /
    /// n[j]` (`dm`: the magnitude's gradient, `base` and `u` as in [`Backend::dora_fwd`]), `gu[r,
    /// j] = (scale * s_j) * g` (the gradient into the adapter's `u`), `gb[r, off + j] = (s_j -
    /// shift) * g` (into the base map's output, `[rows, ld]`).
    #[allow(clippy::too_many_arguments)] // three optional outputs and the forward's operands
    fn dora_bwd(
        &self,
        dm: Option<(&mut Self::Buf, &Self::Buf, &Self::Buf)>,
        gu: Option<&mut Self::Buf>,
        gb: Option<(&mut Self::Buf, f32)>,
        dout: &Self::Buf,
        m: &Self::Buf,
        n: &Self::Buf,
        blk: ColBlock,
        scale: f32,
    );

    /// Fused softmax cross-entropy over rows of width `v` with ignore index -100 and label
    /// smoothing. With `grad_scale = Some(s)` the logits are overwritten by `s * dloss/dlogits`.
    fn cross_entropy(&self, logits: &mut Self::Buf, targets: &Self::Ids, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows>;
    /// [`Backend::cross_entropy`] over `targets.len()` rows that leaves the per-row losses on the
    /// device, in `loss[row0..row0 + targets.len()]` (no wait for the device: the chunked LM head
    /// downloads them once per batch).
    #[allow(clippy::too_many_arguments)] // cross_entropy's operands and where the losses go
    fn cross_entropy_into(
        &self,
        logits: &mut Self::Buf,
        targets: &Self::Ids,
        v: usize,
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut Self::Buf,
        row0: usize,
    );

    /// Whether [`Backend::head_loss`] at vocabulary `v` writes its `logits` scratch (false: it
    /// keeps the logits in memory of its own, as CUDA's bf16 mode and padded rows do, and
    /// `logits` may be left empty).
    fn head_loss_uses_scratch(&self, _v: usize) -> bool {
        true
    }
    /// One chunk of the LM head and the built-in loss, when nothing else reads the logits:
    /// `logits = x w^T` (`x` `[n, k]`, `w` `[v, k]`, `targets` `n` rows), then
    /// [`Backend::cross_entropy_into`] (losses into `loss[row0..row0 + n]`), and with `back` (and
    /// `grad_scale`) the head's backward pass from the loss gradient: `dx = dlogits w`
    /// (overwritten) and `dw += dlogits^T x` when given. `logits` is the chunk's scratch (at least
    /// `[n, v]`, or empty where [`Backend::head_loss_uses_scratch`] says so); what it holds
    /// afterwards is unspecified, so a backend may keep the logits in a layout of its own (CUDA:
    /// padded rows, the gradient in bf16 for the products).
    #[allow(clippy::too_many_arguments)] // the product's, the loss's and the backward pass's operands
    fn head_loss(
        &self,
        logits: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        targets: &Self::Ids,
        (n, k, v): (usize, usize, usize),
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut Self::Buf,
        row0: usize,
        back: Option<(&mut Self::Buf, Option<&mut Self::Buf>)>,
    ) {
        self.matmul_fwd(logits, x, w, None, n, k, v);
        self.cross_entropy_into(logits, targets, v, smoothing, grad_scale, loss, row0);
        if let Some((dx, dw)) = back {
            self.matmul_bwd(Some(dx), dw, None, logits, x, w, n, k, v);
        }
    }

    /// Per-token statistics of rows of logits of width `v`, at rows whose target is not -100
    /// (0 elsewhere); only the requested ones are computed (the others come back empty). The
    /// plugin `loss` hook's input.
    fn token_stats(&self, logits: &Self::Buf, targets: &Self::Ids, v: usize, want: StatsWanted) -> Result<TokenStats>;
    /// The chain rule of [`Backend::token_stats`]: overwrites `logits` with `dloss/dlogits` given
    /// `dloss/dstatistic` per row (empty = zero) and the forward's `row_lse`/`row_mean_z`; rows
    /// whose target is -100 get 0. One pass over the logits.
    fn token_stats_bwd(&self, logits: &mut Self::Buf, targets: &Self::Ids, v: usize, stats: &TokenStats, grads: &StatGrads);

    /// Sum of squares, accumulated in f64.
    fn sum_squares(&self, buf: &Self::Buf) -> Result<f64>;
    /// [`Backend::sum_squares`] of many buffers (the CUDA backend waits for the device once).
    fn sum_squares_multi(&self, bufs: &[&Self::Buf]) -> Result<Vec<f64>> {
        bufs.iter().map(|b| self.sum_squares(b)).collect()
    }
    /// [`Backend::fill`] of every buffer of `bufs` (a device may do it in one launch).
    fn fill_multi(&self, bufs: &mut [&mut Self::Buf], value: f32) {
        bufs.iter_mut().for_each(|b| self.fill(b, value))
    }
    fn scale(&self, buf: &mut Self::Buf, s: f32);
    /// One AdamW step on one tensor (`decay` selects whether weight decay applies).
    fn adamw(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamWStep, decay: bool);
    /// [`Backend::adamw`] on elements `at..at + len(m)` of `p` and `g`, whose moments `m` and `v`
    /// hold those elements only: a process's part of an optimizer sharded over processes. The
    /// default copies the range out and back.
    #[allow(clippy::too_many_arguments)] // adamw's operands and the range
    fn adamw_range(&self, p: &mut Self::Buf, g: &Self::Buf, at: usize, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamWStep, decay: bool) -> Result<()> {
        let n = self.len(m);
        let (mut ps, mut gs) = (self.zeros(n)?, self.zeros(n)?);
        self.copy_range(&mut ps, 0, p, at, n);
        self.copy_range(&mut gs, 0, g, at, n);
        self.adamw(&mut ps, &gs, m, v, hp, decay);
        self.copy_range(p, at, &ps, 0, n);
        Ok(())
    }
    /// One AdamW step over many tensors (the CUDA backend fuses them into one kernel launch).
    fn adamw_multi(&self, tensors: &mut [AdamWArgs<'_, Self>], hp: AdamWStep)
    where
        Self: Sized,
    {
        for (p, g, m, v, decay) in tensors.iter_mut() {
            self.adamw(p, g, m, v, hp, *decay);
        }
    }

    /// Whether the backend's attention supports this head dim (the message says why not).
    fn check_head_dim(&self, _head_dim: usize) -> Result<(), String> {
        Ok(())
    }
    /// Waits until every queued op has finished (for timing), and reports a failure of any of
    /// them; a no-op on the CPU.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Free memory of a device with its own (None: the host's memory, which the caller measures).
    fn free_memory(&self) -> Option<u128> {
        None
    }
    /// After an out-of-memory error, makes the backend usable for a retry with less memory
    /// (`auto_find_batch_size`). A backend that records the failure of an op that could not
    /// return it, and skips every op after it until one reports it, forgets such a failure when
    /// it was out of memory and frees what it keeps between passes. The skipped ops wrote
    /// nothing the caller keeps: it redoes the step from zeroed gradients. Any other recorded
    /// failure is returned, and stays.
    fn recover_out_of_memory(&self) -> Result<()> {
        Ok(())
    }
    /// Says that `w`, a weight no optimizer step writes (a frozen parameter), is read by products
    /// from here on: a backend that converts product operands (CUDA's bf16 mode) may keep the
    /// converted copy, as the fused AdamW step keeps those of the weights it writes. A write to
    /// `w` through the backend, a new buffer in its memory or [`Backend::drop_working_copy`] drops
    /// the copy; asking again keeps a new one.
    fn keep_working_copy(&self, _w: &Self::Buf) {}
    /// Frees `w`'s working copy (before `w` itself is freed: a weight gathered for one layer,
    /// whose copy would otherwise stay until a new buffer takes its memory).
    fn drop_working_copy(&self, _w: &Self::Buf) {}
    /// Says that `bufs` are read, unchanged, by the products that follow until
    /// [`Backend::end_operand_reuse`] (a map's input and output gradient, read by the base product
    /// and its adapters' products): a backend that converts product operands may convert each once.
    /// The caller writes none of them in between; a new call replaces the set.
    fn begin_operand_reuse(&self, _bufs: &[&Self::Buf]) {}
    /// Ends [`Backend::begin_operand_reuse`].
    fn end_operand_reuse(&self) {}
    /// Says that `buf`, a saved activation, is read by products (or attention) in this forward
    /// pass and again in the backward pass, and written only before its first such read (by the
    /// ops that compute it) until [`Backend::release_operands`]: a backend that converts product
    /// operands may convert it once for all those reads.
    fn hold_operand(&self, _buf: &Self::Buf) {}
    /// [`Backend::hold_operand`], and no op reads `buf`'s f32 values until
    /// [`Backend::release_operands`] (only products and attention read it, through the
    /// conversion, or kernels that read converted inputs): an op that computes `buf` may then
    /// write only its converted copy. Also for an input gradient that one product writes and the
    /// next kernel reads, until [`Backend::release_operand`].
    fn hold_operand_only(&self, buf: &Self::Buf) {
        self.hold_operand(buf)
    }
    /// Ends `buf`'s hold: its f32 values are left as they are (stale where only its copy was
    /// written) until an op overwrites them.
    fn release_operand(&self, _buf: &Self::Buf) {}
    /// Ends every [`Backend::hold_operand`].
    fn release_operands(&self) {}
    /// A new device communicator's id (NCCL's unique id): made by rank 0 and handed to the others
    /// over the host collective, then [`Backend::group_join`]. A backend without one says so.
    fn group_id(&self) -> Result<Vec<u8>> {
        Err(Error::Unsupported(format!("device collectives (ddp_backend = \"nccl\") need a CUDA device; this run is on the {}", self.name())))
    }
    /// Joins the communicator `id` as process `rank` of `world`.
    fn group_join(&self, _id: &[u8], _rank: usize, _world: usize) -> Result<()> {
        self.group_id().map(|_| ())
    }
    /// Elements `start..start + len` of `buf`, over the joined communicator's processes: see
    /// [`GroupOp`]. Queued in order with the ops around it.
    fn group_op(&self, _buf: &mut Self::Buf, _start: usize, _len: usize, _op: GroupOp) -> Result<()> {
        self.group_id().map(|_| ())
    }
}
