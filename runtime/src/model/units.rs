//! The models as [`crate::nn`] units: each layer's block, the embedding, the final norm and the
//! head, built from the config, the parameter layout and what the family's block is made of
//! (`registry::Kinds`: which norm, which activation, RoPE or learned positions).

use super::lora::Unit;
use super::Model;
use crate::backend::Backend;
use crate::nn::{Attention, Block, Embedding, Linear, Norm, Params};

impl<B: Backend> Model<B> {
    /// The parameters and the trainable mask, for the units.
    pub fn unit_params(&self) -> Params<'_, B> {
        Params::new(&self.params, &self.trainable)
    }

    fn kinds(&self) -> super::registry::Kinds {
        (super::registry::by_arch(self.config.arch).kinds)(&self.config)
    }

    /// A normalisation of the hidden state with weight `w` (and bias `b`).
    pub fn norm(&self, w: usize, b: Option<usize>) -> Norm {
        Norm { kind: self.kinds().norm, w, b, width: self.config.hidden_size, eps: self.config.norm_eps }
    }

    /// Layer `l` as a block.
    pub fn block(&self, l: usize) -> Block {
        let (c, lp) = (&self.config, &self.layout.layers[l]);
        let h = c.hidden_size;
        let kinds = self.kinds();
        let linear = |unit: Unit, w: usize, b: Option<usize>, in_features: usize, out_features: usize| Linear {
            lora: self.lora.as_ref().map_or(Default::default(), |s| s.of(l, unit)),
            ..Linear::new(w, b, in_features, out_features)
        };
        let norm = |w: usize, b: Option<usize>| Norm { kind: kinds.norm, w, b, width: h, eps: c.norm_eps };
        Block {
            ln1: norm(lp.ln1_w, lp.ln1_b),
            qkv: linear(Unit::Qkv, lp.qkv_w, lp.qkv_b, h, c.qkv_width()),
            attn: Attention {
                n_head: c.n_head,
                n_kv_head: c.n_kv_head,
                head_dim: c.head_dim,
                rope_theta: kinds.rope_theta,
                imp: self.attn_impl,
                pdrop: c.dropout.attn,
            },
            o: linear(Unit::O, lp.o_w, lp.o_b, c.n_head * c.head_dim, h),
            ln2: norm(lp.ln2_w, lp.ln2_b),
            fc: linear(Unit::Fc, lp.fc_w, lp.fc_b, h, c.fc_width()),
            act: kinds.act,
            proj: linear(Unit::Proj, lp.proj_w, lp.proj_b, c.intermediate_size, h),
            resid_pdrop: c.dropout.resid,
        }
    }

    /// The token (and learned position) embedding.
    pub fn embedding(&self) -> Embedding {
        Embedding { wte: self.layout.wte, wpe: self.layout.wpe, width: self.config.hidden_size }
    }

    /// The final normalisation.
    pub fn final_norm(&self) -> Norm {
        self.norm(self.layout.lnf_w, self.layout.lnf_b)
    }

    /// Which parameters need a gradient buffer: the trainable ones, and frozen ones whose
    /// gradient the ops write regardless (a norm's weight and bias; the token embedding when the
    /// position embedding trains). A frozen linear or embedding gets an empty buffer.
    pub fn grad_needed(&self) -> Vec<bool> {
        let mut need = self.trainable.clone();
        let mut norms = vec![self.final_norm()];
        for l in 0..self.config.n_layer {
            let b = self.block(l);
            norms.extend([b.ln1, b.ln2]);
        }
        for n in norms {
            std::iter::once(n.w).chain(n.b).for_each(|i| need[i] = true);
        }
        let emb = self.embedding();
        if emb.wpe.is_some_and(|i| self.trainable[i]) {
            need[emb.wte] = true;
        }
        need
    }

    /// The LM head: the output projection, or the token embedding when they are tied.
    pub fn head(&self) -> Linear {
        Linear::new(self.layout.head(), None, self.config.hidden_size, self.config.vocab_size)
    }

    /// Layer `l`'s linear map `unit`.
    pub fn block_linear(&self, l: usize, unit: Unit) -> Linear {
        let b = self.block(l);
        match unit {
            Unit::Qkv => b.qkv,
            Unit::O => b.o,
            Unit::Fc => b.fc,
            Unit::Proj => b.proj,
        }
    }
}
