//! The forward pass's saved state and the backward pass's scratch for one batch shape
//! ([`Activations`]; with gradient checkpointing only each layer's input is kept and one set of
//! layer buffers is shared), and the parameter gradients ([`Grads`]).

use super::Model;
use crate::backend::{AttnImpl, Backend};
use crate::error::Result;
use crate::nn::{BlockBufs, LoraScratch};
use crate::protocol::IGNORE_INDEX;

/// Parameter gradients, one buffer per [`super::layout::ParamSpec`]; a frozen parameter's is
/// empty unless the ops write it anyway ([`Model::grad_needed`]).
pub struct Grads<B: Backend> {
    pub tensors: Vec<B::Buf>,
}

impl<B: Backend> Grads<B> {
    pub fn zeros(model: &Model<B>) -> Result<Self> {
        let be = &model.backend;
        let need = model.grad_needed();
        let tensors = model.layout.specs.iter().zip(need).map(|(s, n)| be.zeros(if n { s.numel() } else { 0 })).collect::<Result<_>>()?;
        Ok(Grads { tensors })
    }
    pub fn zero(&mut self, be: &B) {
        be.fill_multi(&mut self.tensors.iter_mut().collect::<Vec<_>>(), 0.0);
    }
}

pub(super) struct LayerActs<B: Backend> {
    /// The norms' outputs and the MLP's activation: empty when the layers share
    /// [`SharedActs`] (`Model::recompute_activations`).
    pub(super) ln1: B::Buf,
    pub(super) ln2: B::Buf,
    pub(super) act: B::Buf,
    pub(super) ln1_mean: B::Buf,
    pub(super) ln1_rstd: B::Buf,
    pub(super) qkv: B::Buf,
    pub(super) att_stats: B::Buf,
    pub(super) att_out: B::Buf,
    pub(super) res1: B::Buf,
    pub(super) ln2_mean: B::Buf,
    pub(super) ln2_rstd: B::Buf,
    pub(super) fc: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    /// The block's view of these buffers (with the shared scratch `tmp`, and the shared norm
    /// outputs and activation when `recompute`), and the attention statistics.
    pub(super) fn bufs<'a>(&'a mut self, tmp: &'a mut B::Buf, shared: &'a mut SharedActs<B>, recompute: bool) -> (BlockBufs<'a, B>, &'a mut B::Buf) {
        let (ln1, ln2, act) = if recompute { (&mut shared.ln1, &mut shared.ln2, &mut shared.act) } else { (&mut self.ln1, &mut self.ln2, &mut self.act) };
        let bufs = BlockBufs {
            ln1,
            ln2,
            ln1_mean: &mut self.ln1_mean,
            ln1_rstd: &mut self.ln1_rstd,
            qkv: &mut self.qkv,
            att_out: &mut self.att_out,
            res1: &mut self.res1,
            ln2_mean: &mut self.ln2_mean,
            ln2_rstd: &mut self.ln2_rstd,
            fc: &mut self.fc,
            act,
            tmp,
            recompute,
        };
        (bufs, &mut self.att_stats)
    }
}

/// The norms' outputs (`[rows, hidden]` each) and the MLP's activation (`[rows, intermediate]`)
/// that every layer uses in turn when the backward pass recomputes them.
pub(super) struct SharedActs<B: Backend> {
    pub(super) ln1: B::Buf,
    pub(super) ln2: B::Buf,
    pub(super) act: B::Buf,
}

