//! The weights sharded over the processes too (`fsdp = "full_shard"`, ZeRO stage 3). The
//! parameters are cut into pieces as the sharded optimizer cuts them (`shard.rs`: laid end to
//! end, N equal parts, mid-tensor where a boundary falls); process r keeps the weights, the
//! accumulated gradients and the AdamW moments of part r only, and the model's own buffers stay
//! empty. As the model's [`Residency`], a [`FullShard`] makes a unit's parameters whole just before
//! the unit runs (each piece sent from its owner) and frees them after; in the backward pass each
//! unit's gradients are summed into their owners' pieces as soon as the unit is done, and freed.
//! A process therefore holds its part of everything plus one unit's weights and gradients (the
//! tied embedding's gradient lives from the head to the embedding's backward pass).
//!
//! Saving gathers one tensor at a time on rank 0 while the other processes serve its requests
//! ([`FullShard::whole`], [`FullShard::serve`]).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::collective::Collective;
use super::shard::{on_host, partition, partition_of, Piece};
use crate::backend::{AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::model::residency::Residency;
use crate::model::{Grads, Model};

/// What a save asks for of a parameter: its weights or one of its moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Weight = 0,
    ExpAvg = 1,
    ExpAvgSq = 2,
}

/// The request that ends [`FullShard::serve`].
const END: u8 = 255;

/// This process's pieces of the weights, cut from each whole tensor as the model is loaded or
/// initialised ([`PieceStash::keep`], passed to [`Model::load_keeping`] or
/// [`Model::from_each`]), so that no process ever holds the whole model; the model keeps empty
/// buffers, and [`FullShard::install`] takes the pieces.
pub struct PieceStash {
    pieces: Vec<Piece>,
    rank: usize,
    /// This process's pieces, in order (empty until their tensor has come).
    kept: Vec<Vec<f32>>,
}

impl PieceStash {
    /// The pieces of process `rank` of `world` of every parameter of `layout`.
    pub fn new(layout: &crate::model::Layout, rank: usize, world: usize) -> Self {
        let order: Vec<(usize, usize)> = layout.specs.iter().map(|s| s.numel()).enumerate().collect();
        let pieces = partition_of(&order, world);
        let kept = vec![Vec::new(); pieces.iter().filter(|p| p.owner == rank).count()];
        PieceStash { pieces, rank, kept }
    }

    /// Keeps this process's pieces of parameter `i`'s values `t`; what the model holds of it:
    /// nothing.
    pub fn keep(&mut self, i: usize, t: Vec<f32>) -> Vec<f32> {
        let mine = self.pieces.iter().filter(|p| p.owner == self.rank);
        for (p, kept) in mine.zip(self.kept.iter_mut()).filter(|(p, _)| p.param == i) {
            *kept = t[p.start..p.start + p.len].to_vec();
        }
        Vec::new()
    }
}

/// This process's part of a fully sharded model and its optimizer.
pub struct FullShard<B: Backend> {
    pieces: Vec<Piece>,
    /// Per parameter: its pieces' range in `pieces`.
    ranges: Vec<Range<usize>>,
    numel: Vec<usize>,
    decay: Vec<bool>,
    /// Per piece: its place among this process's pieces (`None`: another process owns it).
    own: Vec<Option<usize>>,
    /// This process's pieces, in order: weights, accumulated gradients, first and second moments.
    w: Vec<B::Buf>,
    g: Vec<B::Buf>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// The parameters a pass has fetched, whole; an empty buffer for every other.
    work: Vec<B::Buf>,
    collective: Box<dyn Collective<B>>,
}

fn empty<B: Backend>(be: &B) -> Result<B::Buf> {
    be.zeros(0)
}

