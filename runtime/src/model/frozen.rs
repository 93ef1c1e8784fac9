//! Frozen weights held in bf16: with a LoRA adapter and `torch_dtype = "bfloat16"`, the base
//! model's weights do not train and were rounded to bf16 on load, so two bytes per value hold
//! them exactly. [`Model::hold_frozen_in_bf16`] moves them out of the model's f32 buffers; the
//! passes' [`Model::with_params`] makes a unit's held weights f32 just before the unit runs and
//! frees them after, so one unit's weights at a time exist in f32. The values the passes see are
//! the same bits as before, so training is bit for bit unchanged.

use std::sync::Mutex;

use half::{bf16, slice::HalfFloatSliceExt};

use super::activations::Activations;
use super::io::Dtype;
use super::Model;
use crate::backend::{Backend, ColBlock};
use crate::error::{Error, Result};
use crate::nn::{ParamBufs, Params};

/// The f32 values of a held LM head made at a time in training and evaluation (2 MiB): the
/// head's rows a block at a time, so the whole head never exists in f32.
const HEAD_BLOCK_FLOATS: usize = 1 << 19;

/// The parameters held in bf16, and the f32 copies of those a unit is running with.
pub struct FrozenBf16<B: Backend> {
    /// Per parameter: its values, when held here (the model's buffer is then empty).
    half: Vec<Option<Vec<bf16>>>,
    expanded: Mutex<Vec<Option<B::Buf>>>,
    /// f32 buffers a unit's weights were made in, kept for the next unit's of the same size
    /// (every layer has the same shapes, so this holds one layer's worth), so that a step does
    /// not allocate and fault in fresh memory for each layer (the allocator may give a freed
    /// layer's memory back to the system at once).
    spare: Mutex<Vec<B::Buf>>,
    /// Rows of a held LM head made f32 at a time by the fused head and loss (`None`:
    /// [`HEAD_BLOCK_FLOATS`] worth; all of them: the head runs as an f32 one would).
    pub head_block_rows: Option<usize>,
}

impl<B: Backend> FrozenBf16<B> {
    /// Bytes held (two per value).
    pub fn bytes(&self) -> usize {
        self.half.iter().flatten().map(|h| 2 * h.len()).sum()
    }

    fn values(&self, i: usize) -> Option<Vec<f32>> {
        self.half.get(i)?.as_ref().map(|h| h.iter().map(|v| v.to_f32()).collect())
    }

    fn held(&self, i: usize) -> Option<&[bf16]> {
        self.half.get(i)?.as_deref()
    }
}

/// Writes `src` as f32 into `buf` from value `at` on, which must fit (in place on a host
/// backend; through an upload otherwise).
fn widen_into<B: Backend>(be: &B, buf: &mut B::Buf, at: usize, src: &[bf16]) -> Result<()> {
    let end = at + src.len();
    if be.len(buf) < end {
        return Err(Error::Invalid(format!("{end} values do not fit a buffer of {}", be.len(buf))));
    }
    if let Some(h) = be.host_mut(buf) {
        src.convert_to_f32_slice(&mut h[at..end]);
        return Ok(());
    }
    let mut v = vec![0.0f32; src.len()];
    src.convert_to_f32_slice(&mut v);
    be.copy_range(buf, at, &be.upload_vec(v)?, 0, src.len());
    Ok(())
}

/// A buffer of at least `need` values: `spare` itself when it is that long (scratch free
/// meanwhile, left empty until [`give_back`]), a new one otherwise.
fn lend<B: Backend>(be: &B, spare: &mut B::Buf, need: usize) -> Result<(B::Buf, bool)> {
    Ok(if be.len(spare) >= need { (std::mem::replace(spare, be.zeros(0)?), true) } else { (be.zeros(need)?, false) })
}

/// Returns a buffer [`lend`] took from `spare`.
fn give_back<T>(spare: &mut T, (buf, lent): (T, bool)) {
    if lent {
        *spare = buf;
    }
}

/// The column blocks of `[n, v]` logits that a head made f32 `vb` rows at a time fills.
fn head_blocks(n: usize, v: usize, vb: usize) -> impl Iterator<Item = ColBlock> {
    (0..v).step_by(vb).map(move |v0| ColBlock { rows: n, width: vb.min(v - v0), ld: v, off: v0 })
}

