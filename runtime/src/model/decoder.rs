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
//! The LM head and the loss run a chunk of rows at a time in training ([`Model::forward_backward`])
//! and evaluation ([`Model::eval_loss`]): each chunk's logits are computed, turned into losses and
//! (in training) their gradient in place, and pushed through the head's backward pass before the
//! next chunk, so the `[rows, vocab]` logits (1.6 GB in f32 at GPT-2's vocabulary and 8 x 1024
//! tokens) never exist at once. [`Model::forward`] keeps the whole logits, for callers that want
//! them.

use super::config::Arch;
use super::Model;
use crate::backend::{AttnShape, Backend, LossRows, StatsWanted, TokenStats};
use crate::error::{Error, Result};
use crate::protocol::IGNORE_INDEX;
pub use crate::protocol::{label_tokens, shifted_labels, Batch, CustomLoss, RowsLoss, StatsLoss};

/// Logit floats one LM-head chunk may hold (128 MiB in f32); see [`Model::head_chunk_rows`].
pub const LOGITS_CHUNK_FLOATS: usize = 1 << 25;

fn no_label_tokens() -> Error {
    Error::Invalid("the batch has no label tokens (every label is -100 after the shift), so there is no loss to train on".into())
}

/// What a custom loss needs of a batch: its label-token count, the divisor (`num_items_in_batch`,
/// or that count) and the shifted labels; an error without labels or label tokens.
fn custom_loss_setup(b: &Batch, num_items_in_batch: Option<usize>) -> Result<(usize, usize, Vec<i32>)> {
    if b.labels.is_none() {
        return Err(Error::Invalid("a loss needs labels".into()));
    }
    let n_tokens = label_tokens(b);
    let denom = num_items_in_batch.unwrap_or(n_tokens);
    if denom == 0 {
        return Err(no_label_tokens());
    }
    Ok((n_tokens, denom, shifted_labels(b)))
}

/// Hands the labelled rows among `r0..r0 + n` (their logits `[n, v]` in `logits`, on the host)
/// to a `loss-logits` hook in pieces of at most 4M logits. Returns the sum of the pieces' losses;
/// with `dlogits` (`[n, v]`) the rows' gradients are written there (other rows untouched).
fn rows_hook(
    hook: &mut dyn RowsLoss,
    b: &Batch,
    targets: &[i32],
    logits: &[f32],
    (r0, n, v): (usize, usize, usize),
    denom: usize,
    mut dlogits: Option<&mut [f32]>,
) -> Result<f64> {
    let labelled: Vec<u32> = (r0 as u32..(r0 + n) as u32).filter(|&r| targets[r as usize] != IGNORE_INDEX).collect();
    let mut loss = 0.0f64;
    for piece in labelled.chunks(((1usize << 22) / v).max(1)) {
        let mut z = Vec::with_capacity(piece.len() * v);
        for &r in piece {
            let i = r as usize - r0;
            z.extend_from_slice(&logits[i * v..(i + 1) * v]);
        }
        let labels: Vec<i32> = piece.iter().map(|&r| targets[r as usize]).collect();
        let (l, d) = hook.chunk(b, piece, &labels, &z, v, denom)?;
        loss += l as f64;
        if let Some(out) = dlogits.as_deref_mut() {
            for (j, &r) in piece.iter().enumerate() {
                let i = r as usize - r0;
                out[i * v..(i + 1) * v].copy_from_slice(&d[j * v..(j + 1) * v]);
            }
        }
    }
    Ok(loss)
}

/// The LM head's chunks of `acts`' batch: (index, first row, rows), `acts.head_rows` rows each
/// (the last one possibly shorter).
fn head_chunks<B: Backend>(acts: &Activations<B>) -> impl Iterator<Item = (usize, usize, usize)> {
    let rows = acts.batch * acts.seq;
    let cr = acts.head_rows.min(rows);
    (0..rows).step_by(cr).enumerate().map(move |(i, r0)| (i, r0, cr.min(rows - r0)))
}

/// How the loss is reduced.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossOptions {
    pub label_smoothing: f32,
    /// Divide the summed loss (and gradients) by this many label tokens instead of this batch's
    /// count: the number of label tokens in the whole gradient-accumulation window.
    pub num_items_in_batch: Option<usize>,
}

/// The loss of one forward pass.
#[derive(Clone, Copy, Debug)]
pub struct LossOutput {
    /// Sum of per-token losses.
    pub sum: f64,
    /// Label tokens in this batch.
    pub n_tokens: usize,
    /// `sum / n_tokens` (NaN when there are no label tokens).
    pub mean: f32,
}

