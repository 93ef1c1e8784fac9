//! T5's forward pass (the backward pass is `seq2seq_backward.rs`; transformers' `T5ForConditionalGeneration.forward`): the
//! encoder (bidirectional self-attention with the relative position bias its first layer
//! computes and every layer shares, then the feed-forward; each sublayer pre-normed with T5's
//! RMS norm and added to the residual stream), the decoder (causal self-attention with its own
//! bias, cross attention to the encoder's output without a bias, the feed-forward), the final
//! norms, the decoder output's `d_model ** -0.5` scale where the config asks for it, the head and
//! the token-mean cross-entropy. No attention scaling (T5 folds it into the initialisation).
//! Training passes given a dropout key apply `dropout_rate` where transformers' T5 does (the
//! embeddings, the attention probabilities, each sublayer's output before its residual add, the
//! feed-forward's activation, the final norm's output); each mask is a function of the key, the
//! stack, the layer and the site, so the backward pass applies the same one.

use super::decoder::Neftune;
use super::seq2seq::{Seq2SeqBatch, Seq2SeqModel};
use super::seq2seq_backward::Scratch;
use super::t5::{bucket_map, FeedForward, T5Config, T5LayerParams};
use crate::backend::seq2seq::{BiasedShape, Cols, Seq2SeqOps};
use crate::error::Result;
use crate::nn::{drop, Embedding, Linear, Norm, NormKind};

/// What one layer's forward pass keeps for its backward pass.
pub(super) struct LayerActs<B: Seq2SeqOps> {
    pub(super) n1: B::Buf,
    pub(super) rstd1: B::Buf,
    pub(super) q: B::Buf,
    pub(super) k: B::Buf,
    pub(super) v: B::Buf,
    pub(super) probs: B::Buf,
    pub(super) a: B::Buf,
    /// After the self-attention's residual add.
    pub(super) h1: B::Buf,
    pub(super) cross: Option<CrossActs<B>>,
    pub(super) n2: B::Buf,
    pub(super) rstd2: B::Buf,
    pub(super) f: B::Buf,
    pub(super) g: B::Buf,
}

pub(super) struct CrossActs<B: Seq2SeqOps> {
    pub(super) n: B::Buf,
    pub(super) rstd: B::Buf,
    pub(super) q: B::Buf,
    pub(super) k: B::Buf,
    pub(super) v: B::Buf,
    pub(super) probs: B::Buf,
    pub(super) a: B::Buf,
    /// After the cross attention's residual add.
    pub(super) h: B::Buf,
}

