//! [`Step`]: one optimizer step, in the parts a trainer calls between its events. A step is:
//! zero the gradients; forward and backward each micro-batch of the accumulation window (the
//! loss divided by the window's label tokens, so the gradients add up to the window's mean);
//! combine the gradients across processes; take the global gradient norm and the clipping
//! coefficient; and, if the caller applies it, one fused AdamW update with the clipping folded in.

use std::sync::{Arc, Mutex};

use super::collective::{Collective, SingleProcess};
use super::full_shard::{FullShard, PieceStash};
use super::optimizer::{bounds_after_update, clip_coef, trainable_grad_norm, AdamW, AdamWConfig};
use super::shard::Shard;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Grads, LossOptions, LossOutput, Model, Neftune, PassLoss, TrainModel};
use crate::protocol::{label_tokens, Batch};

fn poisoned() -> Error {
    Error::Invalid("the sharded weights were left inconsistent by an earlier failure".into())
}

/// How a micro-batch's loss is computed: the built-in cross-entropy (with its options), or a
/// loss from outside the engine (a plugin's) with the divisor `num_items_in_batch`.
pub type MicroLoss<'a, 'b> = PassLoss<'a, 'b>;

/// Per-micro-batch settings of [`Step::micro_batch`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MicroOptions {
    /// NEFTune noise for this micro-batch's input embeddings.
    pub neftune: Option<Neftune>,
    /// More micro-batches of this window follow: their gradients are not final yet, so the
    /// collective is not told of them (as DDP's `no_sync`).
    pub accumulating: bool,
    /// The dropout key of this micro-batch (masks are a function of it; `None`: no dropout).
    pub dropout: Option<u64>,
}

/// What one whole step ([`Step::run`]) did.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    /// The window's mean loss per label token.
    pub loss: f64,
    /// The global gradient norm before clipping, and the clipping coefficient applied.
    pub grad_norm: f32,
    pub clip_coef: f32,
    /// Whether the update was applied (not when the loss or the norm is not finite, nor when
    /// the update would have made the state non-finite).
    pub applied: bool,
}

/// The model (either kind, [`TrainModel`]), its gradients and activations, the optimizer and the
/// collective: everything one optimizer step touches.
pub struct Step<B: Backend, M: TrainModel<B> = Model<B>> {
    pub model: M,
    pub grads: Grads<B>,
    pub acts: M::Acts,
    pub opt: AdamW<B>,
    pub collective: Box<dyn Collective<B>>,
    /// The optimizer sharded over the processes (`fsdp = "shard_grad_op"`): then `opt` holds no
    /// moments, and the gradients are reduce-scattered into the shard.
    pub shard: Option<Shard<B>>,
    /// The weights sharded too (`fsdp = "full_shard"`): the model fetches its units through it,
    /// and it holds this process's pieces of the weights, gradients and moments (`opt` holds no
    /// moments, `grads` only what a pass has fetched).
    pub full: Option<Arc<Mutex<FullShard<B>>>>,
    /// Bounds on the magnitude of every trainable parameter, first-moment and second-moment
    /// element: measured, or carried forward through each update by [`bounds_after_update`]
    /// (`None`: not known; measured at the next update).
    bounds: Option<[f64; 3]>,
    /// The gradient norm from the last [`Step::grad_norm`].
    last_norm: Option<f32>,
}

impl<B: Backend, M: TrainModel<B>> Step<B, M> {
    /// A step for `model` in one process, with zeroed gradients and AdamW moments; the
    /// activation workspace is sized by the first micro-batch.
    pub fn new(model: M, opt: AdamWConfig) -> Result<Self> {
        Self::with_workspace(model, opt, 1, 2)
    }

    /// [`Step::new`] with the activation workspace made for `batch` x `seq` up front (it is
    /// allocated first, then the gradients and the moments).
    pub fn with_workspace(model: M, opt: AdamWConfig, batch: usize, seq: usize) -> Result<Self> {
        let acts = model.workspace(batch, seq)?;
        let grads = model.zero_grads()?;
        let opt = AdamW::new(&model, opt)?;
        Ok(Step { model, grads, acts, opt, collective: Box::new(SingleProcess), shard: None, full: None, bounds: None, last_norm: None })
    }

