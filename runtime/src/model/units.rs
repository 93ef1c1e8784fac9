//! The models as [`crate::nn`] units: each architecture's block description (which norm, which
//! activation, RoPE or learned positions), built from its config and parameter layout. This is
//! the only place the decoder's layer code learns what differs between GPT-2 and the Llama
//! family.

use super::config::Arch;
use super::Model;
use crate::backend::Backend;
use crate::nn::{Activation, Attention, Block, Embedding, Linear, Norm, NormKind, Params};

impl<B: Backend> Model<B> {
    /// The parameters and the trainable mask, for the units.
    pub fn unit_params(&self) -> Params<'_, B> {
        Params { bufs: &self.params, trainable: &self.trainable }
    }

    fn norm_kind(&self) -> NormKind {
        match self.config.arch {
            Arch::Gpt2 => NormKind::LayerNorm,
            Arch::Llama => NormKind::RmsNorm,
        }
    }

    /// A normalisation of the hidden state with weight `w` (and bias `b`).
    pub fn norm(&self, w: usize, b: Option<usize>) -> Norm {
        Norm { kind: self.norm_kind(), w, b, width: self.config.hidden_size, eps: self.config.norm_eps }
    }

    /// Layer `l` as a block.
    pub fn block(&self, l: usize) -> Block {
        let (c, lp) = (&self.config, &self.layout.layers[l]);
        let h = c.hidden_size;
        let linear = |w: usize, b: Option<usize>, in_features: usize, out_features: usize| Linear { w, b, in_features, out_features };
        Block {
            ln1: self.norm(lp.ln1_w, lp.ln1_b),
            qkv: linear(lp.qkv_w, lp.qkv_b, h, c.qkv_width()),
            attn: Attention {
                n_head: c.n_head,
                n_kv_head: c.n_kv_head,
                head_dim: c.head_dim,
                rope_theta: (c.arch == Arch::Llama).then_some(c.rope_theta),
                imp: self.attn_impl,
            },
            o: linear(lp.o_w, lp.o_b, c.n_head * c.head_dim, h),
            ln2: self.norm(lp.ln2_w, lp.ln2_b),
            fc: linear(lp.fc_w, lp.fc_b, h, c.fc_width()),
            act: match c.arch {
                Arch::Gpt2 => Activation::Gelu,
                Arch::Llama => Activation::SwiGlu { intermediate: c.intermediate_size },
            },
            proj: linear(lp.proj_w, lp.proj_b, c.intermediate_size, h),
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

    /// The LM head: the output projection, or the token embedding when they are tied.
    pub fn head(&self) -> Linear {
        Linear { w: self.layout.head(), b: None, in_features: self.config.hidden_size, out_features: self.config.vocab_size }
    }
}
