//! The state an encoder-decoder pass keeps (`seq2seq_pass.rs` writes it, `seq2seq_backward.rs`
//! and `seq2seq_decode.rs` read it): per layer, per stack and for the whole pass, with the
//! dropout sites and keys shared by the forward and backward passes.

use super::seq2seq_backward::Scratch;
use super::seq2seq_config::Seq2SeqConfig;
use crate::backend::seq2seq::{BiasedShape, Seq2SeqOps};
use crate::error::Result;
use crate::nn::NormKind;

/// One sublayer's norm state. Pre-norm (T5): `n` is the norm's output, the sublayer's input.
/// Post-norm (BART): `n` is the residual sum the norm reads. `mean` is empty for RMS norm.
pub(super) struct NormActs<B: Seq2SeqOps> {
    pub(super) n: B::Buf,
    pub(super) mean: B::Buf,
    pub(super) rstd: B::Buf,
}

impl<B: Seq2SeqOps> NormActs<B> {
    pub(super) fn new(be: &B, c: &Seq2SeqConfig, rows: usize) -> Result<Self> {
        let mean = if c.norm_kind() == NormKind::LayerNorm { rows } else { 0 };
        Ok(NormActs { n: be.zeros(rows * c.d_model)?, mean: be.zeros(mean)?, rstd: be.zeros(rows)? })
    }
}

/// What one layer's forward pass keeps for its backward pass.
pub(super) struct LayerActs<B: Seq2SeqOps> {
    pub(super) s1: NormActs<B>,
    pub(super) q: B::Buf,
    pub(super) k: B::Buf,
    pub(super) v: B::Buf,
    pub(super) probs: B::Buf,
    pub(super) a: B::Buf,
    /// After the self-attention's residual add (and its norm, post-norm).
    pub(super) h1: B::Buf,
    pub(super) cross: Option<CrossActs<B>>,
    pub(super) s2: NormActs<B>,
    pub(super) f: B::Buf,
    pub(super) g: B::Buf,
}

pub(super) struct CrossActs<B: Seq2SeqOps> {
    pub(super) s: NormActs<B>,
    pub(super) q: B::Buf,
    pub(super) k: B::Buf,
    pub(super) v: B::Buf,
    pub(super) probs: B::Buf,
    pub(super) a: B::Buf,
    /// After the cross attention's residual add (and its norm, post-norm).
    pub(super) h: B::Buf,
}

impl<B: Seq2SeqOps> LayerActs<B> {
    /// For `rows` rows, `self_probs` self-attention probabilities, and in a decoder layer
    /// `cross = (source rows, cross-attention probabilities)`.
    pub(super) fn new(be: &B, c: &Seq2SeqConfig, rows: usize, self_probs: usize, cross: Option<(usize, usize)>) -> Result<Self> {
        let (d, inner) = (c.d_model, c.inner());
        let z = |n: usize| be.zeros(n);
        let cross = match cross {
            Some((src_rows, probs)) => Some(CrossActs {
                s: NormActs::new(be, c, rows)?,
                q: z(rows * inner)?,
                k: z(src_rows * inner)?,
                v: z(src_rows * inner)?,
                probs: z(probs)?,
                a: z(rows * inner)?,
                h: z(rows * d)?,
            }),
            None => None,
        };
        Ok(LayerActs {
            s1: NormActs::new(be, c, rows)?,
            q: z(rows * inner)?,
            k: z(rows * inner)?,
            v: z(rows * inner)?,
            probs: z(self_probs)?,
            a: z(rows * inner)?,
            h1: z(rows * d)?,
            cross,
            s2: NormActs::new(be, c, rows)?,
            f: z(rows * c.wi_width())?,
            g: z(rows * c.d_ff)?,
        })
    }
}

/// One stack's pass: its layers' inputs (`hs[l]`, and `hs[n]` the last layer's output), what
/// each layer keeps, the stack's output (after T5's final norm) and the embedding's state.
pub(super) struct StackActs<B: Seq2SeqOps> {
    pub(super) hs: Vec<B::Buf>,
    pub(super) layers: Vec<LayerActs<B>>,
    /// The stack's output, and T5's final norm statistics.
    pub(super) out: B::Buf,
    pub(super) rstd: B::Buf,
    /// T5's position bias `[heads, len, len]` and its buckets (empty for BART).
    pub(super) bias: B::Buf,
    pub(super) buckets: B::Ids,
    pub(super) ids: B::Ids,
    /// The ids the embedding's gradient scatters to (the `padding_idx` rows left out: -1).
    pub(super) grad_ids: B::Ids,
    /// BART: the position ids (`i + 2`) and `layernorm_embedding`'s input and statistics.
    pub(super) pos: B::Ids,
    pub(super) emb: NormActs<B>,
    pub(super) geo: Geometry,
    /// The dropout key of this stack's pass (`None`: no dropout).
    pub(super) drop_key: Option<u64>,
    /// The backward pass's scratch, kept for the next pass of the same shape.
    pub(super) scratch: Option<Scratch<B>>,
}