/// The forward pass's saved activations and the backward pass's scratch, for one batch shape.
pub struct Activations<B: Backend> {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) ids: B::Ids,
    pub(super) pos: B::Ids,
    pub(super) mask: B::Ids,
    pub(super) targets: B::Ids,
    /// `resid[0]` is the embedding output, `resid[l + 1]` the output of layer `l`.
    pub(super) resid: Vec<B::Buf>,
    pub(super) layers: Vec<LayerActs<B>>,
    pub(super) lnf: B::Buf,
    pub(super) lnf_mean: B::Buf,
    pub(super) lnf_rstd: B::Buf,
    /// Logits: `[rows, vocab]` after [`Model::forward`] (and, with `train`, the gradient of the
    /// loss); one chunk's `[head_rows, vocab]` in the chunked head.
    pub logits: B::Buf,
    /// Rows per chunk of the LM head ([`Model::head_chunk_rows`]).
    pub(super) head_rows: usize,
    /// With more than one chunk: a chunk's rows of `lnf` and the gradient with respect to them,
    /// `[head_rows, hidden]` each (empty otherwise).
    pub(super) head_in: B::Buf,
    pub(super) head_din: B::Buf,
    /// Each chunk's shifted labels (with more than one chunk).
    pub(super) chunk_targets: Vec<B::Ids>,
    /// The loss of each row, `[rows]`, downloaded once per batch.
    pub(super) row_loss: B::Buf,
    pub(super) tmp: B::Buf,
    /// With `recompute`: the norms' outputs and the MLP's activation, one set for every layer
    /// (empty otherwise).
    pub(super) shared: SharedActs<B>,
    /// Whether the backward pass recomputes the norms' outputs and the MLP's activation
    /// (`Model::recompute_activations`) rather than keeping them per layer.
    pub(super) recompute: bool,
    pub(super) dres: B::Buf,
    pub(super) dln: B::Buf,
    pub(super) datt: B::Buf,
    pub(super) dqkv: B::Buf,
    pub(super) dfc: B::Buf,
    /// The length `dfc` has whenever the backward pass runs.
    pub(super) dfc_len: usize,
    pub(super) dact: B::Buf,
    /// The LoRA branches' scratch (empty without adapters).
    pub(super) lora: LoraScratch<B>,
    /// The dropout key of the training pass under way (`None`: no dropout, as in evaluation).
    pub(super) dropout: Option<u64>,
    pub(super) has_grad: bool,
    /// A training pass under way: when the layers keep their own buffers, each layer's product
    /// inputs are held (`Backend::hold_operand`) from its forward to the end of the backward.
    pub(super) hold: bool,
    pub(super) checkpointing: bool,
}