/// Parameter gradients, one buffer per [`super::layout::ParamSpec`].
pub struct Grads<B: Backend> {
    pub tensors: Vec<B::Buf>,
}

impl<B: Backend> Grads<B> {
    pub fn zeros(model: &Model<B>) -> Result<Self> {
        let be = &model.backend;
        Ok(Grads { tensors: model.layout.specs.iter().map(|s| be.zeros(s.numel())).collect::<Result<_>>()? })
    }
    pub fn zero(&mut self, be: &B) {
        self.tensors.iter_mut().for_each(|t| be.fill(t, 0.0));
    }
}

struct LayerActs<B: Backend> {
    ln1: B::Buf,
    ln1_mean: B::Buf,
    ln1_rstd: B::Buf,
    qkv: B::Buf,
    att_stats: B::Buf,
    att_out: B::Buf,
    res1: B::Buf,
    ln2: B::Buf,
    ln2_mean: B::Buf,
    ln2_rstd: B::Buf,
    fc: B::Buf,
    act: B::Buf,
}

/// The forward pass's saved activations and the backward pass's scratch, for one batch shape.
pub struct Activations<B: Backend> {
    batch: usize,
    seq: usize,
    ids: B::Ids,
    pos: B::Ids,
    mask: B::Ids,
    targets: B::Ids,
    /// `resid[0]` is the embedding output, `resid[l + 1]` the output of layer `l`.
    resid: Vec<B::Buf>,
    layers: Vec<LayerActs<B>>,
    lnf: B::Buf,
    lnf_mean: B::Buf,
    lnf_rstd: B::Buf,
    /// Logits: `[rows, vocab]` after [`Model::forward`] (and, with `train`, the gradient of the
    /// loss); one chunk's `[head_rows, vocab]` in the chunked head.
    pub logits: B::Buf,
    /// Rows per chunk of the LM head ([`Model::head_chunk_rows`]).
    head_rows: usize,
    /// With more than one chunk: a chunk's rows of `lnf` and the gradient with respect to them,
    /// `[head_rows, hidden]` each (empty otherwise).
    head_in: B::Buf,
    head_din: B::Buf,
    /// Each chunk's shifted labels (with more than one chunk).
    chunk_targets: Vec<B::Ids>,
    /// The loss of each row, `[rows]`, downloaded once per batch.
    row_loss: B::Buf,
    tmp: B::Buf,
    dres: B::Buf,
    dln: B::Buf,
    datt: B::Buf,
    dqkv: B::Buf,
    dfc: B::Buf,
    dact: B::Buf,
    has_grad: bool,
    checkpointing: bool,
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
        let layers = (0..kept)
            .map(|_| -> Result<LayerActs<B>> {
                Ok(LayerActs {
                    ln1: z(rows * h)?,
                    ln1_mean: z(rows)?,
                    ln1_rstd: z(rows)?,
                    qkv: z(rows * c.qkv_width())?,
                    att_stats: z(shape.stats_len(model.attn_impl))?,
                    att_out: z(rows * shape.out_width())?,
                    res1: z(rows * h)?,
                    ln2: z(rows * h)?,
                    ln2_mean: z(rows)?,
                    ln2_rstd: z(rows)?,
                    fc: z(rows * c.fc_width())?,
                    act: z(rows * c.intermediate_size)?,
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
            tmp: z(rows * h)?,
            dres: z(rows * h)?,
            dln: z(rows * h)?,
            datt: z(rows * shape.out_width())?,
            dqkv: z(rows * c.qkv_width())?,
            dfc: z(rows * c.fc_width())?,
            dact: z(rows * c.intermediate_size)?,
            has_grad: false,
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
            crate::backend::AttnImpl::Eager => rows * seq as u128 * c.n_head as u128,
            crate::backend::AttnImpl::Flash => rows * c.n_head as u128,
        };
        let kept = if model.gradient_checkpointing { 1 } else { c.n_layer as u128 };
        let per_layer = rows * (3 * h + 4 + qkv + out + fc + i) + stats;
        let head_rows = model.head_chunk_rows(batch * seq) as u128;
        let head = head_rows * v + if head_rows < rows { 2 * head_rows * h } else { 0 } + rows;
        let rest = (c.n_layer as u128 + 1) * rows * h + rows * (h + 2) + head + 3 * rows * h + rows * (out + qkv + fc + i) + 4 * rows;
        4 * (kept * per_layer + rest)
    }

    /// Bytes held by the activation and scratch buffers (what gradient checkpointing reduces).
    pub fn bytes(&self, be: &B) -> usize {
        let l = |a: &LayerActs<B>| {
            [&a.ln1, &a.ln1_mean, &a.ln1_rstd, &a.qkv, &a.att_stats, &a.att_out, &a.res1, &a.ln2, &a.ln2_mean, &a.ln2_rstd, &a.fc, &a.act]
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
            &self.dres,
            &self.dln,
            &self.datt,
            &self.dqkv,
            &self.dfc,
            &self.dact,
        ];
        4 * (self.layers.iter().map(l).sum::<usize>() + self.resid.iter().map(|b| be.len(b)).sum::<usize>() + bufs.iter().map(|b| be.len(b)).sum::<usize>())
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }
}

impl<B: Backend> Model<B> {
    /// Rows per chunk of the LM head and loss for a batch of `rows` rows: `loss_chunk_rows` when
    /// set, otherwise as many as keep a chunk's logits within [`LOGITS_CHUNK_FLOATS`] (a multiple
    /// of 64 when that is at least 64); `rows` when one chunk holds them all.
    pub fn head_chunk_rows(&self, rows: usize) -> usize {
        let fit = (LOGITS_CHUNK_FLOATS / self.config.vocab_size.max(1)).max(1);
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
        let max_pos = match self.config.arch {
            Arch::Gpt2 => self.config.max_positions,
            Arch::Llama => usize::MAX,
        };
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

    fn upload_batch(&self, acts: &mut Activations<B>, b: &Batch) -> Result<()> {
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

    pub(crate) fn norm_fwd(&self, out: &mut B::Buf, mean: &mut B::Buf, rstd: &mut B::Buf, x: &B::Buf, w: usize, b: Option<usize>) {
        let (p, c) = (&self.params, self.config.hidden_size);
        match self.config.arch {
            Arch::Gpt2 => self.backend.layernorm_fwd(out, mean, rstd, x, &p[w], b.map(|b| &p[b]), c, self.config.norm_eps),
            Arch::Llama => self.backend.rmsnorm_fwd(out, rstd, x, &p[w], c, self.config.norm_eps),
        }
    }

    #[allow(clippy::too_many_arguments)] // the norm's saved statistics and its parameters
    fn norm_bwd(&self, grads: &mut Grads<B>, dx: &mut B::Buf, dout: &B::Buf, x: &B::Buf, mean: &B::Buf, rstd: &B::Buf, w: usize, b: Option<usize>) {
        let c = self.config.hidden_size;
        let (dw, db) = pair(&mut grads.tensors, w, b);
        match self.config.arch {
            Arch::Gpt2 => self.backend.layernorm_bwd(dx, dw, db, dout, x, &self.params[w], mean, rstd, c),
            Arch::Llama => self.backend.rmsnorm_bwd(dx, dw, dout, x, &self.params[w], rstd, c),
        }
    }

    /// Layer `l`'s forward pass from `resid[l]` into `resid[l + 1]`, keeping its activations in
    /// its own buffers (or the shared ones under gradient checkpointing).
    fn layer_fwd(&self, acts: &mut Activations<B>, l: usize, shape: AttnShape) {
        let (be, c, p) = (&self.backend, &self.config, &self.params);
        let lp = &self.layout.layers[l];
        let (rows, h) = (shape.rows(), c.hidden_size);
        let (done, rest) = acts.resid.split_at_mut(l + 1);
        let (x, y) = (&done[l], &mut rest[0]);
        let a = &mut acts.layers[if acts.checkpointing { 0 } else { l }];
        self.norm_fwd(&mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd, x, lp.ln1_w, lp.ln1_b);
        be.matmul_fwd(&mut a.qkv, &a.ln1, &p[lp.qkv_w], lp.qkv_b.map(|i| &p[i]), rows, h, c.qkv_width());
        if c.arch == Arch::Llama {
            be.rope(&mut a.qkv, &acts.pos, shape, c.rope_theta, false);
        }
        be.attention_fwd(&mut a.att_out, &mut a.att_stats, &a.qkv, &acts.mask, shape, self.attn_impl);
        be.matmul_fwd(&mut acts.tmp, &a.att_out, &p[lp.o_w], lp.o_b.map(|i| &p[i]), rows, shape.out_width(), h);
        be.add(&mut a.res1, x, &acts.tmp);
        self.norm_fwd(&mut a.ln2, &mut a.ln2_mean, &mut a.ln2_rstd, &a.res1, lp.ln2_w, lp.ln2_b);
        be.matmul_fwd(&mut a.fc, &a.ln2, &p[lp.fc_w], lp.fc_b.map(|i| &p[i]), rows, h, c.fc_width());
        match c.arch {
            Arch::Gpt2 => be.gelu_fwd(&mut a.act, &a.fc),
            Arch::Llama => be.swiglu_fwd(&mut a.act, &a.fc, c.intermediate_size),
        }
        be.matmul_fwd(&mut acts.tmp, &a.act, &p[lp.proj_w], lp.proj_b.map(|i| &p[i]), rows, c.intermediate_size, h);
        be.add(y, &a.res1, &acts.tmp);
    }

    /// The forward pass. With `labels` it returns the loss; with `train` it also leaves the loss
    /// gradient in `acts.logits` for [`Model::backward`].
    pub fn forward(&self, acts: &mut Activations<B>, b: &Batch, loss: LossOptions, train: bool) -> Result<Option<LossOutput>> {
        self.forward_logits(acts, b, train)?;
        let c = &self.config;
        let be = &self.backend;
        if b.labels.is_none() {
            if train {
                return Err(Error::Invalid("training needs labels".into()));
            }
            return Ok(None);
        }
        let n_tokens = label_tokens(b);
        let denom = loss.num_items_in_batch.unwrap_or(n_tokens);
        if train && denom == 0 {
            return Err(no_label_tokens());
        }
        let grad_scale = train.then(|| 1.0 / denom as f32);
        let LossRows { loss: rows_loss, n_targets } = be.cross_entropy(&mut acts.logits, &acts.targets, c.vocab_size, loss.label_smoothing, grad_scale)?;
        debug_assert_eq!(n_targets, n_tokens);
        acts.has_grad = train;
        let sum: f64 = rows_loss.iter().map(|&x| x as f64).sum();
        Ok(Some(LossOutput { sum, n_tokens, mean: (sum / n_tokens as f64) as f32 }))
    }

    /// The forward pass with a loss computed outside the engine (a plugin's): from per-token
    /// statistics, or from whole rows of logits a chunk at a time. `num_items_in_batch` as in
    /// [`LossOptions`]. The returned `sum` is the custom loss times the divisor, so that
    /// `sum / num_items_in_batch` is the loss the hook returned.
    pub fn forward_custom(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        custom: &mut CustomLoss,
        num_items_in_batch: Option<usize>,
        train: bool,
    ) -> Result<LossOutput> {
        self.forward_logits(acts, b, train)?;
        let (n_tokens, denom, targets) = custom_loss_setup(b, num_items_in_batch)?;
        let (be, v) = (&self.backend, self.config.vocab_size);
        let loss = match custom {
            CustomLoss::Stats(hook) => {
                let want = hook.wanted()?;
                let mut stats = be.token_stats(&acts.logits, &acts.targets, v, want)?;
                let saved = stats.take_backward_state();
                let (loss, grads) = hook.loss(b, &targets, stats, denom)?;
                grads.check(want, targets.len()).map_err(Error::Plugin)?;
                if train {
                    be.token_stats_bwd(&mut acts.logits, &acts.targets, v, &saved, &grads);
                }
                loss
            }
            CustomLoss::Rows(hook) => {
                let logits = be.download(&acts.logits)?;
                let rows = targets.len();
                let mut dlogits = if train { vec![0.0f32; rows * v] } else { Vec::new() };
                let loss = rows_hook(*hook, b, &targets, &logits, (0, rows, v), denom, train.then_some(&mut dlogits[..]))?;
                if train {
                    acts.logits = be.upload(&dlogits)?;
                }
                loss as f32
            }
        };
        acts.has_grad = train;
        let sum = loss as f64 * denom as f64;
        Ok(LossOutput { sum, n_tokens, mean: (sum / n_tokens.max(1) as f64) as f32 })
    }

    /// Evaluation with a loss computed outside the engine (the no-gradient form of
    /// [`Model::forward_custom`]), with the LM head in chunks so the whole logits never exist: a
    /// statistics hook gets every row's statistics gathered chunk by chunk, a `loss-logits` hook
    /// the labelled rows of one chunk at a time. Also returns the per-token statistics `want`s
    /// (for evaluation metrics), as [`Model::eval_loss`] does.
    pub fn eval_custom(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        custom: &mut CustomLoss,
        want: Option<StatsWanted>,
    ) -> Result<(LossOutput, Option<TokenStats>)> {
        self.forward_hidden(acts, b, false)?;
        let (n_tokens, _, targets) = custom_loss_setup(b, None)?;
        let (be, v) = (&self.backend, self.config.vocab_size);
        let hook_want = match custom {
            CustomLoss::Stats(hook) => Some(hook.wanted()?),
            CustomLoss::Rows(_) => None,
        };
        let (mut stats, mut hook_stats, mut rows_loss) = (None::<TokenStats>, TokenStats::default(), 0.0f64);
        for (i, r0, n) in head_chunks(acts) {
            self.head_chunk_fwd(acts, r0, n)?;
            let tids = if acts.chunk_targets.is_empty() { &acts.targets } else { &acts.chunk_targets[i] };
            if let Some(w) = want {
                stats.get_or_insert_with(TokenStats::default).append(be.token_stats(&acts.logits, tids, v, w)?);
            }
            match custom {
                CustomLoss::Stats(_) => hook_stats.append(be.token_stats(&acts.logits, tids, v, hook_want.unwrap_or_default())?),
                CustomLoss::Rows(hook) => rows_loss += rows_hook(*hook, b, &targets, &be.download(&acts.logits)?, (r0, n, v), n_tokens, None)?,
            }
        }
        let loss = match custom {
            CustomLoss::Stats(hook) => {
                hook_stats.take_backward_state();
                let (loss, grads) = hook.loss(b, &targets, hook_stats, n_tokens)?;
                grads.check(hook_want.unwrap_or_default(), targets.len()).map_err(Error::Plugin)?;
                loss as f64
            }
            CustomLoss::Rows(_) => rows_loss,
        };
        let sum = loss * n_tokens as f64;
        Ok((LossOutput { sum, n_tokens, mean: (sum / n_tokens as f64) as f32 }, stats))
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
        self.forward_hidden(&mut acts, b, false)?;
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
        be.matmul_fwd(&mut logits, &last, &self.params[self.layout.head()], None, b.batch, h, c.vocab_size);
        Ok(Some(be.download(&logits)?))
    }

    /// Per-token statistics of the logits of the last forward pass, at labelled positions (for
    /// evaluation metrics). Call before a backward pass overwrites the logits with gradients.
    pub fn token_stats(&self, acts: &Activations<B>, want: StatsWanted) -> Result<TokenStats> {
        self.backend.token_stats(&acts.logits, &acts.targets, self.config.vocab_size, want)
    }

    /// Everything up to the whole logits (left in `acts.logits`, grown to `[rows, vocab]` if the
    /// workspace was made for chunks).
    fn forward_logits(&self, acts: &mut Activations<B>, b: &Batch, train: bool) -> Result<()> {
        self.forward_hidden(acts, b, train)?;
        let (be, c) = (&self.backend, &self.config);
        let rows = b.batch * b.seq;
        if be.len(&acts.logits) < rows * c.vocab_size {
            acts.logits = be.zeros(rows * c.vocab_size)?;
        }
        be.matmul_fwd(&mut acts.logits, &acts.lnf, &self.params[self.layout.head()], None, rows, c.hidden_size, c.vocab_size);
        Ok(())
    }

    /// Everything up to the final norm's output (`acts.lnf`).
    fn forward_hidden(&self, acts: &mut Activations<B>, b: &Batch, train: bool) -> Result<()> {
        self.validate(b)?;
        if acts.shape() != (b.batch, b.seq) || acts.checkpointing != self.gradient_checkpointing {
            // the old workspace is freed before the new one is made
            *acts = Activations::new(self, 0, 0)?;
            *acts = Activations::new(self, b.batch, b.seq)?;
        }
        self.upload_batch(acts, b)?;
        let (be, c, lay, p) = (&self.backend, &self.config, &self.layout, &self.params);
        let (rows, h) = (b.batch * b.seq, c.hidden_size);
        let shape = self.attn_shape(b.batch, b.seq);
        let wpe = lay.wpe.map(|i| (&p[i], &acts.pos));
        be.embedding_fwd(&mut acts.resid[0], &acts.ids, &p[lay.wte], wpe, h);
        if let (true, Some((alpha, seed))) = (train, self.neftune) {
            use rand::{RngExt, SeedableRng};
            let mag = alpha / ((b.seq * h) as f32).sqrt();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let noise: Vec<f32> = (0..rows * h).map(|_| rng.random_range(-mag..=mag)).collect();
            be.copy(&mut acts.tmp, &acts.resid[0]);
            be.add(&mut acts.resid[0], &acts.tmp, &be.upload(&noise)?);
        }
        for l in 0..c.n_layer {
            self.layer_fwd(acts, l, shape);
        }
        self.norm_fwd(&mut acts.lnf, &mut acts.lnf_mean, &mut acts.lnf_rstd, &acts.resid[c.n_layer], lay.lnf_w, lay.lnf_b);
        acts.has_grad = false;
        Ok(())
    }

    /// One chunk of the LM head after [`Model::forward_hidden`]: the logits of rows `r0..r0 + n`
    /// into `acts.logits` (the whole batch reads `acts.lnf` directly; a chunk is copied out of it).
    fn head_chunk_fwd(&self, acts: &mut Activations<B>, r0: usize, n: usize) -> Result<()> {
        let (be, h, v) = (&self.backend, self.config.hidden_size, self.config.vocab_size);
        let rows = acts.batch * acts.seq;
        if be.len(&acts.logits) < acts.head_rows.min(rows) * v {
            acts.logits = be.zeros(acts.head_rows.min(rows) * v)?;
        }
        let w = &self.params[self.layout.head()];
        if n == rows {
            be.matmul_fwd(&mut acts.logits, &acts.lnf, w, None, n, h, v);
        } else {
            be.copy_range(&mut acts.head_in, 0, &acts.lnf, r0 * h, n * h);
            be.matmul_fwd(&mut acts.logits, &acts.head_in, w, None, n, h, v);
        }
        Ok(())
    }

    /// The head's backward pass for the chunk of [`Model::head_chunk_fwd`], from the logits'
    /// gradient in `acts.logits`: accumulates the head's weight gradient and writes the chunk's
    /// rows of `acts.dln`.
    fn head_chunk_bwd(&self, acts: &mut Activations<B>, grads: &mut Grads<B>, r0: usize, n: usize) {
        let (be, h, v) = (&self.backend, self.config.hidden_size, self.config.vocab_size);
        let (head, rows) = (self.layout.head(), acts.batch * acts.seq);
        if n == rows {
            be.matmul_bwd(Some(&mut acts.dln), Some(&mut grads.tensors[head]), None, &acts.logits, &acts.lnf, &self.params[head], n, h, v);
        } else {
            be.matmul_bwd(Some(&mut acts.head_din), Some(&mut grads.tensors[head]), None, &acts.logits, &acts.head_in, &self.params[head], n, h, v);
            be.copy_range(&mut acts.dln, r0 * h, &acts.head_din, 0, n * h);
        }
    }

    /// The LM head and the built-in loss after [`Model::forward_hidden`], a chunk of
    /// `acts.head_rows` rows at a time (see the module docs), with the per-token statistics
    /// `want`s for evaluation metrics. With `grads` (training) each chunk's logits become the
    /// loss gradient in place and go through the head's backward pass at once: `acts.dln` gets
    /// the gradient with respect to the final norm's output and the head's weight gradient is
    /// accumulated. Returns the number of label tokens (`None` when the batch has no labels)
    /// and the statistics; the per-row losses stay in `acts.row_loss` ([`Model::loss_output`]),
    /// so that nothing here waits for the device.
    fn head_loss(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        loss: LossOptions,
        mut grads: Option<&mut Grads<B>>,
        want: Option<StatsWanted>,
    ) -> Result<(Option<usize>, Option<TokenStats>)> {
        let (be, v) = (&self.backend, self.config.vocab_size);
        let n_tokens = label_tokens(b);
        let denom = loss.num_items_in_batch.unwrap_or(n_tokens);
        if grads.is_some() && (b.labels.is_none() || denom == 0) {
            return Err(if b.labels.is_none() { Error::Invalid("training needs labels".into()) } else { no_label_tokens() });
        }
        if b.labels.is_none() && want.is_none() {
            return Ok((None, None));
        }
        let grad_scale = grads.is_some().then(|| 1.0 / denom as f32);
        let mut stats: Option<TokenStats> = None;
        for (i, r0, n) in head_chunks(acts) {
            self.head_chunk_fwd(acts, r0, n)?;
            let targets = if acts.chunk_targets.is_empty() { &acts.targets } else { &acts.chunk_targets[i] };
            if let Some(w) = want {
                stats.get_or_insert_with(TokenStats::default).append(be.token_stats(&acts.logits, targets, v, w)?);
            }
            be.cross_entropy_into(&mut acts.logits, targets, v, loss.label_smoothing, grad_scale, &mut acts.row_loss, r0);
            if let Some(g) = grads.as_deref_mut() {
                self.head_chunk_bwd(acts, g, r0, n);
            }
        }
        Ok((b.labels.is_some().then_some(n_tokens), stats))
    }

    /// The loss of the last [`Model::head_loss`] over `n_tokens` label tokens: its per-row losses
    /// downloaded and summed in row order (in f64).
    fn loss_output(&self, acts: &Activations<B>, n_tokens: usize) -> Result<LossOutput> {
        let sum: f64 = self.backend.download(&acts.row_loss)?.iter().map(|&x| x as f64).sum();
        Ok(LossOutput { sum, n_tokens, mean: (sum / n_tokens as f64) as f32 })
    }

    /// Evaluation: the forward pass and the built-in loss with the LM head in chunks (the whole
    /// logits never exist), and the per-token statistics `want`s at labelled positions (all rows
    /// when the batch has no labels: zeros). The loss is `None` when the batch has no labels.
    pub fn eval_loss(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        loss: LossOptions,
        want: Option<StatsWanted>,
    ) -> Result<(Option<LossOutput>, Option<TokenStats>)> {
        self.forward_hidden(acts, b, false)?;
        let (n_tokens, stats) = self.head_loss(acts, b, loss, None, want)?;
        Ok((n_tokens.map(|n| self.loss_output(acts, n)).transpose()?, stats))
    }

    /// The backward pass after a training forward pass; accumulates into `grads`.
    pub fn backward(&self, acts: &mut Activations<B>, grads: &mut Grads<B>) -> Result<()> {
        if !acts.has_grad {
            return Err(Error::Invalid("backward() needs a training forward pass first".into()));
        }
        acts.has_grad = false;
        let (be, c, lay, p) = (&self.backend, &self.config, &self.layout, &self.params);
        let (batch, seq) = acts.shape();
        let (rows, h) = (batch * seq, c.hidden_size);
        let head = lay.head();
        be.matmul_bwd(Some(&mut acts.dln), Some(&mut grads.tensors[head]), None, &acts.logits, &acts.lnf, &p[head], rows, h, c.vocab_size);
        self.backward_body(acts, grads);
        Ok(())
    }

    /// The backward pass from `acts.dln`, the gradient with respect to the final norm's output.
    fn backward_body(&self, acts: &mut Activations<B>, grads: &mut Grads<B>) {
        let (be, c, lay, p) = (&self.backend, &self.config, &self.layout, &self.params);
        let (batch, seq) = acts.shape();
        let (rows, h) = (batch * seq, c.hidden_size);
        let shape = self.attn_shape(batch, seq);
        be.fill(&mut acts.dres, 0.0);
        self.norm_bwd(grads, &mut acts.dres, &acts.dln, &acts.resid[c.n_layer], &acts.lnf_mean, &acts.lnf_rstd, lay.lnf_w, lay.lnf_b);
        for (l, lp) in lay.layers.iter().enumerate().rev() {
            if acts.checkpointing {
                // recompute this layer's activations (its output, resid[l + 1], comes out the same)
                self.layer_fwd(acts, l, shape);
            }
            let a = &acts.layers[if acts.checkpointing { 0 } else { l }];
            // dres holds d(layer output) = d(res1 + mlp(...))
            let (dw, db) = pair(&mut grads.tensors, lp.proj_w, lp.proj_b);
            be.matmul_bwd(Some(&mut acts.dact), Some(dw), db, &acts.dres, &a.act, &p[lp.proj_w], rows, c.intermediate_size, h);
            match c.arch {
                Arch::Gpt2 => be.gelu_bwd(&mut acts.dfc, &a.fc, &acts.dact),
                Arch::Llama => be.swiglu_bwd(&mut acts.dfc, &a.fc, &acts.dact, c.intermediate_size),
            }
            let (dw, db) = pair(&mut grads.tensors, lp.fc_w, lp.fc_b);
            be.matmul_bwd(Some(&mut acts.dln), Some(dw), db, &acts.dfc, &a.ln2, &p[lp.fc_w], rows, h, c.fc_width());
            self.norm_bwd(grads, &mut acts.dres, &acts.dln, &a.res1, &a.ln2_mean, &a.ln2_rstd, lp.ln2_w, lp.ln2_b);
            // dres now holds d(res1) = d(x + attn(...))
            let (dw, db) = pair(&mut grads.tensors, lp.o_w, lp.o_b);
            be.matmul_bwd(Some(&mut acts.datt), Some(dw), db, &acts.dres, &a.att_out, &p[lp.o_w], rows, shape.out_width(), h);
            be.attention_bwd(&mut acts.dqkv, &acts.datt, &a.qkv, &a.att_out, &a.att_stats, &acts.mask, shape, self.attn_impl);
            if c.arch == Arch::Llama {
                be.rope(&mut acts.dqkv, &acts.pos, shape, c.rope_theta, true);
            }
            let (dw, db) = pair(&mut grads.tensors, lp.qkv_w, lp.qkv_b);
            be.matmul_bwd(Some(&mut acts.dln), Some(dw), db, &acts.dqkv, &a.ln1, &p[lp.qkv_w], rows, h, c.qkv_width());
            self.norm_bwd(grads, &mut acts.dres, &acts.dln, &acts.resid[l], &a.ln1_mean, &a.ln1_rstd, lp.ln1_w, lp.ln1_b);
        }
        let (dwte, dwpe) = pair(&mut grads.tensors, lay.wte, lay.wpe);
        be.embedding_bwd(dwte, dwpe.map(|d| (d, &acts.pos)), &acts.ids, &acts.dres, h);
    }

    /// Forward, a loss computed outside the engine and backward for one micro-batch (the
    /// training form of [`Model::forward_custom`]). A `loss-logits` hook gets the labelled rows
    /// of one LM-head chunk at a time, and each chunk's gradient goes through the head's backward
    /// pass at once, so the whole logits never exist; a statistics hook needs every row's
    /// statistics before any gradient, so it runs on the whole logits.
    pub fn forward_backward_custom(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        grads: &mut Grads<B>,
        custom: &mut CustomLoss,
        num_items_in_batch: Option<usize>,
    ) -> Result<LossOutput> {
        let hook = match custom {
            CustomLoss::Rows(hook) => hook,
            CustomLoss::Stats(_) => {
                let out = self.forward_custom(acts, b, custom, num_items_in_batch, true)?;
                self.backward(acts, grads)?;
                return Ok(out);
            }
        };
        self.forward_hidden(acts, b, true)?;
        let (n_tokens, denom, targets) = custom_loss_setup(b, num_items_in_batch)?;
        let (be, v) = (&self.backend, self.config.vocab_size);
        let mut loss = 0.0f64;
        for (_, r0, n) in head_chunks(acts) {
            self.head_chunk_fwd(acts, r0, n)?;
            // the chunk's labelled rows go to the hook; unlabelled rows get no gradient
            let mut dlogits = vec![0.0f32; n * v];
            loss += rows_hook(*hook, b, &targets, &be.download(&acts.logits)?, (r0, n, v), denom, Some(&mut dlogits))?;
            acts.logits = be.upload(&dlogits)?;
            self.head_chunk_bwd(acts, grads, r0, n);
        }
        self.backward_body(acts, grads);
        let sum = loss * denom as f64;
        Ok(LossOutput { sum, n_tokens, mean: (sum / n_tokens.max(1) as f64) as f32 })
    }

    /// Forward, loss and backward for one micro-batch, with the LM head and loss in chunks (the
    /// whole logits never exist).
    pub fn forward_backward(&self, acts: &mut Activations<B>, b: &Batch, grads: &mut Grads<B>, loss: LossOptions) -> Result<LossOutput> {
        self.forward_hidden(acts, b, true)?;
        let (n_tokens, _) = self.head_loss(acts, b, loss, Some(grads), None)?;
        let n_tokens = n_tokens.ok_or_else(|| Error::Invalid("training needs labels".into()))?;
        self.backward_body(acts, grads);
        // read the loss once the backward pass is queued, so a GPU is not left idle meanwhile
        self.loss_output(acts, n_tokens)
    }
}

/// Two distinct elements of a slice, the second optional.
fn pair<T>(v: &mut [T], a: usize, b: Option<usize>) -> (&mut T, Option<&mut T>) {
    match b {
        None => (&mut v[a], None),
        Some(b) => {
            assert_ne!(a, b, "a parameter paired with itself");
            if a < b {
                let (x, y) = v.split_at_mut(b);
                (&mut x[a], Some(&mut y[0]))
            } else {
                let (x, y) = v.split_at_mut(a);
                (&mut y[0], Some(&mut x[b]))
            }
        }
    }
}