    /// Shards the optimizer over the collective's processes (ZeRO stage 2, [`Shard`]): each
    /// keeps the moments of its part of the trainable parameters only. Moments already there
    /// (loaded from a checkpoint) are taken over.
    pub fn shard_optimizer(&mut self) -> Result<()> {
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        let mut shard = match self.shard.take() {
            Some(s) => s,
            None => Shard::new(&self.model, rank, world)?,
        };
        shard.load_moments(&self.model, &self.opt.exp_avg, &self.opt.exp_avg_sq)?;
        self.opt.exp_avg.iter_mut().chain(self.opt.exp_avg_sq.iter_mut()).for_each(|m| *m = None);
        self.shard = Some(shard);
        self.bounds = None;
        Ok(())
    }

    /// [`Step::with_workspace`] with the optimizer sharded over `collective`'s processes from
    /// the start (no process ever holds all the moments).
    pub fn sharded(model: M, opt: AdamWConfig, collective: Box<dyn Collective<B>>, batch: usize, seq: usize) -> Result<Self> {
        let acts = model.workspace(batch, seq)?;
        let grads = model.zero_grads()?;
        let shard = Shard::new(&model, collective.rank(), collective.world_size())?;
        let n = model.specs().len();
        let opt = AdamW { config: opt, exp_avg: (0..n).map(|_| None).collect(), exp_avg_sq: (0..n).map(|_| None).collect(), step: 0 };
        Ok(Step { model, grads, acts, opt, collective, shard: Some(shard), full: None, bounds: None, last_norm: None })
    }