impl<B: Backend> Model<B> {
    /// With a LoRA adapter on the CPU backend and bf16 weights (`torch_dtype = "bfloat16"`, or a
    /// bf16 checkpoint), holds the frozen base in bf16 ([`Model::hold_frozen_in_bf16`]); otherwise
    /// does nothing. Returns the bytes saved.
    pub fn hold_frozen_base(&mut self) -> Result<usize> {
        if self.lora.is_none() || self.dtype != Dtype::BF16 || self.backend.name() != "cpu" || self.residency.is_some() || self.frozen.is_some() {
            return Ok(0);
        }
        let saved = self.hold_frozen_in_bf16()?;
        tracing::info!("the frozen base weights are held in bf16 ({:.1} MiB less)", saved as f64 / (1 << 20) as f64);
        Ok(saved)
    }

    /// Moves every frozen parameter into bf16 storage and returns how many bytes that saves.
    /// Only for weights that are bf16 values already (`torch_dtype = "bfloat16"`): a value that
    /// bf16 does not hold exactly is an error, and nothing is moved.
    pub fn hold_frozen_in_bf16(&mut self) -> Result<usize> {
        if self.residency.is_some() {
            return Err(Error::Unsupported("bf16-held frozen weights with sharded weights (fsdp = \"full_shard\")".into()));
        }
        let be = &self.backend;
        let mut half = Vec::with_capacity(self.params.len());
        for (i, (p, &trains)) in self.params.iter().zip(&self.trainable).enumerate() {
            if trains || be.len(p) == 0 {
                half.push(None);
                continue;
            }
            let values = be.download(p)?;
            let h: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            if let Some(j) = h.iter().zip(&values).position(|(h, v)| h.to_f32().to_bits() != v.to_bits()) {
                return Err(Error::Invalid(format!(
                    "`{}` value {} at {j} is not a bf16 value: frozen weights are held in bf16 only when torch_dtype = \"bfloat16\" rounded them on load",
                    self.layout.specs[i].name, values[j]
                )));
            }
            half.push(Some(h));
        }
        for (p, h) in self.params.iter_mut().zip(&half) {
            if h.is_some() {
                *p = be.zeros(0)?;
            }
        }
        let n = half.len();
        let frozen = FrozenBf16 { half, expanded: Mutex::new((0..n).map(|_| None).collect()), spare: Mutex::new(Vec::new()), head_block_rows: None };
        // two bytes a value instead of four
        let saved = frozen.bytes();
        self.frozen = Some(frozen);
        Ok(saved)
    }

    /// Parameter `i`'s values as host f32, wherever they are held.
    pub fn param_values(&self, i: usize) -> Result<Vec<f32>> {
        match self.frozen.as_ref().and_then(|f| f.values(i)) {
            Some(v) => Ok(v),
            None => self.backend.download(&self.params[i]),
        }
    }

    /// Runs `f` on the parameters with those of `idx` that are held in bf16 made f32 for the call.
    pub(super) fn with_expanded<T>(&self, frozen: &FrozenBf16<B>, idx: &[usize], f: impl FnOnce(&Params<B>) -> T) -> Result<T> {
        let poisoned = || Error::Invalid("the bf16-held weights were left inconsistent by an earlier failure".into());
        let be = &self.backend;
        let mut exp = frozen.expanded.lock().map_err(|_| poisoned())?;
        let mut spare = frozen.spare.lock().map_err(|_| poisoned())?;
        // the token table and the head are not kept (they are the largest, and the passes that
        // need them whole are rare)
        let keep = |i: usize| i != self.layout.wte && i != self.layout.head() && Some(i) != self.layout.wpe;
        let mut made = Vec::new();
        for &i in idx {
            if exp[i].is_none() {
                if let Some(h) = frozen.held(i) {
                    let reuse = spare.iter().position(|b| be.len(b) == h.len()).filter(|_| keep(i));
                    let mut buf = match reuse {
                        Some(j) => spare.swap_remove(j),
                        None => be.zeros(h.len())?,
                    };
                    widen_into(be, &mut buf, 0, h)?;
                    exp[i] = Some(buf);
                    made.push(i);
                }
            }
        }
        let out = f(&Params { bufs: ParamBufs { own: &self.params, expanded: &exp }, trainable: &self.trainable });
        for i in made {
            if let Some(b) = exp[i].take().filter(|_| keep(i)) {
                spare.push(b);
            }
        }
        Ok(out)
    }
}

