//! T5's backward pass (the forward pass and the state it keeps are `seq2seq_pass.rs`): the head,
//! then each stack from its final norm down to the embedding, the decoder first (it accumulates
//! the gradient of the encoder's output), with the forward pass's dropout masks and, under
//! gradient checkpointing, each layer recomputed from its kept input.

use super::seq2seq::{Seq2SeqBatch, Seq2SeqModel};
use super::seq2seq_pass::{layer_key, linear, probs_mask, Geometry, LayerActs, LayerCtx, Seq2SeqActs, Site, StackActs, STACK};
use super::t5::{FeedForward, T5Config, T5LayerParams};
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
        linear(self.layout.head(), c.d_model, c.vocab_size).bwd(be, &self.unit_params(), &mut g, Some(&mut d_out), &acts.logits, &acts.head_in, rows);
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

    /// A stack's backward pass from `d_out` (the gradient of its final norm's output); the
    /// decoder's also accumulates the gradient of the encoder's output into `enc.1`.
    /// `d_out` is changed (the final dropout's mask applied). `mask`: the source mask (for the
    /// layers recomputed under gradient checkpointing).
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
        let stack = if geo.decoder { &self.layout.decoder } else { &self.layout.encoder };
        let mut sc = match s.scratch.take() {
            Some(sc) => sc,
            None => Scratch::new(be, c, geo)?,
        };
        // what the pass accumulates into starts at zero; the rest is written before it is read
        be.fill(&mut sc.dres, 0.0);
        be.fill(&mut sc.dbias, 0.0);
        let last = s.hs.len() - 1;
        let stack_key = layer_key(s.drop_key, geo.decoder, STACK);
        drop(be, d_out, c.dropout_rate, stack_key, Site::Final as u64);
        self.norm(stack.final_norm).bwd(be, p, g, &mut sc.dres, d_out, &s.hs[last], &sc.empty, &s.rstd);
        let enc_out = enc.as_ref().map(|(o, _)| *o);
        for (l, lp) in stack.layers.iter().enumerate().rev() {
            let key = layer_key(s.drop_key, geo.decoder, l);
            let slot = l.min(s.layers.len() - 1);
            if s.layers.len() < stack.layers.len() && l + 1 < stack.layers.len() {
                // gradient checkpointing: the layer's state again, from its kept input (the same
                // dropout masks, from the same key); the last layer's is still there
                let (done, rest) = s.hs.split_at_mut(l + 1);
                let ctx = LayerCtx { enc: enc_out, mask, cross_ready: false, cache: None, drop: key };
                self.layer_fwd(lp, &done[l], &mut rest[0], &mut s.layers[slot], geo, &s.bias, ctx);
            }
            let enc_l = enc.as_mut().map(|(o, d)| (*o, &mut **d));
            let mut dres = std::mem::replace(&mut sc.dres, be.zeros(0)?);
            self.layer_bwd(lp, &s.hs[l], &s.layers[slot], (geo, key), g, (&mut sc, &mut dres), enc_l);
            sc.dres = dres;
        }
        drop(be, &mut sc.dres, c.dropout_rate, stack_key, Site::Embedding as u64);
        Embedding { wte: self.layout.shared, wpe: None, width: c.d_model }.bwd(be, g, &s.ids, &s.ids, &sc.dres);
        be.position_bias_bwd(&mut g.bufs[stack.rel_bias], &sc.dbias, &s.buckets, c.num_heads);
        s.scratch = Some(sc);
        Ok(())
    }

    /// One layer's backward pass: `dres` holds the gradient of its output on entry and of its
    /// input `x` on return.
    #[allow(clippy::too_many_arguments)] // the layer's input, saved state, gradients and scratch
    fn layer_bwd(
        &self,
        lp: &T5LayerParams,
        x: &B::Buf,
        a: &LayerActs<B>,
        (geo, key): (Geometry, Option<u64>),
        g: &mut GradsMut<B>,
        (sc, dres): (&mut Scratch<B>, &mut B::Buf),
        enc: Option<(&B::Buf, &mut B::Buf)>,
    ) {
        let (be, c, p) = (&self.backend, &self.config, &self.unit_params());
        let p_drop = c.dropout_rate;
        let (rows, d, inner) = (geo.rows(), c.d_model, c.inner());
        let col = |b| Cols { buf: b, ld: inner, off: 0 };
        let ff_in = a.cross.as_ref().map_or(&a.h1, |ca| &ca.h);
        let dy = masked(be, &mut sc.tmp, dres, (p_drop, key, Site::FfOut));
        linear(lp.wo, c.d_ff, d).bwd(be, p, g, Some(&mut sc.dg), dy, &a.g, rows);
        drop(be, &mut sc.dg, p_drop, key, Site::Activation as u64);
        match c.ff {
            FeedForward::Relu => be.relu_bwd(&mut sc.df, &a.f, &sc.dg),
            FeedForward::GatedGelu => be.geglu_bwd(&mut sc.df, &a.f, &sc.dg, c.d_ff),
        }
        linear(lp.wi, d, c.wi_width()).bwd(be, p, g, Some(&mut sc.dn), &sc.df, &a.n2, rows);
        self.norm(lp.ln_ff).bwd(be, p, g, dres, &sc.dn, ff_in, &sc.empty, &a.rstd2);
        if let (Some(cp), Some(ca), Some((enc_out, denc)), Some(x)) = (lp.cross, a.cross.as_ref(), enc, sc.cross.as_mut()) {
            let src_rows = geo.batch * geo.src_len;
            let dy = masked(be, &mut sc.tmp, dres, (p_drop, key, Site::CrossOut));
            linear(cp.o, inner, d).bwd(be, p, g, Some(&mut sc.da), dy, &ca.a, rows);
            be.biased_attention_bwd(
                (&mut x.dq, &mut x.dk, &mut x.dv),
                None,
                &mut x.ds,
                &sc.da,
                (col(&ca.q), col(&ca.k), col(&ca.v)),
                &ca.probs,
                BiasedShape { dropout: probs_mask(p_drop, key, Site::CrossProbs), ..geo.cross_shape(c) },
                1.0,
            );
            linear(cp.q, d, inner).bwd(be, p, g, Some(&mut sc.dn), &x.dq, &ca.n, rows);
            for (w, dy) in [(cp.k, &x.dk), (cp.v, &x.dv)] {
                linear(w, d, inner).bwd(be, p, g, Some(&mut x.tmp), dy, enc_out, src_rows);
                be.add_cols(denc, &x.tmp, src_rows, d, d, 0, 1.0);
            }
            self.norm(cp.ln).bwd(be, p, g, dres, &sc.dn, &a.h1, &sc.empty, &ca.rstd);
        }
        let dy = masked(be, &mut sc.tmp, dres, (p_drop, key, Site::SelfOut));
        linear(lp.o, inner, d).bwd(be, p, g, Some(&mut sc.da), dy, &a.a, rows);
        be.biased_attention_bwd(
            (&mut sc.dq, &mut sc.dk, &mut sc.dv),
            Some(&mut sc.dbias),
            &mut sc.ds,
            &sc.da,
            (col(&a.q), col(&a.k), col(&a.v)),
            &a.probs,
            BiasedShape { dropout: probs_mask(p_drop, key, Site::SelfProbs), ..geo.self_shape(c) },
            1.0,
        );
        linear(lp.q, d, inner).bwd(be, p, g, Some(&mut sc.dn), &sc.dq, &a.n1, rows);
        for (w, dy) in [(lp.k, &sc.dk), (lp.v, &sc.dv)] {
            linear(w, d, inner).bwd(be, p, g, Some(&mut sc.tmp), dy, &a.n1, rows);
            be.add_cols(&mut sc.dn, &sc.tmp, rows, d, d, 0, 1.0);
        }
        self.norm(lp.ln_attn).bwd(be, p, g, dres, &sc.dn, x, &sc.empty, &a.rstd1);
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
    /// The self-attention bias's gradient, summed over the layers.
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
    fn new(be: &B, c: &T5Config, geo: Geometry) -> Result<Self> {
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
            dbias: be.zeros(c.num_heads * geo.len * geo.len)?,
            empty: be.zeros(0)?,
            cross,
        })
    }
}
