//! Units with a forward and a backward pass over the op set, as the models compose them: a linear
//! map (with a trainable flag: a frozen weight gets no gradient and its product is not computed),
//! a normalisation (LayerNorm or RMSNorm), an activation (GELU or SwiGLU), attention (causal
//! self-attention with optional RoPE, over a whole sequence or one decoding step against a KV
//! cache), the token and position embedding, and the transformer block built from them.
//!
//! A unit holds indices into the model's parameter buffers and its sizes, not the buffers: the
//! parameters, their gradients and the trainable mask are passed in ([`Params`], [`GradsMut`]),
//! so one description serves training, evaluation and decoding. Units never allocate.

mod block;
mod lora;

pub use block::{AttnCall, Block, BlockBufs, BlockGrads};
pub use lora::{LoraDims, LoraPart, LoraScratch, MAX_LORA_PARTS};

pub use crate::backend::Activation;
use crate::backend::{AttnImpl, AttnShape, Backend, DropoutMask};

/// The dropout stream of one site: `key` (a training pass's, already mixed with the layer) mixed
/// with the site's number.
pub fn site_key(key: u64, site: u64) -> u64 {
    let mut z = key ^ (site.wrapping_add(1)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z ^ (z >> 32)
}

/// Dropout of probability `p` on site `site` of the pass keyed `key`; nothing when `p` is 0 or
/// the pass is not a training pass (`key` is `None`).
pub fn drop<B: Backend>(be: &B, x: &mut B::Buf, p: f32, key: Option<u64>, site: u64) {
    if let Some(k) = key.filter(|_| p > 0.0) {
        be.dropout(x, DropoutMask::new(p, site_key(k, site)));
    }
}

/// Beam search's reordering of per-row caches: in each buffer (`rows` rows of equal width), row
/// `r` takes row `src[r]`'s values. The rows are copied on the device into `spare`, which then
/// becomes the buffer (no download, no upload).
pub fn reorder_rows<'a, B: Backend>(
    be: &B,
    bufs: impl Iterator<Item = &'a mut B::Buf>,
    spare: &mut B::Buf,
    rows: usize,
    src: &[usize],
) -> crate::error::Result<()>
where
    B::Buf: 'a,
{
    for buf in bufs {
        let len = be.len(buf);
        if be.len(spare) != len {
            *spare = be.zeros(len)?;
        }
        let w = len / rows;
        for (r, &s) in src.iter().enumerate() {
            be.copy_range(spare, r * w, buf, s * w, w);
        }
        std::mem::swap(buf, spare);
    }
    Ok(())
}

/// The model's parameter buffers and which of them train.
pub struct Params<'a, B: Backend> {
    pub bufs: ParamBufs<'a, B>,
    pub trainable: &'a [bool],
}

impl<'a, B: Backend> Params<'a, B> {
    pub fn new(bufs: &'a [B::Buf], trainable: &'a [bool]) -> Self {
        Params { bufs: ParamBufs { own: bufs, expanded: &[] }, trainable }
    }

    /// Before a product reads weight `i`: when it does not train, tells the backend it keeps its
    /// value ([`Backend::keep_working_copy`]; the model's own buffers only, not a unit's expanded
    /// copy).
    pub fn keep_if_frozen(&self, be: &B, i: usize) {
        if !self.trainable[i] && matches!(self.bufs.expanded.get(i), None | Some(None)) {
            be.keep_working_copy(&self.bufs.own[i]);
        }
    }
}

/// A unit's parameter buffers, indexed by parameter: the model's own, except where `expanded`
/// holds one for the unit's run (a frozen weight kept in bf16 and made f32 around the unit,
/// `model::frozen`).
pub struct ParamBufs<'a, B: Backend> {
    pub own: &'a [B::Buf],
    pub expanded: &'a [Option<B::Buf>],
}

impl<B: Backend> std::ops::Index<usize> for ParamBufs<'_, B> {
    type Output = B::Buf;
    fn index(&self, i: usize) -> &B::Buf {
        match self.expanded.get(i) {
            Some(Some(b)) => b,
            _ => &self.own[i],
        }
    }
}

/// The gradient buffers, one per parameter, accumulated into (`+=`).
pub struct GradsMut<'a, B: Backend> {
    pub bufs: &'a mut [B::Buf],
    pub trainable: &'a [bool],
}

impl<B: Backend> GradsMut<'_, B> {
    /// The gradients of `a` and `b` (when given), each `None` when frozen.
    fn pair(&mut self, a: usize, b: Option<usize>) -> (Option<&mut B::Buf>, Option<&mut B::Buf>) {
        let (ta, tb) = (self.trainable[a], b.is_some_and(|b| self.trainable[b]));
        let (ga, gb) = pair(self.bufs, a, b);
        (ta.then_some(ga), gb.filter(|_| tb))
    }
}