/// One stack's pass: its layers' inputs (`hs[l]`, and `hs[n]` the last layer's output), what
/// each layer keeps, the final norm's output and statistics.
pub(super) struct StackActs<B: Seq2SeqOps> {
    pub(super) hs: Vec<B::Buf>,
    pub(super) layers: Vec<LayerActs<B>>,
    pub(super) out: B::Buf,
    pub(super) rstd: B::Buf,
    pub(super) bias: B::Buf,
    pub(super) buckets: B::Ids,
    pub(super) ids: B::Ids,
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

impl<B: Seq2SeqOps> LayerActs<B> {
    /// For `rows` rows, `self_probs` self-attention probabilities, and in a decoder layer
    /// `cross = (source rows, cross-attention probabilities)`.
    pub(super) fn new(be: &B, c: &T5Config, rows: usize, self_probs: usize, cross: Option<(usize, usize)>) -> Result<Self> {
        let (d, inner) = (c.d_model, c.inner());
        let z = |n: usize| be.zeros(n);
        let cross = match cross {
            Some((src_rows, probs)) => Some(CrossActs {
                n: z(rows * d)?,
                rstd: z(rows)?,
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
            n1: z(rows * d)?,
            rstd1: z(rows)?,
            q: z(rows * inner)?,
            k: z(rows * inner)?,
            v: z(rows * inner)?,
            probs: z(self_probs)?,
            a: z(rows * inner)?,
            h1: z(rows * d)?,
            cross,
            n2: z(rows * d)?,
            rstd2: z(rows)?,
            f: z(rows * c.wi_width())?,
            g: z(rows * c.d_ff)?,
        })
    }
}

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

/// What a layer's pass attends with: the encoder's output (decoder layers), the source mask,
/// whether the cross attention's keys and values are already in the layer's state (decoding
/// after its first step), and the self-attention cache when decoding.
pub(super) struct LayerCtx<'a, B: Seq2SeqOps> {
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
    pub(super) fn self_shape(&self, c: &T5Config) -> BiasedShape {
        BiasedShape { batch: self.batch, tq: self.len, tk: self.len, n_head: c.num_heads, head_dim: c.d_kv, causal: self.decoder, dropout: None }
    }
    pub(super) fn cross_shape(&self, c: &T5Config) -> BiasedShape {
        BiasedShape { batch: self.batch, tq: self.len, tk: self.src_len, n_head: c.num_heads, head_dim: c.d_kv, causal: false, dropout: None }
    }
}

/// The whole pass's state: both stacks, the head's input and the logits.
pub struct Seq2SeqActs<B: Seq2SeqOps> {
    pub(super) enc: StackActs<B>,
    pub(super) dec: StackActs<B>,
    /// The decoder's output after the scale (the head's input).
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

pub(super) fn linear(w: usize, inp: usize, out: usize) -> Linear {
    Linear::new(w, None, inp, out)
}

impl<B: Seq2SeqOps> Seq2SeqModel<B> {
    pub(super) fn norm(&self, w: usize) -> Norm {
        Norm { kind: NormKind::RmsNorm, w, b: None, width: self.config.d_model, eps: self.config.eps }
    }

