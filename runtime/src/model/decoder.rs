//! The decoder-only transformer, forward and backward, written once against the op set. GPT-2
//! and the Llama family differ only in the choices this file branches on: LayerNorm or RMSNorm,
//! learned positions or RoPE, GELU or SwiGLU, and which biases exist.
//!
//! As in llm.c there is no autograd graph: the forward pass keeps each layer's activations in an
//! [`Activations`] workspace (reused across steps of the same shape) and the backward pass walks
//! the layers in reverse, accumulating parameter gradients into [`Grads`]. With gradient
//! checkpointing only each layer's input is kept; one set of layer buffers is shared, and the
//! backward pass recomputes a layer's forward just before its backward.
//!
//! The LM head and the losses are `head.rs`; the saved activations and gradients
//! `activations.rs`.

use super::activations::{Activations, Grads};
use super::head::LossOptions;
pub use super::head::LossOutput;
use super::Model;
use crate::backend::{AttnShape, Backend};
use crate::error::{Error, Result};
use crate::nn::{AttnCall, BlockGrads, GradsMut, Params};
use crate::protocol::IGNORE_INDEX;
pub use crate::protocol::{label_tokens, shifted_labels, Batch, CustomLoss, RowsLoss, StatsLoss};

/// Told, during a backward pass, a group of parameters (their indices) whose gradients are
/// complete for the micro-batch, with every gradient buffer (the group's may be reduced in place).
pub type GradsReady<'a, B> = dyn FnMut(&[usize], &mut [<B as Backend>::Buf]) + 'a;

/// NEFTune (`neftune_noise_alpha`) for one training pass: `alpha` and the seed of this
/// micro-batch's noise. Uniform noise of magnitude `alpha / sqrt(seq * hidden)` is added to the
/// input embeddings, as transformers' hook does; the seed makes it reproducible.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neftune {
    pub alpha: f32,
    pub seed: u64,
}

/// Logit floats below which an LM-head chunk keeps at least [`MIN_HEAD_CHUNK_ROWS`] rows (128 MiB
/// in f32); see [`Model::head_chunk_rows`].
pub const LOGITS_CHUNK_FLOATS: usize = 1 << 25;
/// Rows a chunk of the LM head keeps at least while [`LOGITS_CHUNK_FLOATS`] allows: each chunk
/// reads the head's weight again.
const MIN_HEAD_CHUNK_ROWS: usize = 512;

impl<B: Backend> Model<B> {
    /// Rows per chunk of the LM head and loss for a batch of `rows` rows: `loss_chunk_rows` when
    /// set, otherwise as many as keep a chunk's logits within the backend's
    /// [`Backend::logits_chunk_floats`], but at least [`MIN_HEAD_CHUNK_ROWS`] while those stay within
    /// [`LOGITS_CHUNK_FLOATS`] (a multiple of 64 when that is at least 64); `rows` when one chunk
    /// holds them all.
    pub fn head_chunk_rows(&self, rows: usize) -> usize {
        let v = self.config.vocab_size.max(1);
        let floor = MIN_HEAD_CHUNK_ROWS.min(LOGITS_CHUNK_FLOATS / v);
        let fit = (self.backend.logits_chunk_floats() / v).max(floor).max(1);
        let want = self.loss_chunk_rows.unwrap_or(if fit >= 64 { fit / 64 * 64 } else { fit });
        want.clamp(1, rows.max(1))
    }

    pub fn attn_shape(&self, batch: usize, seq: usize) -> AttnShape {
        let c = &self.config;
        AttnShape { batch, seq, n_head: c.n_head, n_kv_head: c.n_kv_head, head_dim: c.head_dim }
    }

