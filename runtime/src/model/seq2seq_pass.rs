//! The encoder-decoder forward pass (transformers' `T5ForConditionalGeneration.forward` and
//! `BartForConditionalGeneration.forward`; the backward pass is `seq2seq_backward.rs`, the state
//! kept between them `seq2seq_acts.rs`): each stack embeds its tokens (BART: scaled, plus learned
//! positions, then `layernorm_embedding`), then runs its layers: self-attention (bidirectional in
//! the encoder with T5's relative position bias computed once per stack, causal in the
//! decoder), cross attention to the encoder's output in the decoder, the feed-forward. Each
//! sublayer is pre-normed and added to the residual stream (T5, RMS norm) or added to the
//! residual stream and then normed (BART, LayerNorm). T5 ends each stack with a final norm and
//! scales the decoder output by `d_model ** -0.5` under a tied head; BART adds
//! `final_logits_bias` to the logits. Then the token-mean cross-entropy.
//! Training passes given a dropout key apply dropout where transformers does (the embeddings,
//! the attention probabilities, each sublayer's output before its residual add, the
//! feed-forward's activation, T5's final norm output); each mask is a function of the key, the
//! stack, the layer and the site, so the backward pass applies the same one.

use super::decoder::Neftune;
use super::seq2seq::{Seq2SeqBatch, Seq2SeqModel};
pub(super) use super::seq2seq_acts::{layer_key, probs_mask, Geometry, LayerActs, LayerCtx, NormActs, SelfCache, Site, StackActs, STACK};
pub use super::seq2seq_acts::{Seq2SeqActs, Seq2SeqLoss};
use super::seq2seq_config::{Family, FeedForward, LayerParams, Lin, NormP, StackParams};
use super::t5::bucket_map;
use crate::backend::seq2seq::{BiasedShape, Cols, Seq2SeqOps};
use crate::error::Result;
use crate::nn::{drop, Embedding, Linear, Norm};

pub(super) fn linear(l: Lin, inp: usize, out: usize) -> Linear {
    Linear::new(l.w, l.b, inp, out)
}

impl<B: Seq2SeqOps> Seq2SeqModel<B> {
    pub(super) fn norm(&self, n: NormP) -> Norm {
        Norm { kind: self.config.norm_kind(), w: n.w, b: n.b, width: self.config.d_model, eps: self.config.eps }
    }

    /// The LM head: the head weight, and BART's `final_logits_bias` (frozen).
    pub(super) fn head(&self) -> Linear {
        Linear::new(self.layout.head(), self.layout.logits_bias, self.config.d_model, self.config.vocab_size)
    }

    /// A stack's input embeddings of `rows` tokens into `out`: the shared embedding of `ids`
    /// (plus NEFTune's `noise`); BART's scaled by `embed_scale`, plus the learned positions of
    /// `pos`, then `layernorm_embedding` (its input and statistics kept in `emb`).
    #[allow(clippy::too_many_arguments)] // the stack, its ids, output, kept state and noise
    pub(super) fn embed(&self, decoder: bool, ids: &B::Ids, pos: &B::Ids, out: &mut B::Buf, emb: &mut NormActs<B>, noise: Option<&B::Buf>, rows: usize) {
        let (be, c, p) = (&self.backend, &self.config, &self.unit_params());
        let d = c.d_model;
        let stack = self.layout.stack(decoder);
        let tokens = Embedding { wte: self.layout.shared, wpe: None, width: d };
        match (stack.positions, stack.ln_emb) {
            (Some(table), Some(ln)) => {
                tokens.fwd(be, p, &mut emb.n, ids, pos);
                if c.embed_scale() != 1.0 {
                    be.scale(&mut emb.n, c.embed_scale());
                }
                if let Some(z) = noise {
                    be.add_cols(&mut emb.n, z, rows, d, d, 0, 1.0);
                }
                Embedding { wte: table, wpe: None, width: d }.fwd(be, p, out, pos, pos);
                be.add_cols(&mut emb.n, out, rows, d, d, 0, 1.0);
                self.norm(ln).fwd(be, p, out, &mut emb.mean, &mut emb.rstd, &emb.n);
            }
            _ => {
                tokens.fwd(be, p, out, ids, pos);
                if let Some(z) = noise {
                    be.add_cols(out, z, rows, d, d, 0, 1.0);
                }
            }
        }
    }

