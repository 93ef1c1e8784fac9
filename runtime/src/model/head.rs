//! The LM head and the losses: the built-in cross-entropy a chunk of rows at a time in training
//! and evaluation (each chunk's logits are computed, turned into losses and, in training, their
//! gradient in place, and pushed through the head's backward pass before the next chunk, so the
//! `[rows, vocab]` logits never exist at once), losses from outside the engine (a plugin's, from
//! per-token statistics or from rows of logits), and the whole-logits forward for callers that
//! want the logits.

use super::activations::{Activations, Grads};
use super::decoder::{GradsReady, Neftune};
use super::Model;
use crate::backend::{Backend, LossRows, StatsWanted, TokenStats};
use crate::error::{Error, Result};
use crate::nn::{GradsMut, Params};
use crate::protocol::{label_tokens, shifted_labels, Batch, CustomLoss, RowsLoss, IGNORE_INDEX};

fn no_label_tokens() -> Error {
    Error::Invalid("the batch has no label tokens (every label is -100 after the shift), so there is no loss to train on".into())
}

/// What a custom loss needs of a batch: its label-token count, the divisor (`num_items_in_batch`,
/// or that count) and the shifted labels; an error without labels or label tokens.
pub(crate) fn custom_loss_setup(b: &Batch, num_items_in_batch: Option<usize>) -> Result<(usize, usize, Vec<i32>)> {
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

/// Whole logits `[rows, vocab]` (one row per target) and their targets, on the device and the host.
pub(crate) struct LogitsOf<'a, B: Backend> {
    pub logits: &'a mut B::Buf,
    pub target_ids: &'a B::Ids,
    pub targets: &'a [i32],
    pub vocab: usize,
}