    /// Checks a batch against the model before any work: sizes, id ranges, label ranges.
    pub fn validate(&self, b: &Batch) -> Result<()> {
        let rows = b.batch * b.seq;
        let v = self.config.vocab_size;
        if rows == 0 {
            return Err(Error::Invalid("empty batch".into()));
        }
        if b.decoder_input_ids.is_some() {
            return Err(Error::Invalid("a decoder-only model was given an encoder-decoder batch (sources with decoder inputs)".into()));
        }
        let check_len = |name: &str, len: usize| {
            if len != rows {
                Err(Error::Invalid(format!("`{name}` has {len} values, expected batch {} x seq {} = {rows}", b.batch, b.seq)))
            } else {
                Ok(())
            }
        };
        check_len("input_ids", b.input_ids.len())?;
        if let Some((i, id)) = b.input_ids.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= v) {
            return Err(Error::Invalid(format!("input_ids[{}][{}] = {id} is outside the vocabulary (size {v})", i / b.seq, i % b.seq)));
        }
        if let Some(m) = &b.attention_mask {
            check_len("attention_mask", m.len())?;
            if let Some((i, x)) = m.iter().enumerate().find(|(_, &x)| x != 0 && x != 1) {
                return Err(Error::Invalid(format!("attention_mask[{}][{}] = {x}; expected 0 or 1", i / b.seq, i % b.seq)));
            }
        }
        if let Some(l) = &b.labels {
            check_len("labels", l.len())?;
            if let Some((i, x)) = l.iter().enumerate().find(|(_, &x)| x != IGNORE_INDEX && (x < 0 || x as usize >= v)) {
                return Err(Error::Invalid(format!("labels[{}][{}] = {x} is neither -100 nor a token id below {v}", i / b.seq, i % b.seq)));
            }
        }
        let max_pos = self.config.position_limit().unwrap_or(usize::MAX);
        match &b.position_ids {
            Some(p) => {
                check_len("position_ids", p.len())?;
                if let Some((i, x)) = p.iter().enumerate().find(|(_, &x)| x < 0 || x as usize >= max_pos) {
                    return Err(Error::Invalid(format!("position_ids[{}][{}] = {x} is outside 0..{max_pos}", i / b.seq, i % b.seq)));
                }
            }
            None if b.seq > max_pos => {
                return Err(Error::Invalid(format!("sequence length {} exceeds the model's n_positions ({max_pos})", b.seq)));
            }
            None => {}
        }
        if let Some(w) = self.config.sliding_window {
            if b.seq > w {
                return Err(Error::Unsupported(format!("sequence length {} exceeds sliding_window ({w}); sliding-window attention is not implemented", b.seq)));
            }
        }
        Ok(())
    }

    pub(super) fn upload_batch(&self, acts: &mut Activations<B>, b: &Batch) -> Result<()> {
        let be = &self.backend;
        let rows = b.batch * b.seq;
        acts.ids = be.upload_ids(&b.input_ids)?;
        acts.pos = match &b.position_ids {
            Some(p) => be.upload_ids(p)?,
            None => be.upload_ids(&(0..rows).map(|r| (r % b.seq) as i32).collect::<Vec<_>>())?,
        };
        acts.mask = match &b.attention_mask {
            Some(m) => be.upload_ids(m)?,
            None => be.upload_ids(&vec![1; rows])?,
        };
        let targets = shifted_labels(b);
        acts.targets = be.upload_ids(&targets)?;
        acts.chunk_targets = if acts.head_rows < rows { targets.chunks(acts.head_rows).map(|t| be.upload_ids(t)).collect::<Result<_>>()? } else { Vec::new() };
        Ok(())
    }

    /// Layer `l`'s forward pass from `resid[l]` into `resid[l + 1]`, keeping its activations in
    /// its own buffers (or the shared ones under gradient checkpointing).
    fn layer_fwd(&self, acts: &mut Activations<B>, l: usize) -> Result<()> {
        self.with_params(&self.block(l).params(), |p| self.layer_fwd_in(acts, l, p))
    }

    /// [`Model::layer_fwd`] with the layer's parameters at hand.
    fn layer_fwd_in(&self, acts: &mut Activations<B>, l: usize, p: &Params<B>) {
        let (done, rest) = acts.resid.split_at_mut(l + 1);
        let (x, y) = (&done[l], &mut rest[0]);
        let a = &mut acts.layers[if acts.checkpointing { 0 } else { l }];
        if acts.hold && !acts.checkpointing && !acts.recompute {
            // the products' inputs, read again by the backward pass's weight-gradient products,
            // and the attention's queries, keys and values, read again by its backward pass (not
            // when a layer's buffers are shared: gradient checkpointing, recomputed norms); the
            // maps' inputs that nothing else reads, only as operands
            let only = self.block(l).inputs_only_as_operands(acts.dropout.is_some());
            for (b, only) in [(&a.ln1, only[0]), (&a.att_out, only[1]), (&a.ln2, only[2]), (&a.act, only[3]), (&a.qkv, only[4]), (&a.fc, only[5])] {
                if only {
                    self.backend.hold_operand_only(b);
                } else {
                    self.backend.hold_operand(b);
                }
            }
        }
        let (mut bufs, stats) = a.bufs(&mut acts.tmp, &mut acts.shared, acts.recompute);
        let call = AttnCall::Sequence { stats, mask: &acts.mask, pos: &acts.pos, batch: acts.batch, seq: acts.seq };
        let drop = acts.dropout.map(|k| crate::nn::site_key(k, 1000 + l as u64));
        self.block(l).fwd(&self.backend, p, x, y, &mut bufs, &mut acts.lora, call, drop);
    }

    /// Generation's prefill: the forward pass over a (left-padded) batch of prompts, writing
    /// every layer's keys and values into the caches (`[batch, max_len, kv]` per layer, from
    /// slot 0) and returning the logits at each row's last position, `[batch, vocab]` (the LM
    /// head runs on those positions only). `None`
    /// when the model keeps no per-layer activations (gradient checkpointing): the caller then
    /// feeds the prompt one token at a time.
    pub fn prefill_into(&self, b: &Batch, k: &mut [B::Buf], v: &mut [B::Buf], max_len: usize) -> Result<Option<Vec<f32>>> {
        if self.gradient_checkpointing {
            return Ok(None);
        }
        let mut acts = Activations::new(self, b.batch, b.seq)?;
        self.forward_hidden(&mut acts, b, None)?;
        let (be, c) = (&self.backend, &self.config);
        let shape = self.attn_shape(b.batch, b.seq);
        for (l, layer) in acts.layers.iter().enumerate() {
            be.kv_append(&mut k[l], &mut v[l], &layer.qkv, 0, shape, max_len);
        }
        // the LM head on each row's last position only
        let h = c.hidden_size;
        let mut last = be.zeros(b.batch * h)?;
        for r in 0..b.batch {
            be.copy_range(&mut last, r * h, &acts.lnf, ((r + 1) * b.seq - 1) * h, h);
        }
        let mut logits = be.zeros(b.batch * c.vocab_size)?;
        let head = self.layout.head();
        if !self.held_head_fwd(&mut logits, &last, b.batch)? {
            self.with_params(&[head], |p| be.matmul_fwd(&mut logits, &last, &p.bufs[head], None, b.batch, h, c.vocab_size))?;
        }
        Ok(Some(be.download(&logits)?))
    }

    /// Everything up to the final norm's output (`acts.lnf`), with NEFTune noise on the input
    /// embeddings when given (training passes only).
    pub(super) fn forward_hidden(&self, acts: &mut Activations<B>, b: &Batch, neftune: Option<Neftune>) -> Result<()> {
        self.validate(b)?;
        if acts.shape() != (b.batch, b.seq) || acts.checkpointing != self.gradient_checkpointing {
            // the old workspace is freed before the new one is made (the pass's dropout key stays)
            let (key, hold) = (acts.dropout, acts.hold);
            *acts = Activations::new(self, 0, 0)?;
            *acts = Activations::new(self, b.batch, b.seq)?;
            (acts.dropout, acts.hold) = (key, hold);
        }
        self.upload_batch(acts, b)?;
        let (be, c) = (&self.backend, &self.config);
        // nothing stays held from an earlier pass (one that failed before its backward pass)
        be.release_operands();
        let (rows, h) = (b.batch * b.seq, c.hidden_size);
        let emb = self.embedding();
        // a token table held in bf16 is made f32 only in the rows the batch uses, in the backward
        // pass's scratch
        if !self.held_embedding_fwd(&mut acts.resid[0], &b.input_ids, &acts.pos, &mut acts.dfc)? {
            self.with_params(&emb.params(), |p| emb.fwd(be, p, &mut acts.resid[0], &acts.ids, &acts.pos))?;
        }
        if let Some(Neftune { alpha, seed }) = neftune {
            use rand::{RngExt, SeedableRng};
            let mag = alpha / ((b.seq * h) as f32).sqrt();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let noise: Vec<f32> = (0..rows * h).map(|_| rng.random_range(-mag..=mag)).collect();
            let noise = be.upload_vec(noise)?;
            if be.len(&acts.tmp) > 0 {
                be.copy(&mut acts.tmp, &acts.resid[0]);
                be.add(&mut acts.resid[0], &acts.tmp, &noise);
            } else {
                be.add_assign(&mut acts.resid[0], &noise);
            }
        }
        crate::nn::drop(be, &mut acts.resid[0], c.dropout.embd, acts.dropout, 0);
        for l in 0..c.n_layer {
            self.layer_fwd(acts, l)?;
        }
        let lnf = self.final_norm();
        self.with_params(&lnf.params(), |p| lnf.fwd(be, p, &mut acts.lnf, &mut acts.lnf_mean, &mut acts.lnf_rstd, &acts.resid[c.n_layer]))?;
        acts.has_grad = false;
        Ok(())
    }

    /// The backward pass after a training forward pass; accumulates into `grads`.
    pub fn backward(&self, acts: &mut Activations<B>, grads: &mut Grads<B>) -> Result<()> {
        self.backward_with(acts, grads, &mut |_, _| {})
    }

    /// [`Model::backward`], telling `ready` as each group of gradients is complete.
    pub fn backward_with(&self, acts: &mut Activations<B>, grads: &mut Grads<B>, ready: &mut GradsReady<B>) -> Result<()> {
        if !acts.has_grad {
            return Err(Error::Invalid("backward() needs a training forward pass first".into()));
        }
        acts.has_grad = false;
        let rows = acts.batch * acts.seq;
        let head = self.head();
        self.with_params_grads(&[head.w], &[], &mut grads.tensors, |p, bufs| {
            let mut g = GradsMut { bufs, trainable: &self.trainable };
            head.bwd(&self.backend, p, &mut g, Some(&mut acts.dln), &acts.logits, &acts.lnf, rows);
        })?;
        self.backward_body(acts, grads, ready)
    }

    /// The backward pass from `acts.dln`, the gradient with respect to the final norm's output
    /// (the head's backward pass has run). `ready` is told each group of parameters whose
    /// gradients are complete for this micro-batch, as soon as they are: the untied LM head and
    /// the final norm, then each layer from the last, then the embeddings (with the head when it
    /// is tied to them). A data-parallel collective can reduce a group while the rest of the
    /// backward pass runs.
    /// The groups of parameters [`Model::backward_with`] tells `ready` of, in its order: the
    /// untied LM head with the final norm, each layer from the last, the embeddings.
    pub fn grad_groups(&self) -> Vec<Vec<usize>> {
        let mut groups = vec![self.layout.lm_head.into_iter().chain(self.final_norm().params()).collect()];
        groups.extend((0..self.config.n_layer).rev().map(|l| self.block(l).params()));
        groups.push(self.embedding().params());
        groups
    }

    pub(super) fn backward_body(&self, acts: &mut Activations<B>, grads: &mut Grads<B>, ready: &mut GradsReady<B>) -> Result<()> {
        let (be, n_layer, tr) = (&self.backend, self.config.n_layer, &self.trainable);
        acts.scratch_back(be)?;
        be.fill(&mut acts.dres, 0.0);
        let lnf = self.final_norm();
        let done: Vec<usize> = self.layout.lm_head.into_iter().chain(lnf.params()).collect();
        self.with_params_grads(&lnf.params(), &done, &mut grads.tensors, |p, bufs| {
            let mut g = GradsMut { bufs, trainable: tr };
            lnf.bwd(be, p, &mut g, &mut acts.dres, &acts.dln, &acts.resid[n_layer], &acts.lnf_mean, &acts.lnf_rstd);
        })?;
        ready(&done, &mut grads.tensors);
        let emb = self.embedding();
        let emb_trains = emb.params().iter().any(|&i| tr[i]);
        for l in (0..n_layer).rev() {
            let block = self.block(l);
            let params = block.params();
            self.with_params_grads(&params, &params, &mut grads.tensors, |p, bufs| {
                if acts.checkpointing {
                    // recompute this layer's activations (its output, resid[l + 1], comes out the same)
                    self.layer_fwd_in(acts, l, p);
                }
                let a = &mut acts.layers[if acts.checkpointing { 0 } else { l }];
                let (mut lbufs, stats) = a.bufs(&mut acts.tmp, &mut acts.shared, acts.recompute);
                let mut d = BlockGrads {
                    dres: &mut acts.dres,
                    dln: &mut acts.dln,
                    datt: (!acts.recompute).then_some(&mut acts.datt),
                    dqkv: (!acts.recompute).then_some(&mut acts.dqkv),
                    dfc: &mut acts.dfc,
                    dact: &mut acts.dact,
                    lora: &mut acts.lora,
                };
                let attn = (&*stats, &acts.mask, &acts.pos);
                let drop = acts.dropout.map(|k| crate::nn::site_key(k, 1000 + l as u64));
                let mut g = GradsMut { bufs, trainable: tr };
                block.bwd(be, p, &mut g, &acts.resid[l], &mut lbufs, attn, (acts.batch, acts.seq), &mut d, drop, l > 0 || emb_trains);
            })?;
            ready(&params, &mut grads.tensors);
        }
        // the embedding dropout's backward pass: its mask on the gradient
        crate::nn::drop(be, &mut acts.dres, self.config.dropout.embd, acts.dropout, 0);
        // the embeddings' backward pass reads no weight: one held in bf16 is not made f32
        let fetch = if self.frozen.is_some() { Vec::new() } else { emb.params() };
        self.with_params_grads(&fetch, &emb.params(), &mut grads.tensors, |_, bufs| {
            emb.bwd(be, &mut GradsMut { bufs, trainable: tr }, &acts.ids, &acts.pos, &acts.dres);
        })?;
        ready(&emb.params(), &mut grads.tensors);
        be.release_operands();
        Ok(())
    }

    /// Forward, loss and backward for one micro-batch, with the LM head and loss in chunks (the
    /// whole logits never exist).
    pub fn forward_backward(&self, acts: &mut Activations<B>, b: &Batch, grads: &mut Grads<B>, loss: LossOptions) -> Result<LossOutput> {
        self.forward_backward_with(acts, b, grads, loss, None, &mut |_, _| {})
    }

    /// [`Model::forward_backward`] with NEFTune noise when given, telling `ready` as each group of
    /// gradients is complete (see `backward_body`).
    pub fn forward_backward_with(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        grads: &mut Grads<B>,
        loss: LossOptions,
        neftune: Option<Neftune>,
        ready: &mut GradsReady<B>,
    ) -> Result<LossOutput> {
        // a training pass: the layers' product inputs are held for the backward pass
        acts.hold = true;
        let forward = self.forward_hidden(acts, b, neftune);
        acts.hold = false;
        forward?;
        let (n_tokens, _) = self.head_loss(acts, b, loss, Some(grads), None)?;
        let n_tokens = n_tokens.ok_or_else(|| Error::Invalid("training needs labels".into()))?;
        self.backward_body(acts, grads, ready)?;
        // read the loss once the backward pass is queued, so a GPU is not left idle meanwhile
        self.loss_output(acts, n_tokens)
    }
}