    /// A stack's buffers for a pass of shape `geo` over `ids` (the embedding and T5's position
    /// bias filled in): `reuse`'s when it was made for the same shape (every buffer of a pass
    /// is written before it is read), new ones otherwise.
    fn stack_acts(&self, geo: Geometry, ids: &[i32], reuse: Option<StackActs<B>>, (drop_key, neftune): (Option<u64>, Option<Neftune>)) -> Result<StackActs<B>> {
        let (be, c) = (&self.backend, &self.config);
        let (rows, d) = (geo.rows(), c.d_model);
        let stack = self.layout.stack(geo.decoder);
        let buckets = match c.family {
            Family::T5(t) => bucket_map(geo.len, geo.len, 0, !geo.decoder, &t),
            Family::Bart(_) => Vec::new(),
        };
        let pos: Vec<i32> = match stack.positions {
            Some(_) => (0..geo.batch).flat_map(|_| (0..geo.len).map(|i| i as i32 + 2)).collect(),
            None => Vec::new(),
        };
        let grad_ids: Vec<i32> = match c.padding_idx() {
            Some(pad) => ids.iter().map(|&i| if i as usize == pad { -1 } else { i }).collect(),
            None => ids.to_vec(),
        };
        let (buckets, pos, grad_ids, ids) = (be.upload_ids(&buckets)?, be.upload_ids(&pos)?, be.upload_ids(&grad_ids)?, be.upload_ids(ids)?);
        // with gradient checkpointing one layer's state is kept, and each layer is recomputed
        // into it in the backward pass
        let n_layers = stack.layers.len();
        let kept = if self.gradient_checkpointing { 1 } else { n_layers };
        let mut s = match reuse.filter(|r| r.geo == geo && r.layers.len() == kept) {
            Some(r) => StackActs { buckets, ids, grad_ids, pos, drop_key, ..r },
            None => {
                let z = |n: usize| be.zeros(n);
                let cross = geo.decoder.then(|| (geo.batch * geo.src_len, geo.cross_shape(c).probs_len()));
                let layers = (0..kept).map(|_| LayerActs::new(be, c, rows, geo.self_shape(c).probs_len(), cross)).collect::<Result<Vec<_>>>()?;
                let hs = (0..=n_layers).map(|_| z(rows * d)).collect::<Result<Vec<_>>>()?;
                let bias = z(if stack.rel_bias.is_some() { c.num_heads * geo.len * geo.len } else { 0 })?;
                let emb = NormActs::new(be, c, if stack.ln_emb.is_some() { rows } else { 0 })?;
                StackActs { hs, layers, out: z(rows * d)?, rstd: z(rows)?, bias, buckets, ids, grad_ids, pos, emb, geo, drop_key, scratch: None }
            }
        };
        if let Some(table) = stack.rel_bias {
            be.position_bias_fwd(&mut s.bias, &self.params[table], &s.buckets, c.num_heads);
        }
        let noise = match neftune {
            // transformers' hook on the input embedding: both stacks' inputs, each with the
            // magnitude of its own length
            Some(Neftune { alpha, seed }) => {
                use rand::{RngExt, SeedableRng};
                let mag = alpha / ((geo.len * d) as f32).sqrt();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::nn::site_key(seed, u64::from(geo.decoder)));
                let noise: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-mag..=mag)).collect();
                Some(be.upload(&noise)?)
            }
            None => None,
        };
        self.embed(geo.decoder, &s.ids, &s.pos, &mut s.hs[0], &mut s.emb, noise.as_ref(), rows);
        drop(be, &mut s.hs[0], c.dropout_rate, layer_key(drop_key, geo.decoder, STACK), Site::Embedding as u64);
        Ok(s)
    }

    /// A sublayer's input: `norm(x)` (pre-norm, kept in `na.n`), or `x` itself (post-norm).
    fn sub_in<'a>(&self, ln: NormP, x: &'a B::Buf, na: &'a mut NormActs<B>) -> &'a B::Buf {
        if self.config.post_norm() {
            return x;
        }
        self.norm(ln).fwd(&self.backend, &self.unit_params(), &mut na.n, &mut na.mean, &mut na.rstd, x);
        &na.n
    }

    /// The residual add after a sublayer: `out` holds the sublayer's (dropped) output on entry
    /// and the residual stream on return, `x + out` (pre-norm) or `norm(x + out)` (post-norm,
    /// the sum kept in `na.n`).
    fn residual(&self, ln: NormP, x: &B::Buf, out: &mut B::Buf, na: &mut NormActs<B>, rows: usize) {
        let (be, d) = (&self.backend, self.config.d_model);
        if self.config.post_norm() {
            be.add(&mut na.n, x, out);
            self.norm(ln).fwd(be, &self.unit_params(), out, &mut na.mean, &mut na.rstd, &na.n);
        } else {
            be.add_cols(out, x, rows, d, d, 0, 1.0);
        }
    }

    /// One layer from `x` into `y`: self-attention, cross attention (decoder layers), the
    /// feed-forward, each with its residual add and norm.
    pub(super) fn layer_fwd(&self, lp: &LayerParams, x: &B::Buf, y: &mut B::Buf, a: &mut LayerActs<B>, geo: Geometry, ctx: LayerCtx<B>) {
        let LayerCtx { bias, enc, mask, cross_ready, cache, drop: key } = ctx;
        let (be, c, p) = (&self.backend, &self.config, &self.unit_params());
        let (p_drop, p_attn, scale) = (c.dropout_rate, c.attn_dropout(), c.attn_scale());
        let (rows, d, inner) = (geo.rows(), c.d_model, c.inner());
        let inp = self.sub_in(lp.ln_attn, x, &mut a.s1);
        for (w, out) in [(lp.q, &mut a.q), (lp.k, &mut a.k), (lp.v, &mut a.v)] {
            linear(w, d, inner).fwd(be, p, out, inp, rows);
        }
        let col = |b| Cols { buf: b, ld: inner, off: 0 };
        match cache {
            None => {
                let self_mask = if geo.decoder { None } else { Some(mask) };
                let shape = BiasedShape { dropout: probs_mask(p_attn, key, Site::SelfProbs), ..geo.self_shape(c) };
                be.biased_attention_fwd(&mut a.a, &mut a.probs, col(&a.q), col(&a.k), col(&a.v), bias, self_mask, shape, scale);
            }
            Some(sc) => {
                for r in 0..rows {
                    be.copy_range(sc.k, (r * sc.max_len + sc.slot) * inner, &a.k, r * inner, inner);
                    be.copy_range(sc.v, (r * sc.max_len + sc.slot) * inner, &a.v, r * inner, inner);
                }
                let shape = BiasedShape { batch: rows, tq: 1, tk: sc.max_len, n_head: c.num_heads, head_dim: c.d_kv, causal: false, dropout: None };
                be.biased_attention_fwd(&mut a.a, &mut a.probs, col(&a.q), col(sc.k), col(sc.v), bias, Some(sc.mask), shape, scale);
            }
        }
        linear(lp.o, inner, d).fwd(be, p, &mut a.h1, &a.a, rows);
        drop(be, &mut a.h1, p_drop, key, Site::SelfOut as u64);
        self.residual(lp.ln_attn, x, &mut a.h1, &mut a.s1, rows);
        let mut h = &a.h1;
        if let (Some(cp), Some(ca), Some(enc)) = (lp.cross, a.cross.as_mut(), enc) {
            let src_rows = geo.batch * geo.src_len;
            let inp = self.sub_in(cp.ln, &a.h1, &mut ca.s);
            linear(cp.q, d, inner).fwd(be, p, &mut ca.q, inp, rows);
            if !cross_ready {
                linear(cp.k, d, inner).fwd(be, p, &mut ca.k, enc, src_rows);
                linear(cp.v, d, inner).fwd(be, p, &mut ca.v, enc, src_rows);
            }
            let shape = BiasedShape { dropout: probs_mask(p_attn, key, Site::CrossProbs), ..geo.cross_shape(c) };
            be.biased_attention_fwd(&mut ca.a, &mut ca.probs, col(&ca.q), col(&ca.k), col(&ca.v), None, Some(mask), shape, scale);
            linear(cp.o, inner, d).fwd(be, p, &mut ca.h, &ca.a, rows);
            drop(be, &mut ca.h, p_drop, key, Site::CrossOut as u64);
            self.residual(cp.ln, &a.h1, &mut ca.h, &mut ca.s, rows);
            h = &ca.h;
        }
        let inp = self.sub_in(lp.ln_ff, h, &mut a.s2);
        linear(lp.wi, d, c.wi_width()).fwd(be, p, &mut a.f, inp, rows);
        match c.ff {
            FeedForward::Relu => be.relu_fwd(&mut a.g, &a.f),
            FeedForward::GatedGelu => be.geglu_fwd(&mut a.g, &a.f, c.d_ff),
            FeedForward::Gelu => be.gelu_erf_fwd(&mut a.g, &a.f),
            FeedForward::GeluNew => be.gelu_fwd(&mut a.g, &a.f),
        }
        drop(be, &mut a.g, c.act_dropout(), key, Site::Activation as u64);
        linear(lp.wo, c.d_ff, d).fwd(be, p, y, &a.g, rows);
        drop(be, y, p_drop, key, Site::FfOut as u64);
        self.residual(lp.ln_ff, h, y, &mut a.s2, rows);
    }

    /// A stack's output from its last layer's: T5's final norm (then dropout, keyed `key`),
    /// BART's as it is.
    pub(super) fn stack_out(&self, stack: &StackParams, x: &B::Buf, out: &mut B::Buf, rstd: &mut B::Buf, key: Option<u64>) -> Result<()> {
        let be = &self.backend;
        match stack.final_norm {
            Some(n) => {
                self.norm(n).fwd(be, &self.unit_params(), out, &mut be.zeros(0)?, rstd, x);
                drop(be, out, self.config.dropout_rate, key, Site::Final as u64);
            }
            None => be.copy(out, x),
        }
        Ok(())
    }

    /// A stack's forward pass over `ids`: the embedding, the layers, then the stack's output.
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
        let stack = self.layout.stack(geo.decoder);
        for (l, lp) in stack.layers.iter().enumerate() {
            let (done, rest) = s.hs.split_at_mut(l + 1);
            let bias = stack.rel_bias.map(|_| &s.bias);
            let ctx = LayerCtx { bias, enc, mask, cross_ready: false, cache: None, drop: layer_key(drop_key, geo.decoder, l) };
            let slot = l.min(s.layers.len() - 1);
            self.layer_fwd(lp, &done[l], &mut rest[0], &mut s.layers[slot], geo, ctx);
        }
        let last = s.hs.len() - 1;
        self.stack_out(stack, &s.hs[last], &mut s.out, &mut s.rstd, layer_key(drop_key, geo.decoder, STACK))?;
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
        c.check_lengths(b.src_len, b.tgt_len)?;
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
        self.head().fwd(be, &self.unit_params(), &mut logits, &head_in, rows);
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
