//! The pre-norm transformer block both decoder families use: `x + attn(norm(x))`, then
//! `r + mlp(norm(r))`. One forward serves training (a whole sequence, keeping what the backward
//! pass needs) and decoding (one token per row against the KV cache); the backward pass walks
//! the same units in reverse.

use super::{drop, site_key, Activation, Attention, GradsMut, Linear, LoraScratch, Norm, Params};
use crate::backend::Backend;

/// A block: its units, in the order the forward pass runs them.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub ln1: Norm,
    pub qkv: Linear,
    pub attn: Attention,
    pub o: Linear,
    pub ln2: Norm,
    pub fc: Linear,
    pub act: Activation,
    pub proj: Linear,
    /// Dropout on the two residual branches' outputs in training (GPT-2's `resid_pdrop`).
    pub resid_pdrop: f32,
}

/// The dropout sites of a block (`site_key` numbers): the two residual branches, then each
/// map's adapters.
const SITE_ATTN_OUT: u64 = 1;
const SITE_MLP_OUT: u64 = 2;
const SITE_ATTN_PROBS: u64 = 3;
fn lora_key(drop: Option<u64>, unit: u64) -> Option<u64> {
    drop.map(|k| site_key(k, 100 + unit))
}

/// The block's activations: written by the forward pass, read by the backward pass (`tmp` is
/// scratch for the branches' outputs; empty: they are written into the residual sums). With `recompute`, `ln1`, `ln2` (the norms' outputs, `[rows, hidden]`) and `act` (the
/// MLP's activation, `[rows, intermediate]`) are buffers the layers share: the backward pass
/// recomputes them from the norms' inputs and statistics and from `fc`, as llm.c does, which
/// saves three buffers per layer.
pub struct BlockBufs<'a, B: Backend> {
    pub ln1: &'a mut B::Buf,
    pub ln1_mean: &'a mut B::Buf,
    pub ln1_rstd: &'a mut B::Buf,
    pub qkv: &'a mut B::Buf,
    pub att_out: &'a mut B::Buf,
    pub res1: &'a mut B::Buf,
    pub ln2: &'a mut B::Buf,
    pub ln2_mean: &'a mut B::Buf,
    pub ln2_rstd: &'a mut B::Buf,
    pub fc: &'a mut B::Buf,
    pub act: &'a mut B::Buf,
    pub tmp: &'a mut B::Buf,
    pub recompute: bool,
}

/// How the block attends.
pub enum AttnCall<'a, B: Backend> {
    /// Whole sequences of `seq` tokens (`1` in `mask` = attend), keeping the statistics the
    /// backward pass needs in `stats`.
    Sequence { stats: &'a mut B::Buf, mask: &'a B::Ids, pos: &'a B::Ids, batch: usize, seq: usize },
    /// One new token per row: its key and value go into the caches at `slot`, and its query
    /// attends to the cached keys `0..=slot` whose `mask[row * max_len + j]` is 1.
    Decode { k_cache: &'a mut B::Buf, v_cache: &'a mut B::Buf, mask: &'a B::Ids, pos: &'a B::Ids, slot: usize, max_len: usize, batch: usize },
}

/// The backward pass's scratch. `dres` holds the gradient with respect to the block's output on
/// entry and with respect to its input on return.
pub struct BlockGrads<'a, B: Backend> {
    pub dres: &'a mut B::Buf,
    pub dln: &'a mut B::Buf,
    /// The attention's output and input gradients; `None`: `dact` and `dfc` serve (they are
    /// free once the MLP's backward pass is done, and at least as long).
    pub datt: Option<&'a mut B::Buf>,
    pub dqkv: Option<&'a mut B::Buf>,
    pub dfc: &'a mut B::Buf,
    pub dact: &'a mut B::Buf,
    pub lora: &'a mut LoraScratch<B>,
}