impl<B: Backend> FullShard<B> {
    /// Shards `model` over `collective`'s processes: this process keeps its pieces of the
    /// weights (from `stash`, cut as the model was made; else from the model's whole weights,
    /// the same on every process), the model's buffers and `grads`' are emptied, and the model
    /// fetches through the returned shard from now on.
    pub fn install(model: &mut Model<B>, grads: &mut Grads<B>, collective: &dyn Collective<B>, stash: Option<PieceStash>) -> Result<Arc<Mutex<Self>>> {
        if let Some(i) = model.trainable.iter().position(|t| !t) {
            return Err(Error::Unsupported(format!(
                "fsdp `full_shard` with frozen parameters (here `{}`; an adapter run freezes the base) is not supported: use `shard_grad_op`",
                model.layout.specs[i].name
            )));
        }
        let (rank, world) = (collective.rank(), collective.world_size());
        let pieces = partition(model, world);
        let n = model.params.len();
        let mut ranges = vec![0..0; n];
        let mut own = Vec::with_capacity(pieces.len());
        let mut count = 0;
        for (k, p) in pieces.iter().enumerate() {
            let r = &mut ranges[p.param];
            *r = if r.start == r.end { k..k + 1 } else { r.start..k + 1 };
            own.push((p.owner == rank).then(|| {
                count += 1;
                count - 1
            }));
        }
        let be = &model.backend;
        let zeros = || -> Result<Vec<B::Buf>> { pieces.iter().filter(|p| p.owner == rank).map(|p| be.zeros(p.len)).collect() };
        let (w, g, m, v) = (zeros()?, zeros()?, zeros()?, zeros()?);
        let mut shard = FullShard {
            numel: model.layout.specs.iter().map(|s| s.numel()).collect(),
            decay: model.layout.specs.iter().map(|s| s.decay).collect(),
            w,
            g,
            m,
            v,
            work: (0..n).map(|_| empty(be)).collect::<Result<_>>()?,
            collective: collective.duplicate()?,
            pieces,
            ranges,
            own,
        };
        match stash {
            Some(stash) => {
                if stash.pieces.len() != shard.pieces.len() || stash.kept.len() != shard.w.len() {
                    return Err(Error::Invalid("the weights were cut for another number of processes".into()));
                }
                for (w, kept) in shard.w.iter_mut().zip(stash.kept) {
                    if kept.len() != be.len(w) {
                        return Err(Error::Invalid("a piece of the weights was not given when the model was made".into()));
                    }
                    *w = be.upload_vec(kept)?;
                }
            }
            None => shard.take_weights(be, &mut model.params)?,
        }
        for t in &mut grads.tensors {
            *t = empty(be)?;
        }
        let shared = Arc::new(Mutex::new(shard));
        model.residency = Some(shared.clone());
        Ok(shared)
    }

    /// Takes this process's pieces of whole weights (`params`, by parameter: as loaded from a
    /// checkpoint) and empties the buffers.
    pub fn take_weights(&mut self, be: &B, params: &mut [B::Buf]) -> Result<()> {
        for (p, own) in self.pieces.iter().zip(&self.own) {
            if let Some(o) = *own {
                if be.len(&params[p.param]) != self.numel[p.param] {
                    return Err(Error::Invalid(format!("parameter {} is not whole: it cannot be sharded", p.param)));
                }
                be.copy_range(&mut self.w[o], 0, &params[p.param], p.start, p.len);
            }
        }
        for t in params.iter_mut() {
            *t = empty(be)?;
        }
        Ok(())
    }

    /// Takes this process's pieces of parameter `i`'s whole weights or moment `t` (read from a
    /// checkpoint a tensor at a time).
    pub fn take_tensor(&mut self, be: &B, part: Part, i: usize, t: &[f32]) -> Result<()> {
        if t.len() != self.numel[i] {
            return Err(Error::Invalid(format!("parameter {i}: {} values given, {} expected", t.len(), self.numel[i])));
        }
        for k in self.ranges[i].clone() {
            let (p, Some(o)) = (self.pieces[k], self.own[k]) else { continue };
            let dst = match part {
                Part::Weight => &mut self.w[o],
                Part::ExpAvg => &mut self.m[o],
                Part::ExpAvgSq => &mut self.v[o],
            };
            *dst = be.upload(&t[p.start..p.start + p.len])?;
        }
        Ok(())
    }

    /// Zeroes this process's accumulated gradients: the start of a step.
    pub fn zero_grads(&mut self, be: &B) {
        self.g.iter_mut().for_each(|g| be.fill(g, 0.0));
    }

    /// The sum of squares of this process's gradient pieces.
    pub fn grad_sq(&mut self, be: &B) -> Result<f64> {
        Ok(be.sum_squares_multi(&self.g.iter().collect::<Vec<_>>())?.iter().sum())
    }

    /// One AdamW step (`hp`, the clipping folded in) of this process's pieces.
    pub fn update(&mut self, be: &B, hp: AdamWStep) -> Result<()> {
        let FullShard { pieces, own, w, g, m, v, decay, .. } = self;
        for (p, o) in pieces.iter().zip(own.iter()).filter_map(|(p, o)| o.map(|o| (p, o))) {
            be.adamw_range(&mut w[o], &g[o], 0, &mut m[o], &mut v[o], hp, decay[p.param])?;
        }
        Ok(())
    }

    /// The sums of squares of this process's pieces of the weights, first and second moments.
    pub fn state_sums(&mut self, be: &B) -> Result<[f64; 3]> {
        let sums = |bufs: &[B::Buf]| -> Result<f64> { Ok(be.sum_squares_multi(&bufs.iter().collect::<Vec<_>>())?.iter().sum()) };
        Ok([sums(&self.w)?, sums(&self.m)?, sums(&self.v)?])
    }

    /// A copy of this process's pieces (weights, moments), and [`FullShard::restore`].
    pub fn backup(&self, be: &B) -> Result<Vec<[Vec<f32>; 3]>> {
        (0..self.w.len()).map(|o| Ok([be.download(&self.w[o])?, be.download(&self.m[o])?, be.download(&self.v[o])?])).collect()
    }