impl<B: Backend> Model<B> {
    /// The embedding's forward pass into `out` when its token table is held in bf16 (returns
    /// `false`, doing nothing, otherwise): only the table's rows that `ids` use are made f32, in
    /// `spare` (scratch that is free during the forward pass) when it is long enough, and looked
    /// up through ids renumbered into them. The same values land in `out` as from the whole table.
    pub(crate) fn held_embedding_fwd(&self, out: &mut B::Buf, ids: &[i32], pos: &B::Ids, spare: &mut B::Buf) -> Result<bool> {
        let (be, emb) = (&self.backend, self.embedding());
        let Some(frozen) = &self.frozen else { return Ok(false) };
        let Some(table) = frozen.held(emb.wte) else { return Ok(false) };
        let h = emb.width;
        let mut used = ids.to_vec();
        used.sort_unstable();
        used.dedup();
        let mut renumbered = Vec::with_capacity(ids.len());
        for &id in ids {
            renumbered.push(used.binary_search(&id).unwrap_or_default() as i32);
        }
        let mut rows_f32 = lend(be, spare, used.len() * h)?;
        for (j, &id) in used.iter().enumerate() {
            let row = usize::try_from(id).ok().and_then(|r| table.get(r * h..(r + 1) * h));
            let row = row.ok_or_else(|| Error::Invalid(format!("token id {id} is outside the embedding's {} rows", table.len() / h.max(1))))?;
            widen_into(be, &mut rows_f32.0, j * h, row)?;
        }
        let mut expanded: Vec<Option<B::Buf>> = (0..self.params.len()).map(|_| None).collect();
        if let Some(wpe) = emb.wpe {
            if let Some(v) = frozen.values(wpe) {
                expanded[wpe] = Some(be.upload_vec(v)?);
            }
        }
        let ids = be.upload_ids(&renumbered)?;
        let lent = rows_f32.1;
        expanded[emb.wte] = Some(rows_f32.0);
        emb.fwd(be, &Params { bufs: ParamBufs { own: &self.params, expanded: &expanded }, trainable: &self.trainable }, out, &ids, pos);
        if let Some(buf) = expanded[emb.wte].take() {
            give_back(spare, (buf, lent));
        }
        Ok(true)
    }

    /// Whether the LM head's weight is held in bf16.
    pub(super) fn head_is_held(&self) -> bool {
        self.frozen.as_ref().is_some_and(|f| f.held(self.layout.head()).is_some())
    }

    /// The LM head's logits `out = x W^T` (`[n, vocab]`, from `x` `[n, hidden]`) when its weight
    /// is held in bf16 and it has no bias or adapter (returns `false`, doing nothing, otherwise):
    /// the head made f32 `head_block_rows` rows at a time, each block's product into its columns
    /// (in one block, exactly as an f32 head runs). For generation's steps.
    pub(crate) fn held_head_fwd(&self, out: &mut B::Buf, x: &B::Buf, n: usize) -> Result<bool> {
        let (be, h, v) = (&self.backend, self.config.hidden_size, self.config.vocab_size);
        let unit = self.head();
        let Some(frozen) = self.frozen.as_ref().filter(|_| unit.b.is_none() && unit.lora.iter().all(Option::is_none)) else { return Ok(false) };
        let Some(weight) = frozen.held(unit.w) else { return Ok(false) };
        let vb = Self::head_block(frozen.head_block_rows, h, v);
        let mut w = be.zeros(vb * h)?;
        if vb == v {
            widen_into(be, &mut w, 0, weight)?;
            be.matmul_fwd(out, x, &w, None, n, h, v);
        } else {
            self.held_logits_in_blocks(weight, vb, &mut w, out, x, n)?;
        }
        Ok(true)
    }