/// The dropout sites of a layer (and, as layer `u32::MAX`, of a stack's embedding and output).
#[derive(Clone, Copy)]
pub(super) enum Site {
    Embedding = 1,
    SelfOut,
    CrossOut,
    Activation,
    FfOut,
    Final,
    SelfProbs,
    CrossProbs,
}

/// The attention-probability dropout of site `site` in a layer keyed `key` (`None` without dropout).
pub(super) fn probs_mask(p: f32, key: Option<u64>, site: Site) -> Option<crate::backend::DropoutMask> {
    key.filter(|_| p > 0.0).map(|k| crate::backend::DropoutMask::new(p, crate::nn::site_key(k, site as u64)))
}

/// The dropout key of layer `layer` of a stack (`decoder`) in the pass keyed `key`.
pub(super) fn layer_key(key: Option<u64>, decoder: bool, layer: usize) -> Option<u64> {
    key.map(|k| crate::nn::site_key(k, (u64::from(decoder) << 40) | ((layer as u64) << 8)))
}

/// The whole stack's sites (embedding, final norm).
pub(super) const STACK: usize = u32::MAX as usize;

/// Decoding's key/value cache of one decoder layer's self-attention, `[rows, max_len, inner]`:
/// the layer writes the new token's key and value at `slot` and attends to the slots whose
/// `mask[row * max_len + j]` is 1.
pub(super) struct SelfCache<'a, B: Seq2SeqOps> {
    pub k: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
    pub slot: usize,
    pub max_len: usize,
    pub mask: &'a B::Ids,
}

/// What a layer's pass attends with: T5's position bias, the encoder's output (decoder layers),
/// the source mask, whether the cross attention's keys and values are already in the layer's
/// state (decoding after its first step), and the self-attention cache when decoding.
pub(super) struct LayerCtx<'a, B: Seq2SeqOps> {
    pub bias: Option<&'a B::Buf>,
    pub enc: Option<&'a B::Buf>,
    pub mask: &'a B::Ids,
    pub cross_ready: bool,
    pub cache: Option<SelfCache<'a, B>>,
    /// The layer's dropout key (a training pass's; `None` otherwise).
    pub drop: Option<u64>,
}

/// The shape of a stack's pass: its rows, sequences and (for the decoder) the encoder's.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub batch: usize,
    pub len: usize,
    /// The encoder's sequence length (cross attention's keys).
    pub src_len: usize,
    pub decoder: bool,
}

impl Geometry {
    pub(super) fn rows(&self) -> usize {
        self.batch * self.len
    }
    pub(super) fn self_shape(&self, c: &Seq2SeqConfig) -> BiasedShape {
        BiasedShape { batch: self.batch, tq: self.len, tk: self.len, n_head: c.num_heads, head_dim: c.d_kv, causal: self.decoder, dropout: None }
    }
    pub(super) fn cross_shape(&self, c: &Seq2SeqConfig) -> BiasedShape {
        BiasedShape { batch: self.batch, tq: self.len, tk: self.src_len, n_head: c.num_heads, head_dim: c.d_kv, causal: false, dropout: None }
    }
}

/// The whole pass's state: both stacks, the head's input and the logits.
pub struct Seq2SeqActs<B: Seq2SeqOps> {
    pub(super) enc: StackActs<B>,
    pub(super) dec: StackActs<B>,
    /// The decoder's output after T5's scale (the head's input).
    pub(super) head_in: B::Buf,
    /// `[batch * tgt_len, vocab]`: the logits, or after a training pass the loss's gradient.
    pub logits: B::Buf,
}

/// The loss of a pass: the sum over label tokens and their count.
#[derive(Clone, Copy, Debug)]
pub struct Seq2SeqLoss {
    pub sum: f64,
    pub n_tokens: usize,
}

impl Seq2SeqLoss {
    pub fn mean(&self) -> f32 {
        (self.sum / self.n_tokens as f64) as f32
    }
}
