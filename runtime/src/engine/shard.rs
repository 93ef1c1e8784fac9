//! The optimizer sharded over the processes of a data parallel run (`fsdp = "shard_grad_op"`,
//! ZeRO stage 2): the trainable parameters are laid end to end in one flat order and cut into as
//! many equal parts as there are processes (mid-tensor where a boundary falls), and process r owns
//! part r. The gradients of each piece are summed into its owner only; the owner keeps AdamW's
//! moments for its part alone, updates its part of the weights in place, and sends each updated
//! piece to every process. Each piece is computed by one process, so every process ends with the
//! same bits.

use super::collective::Collective;
use crate::backend::{AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::model::{Grads, ParamSet};

/// A piece of one tensor owned by one process: elements `start..start + len` of parameter `param`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece {
    pub param: usize,
    pub start: usize,
    pub len: usize,
    pub owner: usize,
}

/// The trainable parameters of `model` laid end to end and cut into `world` equal parts: every
/// piece, in the flat order.
pub(super) fn partition<B: Backend>(model: &dyn ParamSet<B>, world: usize) -> Vec<Piece> {
    let trainable = model.trainable();
    let order: Vec<(usize, usize)> = model.specs().iter().enumerate().filter(|(i, _)| trainable[*i]).map(|(i, s)| (i, s.numel())).collect();
    partition_of(&order, world)
}

/// [`partition`] of the parameters `order` (index, elements), in that order.
pub(super) fn partition_of(order: &[(usize, usize)], world: usize) -> Vec<Piece> {
    let total: usize = order.iter().map(|o| o.1).sum();
    let part = total.div_ceil(world.max(1)).max(1);
    let mut pieces = Vec::new();
    let mut at = 0;
    for &(param, n) in order {
        let mut start = 0;
        while start < n {
            let owner = (at + start) / part;
            let len = ((owner + 1) * part - (at + start)).min(n - start);
            pieces.push(Piece { param, start, len, owner });
            start += len;
        }
        at += n;
    }
    pieces
}

/// This process's view of the sharded optimizer: every piece (in the flat order), and the
/// moments of its own.
pub struct Shard<B: Backend> {
    pieces: Vec<Piece>,
    rank: usize,
    /// The first and second moments of this process's pieces, in order.
    exp_avg: Vec<B::Buf>,
    exp_avg_sq: Vec<B::Buf>,
}

/// Runs `f` on elements `start..start + len` of `buf` on the host: in place when the buffer lives
/// there, else on a copy that is written back when `write` is set.
pub(super) fn on_host<B: Backend, T>(be: &B, buf: &mut B::Buf, start: usize, len: usize, write: bool, f: impl FnOnce(&mut [f32]) -> Result<T>) -> Result<T> {
    if let Some(host) = be.host_mut(buf) {
        return f(&mut host[start..start + len]);
    }
    let mut host = be.download(buf)?;
    let out = f(&mut host[start..start + len])?;
    if write {
        *buf = be.upload(&host)?;
    }
    Ok(out)
}

pub(super) fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

impl<B: Backend> Shard<B> {
    /// Process `rank`'s view over `world` processes, with zeroed moments.
    pub fn new(model: &dyn ParamSet<B>, rank: usize, world: usize) -> Result<Self> {
        let pieces = partition(model, world);
        let mine: Vec<&Piece> = pieces.iter().filter(|p| p.owner == rank).collect();
        let be = model.backend();
        let exp_avg = mine.iter().map(|p| be.zeros(p.len)).collect::<Result<_>>()?;
        let exp_avg_sq = mine.iter().map(|p| be.zeros(p.len)).collect::<Result<_>>()?;
        Ok(Shard { pieces, rank, exp_avg, exp_avg_sq })
    }

    /// Bytes of the moments this process holds.
    pub fn bytes(&self, be: &B) -> usize {
        4 * self.exp_avg.iter().chain(&self.exp_avg_sq).map(|b| be.len(b)).sum::<usize>()
    }

    fn mine(&self) -> impl Iterator<Item = &Piece> {
        self.pieces.iter().filter(move |p| p.owner == self.rank)
    }

    /// Sums each piece's gradient over the processes into its owner's gradient buffer; returns
    /// the sum of squares of this process's pieces (the others' gradients are left partial).
    pub fn reduce_grads(&mut self, model: &dyn ParamSet<B>, grads: &mut Grads<B>, collective: &mut dyn Collective<B>) -> Result<f64> {
        let be = model.backend();
        let mut sq = 0.0;
        for p in &self.pieces {
            collective.reduce_buf_to(be, p.owner, &mut grads.tensors[p.param], p.start, p.len)?;
            if p.owner == self.rank {
                sq += on_host(be, &mut grads.tensors[p.param], p.start, p.len, false, |g| Ok(sum_squares(g)))?;
            }
        }
        Ok(sq)
    }