    /// The fully sharded state, locked (see [`Step::fully_sharded`]).
    pub fn full_shard(&self) -> Option<Result<std::sync::MutexGuard<'_, FullShard<B>>>> {
        self.full.as_ref().map(|f| f.lock().map_err(|_| poisoned()))
    }

    /// Bytes this process holds of weights, gradients and optimizer moments (not activations):
    /// whole, or its shards of them.
    pub fn state_bytes(&self) -> Result<usize> {
        let be = self.model.backend();
        let moments = self.opt.exp_avg.iter().chain(&self.opt.exp_avg_sq).flatten();
        let own: usize = self.model.params().iter().chain(&self.grads.tensors).chain(moments).map(|b| be.len(b)).sum();
        let shard = self.shard.as_ref().map_or(0, |s| s.bytes(be));
        let full = match self.full_shard() {
            Some(f) => f?.bytes(be),
            None => 0,
        };
        Ok(4 * own + self.model.held_bytes() + shard + full)
    }

    /// Zeroes the gradients: the start of a step.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.grads.zero(self.model.backend());
        if let Some(full) = self.full_shard() {
            full?.zero_grads(self.model.backend());
        }
        Ok(())
    }

    /// Forward and backward for one micro-batch, accumulating into the gradients. Unless more
    /// micro-batches follow, the collective is told each group of trainable gradients as soon as
    /// the backward pass has finished it.
    pub fn micro_batch(&mut self, b: &Batch, loss: MicroLoss, o: MicroOptions) -> Result<LossOutput> {
        // the sums start during the backward pass in plain data parallel only (sharded, the
        // gradients are reduce-scattered into the shards after it)
        let tell = !o.accumulating && self.shard.is_none() && self.full.is_none();
        if tell {
            self.plan_grads()?;
        }
        let Step { model, grads, acts, collective, .. } = self;
        let (be, trainable) = (model.backend(), model.trainable());
        let mut failed = None;
        let mut ready = |params: &[usize], bufs: &mut [B::Buf]| {
            let params: Vec<usize> = params.iter().copied().filter(|&i| trainable[i]).collect();
            if tell && failed.is_none() && !params.is_empty() {
                failed = collective.grads_ready(be, &params, bufs).err();
            }
        };
        M::set_dropout(acts, o.dropout);
        let out = model.train_pass(acts, b, grads, loss, o.neftune, &mut ready)?;
        failed.map_or(Ok(out), Err)
    }

    /// Tells the collective the groups of gradients the backward pass reports, as `grads_ready`
    /// is told them (trainable ones only; it keeps the first plan).
    fn plan_grads(&mut self) -> Result<()> {
        if self.collective.world_size() > 1 {
            let trainable = self.model.trainable();
            let groups: Vec<Vec<usize>> = self.model.grad_groups().into_iter().map(|g| g.into_iter().filter(|&i| trainable[i]).collect()).collect();
            self.collective.plan_grads(self.model.backend(), &groups, &mut self.grads.tensors)?;
        }
        Ok(())
    }

    /// Combines the gradients across processes, then returns the global gradient norm and the
    /// clipping coefficient for `max_grad_norm` (1.0 when it is not positive: no clipping).
    pub fn grad_norm(&mut self, max_grad_norm: f32) -> Result<(f32, f32)> {
        let full_sq = match self.full_shard() {
            Some(full) => Some(full?.grad_sq(self.model.backend())?),
            None => None,
        };
        let norm = match &mut self.shard {
            _ if full_sq.is_some() => {
                let mut sq = [full_sq.unwrap_or_default()];
                self.collective.sum_f64(&mut sq)?;
                sq[0].sqrt() as f32
            }
            Some(shard) => {
                let mut sq = [shard.reduce_grads(&self.model, &mut self.grads, self.collective.as_mut())?];
                self.collective.sum_f64(&mut sq)?;
                sq[0].sqrt() as f32
            }
            None => {
                self.plan_grads()?;
                self.collective.all_reduce_grads(self.model.backend(), &mut self.grads)?;
                trainable_grad_norm(self.model.backend(), &self.grads, self.model.trainable())?
            }
        };
        self.last_norm = Some(norm);
        Ok((norm, if max_grad_norm > 0.0 { clip_coef(norm, max_grad_norm) } else { 1.0 }))
    }

    /// The AdamW update at learning rate `lr`, with the gradients multiplied by `clip_coef`
    /// (after [`Step::grad_norm`]; the gradients must be finite). Returns whether it was applied:
    /// an update that would make a parameter or a moment non-finite (an absurd learning rate, an
    /// overflow) is undone, and the parameters, moments and step count stay as they were.
    ///
    /// Bounds on the state's elements are carried from step to step ([`bounds_after_update`]),
    /// so an update the bounds vouch for costs nothing extra. When they cannot vouch for it, the
    /// state is measured (one pass over the trainable parameters and moments); if the measured
    /// bounds cannot either, the state is copied to the host, the update applied and checked, and
    /// undone when something came out non-finite.
    ///
    /// With a sharded optimizer each process updates its part, the bounds and checks are over
    /// every process's, and the updated parts are sent to every process once the update stands.
    pub fn apply(&mut self, lr: f32, clip_coef: f32) -> Result<bool> {
        if self.shard.is_none() && self.full.is_none() {
            self.opt.allocate(&self.model)?;
        }
        let g = match self.last_norm {
            Some(n) => n as f64,
            None => trainable_grad_norm(self.model.backend(), &self.grads, self.model.trainable())? as f64,
        } * clip_coef as f64;
        // the hyper-parameters of the step about to be taken
        let hp = self.opt.hyper(self.opt.step + 1, lr, clip_coef);
        let mut next = self.bounds.and_then(|b| bounds_after_update(hp, b, g));
        if next.is_none() {
            let (finite, measured) = self.state_bounds()?;
            if !finite {
                return Err(Error::Invalid("a trainable parameter or an optimizer moment is non-finite before the update".into()));
            }
            next = bounds_after_update(hp, measured, g);
        }
        let backup = if next.is_none() { Some(self.download_state()?) } else { None };
        // from here part of the update may stand when an error comes: running out of memory is
        // then no reason to retry the step with a smaller batch (`auto_find_batch_size` retries
        // `Error::OutOfMemory` only), which would apply the update again
        let in_update = |e: Error| match e {
            Error::OutOfMemory(why) => {
                Error::Device(format!("{why} (in the optimizer's update, which does not run again with a smaller batch: the last checkpoint is as it was)"))
            }
            e => e,
        };
        match (&mut self.shard, self.full.as_ref()) {
            (_, Some(full)) => {
                self.opt.step += 1;
                full.lock().map_err(|_| poisoned())?.update(self.model.backend(), hp).map_err(in_update)?;
            }
            (Some(shard), None) => {
                self.opt.step += 1;
                shard.update(&mut self.model, &self.grads, hp).map_err(in_update)?;
            }
            (None, None) => self.opt.step(&mut self.model, &self.grads, lr, clip_coef).map_err(in_update)?,
        }
        let finite = match next {
            Some(_) => true,
            None => {
                let (finite, after) = self.state_bounds().map_err(in_update)?;
                next = Some(after);
                finite
            }
        };
        if finite {
            self.bounds = next;
            if let Some(shard) = &mut self.shard {
                shard.share_weights(&mut self.model, self.collective.as_mut()).map_err(in_update)?;
            }
            return Ok(true);
        }
        self.restore_state(backup.unwrap_or_default()).map_err(in_update)?;
        self.opt.step -= 1;
        Ok(false)
    }

    /// Puts back the state [`Step::download_state`] copied.
    fn restore_state(&mut self, backup: Vec<(usize, [Vec<f32>; 3])>) -> Result<()> {
        if let Some(full) = self.full_shard() {
            return full?.restore(self.model.backend(), backup.into_iter().map(|b| b.1).collect());
        }
        if let Some(shard) = &mut self.shard {
            return shard.restore(&mut self.model, backup.into_iter().map(|b| b.1).collect());
        }
        for (i, [p, m, v]) in backup {
            let pm = self.model.params_mut();
            let be = pm.backend;
            pm.params[i] = be.upload(&p)?;
            self.opt.exp_avg[i] = Some(be.upload(&m)?);
            self.opt.exp_avg_sq[i] = Some(be.upload(&v)?);
        }
        Ok(())
    }

    /// Forgets the bounds of the parameters and moments, after something replaced them (a
    /// checkpoint was loaded): the next update measures them again.
    pub fn state_replaced(&mut self) {
        self.bounds = None;
    }

    /// The trainable parameters, first and second moments on the host, by parameter index.
    /// (With a sharded optimizer: this process's pieces, numbered in order.)
    fn download_state(&mut self) -> Result<Vec<(usize, [Vec<f32>; 3])>> {
        if let Some(full) = self.full_shard() {
            return Ok(full?.backup(self.model.backend())?.into_iter().enumerate().collect());
        }
        if let Some(shard) = &mut self.shard {
            return Ok(shard.backup(&mut self.model)?.into_iter().enumerate().collect());
        }
        let (be, opt, params) = (self.model.backend(), &self.opt, self.model.params());
        let mut out = Vec::new();
        for i in (0..params.len()).filter(|&i| self.model.trainable()[i]) {
            let (Some(m), Some(v)) = (&opt.exp_avg[i], &opt.exp_avg_sq[i]) else { continue };
            out.push((i, [be.download(&params[i])?, be.download(m)?, be.download(v)?]));
        }
        Ok(out)
    }

    /// Whether every trainable parameter and moment is finite, and the largest L2 norm of a
    /// parameter, of a first moment and of a second moment (a sum of squares in f64 is finite
    /// exactly when every f32 element is).
    ///
    /// With a sharded optimizer: the L2 norms of all the weights, all first and all second
    /// moments, over every process (bounds too, if looser), and whether every process's are finite.
    fn state_bounds(&mut self) -> Result<(bool, [f64; 3])> {
        let full = match self.full_shard() {
            Some(full) => Some(full?.state_sums(self.model.backend())?),
            None => None,
        };
        if let Some(mut sums) = full {
            self.collective.sum_f64(&mut sums)?;
            return Ok((sums.iter().all(|s| s.is_finite()), sums.map(f64::sqrt)));
        }
        if let Some(shard) = &mut self.shard {
            let mut sums = shard.state_sums(&mut self.model)?;
            self.collective.sum_f64(&mut sums)?;
            return Ok((sums.iter().all(|s| s.is_finite()), sums.map(f64::sqrt)));
        }
        let (model, opt) = (&self.model, &self.opt);
        let (params, trainable) = (model.params(), model.trainable());
        let mut bufs = Vec::new();
        for i in (0..params.len()).filter(|&i| trainable[i]) {
            if let (Some(m), Some(v)) = (&opt.exp_avg[i], &opt.exp_avg_sq[i]) {
                bufs.extend([&params[i], m, v]);
            }
        }
        let sums = model.backend().sum_squares_multi(&bufs)?;
        let finite = sums.iter().all(|s| s.is_finite());
        let mut bounds = [0.0f64; 3];
        for (k, s) in sums.iter().enumerate() {
            bounds[k % 3] = bounds[k % 3].max(s.sqrt());
        }
        Ok((finite, bounds))
    }

    /// A whole step with the built-in loss over the micro-batches of one accumulation window:
    /// the loss is normalised by the window's label tokens (`num_items_in_batch`), and the update
    /// is skipped when the loss or the gradient norm is not finite.
    ///
    /// In a data parallel run each process passes its share of the window; the label tokens and
    /// the loss are summed over the processes.
    pub fn run(&mut self, window: &[Batch], loss: LossOptions, lr: f32, max_grad_norm: f32) -> Result<StepReport> {
        let mut items = [window.iter().map(label_tokens).sum::<usize>() as f64];
        self.collective.sum_f64(&mut items)?;
        let items = items[0] as usize;
        if items == 0 {
            return Err(Error::Invalid("the batches of this accumulation window have no label tokens".into()));
        }
        self.zero_grad()?;
        let mut sum = 0.0;
        for (i, b) in window.iter().enumerate() {
            let o = MicroOptions { neftune: None, accumulating: i + 1 < window.len(), dropout: None };
            sum += self.micro_batch(b, MicroLoss::BuiltIn(LossOptions { num_items_in_batch: Some(items), ..loss }), o)?.sum;
        }
        let mut sum = [sum];
        self.collective.sum_f64(&mut sum)?;
        let loss = sum[0] / items as f64;
        let (grad_norm, clip_coef) = self.grad_norm(max_grad_norm)?;
        let applied = loss.is_finite() && grad_norm.is_finite() && self.apply(lr, clip_coef)?;
        Ok(StepReport { loss, grad_norm, clip_coef, applied })
    }
}

impl<B: Backend> Step<B, Model<B>> {
    /// [`Step::with_workspace`] with the weights, gradients and optimizer sharded over
    /// `collective`'s processes ([`FullShard`]): the model's whole weights are dropped once this
    /// process has taken its pieces, and no gradient or moment is ever allocated whole.
    ///
    /// `stash`: this process's pieces, when they were cut as the model was made (its buffers
    /// are then empty already).
    pub fn fully_sharded(
        mut model: Model<B>,
        opt: AdamWConfig,
        collective: Box<dyn Collective<B>>,
        batch: usize,
        seq: usize,
        stash: Option<PieceStash>,
    ) -> Result<Self> {
        let acts = model.workspace(batch, seq)?;
        let n = model.params.len();
        let mut grads = Grads { tensors: (0..n).map(|_| model.backend.zeros(0)).collect::<Result<_>>()? };
        let full = FullShard::install(&mut model, &mut grads, collective.as_ref(), stash)?;
        let opt = AdamW { config: opt, exp_avg: (0..n).map(|_| None).collect(), exp_avg_sq: (0..n).map(|_| None).collect(), step: 0 };
        Ok(Step { model, grads, acts, opt, collective, shard: None, full: Some(full), bounds: None, last_norm: None })
    }
}