impl Block {
    /// The indices of the block's parameters.
    pub fn params(&self) -> Vec<usize> {
        let units = [
            (self.ln1.w, self.ln1.b),
            (self.qkv.w, self.qkv.b),
            (self.o.w, self.o.b),
            (self.ln2.w, self.ln2.b),
            (self.fc.w, self.fc.b),
            (self.proj.w, self.proj.b),
        ];
        let adapters =
            [self.qkv, self.o, self.fc, self.proj].into_iter().flat_map(|l| l.lora.into_iter().flatten().flat_map(|p| [p.a, p.b].into_iter().chain(p.mag)));
        units.into_iter().flat_map(|(w, b)| std::iter::once(w).chain(b)).chain(adapters).collect()
    }

    /// Whether a training pass (`dropping`: with dropout) reads the maps' inputs `ln1`,
    /// `att_out`, `ln2` and `act`, and the maps' outputs `qkv` and `fc`, only as product,
    /// attention or activation operands (the attention's backward pass reads `att_out` through
    /// its copy too), so that a backend may keep only their converted copies
    /// (`Backend::hold_operand_only`): not a map's input where its adapters drop it out (they copy
    /// the f32 values), not a map's output under adapters (which add into it), and not `qkv`
    /// under RoPE (which rotates the f32 values in place).
    pub fn inputs_only_as_operands(&self, dropping: bool) -> [bool; 6] {
        let only = |l: &Linear| !dropping || l.lora.iter().flatten().all(|p| p.dropout == 0.0);
        let qkv = self.attn.rope_theta.is_none() && !self.qkv.adapted();
        [only(&self.qkv), only(&self.o), only(&self.fc), only(&self.proj), qkv, !self.fc.adapted()]
    }

    /// Whether the backward pass's input gradients of `proj` (the activation's gradient), `o`
    /// (the attention output's), `fc` (the second norm's output's) and `qkv` (the first norm's
    /// output's) are each written by one product and read only by the next kernel (the
    /// activation's, the attention's or the norm's backward pass), so that a backend may keep
    /// only their bf16 copies (`Backend::hold_operand_only`): not where adapters add into them,
    /// and not the activation's when its backward pass runs apart from `fc`'s products
    /// (adapters on `fc`: the activation's kernel would read it in f32).
    pub fn grads_only_as_operands(&self) -> [bool; 4] {
        [!self.proj.adapted() && !self.fc.adapted(), !self.o.adapted(), !self.fc.adapted(), !self.qkv.adapted()]
    }

    /// The attention-probability dropout mask of a training pass, where the backend applies it.
    fn attn_dropout<B: Backend>(&self, be: &B, drop_key: Option<u64>) -> Option<crate::backend::DropoutMask> {
        let k = drop_key.filter(|_| self.attn.pdrop > 0.0 && be.has_attention_dropout())?;
        Some(crate::backend::DropoutMask::new(self.attn.pdrop, site_key(k, SITE_ATTN_PROBS)))
    }