    pub fn restore(&mut self, be: &B, backup: Vec<[Vec<f32>; 3]>) -> Result<()> {
        for (o, [w, m, v]) in backup.into_iter().enumerate() {
            (self.w[o], self.m[o], self.v[o]) = (be.upload(&w)?, be.upload(&m)?, be.upload(&v)?);
        }
        Ok(())
    }

    /// Parameter `i`'s weights or moment, whole, on every process (each piece sent from its
    /// owner). Every process calls it, in the same order.
    fn gather(&mut self, be: &B, part: Part, i: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.numel[i]];
        for k in self.ranges[i].clone() {
            let p = self.pieces[k];
            let dst = &mut out[p.start..p.start + p.len];
            if let Some(o) = self.own[k] {
                let src = match part {
                    Part::Weight => &self.w[o],
                    Part::ExpAvg => &self.m[o],
                    Part::ExpAvgSq => &self.v[o],
                };
                dst.copy_from_slice(&be.download(src)?);
            }
            self.collective.broadcast_from(p.owner, dst)?;
        }
        Ok(out)
    }

    /// On rank 0, while every other process is in [`FullShard::serve`]: parameter `i`'s weights
    /// or moment, whole.
    pub fn whole(&mut self, be: &B, part: Part, i: usize) -> Result<Vec<f32>> {
        let mut req = [vec![part as u8], (i as u64).to_le_bytes().to_vec()].concat();
        self.collective.broadcast_bytes(&mut req)?;
        self.gather(be, part, i)
    }

    /// On rank 0: ends the other processes' [`FullShard::serve`].
    pub fn end_serving(&mut self) -> Result<()> {
        self.collective.broadcast_bytes(&mut vec![END])
    }

    /// On the processes other than rank 0: takes part in each of rank 0's [`FullShard::whole`]
    /// until [`FullShard::end_serving`].
    pub fn serve(&mut self, be: &B) -> Result<()> {
        loop {
            let mut req = Vec::new();
            self.collective.broadcast_bytes(&mut req)?;
            let part = match req.first() {
                Some(0) => Part::Weight,
                Some(1) => Part::ExpAvg,
                Some(2) => Part::ExpAvgSq,
                _ => return Ok(()),
            };
            let i = req.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(u64::MAX) as usize;
            if i >= self.numel.len() {
                return Err(Error::Invalid(format!("rank 0 asked for parameter {i}, which does not exist")));
            }
            self.gather(be, part, i)?;
        }
    }

    /// Bytes this process holds of weights, gradients and moments (its pieces, and what a pass
    /// has fetched and not yet released).
    pub fn bytes(&self, be: &B) -> usize {
        4 * [&self.w, &self.g, &self.m, &self.v, &self.work].iter().flat_map(|v| v.iter()).map(|b| be.len(b)).sum::<usize>()
    }
}

impl<B: Backend> Residency<B> for FullShard<B> {
    fn params(&self) -> &[B::Buf] {
        &self.work
    }

    fn fetch(&mut self, be: &B, idx: &[usize]) -> Result<()> {
        let FullShard { pieces, ranges, numel, own, w, work, collective, .. } = self;
        for &i in idx {
            if be.len(&work[i]) == numel[i] {
                continue;
            }
            let mut buf = be.zeros(numel[i])?;
            for k in ranges[i].clone() {
                let p = pieces[k];
                if let Some(o) = own[k] {
                    be.copy_range(&mut buf, p.start, &w[o], 0, p.len);
                }
                collective.broadcast_buf_from(be, p.owner, &mut buf, p.start, p.len)?;
            }
            work[i] = buf;
        }
        Ok(())
    }

    fn release(&mut self, be: &B, idx: &[usize]) -> Result<()> {
        for &i in idx {
            // (a frozen weight's working copy goes with it: the next layer's gather may not take
            // this memory, which is what would drop the copy otherwise)
            be.drop_working_copy(&self.work[i]);
            self.work[i] = empty(be)?;
        }
        Ok(())
    }

    fn fetch_grads(&mut self, be: &B, grads: &mut [B::Buf], idx: &[usize]) -> Result<()> {
        for &i in idx {
            if be.len(&grads[i]) == 0 {
                grads[i] = be.zeros(self.numel[i])?;
            }
        }
        Ok(())
    }

    fn grads_done(&mut self, be: &B, grads: &mut [B::Buf], idx: &[usize]) -> Result<()> {
        let FullShard { pieces, ranges, own, g, collective, .. } = self;
        for &i in idx {
            if be.len(&grads[i]) == 0 {
                continue;
            }
            for k in ranges[i].clone() {
                let p = pieces[k];
                collective.reduce_buf_to(be, p.owner, &mut grads[i], p.start, p.len)?;
                if let Some(o) = own[k] {
                    on_host(be, &mut grads[i], p.start, p.len, false, |src| {
                        on_host(be, &mut g[o], 0, p.len, true, |acc| {
                            acc.iter_mut().zip(src.iter()).for_each(|(a, s)| *a += s);
                            Ok(())
                        })
                    })?;
                }
            }
            grads[i] = empty(be)?;
        }
        Ok(())
    }
}