    /// One AdamW step (`hp`, the clipping folded in) of this process's pieces, in place.
    pub fn update(&mut self, model: &mut dyn ParamSet<B>, grads: &Grads<B>, hp: AdamWStep) -> Result<()> {
        let pm = model.params_mut();
        let be = pm.backend;
        let mine: Vec<Piece> = self.mine().copied().collect();
        for ((p, m), v) in mine.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
            let decay = pm.specs[p.param].decay;
            be.adamw_range(&mut pm.params[p.param], &grads.tensors[p.param], p.start, m, v, hp, decay)?;
        }
        Ok(())
    }

    /// Sends every piece of the weights from its owner to every process (after an update).
    pub fn share_weights(&mut self, model: &mut dyn ParamSet<B>, collective: &mut dyn Collective<B>) -> Result<()> {
        let pm = model.params_mut();
        let be = pm.backend;
        for p in &self.pieces {
            collective.broadcast_buf_from(be, p.owner, &mut pm.params[p.param], p.start, p.len)?;
        }
        Ok(())
    }

    /// The sums of squares of this process's pieces of the weights, first and second moments.
    pub fn state_sums(&mut self, model: &mut dyn ParamSet<B>) -> Result<[f64; 3]> {
        let pm = model.params_mut();
        let be = pm.backend;
        let mut w = 0.0;
        for p in self.pieces.iter().filter(|p| p.owner == self.rank) {
            w += on_host(be, &mut pm.params[p.param], p.start, p.len, false, |x| Ok(sum_squares(x)))?;
        }
        let sums = |bufs: &[B::Buf]| -> Result<f64> { Ok(be.sum_squares_multi(&bufs.iter().collect::<Vec<_>>())?.iter().sum()) };
        Ok([w, sums(&self.exp_avg)?, sums(&self.exp_avg_sq)?])
    }

    /// A copy of this process's pieces of the weights and its moments, and [`Shard::restore`].
    pub fn backup(&mut self, model: &mut dyn ParamSet<B>) -> Result<Vec<[Vec<f32>; 3]>> {
        let pm = model.params_mut();
        let be = pm.backend;
        let mine: Vec<Piece> = self.mine().copied().collect();
        let mut out = Vec::new();
        for ((p, m), v) in mine.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            let w = on_host(be, &mut pm.params[p.param], p.start, p.len, false, |x| Ok(x.to_vec()))?;
            out.push([w, be.download(m)?, be.download(v)?]);
        }
        Ok(out)
    }

    pub fn restore(&mut self, model: &mut dyn ParamSet<B>, backup: Vec<[Vec<f32>; 3]>) -> Result<()> {
        let pm = model.params_mut();
        let be = pm.backend;
        let mine: Vec<Piece> = self.mine().copied().collect();
        for (((p, m), v), [w, bm, bv]) in mine.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq).zip(backup) {
            on_host(be, &mut pm.params[p.param], p.start, p.len, true, |x| {
                x.copy_from_slice(&w);
                Ok(())
            })?;
            *m = be.upload(&bm)?;
            *v = be.upload(&bv)?;
        }
        Ok(())
    }

    /// Every parameter's moments (`None` for a frozen one), gathered on rank 0, tensor by tensor
    /// (each piece sent from its owner); `None` on the other processes. Every process calls it.
    #[allow(clippy::type_complexity)] // per parameter: (first, second) moment
    pub fn gather_moments(&mut self, model: &dyn ParamSet<B>, collective: &mut dyn Collective<B>) -> Result<Option<Vec<Option<(Vec<f32>, Vec<f32>)>>>> {
        let be = model.backend();
        let mut out: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; model.specs().len()];
        let mut k = 0;
        for (i, p) in self.pieces.iter().enumerate() {
            let n = model.specs()[p.param].numel();
            let slot = out[p.param].get_or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
            let own = p.owner == self.rank;
            for (full, mine) in [(&mut slot.0, &self.exp_avg), (&mut slot.1, &self.exp_avg_sq)] {
                let dst = &mut full[p.start..p.start + p.len];
                if own {
                    dst.copy_from_slice(&be.download(&mine[k])?);
                }
                collective.broadcast_from(p.owner, dst)?;
            }
            k += usize::from(own);
            // the other processes hold one tensor at a time
            let last_of_tensor = self.pieces.get(i + 1).is_none_or(|q| q.param != p.param);
            if collective.rank() != 0 && last_of_tensor {
                out[p.param] = None;
            }
        }
        Ok((collective.rank() == 0).then_some(out))
    }

    /// Takes this process's pieces of full moments (by parameter, as a checkpoint holds them).
    pub fn load_moments(&mut self, model: &dyn ParamSet<B>, exp_avg: &[Option<B::Buf>], exp_avg_sq: &[Option<B::Buf>]) -> Result<()> {
        let be = model.backend();
        let mine: Vec<Piece> = self.mine().copied().collect();
        for ((p, m), v) in mine.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
            let (fm, fv) = match (&exp_avg[p.param], &exp_avg_sq[p.param]) {
                (Some(fm), Some(fv)) => (fm, fv),
                // none yet (a fresh start): the zeroed moments stay
                (None, None) => continue,
                _ => return Err(Error::Invalid(format!("one moment only for parameter {}", model.specs()[p.param].name))),
            };
            be.copy_range(m, 0, fm, p.start, p.len);
            be.copy_range(v, 0, fv, p.start, p.len);
        }
        Ok(())
    }
}