    /// `out = x W^T` (`[n, vocab]`) for a held head of `weight`, made f32 `vb` rows at a time in
    /// `w`, each block's product into its columns.
    fn held_logits_in_blocks(&self, weight: &[bf16], vb: usize, w: &mut B::Buf, out: &mut B::Buf, x: &B::Buf, n: usize) -> Result<()> {
        let (be, h, v) = (&self.backend, self.config.hidden_size, self.config.vocab_size);
        for blk in head_blocks(n, v, vb) {
            widen_into(be, w, 0, &weight[blk.off * h..(blk.off + blk.width) * h])?;
            be.lora_up(out, x, w, blk, h, 1.0, false);
        }
        Ok(())
    }

    /// Chunk `i` (rows `r0..r0 + n`) of the LM head and the built-in loss with the head's weight
    /// held in bf16 (see `Model::head_chunk_loss`): the losses into `acts.row_loss` and, with
    /// `grad_scale` (training), the chunk's rows of `acts.dln`; the head is frozen, so it has no
    /// gradient. The head is made f32 `head_block_rows` rows at a time, into `w` (scratch of at
    /// least that many rows): each block's logits columns, the loss over whole rows, then each
    /// block's share of the input gradient, added block by block (in one block it runs exactly
    /// as an f32 head).
    pub(super) fn held_head_chunk_loss(
        &self,
        acts: &mut Activations<B>,
        w: &mut B::Buf,
        (i, r0, n): (usize, usize, usize),
        smoothing: f32,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        let (be, h, v) = (&self.backend, self.config.hidden_size, self.config.vocab_size);
        let head = self.layout.head();
        let held = self.frozen.as_ref().and_then(|f| Some((f.held(head)?, f.head_block_rows)));
        let Some((weight, block_rows)) = held else { return Err(Error::Invalid("the LM head is not held in bf16".into())) };
        let rows = acts.batch * acts.seq;
        acts.logits_room(be, acts.head_rows.min(rows) * v)?;
        if n != rows {
            be.copy_range(&mut acts.head_in, 0, &acts.lnf, r0 * h, n * h);
        }
        let targets = if acts.chunk_targets.is_empty() { &acts.targets } else { &acts.chunk_targets[i] };
        let x = if n == rows { &acts.lnf } else { &acts.head_in };
        let dx = if n == rows { &mut acts.dln } else { &mut acts.head_din };
        let vb = Self::head_block(block_rows, h, v);
        if vb == v {
            widen_into(be, w, 0, weight)?;
            let back = grad_scale.map(|_| (&mut *dx, None));
            be.head_loss(&mut acts.logits, x, w, targets, (n, h, v), smoothing, grad_scale, &mut acts.row_loss, r0, back);
        } else {
            self.held_logits_in_blocks(weight, vb, w, &mut acts.logits, x, n)?;
            be.cross_entropy_into(&mut acts.logits, targets, v, smoothing, grad_scale, &mut acts.row_loss, r0);
            if grad_scale.is_some() {
                for (j, blk) in head_blocks(n, v, vb).enumerate() {
                    widen_into(be, w, 0, &weight[blk.off * h..(blk.off + blk.width) * h])?;
                    be.lora_up_bwd((&mut *dx, j > 0), None, &acts.logits, x, w, blk, h, 1.0);
                }
            }
        }
        if grad_scale.is_some() && n != rows {
            be.copy_range(&mut acts.dln, r0 * h, &acts.head_din, 0, n * h);
        }
        Ok(())
    }

    /// Rows of a held head made f32 at a time, of `v` rows of width `h`.
    fn head_block(block_rows: Option<usize>, h: usize, v: usize) -> usize {
        block_rows.unwrap_or(HEAD_BLOCK_FLOATS / h.max(1)).clamp(1, v.max(1))
    }

    /// The scratch [`Model::held_head_chunk_loss`] needs: a block of the head in f32, lent by
    /// `spare` ([`lend`]; give it back with [`Model::give_back_held_scratch`]).
    pub(super) fn held_head_scratch(&self, spare: &mut B::Buf) -> Result<(B::Buf, bool)> {
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let vb = Self::head_block(self.frozen.as_ref().and_then(|f| f.head_block_rows), h, v);
        lend(&self.backend, spare, vb * h)
    }

    /// Gives back the buffer [`Model::held_head_scratch`] took.
    pub(super) fn give_back_held_scratch(w: (B::Buf, bool), spare: &mut B::Buf) {
        give_back(spare, w);
    }
}