/// Two distinct elements of a slice, the second optional.
pub fn pair<T>(v: &mut [T], a: usize, b: Option<usize>) -> (&mut T, Option<&mut T>) {
    match b {
        None => (&mut v[a], None),
        Some(b) => {
            assert_ne!(a, b, "a parameter paired with itself");
            if a < b {
                let (x, y) = v.split_at_mut(b);
                (&mut x[a], Some(&mut y[0]))
            } else {
                let (x, y) = v.split_at_mut(a);
                (&mut y[0], Some(&mut x[b]))
            }
        }
    }
}

/// `y = x W^T + b` with `W` `[out, in]`, plus its LoRA adapters.
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub w: usize,
    pub b: Option<usize>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: [Option<LoraPart>; MAX_LORA_PARTS],
}

impl Linear {
    /// A linear map without adapters.
    pub fn new(w: usize, b: Option<usize>, in_features: usize, out_features: usize) -> Self {
        Linear { w, b, in_features, out_features, lora: [None; MAX_LORA_PARTS] }
    }

    /// [`Linear::fwd`], then [`Linear::lora_fwd`]. With adapters, `inp` is named for operand
    /// reuse (`Backend::begin_operand_reuse`) while the base product and the adapters read it.
    #[allow(clippy::too_many_arguments)] // as Linear::lora_fwd
    pub fn fwd_all<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, inp: &B::Buf, rows: usize, s: &mut LoraScratch<B>, drop: Option<u64>) {
        if !self.adapted() {
            return self.fwd(be, p, out, inp, rows);
        }
        if self.merged(be, p, s, rows, drop) {
            return be.matmul_fwd(out, inp, &s.merged, self.b.map(|b| &p.bufs[b]), rows, self.in_features, self.out_features);
        }
        be.begin_operand_reuse(&[inp]);
        self.fwd(be, p, out, inp, rows);
        self.lora_fwd(be, p, out, inp, rows, s, drop);
        be.end_operand_reuse();
    }

    /// The backward pass of [`Linear::fwd`] and [`Linear::lora_fwd`]: writes `dinp` (when asked)
    /// and accumulates the trainable parameters' gradients.
    #[allow(clippy::too_many_arguments)] // as Linear::lora_bwd
    pub fn bwd_all<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        dinp: Option<&mut B::Buf>,
        dout: &B::Buf,
        inp: &B::Buf,
        rows: usize,
        s: &mut LoraScratch<B>,
        drop: Option<u64>,
    ) {
        if !self.adapted() {
            return self.bwd(be, p, g, dinp, dout, inp, rows);
        }
        // the input and the output gradient are read by the base map's products and each
        // adapter's, and written by none of them
        be.begin_operand_reuse(&[inp, dout]);
        self.bwd_adapted(be, p, g, dinp, dout, inp, rows, s, drop);
        be.end_operand_reuse();
    }

    /// `out = res + self(inp)` for a map without adapters ([`Backend::matmul_fwd_add`]).
    pub fn fwd_add<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, inp: &B::Buf, res: &B::Buf, rows: usize) {
        p.keep_if_frozen(be, self.w);
        be.matmul_fwd_add(out, inp, &p.bufs[self.w], self.b.map(|b| &p.bufs[b]), res, rows, self.in_features, self.out_features);
    }

    pub fn fwd<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, inp: &B::Buf, rows: usize) {
        p.keep_if_frozen(be, self.w);
        be.matmul_fwd(out, inp, &p.bufs[self.w], self.b.map(|b| &p.bufs[b]), rows, self.in_features, self.out_features);
    }

    /// Writes `dinp` (when asked) and accumulates the trainable parameters' gradients.
    #[allow(clippy::too_many_arguments)] // the unit's parameters, gradients, and the pass's tensors
    pub fn bwd<B: Backend>(&self, be: &B, p: &Params<B>, g: &mut GradsMut<B>, dinp: Option<&mut B::Buf>, dout: &B::Buf, inp: &B::Buf, rows: usize) {
        p.keep_if_frozen(be, self.w);
        let (dw, db) = g.pair(self.w, self.b);
        be.matmul_bwd(dinp, dw, db, dout, inp, &p.bufs[self.w], rows, self.in_features, self.out_features);
    }

    /// Whether the map has LoRA adapters.
    pub fn adapted(&self) -> bool {
        self.lora.iter().any(Option::is_some)
    }

    /// [`Linear::bwd`] for a map whose output `pre` went through the activation `act`, from the
    /// activation's gradient `dact` (`Backend::act_matmul_bwd`: `dpre` is scratch the backend may
    /// leave unwritten). Not for adapted maps, whose adapters read `dpre`.
    #[allow(clippy::too_many_arguments)] // as Linear::bwd, with the activation's tensors
    pub fn bwd_act<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        dinp: Option<&mut B::Buf>,
        dpre: &mut B::Buf,
        (act, dact, pre): (Activation, &B::Buf, &B::Buf),
        inp: &B::Buf,
        rows: usize,
    ) {
        debug_assert!(!self.adapted());
        p.keep_if_frozen(be, self.w);
        let (dw, db) = g.pair(self.w, self.b);
        be.act_matmul_bwd(act, dinp, dw, db, dpre, dact, pre, inp, &p.bufs[self.w], rows, self.in_features, self.out_features);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

/// LayerNorm (GPT-2) or RMSNorm (Llama) over rows of `width`; keeps the per-row statistics its
/// backward pass needs (`mean` is unused by RMSNorm).
#[derive(Clone, Copy, Debug)]
pub struct Norm {
    pub kind: NormKind,
    pub w: usize,
    pub b: Option<usize>,
    pub width: usize,
    pub eps: f32,
}

impl Norm {
    /// Its parameters' indices.
    pub fn params(&self) -> Vec<usize> {
        std::iter::once(self.w).chain(self.b).collect()
    }

    pub fn fwd<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, mean: &mut B::Buf, rstd: &mut B::Buf, x: &B::Buf) {
        let (w, c) = (&p.bufs[self.w], self.width);
        match self.kind {
            NormKind::LayerNorm => be.layernorm_fwd(out, mean, rstd, x, w, self.b.map(|b| &p.bufs[b]), c, self.eps),
            NormKind::RmsNorm => be.rmsnorm_fwd(out, rstd, x, w, c, self.eps),
        }
    }

    /// Accumulates into `dx` and into the parameters' gradients (a frozen norm's gradient is
    /// computed and left unused: the norm ops always produce it).
    #[allow(clippy::too_many_arguments)] // the pass's tensors and the saved statistics
    pub fn bwd<B: Backend>(&self, be: &B, p: &Params<B>, g: &mut GradsMut<B>, dx: &mut B::Buf, dout: &B::Buf, x: &B::Buf, mean: &B::Buf, rstd: &B::Buf) {
        let (w, c) = (&p.bufs[self.w], self.width);
        let (dw, db) = pair(g.bufs, self.w, self.b);
        match self.kind {
            NormKind::LayerNorm => be.layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, c),
            NormKind::RmsNorm => be.rmsnorm_bwd(dx, dw, dout, x, w, rstd, c),
        }
    }
}

