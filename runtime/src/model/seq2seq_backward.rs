//! The encoder-decoder backward pass (the forward pass is `seq2seq_pass.rs`): the head, then
//! each stack from its output down to the embedding, the decoder first (it accumulates the
//! gradient of the encoder's output), with the forward pass's dropout masks and, under gradient
//! checkpointing, each layer recomputed from its kept input.

use super::seq2seq::{Seq2SeqBatch, Seq2SeqModel};
use super::seq2seq_config::{FeedForward, LayerParams, NormP, Seq2SeqConfig};
use super::seq2seq_pass::{layer_key, linear, probs_mask, Geometry, LayerActs, LayerCtx, NormActs, Seq2SeqActs, Site, StackActs, STACK};
use crate::backend::seq2seq::{BiasedShape, Cols, Seq2SeqOps};
use crate::error::Result;
use crate::nn::{drop, Embedding, GradsMut};

/// The gradient of a sublayer's output that was dropped (`site`) before its residual add: the
/// residual's gradient `dres` with the same mask, in `tmp`; `dres` itself without dropout.
fn masked<'a, B: Seq2SeqOps>(be: &B, tmp: &'a mut B::Buf, dres: &'a B::Buf, (p, key, site): (f32, Option<u64>, Site)) -> &'a B::Buf {
    if key.is_none() || p == 0.0 {
        return dres;
    }
    be.copy(tmp, dres);
    drop(be, tmp, p, key, site as u64);
    tmp
}

impl<B: Seq2SeqOps> Seq2SeqModel<B> {
    /// The backward pass of a [`Seq2SeqModel::forward`] made with a `grad_scale`: accumulates
    /// every parameter's gradient into `grads` (one buffer per parameter, in layout order).
    pub fn backward(&self, acts: &mut Seq2SeqActs<B>, b: &Seq2SeqBatch, grads: &mut [B::Buf]) -> Result<()> {
        let (be, c) = (&self.backend, &self.config);
        let rows = b.batch * b.tgt_len;
        let mut g = self.grads_mut(grads);
        let mut d_out = be.zeros(rows * c.d_model)?;
        self.head().bwd(be, &self.unit_params(), &mut g, Some(&mut d_out), &acts.logits, &acts.head_in, rows);
        if c.scale_decoder_outputs {
            be.scale(&mut d_out, (c.d_model as f32).powf(-0.5));
        }
        let mut denc = be.zeros(b.batch * b.src_len * c.d_model)?;
        let dec_geo = Geometry { batch: b.batch, len: b.tgt_len, src_len: b.src_len, decoder: true };
        let mask = be.upload_ids(&b.attention_mask)?;
        self.stack_bwd(&mut acts.dec, dec_geo, &mut d_out, &mut g, Some((&acts.enc.out, &mut denc)), &mask)?;
        let enc_geo = Geometry { batch: b.batch, len: b.src_len, src_len: b.src_len, decoder: false };
        self.stack_bwd(&mut acts.enc, enc_geo, &mut denc, &mut g, None, &mask)
    }