    /// A stack's buffers for a pass of shape `geo` over `ids` (the embedding and the position
    /// bias filled in): `reuse`'s when it was made for the same shape (every buffer of a pass
    /// is written before it is read), new ones otherwise.
    fn stack_acts(&self, geo: Geometry, ids: &[i32], reuse: Option<StackActs<B>>, (drop_key, neftune): (Option<u64>, Option<Neftune>)) -> Result<StackActs<B>> {
        let (be, c) = (&self.backend, &self.config);
        let (rows, d) = (geo.rows(), c.d_model);
        let stack = if geo.decoder { &self.layout.decoder } else { &self.layout.encoder };
        let buckets = be.upload_ids(&bucket_map(geo.len, geo.len, 0, !geo.decoder, c))?;
        let ids = be.upload_ids(ids)?;
        // with gradient checkpointing one layer's state is kept, and each layer is recomputed
        // into it in the backward pass
        let n_layers = stack.layers.len();
        let kept = if self.gradient_checkpointing { 1 } else { n_layers };
        let mut s = match reuse.filter(|r| r.geo == geo && r.layers.len() == kept) {
            Some(r) => StackActs { buckets, ids, drop_key, ..r },
            None => {
                let z = |n: usize| be.zeros(n);
                let cross = geo.decoder.then(|| (geo.batch * geo.src_len, geo.cross_shape(c).probs_len()));
                let layers = (0..kept).map(|_| LayerActs::new(be, c, rows, geo.self_shape(c).probs_len(), cross)).collect::<Result<Vec<_>>>()?;
                let hs = (0..=n_layers).map(|_| z(rows * d)).collect::<Result<Vec<_>>>()?;
                let bias = z(c.num_heads * geo.len * geo.len)?;
                StackActs { hs, layers, out: z(rows * d)?, rstd: z(rows)?, bias, buckets, ids, geo, drop_key, scratch: None }
            }
        };
        be.position_bias_fwd(&mut s.bias, &self.params[stack.rel_bias], &s.buckets, c.num_heads);
        Embedding { wte: self.layout.shared, wpe: None, width: d }.fwd(be, &self.unit_params(), &mut s.hs[0], &s.ids, &be.upload_ids(&[])?);
        if let Some(Neftune { alpha, seed }) = neftune {
            // transformers' hook on the shared embedding: both stacks' inputs, each with the
            // magnitude of its own length
            use rand::{RngExt, SeedableRng};
            let mag = alpha / ((geo.len * d) as f32).sqrt();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::nn::site_key(seed, u64::from(geo.decoder)));
            let noise: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-mag..=mag)).collect();
            be.add_cols(&mut s.hs[0], &be.upload(&noise)?, rows, d, d, 0, 1.0);
        }
        drop(be, &mut s.hs[0], c.dropout_rate, layer_key(drop_key, geo.decoder, STACK), Site::Embedding as u64);
        Ok(s)
    }

    /// One layer: `y = x + attn(norm(x))` (then `+ cross(norm(.))` in the decoder), then `+
    /// ff(norm(.))`.
    #[allow(clippy::too_many_arguments)] // the layer's input and output, state and context
    pub(super) fn layer_fwd(&self, lp: &T5LayerParams, x: &B::Buf, y: &mut B::Buf, a: &mut LayerActs<B>, geo: Geometry, bias: &B::Buf, ctx: LayerCtx<B>) {
        let LayerCtx { enc, mask, cross_ready, cache, drop: key } = ctx;
        let (be, c, p) = (&self.backend, &self.config, &self.unit_params());
        let p_drop = c.dropout_rate;
        let (rows, d, inner) = (geo.rows(), c.d_model, c.inner());
        let mut empty = be.zeros(0).expect("an empty buffer");
        self.norm(lp.ln_attn).fwd(be, p, &mut a.n1, &mut empty, &mut a.rstd1, x);
        for (w, out) in [(lp.q, &mut a.q), (lp.k, &mut a.k), (lp.v, &mut a.v)] {
            linear(w, d, inner).fwd(be, p, out, &a.n1, rows);
        }
        let col = |b| Cols { buf: b, ld: inner, off: 0 };
        match cache {
            None => {
                let self_mask = if geo.decoder { None } else { Some(mask) };
                be.biased_attention_fwd(
                    &mut a.a,
                    &mut a.probs,
                    col(&a.q),
                    col(&a.k),
                    col(&a.v),
                    Some(bias),
                    self_mask,
                    BiasedShape { dropout: probs_mask(p_drop, key, Site::SelfProbs), ..geo.self_shape(c) },
                    1.0,
                );
            }
            Some(sc) => {
                for r in 0..rows {
                    be.copy_range(sc.k, (r * sc.max_len + sc.slot) * inner, &a.k, r * inner, inner);
                    be.copy_range(sc.v, (r * sc.max_len + sc.slot) * inner, &a.v, r * inner, inner);
                }
                let shape = BiasedShape { batch: rows, tq: 1, tk: sc.max_len, n_head: c.num_heads, head_dim: c.d_kv, causal: false, dropout: None };
                be.biased_attention_fwd(&mut a.a, &mut a.probs, col(&a.q), col(sc.k), col(sc.v), Some(bias), Some(sc.mask), shape, 1.0);
            }
        }
        linear(lp.o, inner, d).fwd(be, p, y, &a.a, rows);
        drop(be, y, p_drop, key, Site::SelfOut as u64);
        be.add(&mut a.h1, x, y);
        let mut h = &a.h1;
        if let (Some(cp), Some(ca), Some(enc)) = (lp.cross, a.cross.as_mut(), enc) {
            let src_rows = geo.batch * geo.src_len;
            self.norm(cp.ln).fwd(be, p, &mut ca.n, &mut empty, &mut ca.rstd, &a.h1);
            linear(cp.q, d, inner).fwd(be, p, &mut ca.q, &ca.n, rows);
            if !cross_ready {
                linear(cp.k, d, inner).fwd(be, p, &mut ca.k, enc, src_rows);
                linear(cp.v, d, inner).fwd(be, p, &mut ca.v, enc, src_rows);
            }
            be.biased_attention_fwd(
                &mut ca.a,
                &mut ca.probs,
                col(&ca.q),
                col(&ca.k),
                col(&ca.v),
                None,
                Some(mask),
                BiasedShape { dropout: probs_mask(p_drop, key, Site::CrossProbs), ..geo.cross_shape(c) },
                1.0,
            );
            linear(cp.o, inner, d).fwd(be, p, y, &ca.a, rows);
            drop(be, y, p_drop, key, Site::CrossOut as u64);
            be.add(&mut ca.h, &a.h1, y);
            h = &ca.h;
        }
        self.norm(lp.ln_ff).fwd(be, p, &mut a.n2, &mut empty, &mut a.rstd2, h);
        linear(lp.wi, d, c.wi_width()).fwd(be, p, &mut a.f, &a.n2, rows);
        match c.ff {
            FeedForward::Relu => be.relu_fwd(&mut a.g, &a.f),
            FeedForward::GatedGelu => be.geglu_fwd(&mut a.g, &a.f, c.d_ff),
        }
        drop(be, &mut a.g, p_drop, key, Site::Activation as u64);
        linear(lp.wo, c.d_ff, d).fwd(be, p, y, &a.g, rows);
        drop(be, y, p_drop, key, Site::FfOut as u64);
        be.add_cols(y, h, rows, d, d, 0, 1.0);
    }

    /// A stack's forward pass over `ids`: the layers, then the final norm into `out`.
    #[allow(clippy::too_many_arguments)] // the pass's shape, inputs, buffers and dropout key
    pub(super) fn stack_fwd(
        &self,
        geo: Geometry,
        ids: &[i32],
        enc: Option<&B::Buf>,
        mask: &B::Ids,
        reuse: Option<StackActs<B>>,
        (drop_key, neftune): (Option<u64>, Option<Neftune>),
    ) -> Result<StackActs<B>> {
        let mut s = self.stack_acts(geo, ids, reuse, (drop_key, neftune))?;
        let stack = if geo.decoder { &self.layout.decoder } else { &self.layout.encoder };
        for (l, lp) in stack.layers.iter().enumerate() {
            let (done, rest) = s.hs.split_at_mut(l + 1);
            let ctx = LayerCtx { enc, mask, cross_ready: false, cache: None, drop: layer_key(drop_key, geo.decoder, l) };
            let slot = l.min(s.layers.len() - 1);
            self.layer_fwd(lp, &done[l], &mut rest[0], &mut s.layers[slot], geo, &s.bias, ctx);
        }
        let be = &self.backend;
        let mut empty = be.zeros(0)?;
        let last = s.hs.len() - 1;
        self.norm(stack.final_norm).fwd(be, &self.unit_params(), &mut s.out, &mut empty, &mut s.rstd, &s.hs[last]);
        drop(be, &mut s.out, self.config.dropout_rate, layer_key(drop_key, geo.decoder, STACK), Site::Final as u64);
        Ok(s)
    }

    /// The forward pass: the logits in `acts.logits` (`[batch * tgt_len, vocab]`) and the loss.
    /// With `grad_scale = Some(s)` the logits are replaced by `s` times the loss's gradient,
    /// ready for [`Seq2SeqModel::backward`] (`s = 1 / label tokens` gives the token mean's).
    pub fn forward(&self, b: &Seq2SeqBatch, smoothing: f32, grad_scale: Option<f32>) -> Result<(Seq2SeqActs<B>, Seq2SeqLoss)> {
        self.forward_reusing(None, b, smoothing, grad_scale)
    }

    /// [`Seq2SeqModel::forward`] in the buffers of an earlier pass's activations, where the
    /// shapes are the same (a training loop over batches of one shape allocates once).
    pub fn forward_reusing(
        &self,
        reuse: Option<Seq2SeqActs<B>>,
        b: &Seq2SeqBatch,
        smoothing: f32,
        grad_scale: Option<f32>,
    ) -> Result<(Seq2SeqActs<B>, Seq2SeqLoss)> {
        self.forward_noisy(reuse, b, smoothing, grad_scale, (None, None))
    }

    /// [`Seq2SeqModel::forward_reusing`] with dropout keyed `drop_key` (`None`: none; the
    /// backward pass applies the same masks).
    pub fn forward_dropping(
        &self,
        reuse: Option<Seq2SeqActs<B>>,
        b: &Seq2SeqBatch,
        smoothing: f32,
        grad_scale: Option<f32>,
        drop_key: Option<u64>,
    ) -> Result<(Seq2SeqActs<B>, Seq2SeqLoss)> {
        self.forward_noisy(reuse, b, smoothing, grad_scale, (drop_key, None))
    }

    /// [`Seq2SeqModel::forward_dropping`] with NEFTune's noise on both stacks' input embeddings
    /// when given (it changes no gradient's form: the embeddings' is the same).
    pub fn forward_noisy(
        &self,
        reuse: Option<Seq2SeqActs<B>>,
        b: &Seq2SeqBatch,
        smoothing: f32,
        grad_scale: Option<f32>,
        (drop_key, neftune): (Option<u64>, Option<Neftune>),
    ) -> Result<(Seq2SeqActs<B>, Seq2SeqLoss)> {
        let (be, c) = (&self.backend, &self.config);
        b.check(c.vocab_size)?;
        let mask = be.upload_ids(&b.attention_mask)?;
        let rows = b.batch * b.tgt_len;
        let (reuse_enc, reuse_dec, reuse_bufs) = match reuse {
            Some(r) if be.len(&r.logits) == rows * c.vocab_size => (Some(r.enc), Some(r.dec), Some((r.head_in, r.logits))),
            Some(r) => (Some(r.enc), Some(r.dec), None),
            None => (None, None, None),
        };
        let enc_geo = Geometry { batch: b.batch, len: b.src_len, src_len: b.src_len, decoder: false };
        let enc = self.stack_fwd(enc_geo, &b.input_ids, None, &mask, reuse_enc, (drop_key, neftune))?;
        let dec_geo = Geometry { batch: b.batch, len: b.tgt_len, src_len: b.src_len, decoder: true };
        let dec = self.stack_fwd(dec_geo, &b.decoder_input_ids, Some(&enc.out), &mask, reuse_dec, (drop_key, neftune))?;
        let (mut head_in, mut logits) = match reuse_bufs {
            Some(bufs) => bufs,
            None => (be.zeros(rows * c.d_model)?, be.zeros(rows * c.vocab_size)?),
        };
        be.copy(&mut head_in, &dec.out);
        if c.scale_decoder_outputs {
            be.scale(&mut head_in, (c.d_model as f32).powf(-0.5));
        }
        linear(self.layout.head(), c.d_model, c.vocab_size).fwd(be, &self.unit_params(), &mut logits, &head_in, rows);
        let targets = be.upload_ids(&b.labels)?;
        let mut acts = Seq2SeqActs { enc, dec, head_in, logits };
        let loss = match grad_scale {
            Some(_) => be.cross_entropy(&mut acts.logits, &targets, c.vocab_size, smoothing, grad_scale)?,
            None => {
                let mut scratch = be.zeros(rows * c.vocab_size)?;
                be.copy(&mut scratch, &acts.logits);
                be.cross_entropy(&mut scratch, &targets, c.vocab_size, smoothing, None)?
            }
        };
        let sum = loss.loss.iter().map(|&l| l as f64).sum();
        Ok((acts, Seq2SeqLoss { sum, n_tokens: loss.n_targets }))
    }
}