impl<B: Backend> Activations<B> {
    pub fn new(model: &Model<B>, batch: usize, seq: usize) -> Result<Self> {
        let (be, c) = (&model.backend, &model.config);
        let rows = batch * seq;
        let shape = model.attn_shape(batch, seq);
        let z = |n: usize| be.zeros(n);
        let h = c.hidden_size;
        let kept = if model.gradient_checkpointing { 1 } else { c.n_layer };
        let head_rows = model.head_chunk_rows(rows);
        let chunked = head_rows < rows;
        let recompute = model.recompute_activations;
        // the norms' outputs and the activation: per layer, or one set the layers share
        let (own, shared) = if recompute { (0, rows) } else { (rows, 0) };
        // with `recompute`, the MLP's input gradient, the attention's and the LM head's chunk of
        // logits take turns in one buffer (`Activations::logits_room`)
        let dfc_len = if recompute { (rows * c.fc_width().max(c.qkv_width())).max(head_rows.min(rows) * c.vocab_size) } else { rows * c.fc_width() };
        let layers = (0..kept)
            .map(|_| -> Result<LayerActs<B>> {
                Ok(LayerActs {
                    ln1: z(own * h)?,
                    ln2: z(own * h)?,
                    act: z(own * c.intermediate_size)?,
                    ln1_mean: z(rows)?,
                    ln1_rstd: z(rows)?,
                    qkv: z(rows * c.qkv_width())?,
                    att_stats: z(shape.stats_len(model.attn_impl))?,
                    att_out: z(rows * shape.out_width())?,
                    res1: z(rows * h)?,
                    ln2_mean: z(rows)?,
                    ln2_rstd: z(rows)?,
                    fc: z(rows * c.fc_width())?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Activations {
            batch,
            seq,
            ids: be.upload_ids(&vec![0; rows])?,
            pos: be.upload_ids(&vec![0; rows])?,
            mask: be.upload_ids(&vec![1; rows])?,
            targets: be.upload_ids(&vec![IGNORE_INDEX; rows])?,
            resid: (0..=c.n_layer).map(|_| z(rows * h)).collect::<Result<_>>()?,
            layers,
            lnf: z(rows * h)?,
            lnf_mean: z(rows)?,
            lnf_rstd: z(rows)?,
            // allocated by the first pass that needs it (generation's prefill never does)
            logits: z(0)?,
            head_rows,
            head_in: z(if chunked { head_rows * h } else { 0 })?,
            head_din: z(if chunked { head_rows * h } else { 0 })?,
            chunk_targets: Vec::new(),
            row_loss: z(rows)?,
            // with `recompute` the branches' outputs go straight into the residual sums
            tmp: z(if recompute { 0 } else { rows * h })?,
            shared: SharedActs { ln1: z(shared * h)?, ln2: z(shared * h)?, act: z(shared * c.intermediate_size)? },
            recompute,
            dres: z(rows * h)?,
            dln: z(rows * h)?,
            // with `recompute` the attention's backward scratch is the MLP's (a layer's MLP part
            // of the backward pass is done before its attention part starts): empty here
            datt: z(if recompute { 0 } else { rows * shape.out_width() })?,
            dqkv: z(if recompute { 0 } else { rows * c.qkv_width() })?,
            dfc: z(dfc_len)?,
            dfc_len,
            dact: z(rows * if recompute { c.intermediate_size.max(shape.out_width()) } else { c.intermediate_size })?,
            lora: LoraScratch::new(be, rows, model.lora_dims(), model.lora.as_ref().is_some_and(|l| l.config.lora_dropout > 0.0))?,
            dropout: None,
            has_grad: false,
            hold: false,
            checkpointing: model.gradient_checkpointing,
        })
    }

    /// What [`Activations::new`] would allocate for `batch` x `seq`, in bytes, without
    /// allocating (saturating; for planning the batch size).
    pub fn estimate_bytes(model: &Model<B>, batch: usize, seq: usize) -> u128 {
        let c = &model.config;
        let rows = batch as u128 * seq as u128;
        let shape = model.attn_shape(batch, seq);
        let (h, qkv, out, fc, i, v) =
            (c.hidden_size as u128, c.qkv_width() as u128, shape.out_width() as u128, c.fc_width() as u128, c.intermediate_size as u128, c.vocab_size as u128);
        let stats = match model.attn_impl {
            AttnImpl::Eager => rows * seq as u128 * c.n_head as u128,
            AttnImpl::Flash => rows * c.n_head as u128,
        };
        let kept = if model.gradient_checkpointing { 1 } else { c.n_layer as u128 };
        // the norms' outputs and the activation: per layer, or one set the layers share
        let acts = rows * (2 * h + i);
        let (own, shared) = if model.recompute_activations { (0, acts) } else { (acts, 0) };
        let per_layer = rows * (h + 4 + qkv + out + fc) + own + stats;
        let head_rows = model.head_chunk_rows(batch * seq) as u128;
        let logits = head_rows.min(rows) * v;
        let head = if model.recompute_activations { 0 } else { logits } + if head_rows < rows { 2 * head_rows * h } else { 0 } + rows;
        let scratch = if model.recompute_activations { (rows * fc.max(qkv)).max(logits) + rows * i.max(out) } else { rows * (out + qkv + fc + i) };
        let tmp = if model.recompute_activations { 0 } else { rows * h };
        let rest = (c.n_layer as u128 + 1) * rows * h + rows * (h + 2) + head + 2 * rows * h + tmp + scratch + shared + 4 * rows;
        let dropout = model.lora.as_ref().is_some_and(|l| l.config.lora_dropout > 0.0);
        let lora = model.lora_dims().floats(batch.saturating_mul(seq), dropout) as u128;
        4 * (kept * per_layer + rest + lora)
    }

    /// What a GPU's bf16 mode adds for `batch` x `seq`, in bytes, to the f32 buffers of
    /// [`Activations::estimate_bytes`] (planning only): the bf16 copies held of each layer's
    /// saved activations (the norms' outputs, qkv, the attention's output, the MLP's
    /// pre-activation and activation: docs/CUDA.md; none with gradient checkpointing or
    /// `recompute_activations`, which hold nothing in the forward pass), one layer's
    /// input-gradient copies, and the LM head's bf16 logits, less the f32 chunk of logits that
    /// bf16 does not allocate (`Backend::head_loss_uses_scratch`; 0 if that is more).
    pub fn estimate_copy_bytes(model: &Model<B>, batch: usize, seq: usize) -> u128 {
        let c = &model.config;
        let rows = batch as u128 * seq as u128;
        let out = model.attn_shape(batch, seq).out_width() as u128;
        let (h, qkv, fc, i, v) = (c.hidden_size as u128, c.qkv_width() as u128, c.fc_width() as u128, c.intermediate_size as u128, c.vocab_size as u128);
        let kept = if model.gradient_checkpointing || model.recompute_activations { 0 } else { c.n_layer as u128 };
        let held = rows * (2 * h + qkv + out + fc + i);
        let grads = rows * (i + out + h);
        let logits = (model.head_chunk_rows(batch * seq) as u128).min(rows) * v;
        // estimate_bytes counts the f32 chunk except where it trades places with a scratch buffer
        let f32_logits = if model.recompute_activations { 0 } else { 4 * logits };
        (2 * (kept * held + grads + logits)).saturating_sub(f32_logits)
    }

    /// Bytes held by the activation and scratch buffers (what gradient checkpointing reduces).
    pub fn bytes(&self, be: &B) -> usize {
        let l = |a: &LayerActs<B>| {
            [&a.ln1, &a.ln2, &a.act, &a.ln1_mean, &a.ln1_rstd, &a.qkv, &a.att_stats, &a.att_out, &a.res1, &a.ln2_mean, &a.ln2_rstd, &a.fc]
                .iter()
                .map(|b| be.len(b))
                .sum::<usize>()
        };
        let bufs = [
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.head_in,
            &self.head_din,
            &self.row_loss,
            &self.tmp,
            &self.shared.ln1,
            &self.shared.ln2,
            &self.shared.act,
            &self.dres,
            &self.dln,
            &self.datt,
            &self.dqkv,
            &self.dfc,
            &self.dact,
        ];
        let layers = self.layers.iter().map(l).sum::<usize>() + self.resid.iter().map(|b| be.len(b)).sum::<usize>();
        4 * (layers + bufs.iter().map(|b| be.len(b)).sum::<usize>()) + self.lora.bytes(be)
    }

    /// Makes `logits` hold at least `need` values for a chunk of the LM head: with `recompute`,
    /// by trading buffers with `dfc` (the backward pass's scratch, free until the backward pass,
    /// which [`Activations::scratch_back`] gives it back to).
    pub(super) fn logits_room(&mut self, be: &B, need: usize) -> Result<()> {
        if be.len(&self.logits) >= need {
            return Ok(());
        }
        if self.recompute && be.len(&self.dfc) >= need {
            std::mem::swap(&mut self.logits, &mut self.dfc);
        } else {
            self.logits = be.zeros(need)?;
        }
        Ok(())
    }

    /// Gives `dfc` back its length for the backward pass (from `logits` when they traded).
    pub(super) fn scratch_back(&mut self, be: &B) -> Result<()> {
        if be.len(&self.dfc) >= self.dfc_len {
            return Ok(());
        }
        if be.len(&self.logits) >= self.dfc_len {
            std::mem::swap(&mut self.logits, &mut self.dfc);
        } else {
            self.dfc = be.zeros(self.dfc_len)?;
        }
        Ok(())
    }

    /// Dropout for the next training passes, with masks from `key` (`None`: off).
    pub fn set_dropout(&mut self, key: Option<u64>) {
        self.dropout = key;
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }
}