    /// A stack's backward pass from `d_out` (the gradient of its output); the decoder's also
    /// accumulates the gradient of the encoder's output into `enc.1`. `d_out` is changed (T5's
    /// final dropout mask applied). `mask`: the source mask (for the layers recomputed under
    /// gradient checkpointing).
    #[allow(clippy::too_many_arguments)] // the pass's state, shape, gradients and the encoder's side
    fn stack_bwd(
        &self,
        s: &mut StackActs<B>,
        geo: Geometry,
        d_out: &mut B::Buf,
        g: &mut GradsMut<B>,
        mut enc: Option<(&B::Buf, &mut B::Buf)>,
        mask: &B::Ids,
    ) -> Result<()> {
        let (be, c, p) = (&self.backend, &self.config, &self.unit_params());
        let stack = self.layout.stack(geo.decoder);
        let mut sc = match s.scratch.take() {
            Some(sc) => sc,
            None => Scratch::new(be, c, geo, stack.rel_bias.is_some())?,
        };
        // what the pass accumulates into starts at zero; the rest is written before it is read
        be.fill(&mut sc.dres, 0.0);
        be.fill(&mut sc.dbias, 0.0);
        let last = s.hs.len() - 1;
        let stack_key = layer_key(s.drop_key, geo.decoder, STACK);
        match stack.final_norm {
            Some(n) => {
                drop(be, d_out, c.dropout_rate, stack_key, Site::Final as u64);
                self.norm(n).bwd(be, p, g, &mut sc.dres, d_out, &s.hs[last], &sc.empty, &s.rstd);
            }
            None => be.copy(&mut sc.dres, d_out),
        }
        let enc_out = enc.as_ref().map(|(o, _)| *o);
        for (l, lp) in stack.layers.iter().enumerate().rev() {
            let key = layer_key(s.drop_key, geo.decoder, l);
            let slot = l.min(s.layers.len() - 1);
            if s.layers.len() < stack.layers.len() && l + 1 < stack.layers.len() {
                // gradient checkpointing: the layer's state again, from its kept input (the same
                // dropout masks, from the same key); the last layer's is still there
                let (done, rest) = s.hs.split_at_mut(l + 1);
                let bias = stack.rel_bias.map(|_| &s.bias);
                let ctx = LayerCtx { bias, enc: enc_out, mask, cross_ready: false, cache: None, drop: key };
                self.layer_fwd(lp, &done[l], &mut rest[0], &mut s.layers[slot], geo, ctx);
            }
            let enc_l = enc.as_mut().map(|(o, d)| (*o, &mut **d));
            let mut dres = std::mem::replace(&mut sc.dres, be.zeros(0)?);
            self.layer_bwd(lp, &s.hs[l], &s.layers[slot], (geo, key), g, (&mut sc, &mut dres), enc_l);
            sc.dres = dres;
        }
        drop(be, &mut sc.dres, c.dropout_rate, stack_key, Site::Embedding as u64);
        self.embed_bwd(s, geo.decoder, &mut sc, g);
        if let Some(table) = stack.rel_bias {
            be.position_bias_bwd(&mut g.bufs[table], &sc.dbias, &s.buckets, c.num_heads);
        }
        s.scratch = Some(sc);
        Ok(())
    }

    /// The embedding's backward pass from `sc.dres` (the gradient of the stack's input): BART's
    /// `layernorm_embedding`, positions and scale, then the shared embedding (not its
    /// `padding_idx` row).
    fn embed_bwd(&self, s: &StackActs<B>, decoder: bool, sc: &mut Scratch<B>, g: &mut GradsMut<B>) {
        let (be, c, p) = (&self.backend, &self.config, &self.unit_params());
        let d = c.d_model;
        let stack = self.layout.stack(decoder);
        let tokens = Embedding { wte: self.layout.shared, wpe: None, width: d };
        match (stack.positions, stack.ln_emb) {
            (Some(table), Some(ln)) => {
                be.fill(&mut sc.dsum, 0.0);
                self.norm(ln).bwd(be, p, g, &mut sc.dsum, &sc.dres, &s.emb.n, &s.emb.mean, &s.emb.rstd);
                Embedding { wte: table, wpe: None, width: d }.bwd(be, g, &s.pos, &s.pos, &sc.dsum);
                if c.embed_scale() != 1.0 {
                    be.scale(&mut sc.dsum, c.embed_scale());
                }
                tokens.bwd(be, g, &s.grad_ids, &s.grad_ids, &sc.dsum);
            }
            _ => tokens.bwd(be, g, &s.grad_ids, &s.grad_ids, &sc.dres),
        }
    }

    /// Post-norm: turns `dres`, the gradient of a sublayer's norm output, into that of the
    /// norm's input (the residual sum), through `spare`. Pre-norm: nothing.
    fn residual_bwd(&self, ln: NormP, dres: &mut B::Buf, na: &NormActs<B>, spare: &mut B::Buf, g: &mut GradsMut<B>) {
        if !self.config.post_norm() {
            return;
        }
        let be = &self.backend;
        be.fill(spare, 0.0);
        self.norm(ln).bwd(be, &self.unit_params(), g, spare, dres, &na.n, &na.mean, &na.rstd);
        std::mem::swap(dres, spare);
    }