/// A loss from outside the engine (a plugin's) on whole logits, divided by `denom`: returns the
/// hook's loss; in training the logits are replaced by the loss's gradient.
pub(crate) fn custom_loss_on_logits<B: Backend>(be: &B, on: LogitsOf<B>, b: &Batch, custom: &mut CustomLoss, denom: usize, train: bool) -> Result<f32> {
    let LogitsOf { logits, target_ids, targets, vocab: v } = on;
    Ok(match custom {
        CustomLoss::Stats(hook) => {
            let want = hook.wanted()?;
            let mut stats = be.token_stats(logits, target_ids, v, want)?;
            let saved = stats.take_backward_state();
            let (loss, grads) = hook.loss(b, targets, stats, denom)?;
            grads.check(want, targets.len()).map_err(Error::Plugin)?;
            if train {
                be.token_stats_bwd(logits, target_ids, v, &saved, &grads);
            }
            loss
        }
        CustomLoss::Rows(hook) => {
            let host = be.download(logits)?;
            let rows = targets.len();
            let mut dlogits = if train { vec![0.0f32; rows * v] } else { Vec::new() };
            let loss = rows_hook(*hook, b, targets, &host, (0, rows, v), denom, train.then_some(&mut dlogits[..]))?;
            if train {
                *logits = be.upload(&dlogits)?;
            }
            loss as f32
        }
    })
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

impl<B: Backend> Model<B> {
    /// The forward pass. With `labels` it returns the loss; with `train` it also leaves the loss
    /// gradient in `acts.logits` for [`Model::backward`].
    pub fn forward(&self, acts: &mut Activations<B>, b: &Batch, loss: LossOptions, train: bool) -> Result<Option<LossOutput>> {
        self.forward_logits(acts, b, None)?;
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
        self.custom_pass(acts, b, custom, num_items_in_batch, train.then_some(None))
    }

    /// [`Model::forward_custom`]; `train` is `Some(neftune)` in training.
    fn custom_pass(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        custom: &mut CustomLoss,
        num_items_in_batch: Option<usize>,
        train: Option<Option<Neftune>>,
    ) -> Result<LossOutput> {
        self.forward_logits(acts, b, train.flatten())?;
        let train = train.is_some();
        let (n_tokens, denom, targets) = custom_loss_setup(b, num_items_in_batch)?;
        let on = LogitsOf { logits: &mut acts.logits, target_ids: &acts.targets, targets: &targets, vocab: self.config.vocab_size };
        let loss = custom_loss_on_logits(&self.backend, on, b, custom, denom, train)?;
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
        self.forward_hidden(acts, b, None)?;
        let (n_tokens, _, targets) = custom_loss_setup(b, None)?;
        let (be, v) = (&self.backend, self.config.vocab_size);
        let hook_want = match custom {
            CustomLoss::Stats(hook) => Some(hook.wanted()?),
            CustomLoss::Rows(_) => None,
        };
        let (mut stats, mut hook_stats, mut rows_loss) = (None::<TokenStats>, TokenStats::default(), 0.0f64);
        self.with_params(&[self.layout.head()], |p| -> Result<()> {
            for (i, r0, n) in head_chunks(acts) {
                self.head_chunk_fwd(acts, p, r0, n)?;
                let tids = if acts.chunk_targets.is_empty() { &acts.targets } else { &acts.chunk_targets[i] };
                if let Some(w) = want {
                    stats.get_or_insert_with(TokenStats::default).append(be.token_stats(&acts.logits, tids, v, w)?);
                }
                match custom {
                    CustomLoss::Stats(_) => hook_stats.append(be.token_stats(&acts.logits, tids, v, hook_want.unwrap_or_default())?),
                    CustomLoss::Rows(hook) => rows_loss += rows_hook(*hook, b, &targets, &be.download(&acts.logits)?, (r0, n, v), n_tokens, None)?,
                }
            }
            Ok(())
        })??;
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

    /// Per-token statistics of the logits of the last forward pass, at labelled positions (for
    /// evaluation metrics). Call before a backward pass overwrites the logits with gradients.
    pub fn token_stats(&self, acts: &Activations<B>, want: StatsWanted) -> Result<TokenStats> {
        self.backend.token_stats(&acts.logits, &acts.targets, self.config.vocab_size, want)
    }

    /// Everything up to the whole logits (left in `acts.logits`, grown to `[rows, vocab]` if the
    /// workspace was made for chunks).
    pub(super) fn forward_logits(&self, acts: &mut Activations<B>, b: &Batch, neftune: Option<Neftune>) -> Result<()> {
        self.forward_hidden(acts, b, neftune)?;
        let (be, c) = (&self.backend, &self.config);
        let rows = b.batch * b.seq;
        // the whole logits, exactly `[rows, vocab]` (callers download them)
        acts.scratch_back(be)?;
        if be.len(&acts.logits) != rows * c.vocab_size {
            acts.logits = be.zeros(rows * c.vocab_size)?;
        }
        let head = self.layout.head();
        self.with_params(&[head], |p| be.matmul_fwd(&mut acts.logits, &acts.lnf, &p.bufs[head], None, rows, c.hidden_size, c.vocab_size))
    }

    /// One chunk of the LM head after [`Model::forward_hidden`]: the logits of rows `r0..r0 + n`
    /// into `acts.logits` (the whole batch reads `acts.lnf` directly; a chunk is copied out of it).
    pub(super) fn head_chunk_fwd(&self, acts: &mut Activations<B>, p: &Params<B>, r0: usize, n: usize) -> Result<()> {
        let (be, h, v) = (&self.backend, self.config.hidden_size, self.config.vocab_size);
        let rows = acts.batch * acts.seq;
        acts.logits_room(be, acts.head_rows.min(rows) * v)?;
        p.keep_if_frozen(be, self.layout.head());
        let w = &p.bufs[self.layout.head()];
        if n == rows {
            be.matmul_fwd(&mut acts.logits, &acts.lnf, w, None, n, h, v);
        } else {
            be.copy_range(&mut acts.head_in, 0, &acts.lnf, r0 * h, n * h);
            be.matmul_fwd(&mut acts.logits, &acts.head_in, w, None, n, h, v);
        }
        Ok(())
    }

    /// Chunk `i` (rows `r0..r0 + n`) of the LM head and the built-in loss through the fused
    /// [`Backend::head_loss`] when no statistics are wanted: the losses into `acts.row_loss`, and
    /// with `bufs` (training) the head's weight gradient and the chunk's rows of `acts.dln`.
    fn head_chunk_loss(
        &self,
        acts: &mut Activations<B>,
        p: &Params<B>,
        bufs: Option<&mut [B::Buf]>,
        (i, r0, n): (usize, usize, usize),
        smoothing: f32,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        let (be, h, v) = (&self.backend, self.config.hidden_size, self.config.vocab_size);
        let rows = acts.batch * acts.seq;
        if be.head_loss_uses_scratch(v) {
            acts.logits_room(be, acts.head_rows.min(rows) * v)?;
        }
        let head = self.layout.head();
        p.keep_if_frozen(be, head);
        if n != rows {
            be.copy_range(&mut acts.head_in, 0, &acts.lnf, r0 * h, n * h);
        }
        let targets = if acts.chunk_targets.is_empty() { &acts.targets } else { &acts.chunk_targets[i] };
        let (x, w) = (if n == rows { &acts.lnf } else { &acts.head_in }, &p.bufs[head]);
        let scale = bufs.as_ref().and(grad_scale);
        let back = match bufs {
            Some(g) => {
                let dx = if n == rows { &mut acts.dln } else { &mut acts.head_din };
                let dw = if self.trainable[head] { Some(&mut g[head]) } else { None };
                Some((dx, dw))
            }
            None => None,
        };
        be.head_loss(&mut acts.logits, x, w, targets, (n, h, v), smoothing, scale, &mut acts.row_loss, r0, back);
        if scale.is_some() && n != rows {
            be.copy_range(&mut acts.dln, r0 * h, &acts.head_din, 0, n * h);
        }
        Ok(())
    }

    /// The head's backward pass for the chunk of [`Model::head_chunk_fwd`], from the logits'
    /// gradient in `acts.logits`: accumulates the head's weight gradient and writes the chunk's
    /// rows of `acts.dln`.
    pub(super) fn head_chunk_bwd(&self, acts: &mut Activations<B>, p: &Params<B>, bufs: &mut [B::Buf], r0: usize, n: usize) {
        let (be, h, rows) = (&self.backend, self.config.hidden_size, acts.batch * acts.seq);
        let head = self.head();
        let mut g = GradsMut { bufs, trainable: &self.trainable };
        if n == rows {
            head.bwd(be, p, &mut g, Some(&mut acts.dln), &acts.logits, &acts.lnf, n);
        } else {
            head.bwd(be, p, &mut g, Some(&mut acts.head_din), &acts.logits, &acts.head_in, n);
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
    pub(super) fn head_loss(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        loss: LossOptions,
        grads: Option<&mut Grads<B>>,
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
        // without statistics nothing but the loss reads the logits: the fused head and loss
        let fused = want.is_none() && self.head().b.is_none() && self.head().lora.iter().all(Option::is_none);
        let mut chunks = |p: &Params<B>, mut bufs: Option<&mut [B::Buf]>| -> Result<Option<TokenStats>> {
            let mut stats: Option<TokenStats> = None;
            for (i, r0, n) in head_chunks(acts) {
                if fused {
                    self.head_chunk_loss(acts, p, bufs.as_deref_mut(), (i, r0, n), loss.label_smoothing, grad_scale)?;
                    continue;
                }
                self.head_chunk_fwd(acts, p, r0, n)?;
                let targets = if acts.chunk_targets.is_empty() { &acts.targets } else { &acts.chunk_targets[i] };
                if let Some(w) = want {
                    stats.get_or_insert_with(TokenStats::default).append(be.token_stats(&acts.logits, targets, v, w)?);
                }
                be.cross_entropy_into(&mut acts.logits, targets, v, loss.label_smoothing, grad_scale, &mut acts.row_loss, r0);
                if let Some(g) = bufs.as_deref_mut() {
                    self.head_chunk_bwd(acts, p, g, r0, n);
                }
            }
            Ok(stats)
        };
        let head = self.layout.head();
        if fused && self.head_is_held() {
            // a frozen head held in bf16: made f32 a block of rows at a time, never whole
            let mut w = self.held_head_scratch(&mut acts.dact)?;
            let mut run = || -> Result<()> {
                for chunk in head_chunks(acts).collect::<Vec<_>>() {
                    self.held_head_chunk_loss(acts, &mut w.0, chunk, loss.label_smoothing, grad_scale)?;
                }
                Ok(())
            };
            let done = run();
            Self::give_back_held_scratch(w, &mut acts.dact);
            done?;
            return Ok((b.labels.is_some().then_some(n_tokens), None));
        }
        let stats = match grads {
            Some(g) => self.with_params_grads(&[head], &[], &mut g.tensors, |p, bufs| chunks(p, Some(bufs)))??,
            None => self.with_params(&[head], |p| chunks(p, None))??,
        };
        Ok((b.labels.is_some().then_some(n_tokens), stats))
    }

    /// The loss of the last [`Model::head_loss`] over `n_tokens` label tokens: its per-row losses
    /// downloaded and summed in row order (in f64).
    pub(super) fn loss_output(&self, acts: &Activations<B>, n_tokens: usize) -> Result<LossOutput> {
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
        self.forward_hidden(acts, b, None)?;
        let (n_tokens, stats) = self.head_loss(acts, b, loss, None, want)?;
        Ok((n_tokens.map(|n| self.loss_output(acts, n)).transpose()?, stats))
    }

    /// Forward, a loss computed outside the engine and backward for one micro-batch (the
    /// training form of [`Model::forward_custom`]). A `loss-logits` hook gets the labelled rows
    /// of one LM-head chunk at a time, and each chunk's gradient goes through the head's backward
    /// pass at once, so the whole logits never exist; a statistics hook needs every row's
    /// statistics before any gradient, so it runs on the whole logits. NEFTune noise and the
    /// gradients-ready callback as in [`Model::forward_backward_with`].
    #[allow(clippy::too_many_arguments)] // the pass's inputs, the loss and the training pass's options
    pub fn forward_backward_custom(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        grads: &mut Grads<B>,
        custom: &mut CustomLoss,
        num_items_in_batch: Option<usize>,
        neftune: Option<Neftune>,
        ready: &mut GradsReady<B>,
    ) -> Result<LossOutput> {
        let hook = match custom {
            CustomLoss::Rows(hook) => hook,
            CustomLoss::Stats(_) => {
                let out = self.custom_pass(acts, b, custom, num_items_in_batch, Some(neftune))?;
                self.backward_with(acts, grads, ready)?;
                return Ok(out);
            }
        };
        self.forward_hidden(acts, b, neftune)?;
        let (n_tokens, denom, targets) = custom_loss_setup(b, num_items_in_batch)?;
        let (be, v) = (&self.backend, self.config.vocab_size);
        let mut loss = 0.0f64;
        self.with_params_grads(&[self.layout.head()], &[], &mut grads.tensors, |p, bufs| -> Result<()> {
            for (_, r0, n) in head_chunks(acts) {
                self.head_chunk_fwd(acts, p, r0, n)?;
                // the chunk's labelled rows go to the hook; unlabelled rows get no gradient
                let mut dlogits = vec![0.0f32; n * v];
                loss += rows_hook(*hook, b, &targets, &be.download(&acts.logits)?, (r0, n, v), denom, Some(&mut dlogits))?;
                // into the chunk's buffer (which may be the backward pass's scratch, lent)
                be.copy_range(&mut acts.logits, 0, &be.upload_vec(dlogits)?, 0, n * v);
                self.head_chunk_bwd(acts, p, bufs, r0, n);
            }
            Ok(())
        })??;
        self.backward_body(acts, grads, ready)?;
        let sum = loss * denom as f64;
        Ok(LossOutput { sum, n_tokens, mean: (sum / n_tokens.max(1) as f64) as f32 })
    }
}