impl Activation {
    pub fn fwd<B: Backend>(&self, be: &B, out: &mut B::Buf, x: &B::Buf) {
        match *self {
            Activation::Gelu => be.gelu_fwd(out, x),
            Activation::SwiGlu { intermediate } => be.swiglu_fwd(out, x, intermediate),
        }
    }

    pub fn bwd<B: Backend>(&self, be: &B, dx: &mut B::Buf, x: &B::Buf, dout: &B::Buf) {
        match *self {
            Activation::Gelu => be.gelu_bwd(dx, x, dout),
            Activation::SwiGlu { intermediate } => be.swiglu_bwd(dx, x, dout, intermediate),
        }
    }
}

/// Causal (grouped-query) self-attention over the fused `qkv` activation, with RoPE applied to
/// the query and key heads when `rope_theta` is set.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_theta: Option<f32>,
    pub imp: AttnImpl,
    /// Dropout on the attention probabilities in training (`attn_pdrop`, `attention_dropout`),
    /// where the backend implements it.
    pub pdrop: f32,
}

impl Attention {
    pub fn shape(&self, batch: usize, seq: usize) -> AttnShape {
        AttnShape { batch, seq, n_head: self.n_head, n_kv_head: self.n_kv_head, head_dim: self.head_dim }
    }
}

/// The token embedding and, for learned positions (GPT-2), the position embedding.
#[derive(Clone, Copy, Debug)]
pub struct Embedding {
    pub wte: usize,
    pub wpe: Option<usize>,
    pub width: usize,
}

impl Embedding {
    /// Its parameters' indices.
    pub fn params(&self) -> Vec<usize> {
        std::iter::once(self.wte).chain(self.wpe).collect()
    }

    pub fn fwd<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, ids: &B::Ids, pos: &B::Ids) {
        be.embedding_fwd(out, ids, &p.bufs[self.wte], self.wpe.map(|i| (&p.bufs[i], pos)), self.width);
    }

    /// Accumulates into the embeddings' gradients. Nothing runs when both are frozen; when only
    /// one is, its gradient (a scatter-add the op always makes) is computed and left unused.
    pub fn bwd<B: Backend>(&self, be: &B, g: &mut GradsMut<B>, ids: &B::Ids, pos: &B::Ids, dout: &B::Buf) {
        if !g.trainable[self.wte] && !self.wpe.is_some_and(|i| g.trainable[i]) {
            return;
        }
        let (dwte, dwpe) = pair(g.bufs, self.wte, self.wpe);
        be.embedding_bwd(dwte, dwpe.map(|d| (d, pos)), ids, dout, self.width);
    }
}