    /// Adds `d_in`, the gradient of a sublayer's input, to `dres`: through the norm that made
    /// it from `x` (pre-norm), or as it is (post-norm: the input was `x`).
    #[allow(clippy::too_many_arguments)] // the gradients, the norm's input and state, the geometry
    fn sub_in_bwd(&self, ln: NormP, dres: &mut B::Buf, d_in: &B::Buf, x: &B::Buf, na: &NormActs<B>, g: &mut GradsMut<B>, rows: usize) {
        let (be, d) = (&self.backend, self.config.d_model);
        if self.config.post_norm() {
            be.add_cols(dres, d_in, rows, d, d, 0, 1.0);
        } else {
            self.norm(ln).bwd(be, &self.unit_params(), g, dres, d_in, x, &na.mean, &na.rstd);
        }
    }

    /// One layer's backward pass: `dres` holds the gradient of its output on entry and of its
    /// input `x` on return.
    #[allow(clippy::too_many_arguments)] // the layer's input, saved state, gradients and scratch
    fn layer_bwd(
        &self,
        lp: &LayerParams,
        x: &B::Buf,
        a: &LayerActs<B>,
        (geo, key): (Geometry, Option<u64>),
        g: &mut GradsMut<B>,
        (sc, dres): (&mut Scratch<B>, &mut B::Buf),
        enc: Option<(&B::Buf, &mut B::Buf)>,
    ) {
        let (be, c, p) = (&self.backend, &self.config, &self.unit_params());
        let (p_drop, p_attn, scale, post) = (c.dropout_rate, c.attn_dropout(), c.attn_scale(), c.post_norm());
        let (rows, d, inner) = (geo.rows(), c.d_model, c.inner());
        let col = |b| Cols { buf: b, ld: inner, off: 0 };
        let ff_in = a.cross.as_ref().map_or(&a.h1, |ca| &ca.h);
        self.residual_bwd(lp.ln_ff, dres, &a.s2, &mut sc.dsum, g);
        let dy = masked(be, &mut sc.tmp, dres, (p_drop, key, Site::FfOut));
        linear(lp.wo, c.d_ff, d).bwd(be, p, g, Some(&mut sc.dg), dy, &a.g, rows);
        drop(be, &mut sc.dg, c.act_dropout(), key, Site::Activation as u64);
        match c.ff {
            FeedForward::Relu => be.relu_bwd(&mut sc.df, &a.f, &sc.dg),
            FeedForward::GatedGelu => be.geglu_bwd(&mut sc.df, &a.f, &sc.dg, c.d_ff),
            FeedForward::Gelu => be.gelu_erf_bwd(&mut sc.df, &a.f, &sc.dg),
            FeedForward::GeluNew => be.gelu_bwd(&mut sc.df, &a.f, &sc.dg),
        }
        let inp = if post { ff_in } else { &a.s2.n };
        linear(lp.wi, d, c.wi_width()).bwd(be, p, g, Some(&mut sc.dn), &sc.df, inp, rows);
        self.sub_in_bwd(lp.ln_ff, dres, &sc.dn, ff_in, &a.s2, g, rows);
        if let (Some(cp), Some(ca), Some((enc_out, denc)), Some(x)) = (lp.cross, a.cross.as_ref(), enc, sc.cross.as_mut()) {
            let src_rows = geo.batch * geo.src_len;
            self.residual_bwd(cp.ln, dres, &ca.s, &mut sc.dsum, g);
            let dy = masked(be, &mut sc.tmp, dres, (p_drop, key, Site::CrossOut));
            linear(cp.o, inner, d).bwd(be, p, g, Some(&mut sc.da), dy, &ca.a, rows);
            be.biased_attention_bwd(
                (&mut x.dq, &mut x.dk, &mut x.dv),
                None,
                &mut x.ds,
                &sc.da,
                (col(&ca.q), col(&ca.k), col(&ca.v)),
                &ca.probs,
                BiasedShape { dropout: probs_mask(p_attn, key, Site::CrossProbs), ..geo.cross_shape(c) },
                scale,
            );
            let inp = if post { &a.h1 } else { &ca.s.n };
            linear(cp.q, d, inner).bwd(be, p, g, Some(&mut sc.dn), &x.dq, inp, rows);
            for (w, dy) in [(cp.k, &x.dk), (cp.v, &x.dv)] {
                linear(w, d, inner).bwd(be, p, g, Some(&mut x.tmp), dy, enc_out, src_rows);
                be.add_cols(denc, &x.tmp, src_rows, d, d, 0, 1.0);
            }
            self.sub_in_bwd(cp.ln, dres, &sc.dn, &a.h1, &ca.s, g, rows);
        }
        self.residual_bwd(lp.ln_attn, dres, &a.s1, &mut sc.dsum, g);
        let dy = masked(be, &mut sc.tmp, dres, (p_drop, key, Site::SelfOut));
        linear(lp.o, inner, d).bwd(be, p, g, Some(&mut sc.da), dy, &a.a, rows);
        let dbias = if be.len(&sc.dbias) > 0 { Some(&mut sc.dbias) } else { None };
        be.biased_attention_bwd(
            (&mut sc.dq, &mut sc.dk, &mut sc.dv),
            dbias,
            &mut sc.ds,
            &sc.da,
            (col(&a.q), col(&a.k), col(&a.v)),
            &a.probs,
            BiasedShape { dropout: probs_mask(p_attn, key, Site::SelfProbs), ..geo.self_shape(c) },
            scale,
        );
        let inp = if post { x } else { &a.s1.n };
        linear(lp.q, d, inner).bwd(be, p, g, Some(&mut sc.dn), &sc.dq, inp, rows);
        for (w, dy) in [(lp.k, &sc.dk), (lp.v, &sc.dv)] {
            linear(w, d, inner).bwd(be, p, g, Some(&mut sc.tmp), dy, inp, rows);
            be.add_cols(&mut sc.dn, &sc.tmp, rows, d, d, 0, 1.0);
        }
        self.sub_in_bwd(lp.ln_attn, dres, &sc.dn, x, &a.s1, g, rows);
    }
}