    /// `y = block(x)` over `rows` rows (`lora`: the adapters' scratch; `drop`: a training pass's
    /// dropout key for this layer).
    #[allow(clippy::too_many_arguments)] // the block's input and output, its state and scratch
    pub fn fwd<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        x: &B::Buf,
        y: &mut B::Buf,
        a: &mut BlockBufs<B>,
        lora: &mut LoraScratch<B>,
        call: AttnCall<B>,
        drop_key: Option<u64>,
    ) {
        let rows = match &call {
            AttnCall::Sequence { batch, seq, .. } => batch * seq,
            AttnCall::Decode { batch, .. } => *batch,
        };
        self.ln1.fwd(be, p, a.ln1, a.ln1_mean, a.ln1_rstd, x);
        self.qkv.fwd_all(be, p, a.qkv, a.ln1, rows, lora, lora_key(drop_key, 0));
        match call {
            AttnCall::Sequence { stats, mask, pos, batch, seq } => {
                let shape = self.attn.shape(batch, seq);
                if let Some(theta) = self.attn.rope_theta {
                    be.rope(a.qkv, pos, shape, theta, false);
                }
                match self.attn_dropout(be, drop_key) {
                    Some(m) => be.attention_fwd_dropout(a.att_out, stats, a.qkv, mask, shape, self.attn.imp, m),
                    None => be.attention_fwd(a.att_out, stats, a.qkv, mask, shape, self.attn.imp),
                }
            }
            AttnCall::Decode { k_cache, v_cache, mask, pos, slot, max_len, batch } => {
                let shape = self.attn.shape(batch, 1);
                if let Some(theta) = self.attn.rope_theta {
                    be.rope(a.qkv, pos, shape, theta, false);
                }
                be.kv_append(k_cache, v_cache, a.qkv, slot, shape, max_len);
                be.attention_decode(a.att_out, a.qkv, k_cache, v_cache, mask, slot, shape, max_len);
            }
        }
        // each branch's output goes to `tmp` and is added to the skip connection, or, when `tmp`
        // is empty, straight into the sum's buffer with the skip connection added in place (the
        // same sums: addition commutes); a map without adapters or dropout after it adds the skip
        // connection in its product (`Backend::matmul_fwd_add`)
        let in_tmp = be.len(a.tmp) > 0;
        let fused = |l: &Linear| !l.adapted() && (drop_key.is_none() || self.resid_pdrop == 0.0);
        if fused(&self.o) {
            self.o.fwd_add(be, p, a.res1, a.att_out, x, rows);
        } else {
            let out = if in_tmp { &mut *a.tmp } else { &mut *a.res1 };
            self.o.fwd_all(be, p, out, a.att_out, rows, lora, lora_key(drop_key, 1));
            drop(be, out, self.resid_pdrop, drop_key, SITE_ATTN_OUT);
            if in_tmp {
                be.add(a.res1, x, a.tmp);
            } else {
                be.add_assign(a.res1, x);
            }
        }
        self.ln2.fwd(be, p, a.ln2, a.ln2_mean, a.ln2_rstd, a.res1);
        self.fc.fwd_all(be, p, a.fc, a.ln2, rows, lora, lora_key(drop_key, 2));
        self.act.fwd(be, a.act, a.fc);
        if fused(&self.proj) {
            return self.proj.fwd_add(be, p, y, a.act, a.res1, rows);
        }
        let out = if in_tmp { &mut *a.tmp } else { &mut *y };
        self.proj.fwd_all(be, p, out, a.act, rows, lora, lora_key(drop_key, 3));
        drop(be, out, self.resid_pdrop, drop_key, SITE_MLP_OUT);
        if in_tmp {
            be.add(y, a.res1, a.tmp);
        } else {
            be.add_assign(y, a.res1);
        }
    }

    /// The backward pass of a [`AttnCall::Sequence`] forward whose activations are `a` (and
    /// attention statistics `stats`), from `d.dres` = d(output) to `d.dres` = d(`x`),
    /// accumulating the trainable parameters' gradients. With `a.recompute`, `a.act`, `a.ln2`
    /// and `a.ln1` are recomputed (bit for bit what the forward pass wrote). Without `need_dx`
    /// (the first layer under a frozen embedding) `d.dres` is left as it is, unless the first
    /// norm trains, since nothing reads the gradient with respect to `x`.
    #[allow(clippy::too_many_arguments)] // the block's input, saved state and the attention's inputs
    pub fn bwd<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        x: &B::Buf,
        a: &mut BlockBufs<B>,
        (stats, mask, pos): (&B::Buf, &B::Ids, &B::Ids),
        (batch, seq): (usize, usize),
        d: &mut BlockGrads<B>,
        drop_key: Option<u64>,
        need_dx: bool,
    ) {
        let rows = batch * seq;
        let shape = self.attn.shape(batch, seq);
        let dropping = drop_key.is_some() && self.resid_pdrop > 0.0;
        // with residual dropout, a branch's gradient is the output's with the branch's mask (in
        // d.dln, free until the norm's backward pass); the skip connection's stays in d.dres
        if dropping {
            be.copy(d.dln, d.dres);
            drop(be, d.dln, self.resid_pdrop, drop_key, SITE_MLP_OUT);
        }
        let dmlp: &B::Buf = if dropping { &*d.dln } else { &*d.dres };
        if a.recompute {
            self.act.fwd(be, a.act, a.fc);
        }
        // the input gradients that one product writes and only the next kernel reads, which
        // reads them as bf16 where a backend keeps them so (`Backend::hold_operand_only`, each
        // released after its reader): the activation's, the attention output's and each norm's
        // output's
        let [dact_only, datt_only, dln2_only, dln1_only] = self.grads_only_as_operands();
        if dact_only {
            be.hold_operand_only(d.dact);
        }
        self.proj.bwd_all(be, p, g, Some(d.dact), dmlp, a.act, rows, d.lora, lora_key(drop_key, 3));
        if a.recompute {
            self.ln2.fwd(be, p, a.ln2, a.ln2_mean, a.ln2_rstd, a.res1);
        }
        if dln2_only {
            be.hold_operand_only(d.dln);
        }
        if !self.fc.adapted() {
            // the activation's backward pass goes with the map's (fused on CUDA in bf16)
            self.fc.bwd_act(be, p, g, Some(d.dln), d.dfc, (self.act, d.dact, a.fc), a.ln2, rows);
        } else {
            self.act.bwd(be, d.dfc, a.fc, d.dact);
            self.fc.bwd_all(be, p, g, Some(d.dln), d.dfc, a.ln2, rows, d.lora, lora_key(drop_key, 2));
        }
        if dact_only {
            be.release_operand(d.dact);
        }
        self.ln2.bwd(be, p, g, d.dres, d.dln, a.res1, a.ln2_mean, a.ln2_rstd);
        if dln2_only {
            be.release_operand(d.dln);
        }
        // d.dres now holds d(res1) = d(x + attn(...))
        if dropping {
            be.copy(d.dln, d.dres);
            drop(be, d.dln, self.resid_pdrop, drop_key, SITE_ATTN_OUT);
        }
        let dattn: &B::Buf = if dropping { &*d.dln } else { &*d.dres };
        let datt: &mut B::Buf = match d.datt.as_deref_mut() {
            Some(b) => b,
            None => &mut *d.dact,
        };
        let dqkv: &mut B::Buf = match d.dqkv.as_deref_mut() {
            Some(b) => b,
            None => &mut *d.dfc,
        };
        if datt_only {
            be.hold_operand_only(datt);
        }
        self.o.bwd_all(be, p, g, Some(&mut *datt), dattn, a.att_out, rows, d.lora, lora_key(drop_key, 1));
        match self.attn_dropout(be, drop_key) {
            Some(m) => be.attention_bwd_dropout(dqkv, datt, a.qkv, a.att_out, stats, mask, shape, self.attn.imp, m),
            None => be.attention_bwd(dqkv, datt, a.qkv, a.att_out, stats, mask, shape, self.attn.imp),
        }
        if datt_only {
            be.release_operand(datt);
        }
        if let Some(theta) = self.attn.rope_theta {
            be.rope(dqkv, pos, shape, theta, true);
        }
        if a.recompute {
            self.ln1.fwd(be, p, a.ln1, a.ln1_mean, a.ln1_rstd, x);
        }
        let need_dln = need_dx || g.trainable[self.ln1.w] || self.ln1.b.is_some_and(|b| g.trainable[b]);
        if need_dln && dln1_only {
            be.hold_operand_only(d.dln);
        }
        self.qkv.bwd_all(be, p, g, need_dln.then_some(&mut *d.dln), dqkv, a.ln1, rows, d.lora, lora_key(drop_key, 0));
        if need_dln {
            self.ln1.bwd(be, p, g, d.dres, d.dln, x, a.ln1_mean, a.ln1_rstd);
        }
        if need_dln && dln1_only {
            be.release_operand(d.dln);
        }
    }
}