/// A stack's backward scratch.
pub(super) struct Scratch<B: Seq2SeqOps> {
    /// The gradient of the residual stream.
    dres: B::Buf,
    dn: B::Buf,
    da: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    ds: B::Buf,
    dg: B::Buf,
    df: B::Buf,
    tmp: B::Buf,
    /// The gradient of a post-norm sublayer's residual sum.
    dsum: B::Buf,
    /// T5's self-attention bias gradient, summed over the layers (empty for BART).
    dbias: B::Buf,
    empty: B::Buf,
    cross: Option<CrossScratch<B>>,
}

struct CrossScratch<B: Seq2SeqOps> {
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    ds: B::Buf,
    /// `[src rows, d_model]`.
    tmp: B::Buf,
}

impl<B: Seq2SeqOps> Scratch<B> {
    fn new(be: &B, c: &Seq2SeqConfig, geo: Geometry, position_bias: bool) -> Result<Self> {
        let (rows, d, inner) = (geo.rows(), c.d_model, c.inner());
        let src_rows = geo.batch * geo.src_len;
        let cross = if geo.decoder {
            Some(CrossScratch {
                dq: be.zeros(rows * inner)?,
                dk: be.zeros(src_rows * inner)?,
                dv: be.zeros(src_rows * inner)?,
                ds: be.zeros(geo.cross_shape(c).probs_len())?,
                tmp: be.zeros(src_rows * d)?,
            })
        } else {
            None
        };
        Ok(Scratch {
            dres: be.zeros(rows * d)?,
            dn: be.zeros(rows * d)?,
            da: be.zeros(rows * inner)?,
            dq: be.zeros(rows * inner)?,
            dk: be.zeros(rows * inner)?,
            dv: be.zeros(rows * inner)?,
            ds: be.zeros(geo.self_shape(c).probs_len())?,
            dg: be.zeros(rows * c.d_ff)?,
            df: be.zeros(rows * c.wi_width())?,
            tmp: be.zeros(rows * d)?,
            dsum: be.zeros(rows * d)?,
            dbias: be.zeros(if position_bias { c.num_heads * geo.len * geo.len } else { 0 })?,
            empty: be.zeros(0)?,
            cross,
        })
    }
}
