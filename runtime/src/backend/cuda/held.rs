//! bf16 mode's operand copies: the fused AdamW step's working copies of the weights, the held
//! copies of saved activations (`Backend::hold_operand`, `hold_operand_only`) and the shared
//! copies of a map's input and output gradient (`Backend::begin_operand_reuse`), which the
//! products (`products.rs`), the attention and the activation kernels read instead of casting.

use cudarc::driver::CudaSlice;

use super::blas::{Gemm, Ty};
use super::{device_error, Cuda, A};

/// A held activation (see [`Held`]).
struct HeldEntry {
    len: usize,
    /// Whether the copy is made (at the first product that reads it after the hold, or by the op
    /// that computes the activation).
    ready: bool,
    copy: Option<CudaSlice<u16>>,
    /// `Backend::hold_operand_only`: nothing reads the f32 values, so the op that computes the
    /// activation writes only the copy.
    only: bool,
}

/// The saved activations named by [`crate::backend::Backend::hold_operand`], by address; `spare`
/// keeps released copies for the next pass.
#[derive(Default)]
pub(super) struct Held {
    map: std::collections::HashMap<u64, HeldEntry>,
    /// Released copies, each with the pass (`passes`) it was released in.
    spare: Vec<(CudaSlice<u16>, u64)>,
    /// Calls of `release_operands` so far: a pass's start and its backward pass's end.
    passes: u64,
    /// Holds ignored (`Cuda::set_hold_operands`): every product casts its own operands.
    off: bool,
    /// Nothing is held `only` and no op reads a held copy in place of f32 values that it would
    /// read without holds (`Cuda::set_held_products`).
    products_off: bool,
}

/// The environment variable that sets the holds at start-up: `on` (the default), `copies` (the
/// held products off, `Cuda::set_held_products(false)`) or `off` (no holds,
/// `Cuda::set_hold_operands(false)`). A switch to isolate the held copies on a GPU: a step
/// should give the same loss with each (to the bf16 limits), and the same bits with `copies`
/// and `off`.
pub(crate) const HOLDS_ENV: &str = "RUNTIME_CUDA_HOLDS";

/// `RUNTIME_CUDA_HOLDS`'s value `value` in its words (`on`, `copies` or `off`; unset: `on`), or
/// the error that names the values it takes.
pub(crate) fn holds_setting(value: Option<&str>) -> crate::error::Result<&'static str> {
    Held::from_setting(value).map(|h| h.words())
}

impl Held {
    /// The holds as `RUNTIME_CUDA_HOLDS` (its value `value`) sets them; any other value is an
    /// error that names the variable and the values it takes.
    pub(super) fn from_setting(value: Option<&str>) -> crate::error::Result<Self> {
        let (off, products_off) = match value.map(str::trim) {
            None | Some("") | Some("on") => (false, false),
            Some("copies") => (false, true),
            Some("off") => (true, true),
            Some(v) => {
                return Err(crate::error::Error::Invalid(format!(
                    "{HOLDS_ENV}={v:?}: expected `on` (the default), `copies` (no op reads a held copy in place of f32 values) or `off` (no holds)"
                )))
            }
        };
        Ok(Held { off, products_off, ..Default::default() })
    }

    /// The holds in `RUNTIME_CUDA_HOLDS`'s words: `on`, `copies` or `off`.
    fn words(&self) -> &'static str {
        match (self.off, self.products_off) {
            (true, _) => "off",
            (false, true) => "copies",
            (false, false) => "on",
        }
    }

    /// Drops the entry of `key` (all when `None`), keeping the copies for reuse.
    fn drop_entries(&mut self, key: Option<u64>) {
        let dropped: Vec<_> = match key {
            Some(k) => self.map.remove(&k).into_iter().collect(),
            None => self.map.drain().map(|(_, e)| e).collect(),
        };
        let pass = self.passes;
        self.spare.extend(dropped.into_iter().filter_map(|e| e.copy).map(|c| (c, pass)));
    }
}

/// An operand named by [`crate::backend::Backend::begin_operand_reuse`]: its address and length,
/// and its bf16 copy, made at the first product that reads it (`ready`). The copy's buffer stays
/// for the next set.
pub(super) struct Reused {
    src: u64,
    len: usize,
    ready: bool,
    copy: CudaSlice<u16>,
}

impl Cuda {
    /// The bf16 working copy of a parameter, when the last write to it was the fused AdamW step.
    ///
    /// An entry is written by `adamw_multi` together with its parameter. Any other write drops it:
    /// `copy`, `fill` and `scale` drop their destination's entry, and `zeros` and `upload` of a
    /// non-empty buffer drop the entries of the freed memory they take, because they are how a
    /// buffer comes to exist and a new one may reuse a freed parameter's address (see
    /// [`Cuda::forget_for_new`]). The
    /// copy equals what the cast kernel would produce (both round to nearest even), so a hit
    /// changes the speed, never the numbers.
    pub(super) fn weight_copy(&self, w: &CudaSlice<f32>) -> Option<u64> {
        let map = self.0.weights16.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&self.ptr(w)).filter(|c| c.len() == w.len()).map(|c| self.ptr(c))
    }

    /// Before an op writes `buf` (every caller calls it before its launch): drops `buf`'s working
    /// copy, its shared operand copy and its hold. A buffer held `only` whose copy was made has
    /// no f32 values, so its copy is widened into it first: an op that reads what it writes (a
    /// sum into it, a scale, dropout, a partial copy) then reads the values. No model op writes
    /// such a buffer today (`Block` keeps them out of those ops), so this is a guard that costs
    /// nothing when it does not apply.
    pub(super) fn forget_weight(&self, buf: &CudaSlice<f32>) {
        if self.0.bf16 {
            self.widen_held(buf);
            let key = self.ptr(buf);
            self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            self.0.reuse.lock().unwrap_or_else(|e| e.into_inner()).iter_mut().filter(|r| r.src == key).for_each(|r| r.src = 0);
            self.0.held.lock().unwrap_or_else(|e| e.into_inner()).drop_entries(Some(key));
        }
    }

    /// What a new buffer `buf` (from `zeros` or `upload`) makes stale: the working copies and
    /// shared operand copies of freed buffers whose memory `buf` now takes (any overlap), and the
    /// hold of a freed buffer whose address `buf` took. Every f32 buffer the models pass to the
    /// backend comes from `zeros` or `upload`, so an entry found by a live buffer's address is
    /// that buffer's own. An empty buffer takes no memory and drops nothing. The other entries
    /// stay (before, every weight's copy went with any new buffer: with NEFTune's noise, a
    /// rows-loss plugin's gradient, an evaluation's activations or a full-shard gather, every step
    /// cast each weight again and the AdamW step remade every copy and its descriptor table).
    /// The other holds must stay: a buffer held `only` has no f32 values, its copy is all there
    /// is, so dropping its hold between the op that wrote it and the op that reads it would have
    /// the reader read unwritten f32 values (a LoRA map's `zeros(0)` under dropout, or the loss's
    /// logits made after the forward pass, fall in that span).
    pub(super) fn forget_for_new(&self, buf: &CudaSlice<f32>) {
        if self.0.bf16 && !buf.is_empty() {
            let key = self.ptr(buf);
            let end = key + 4 * buf.len() as u64;
            let overlaps = |at: u64, len: usize| at < end && key < at + 4 * len as u64;
            self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).retain(|&at, c| !overlaps(at, c.len()));
            self.0.reuse.lock().unwrap_or_else(|e| e.into_inner()).iter_mut().filter(|r| r.src != 0 && overlaps(r.src, r.len)).for_each(|r| r.src = 0);
            self.0.held.lock().unwrap_or_else(|e| e.into_inner()).drop_entries(Some(key));
        }
    }

    /// bf16 mode: names `buf` as held (see `Backend::hold_operand`); its copy is made at the
    /// first product that reads it from now on, or by the op that computes it (which with `only`,
    /// `Backend::hold_operand_only`, writes no f32 values).
    pub(super) fn hold_operand_op(&self, buf: &CudaSlice<f32>, only: bool) {
        if self.0.bf16 && !buf.is_empty() {
            let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
            if held.off {
                return;
            }
            let key = self.ptr(buf);
            held.drop_entries(Some(key));
            // with the held products off, nothing is held `only` (see `set_held_products`)
            let only = only && !held.products_off;
            held.map.insert(key, HeldEntry { len: buf.len(), ready: false, copy: None, only });
        }
    }

    /// On (the default): `hold_operand` keeps a saved activation's bf16 copy for the backward
    /// pass. `cuda-check` turns it off to check that a step comes out the same bits either way.
    /// Returns whether they were on.
    pub fn set_hold_operands(&self, on: bool) -> bool {
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        held.drop_entries(None);
        !std::mem::replace(&mut held.off, !on)
    }

    /// The holds as set now, in `RUNTIME_CUDA_HOLDS`'s words: `on`, `copies` or `off`.
    pub fn holds(&self) -> &'static str {
        self.0.held.lock().unwrap_or_else(|e| e.into_inner()).words()
    }

    /// On (the default): a buffer held with `hold_operand_only` has its bf16 copy written alone
    /// (by its product, `held_only_gemm`, or its kernel) and read in place of its f32 values, and
    /// the attention's backward pass reads its output's held copy. Off: every held buffer's f32
    /// values are written and read as without holds, the copies only sharing the casts.
    /// `cuda-check` turns it off to compare a step with holds, bit for bit, with one that casts
    /// every operand.
    /// Returns whether they were on.
    pub fn set_held_products(&self, on: bool) -> bool {
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        held.drop_entries(None);
        !std::mem::replace(&mut held.products_off, !on)
    }

    /// Frees every bf16 copy kept here (held, spare, shared operand copies and the weights'
    /// working copies): the recovery after running out of memory.
    pub(super) fn free_copies(&self) {
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        held.drop_entries(None);
        held.spare.clear();
        drop(held);
        // (sized for the batch that failed; `begin_operand_reuse` makes them again)
        self.0.reuse.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Ends `buf`'s hold (`Backend::release_operand`), keeping its copy for reuse.
    pub(super) fn release_operand_op(&self, buf: &CudaSlice<f32>) {
        if self.0.bf16 {
            let key = self.ptr(buf);
            self.0.held.lock().unwrap_or_else(|e| e.into_inner()).drop_entries(Some(key));
        }
    }

    /// Ends every hold. Spares released three or more calls ago are freed: a steady run takes
    /// every spare again within its pass, so these are of shapes no longer in use (a batch of
    /// another length, an evaluation's), which would otherwise pile up, one set per shape.
    pub(super) fn release_operands_op(&self) {
        if self.0.bf16 {
            let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
            held.drop_entries(None);
            let pass = held.passes;
            held.spare.retain(|(_, released)| released + 2 >= pass);
            held.passes += 1;
        }
    }

    /// The held copy of `src` (made now, from a spare buffer when one fits, if no product has
    /// read it since its hold and the op that wrote it did not write the copy too).
    pub(super) fn held_copy(&self, src: &CudaSlice<f32>) -> Option<u64> {
        let (dst, ready, _) = self.held_entry(src)?;
        if !ready {
            self.launch_n("cast_f32_bf16", src.len().div_ceil(4), &[A::P(dst), self.p(src), A::L(src.len() as i64)]);
        }
        Some(dst)
    }

    /// Where an op that computes `out` writes it: the f32 values (null when `out` is held with
    /// `only`), and the held copy of `out` (its entry then counts as made; null when `out` is not
    /// held).
    pub(super) fn held_outputs(&self, out: &CudaSlice<f32>) -> (A, A) {
        match self.held_entry(out) {
            Some((dst, _, only)) => (if only { A::P(0) } else { self.p(out) }, A::P(dst)),
            None => (self.p(out), A::P(0)),
        }
    }

    /// The held entry of `buf`: its copy's address (allocated now if it has none), whether the
    /// copy was made (from now on it counts as made: the caller makes it) and whether it is held
    /// `only`.
    fn held_entry(&self, buf: &CudaSlice<f32>) -> Option<(u64, bool, bool)> {
        let key = self.ptr(buf);
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        let Held { map, spare, passes, .. } = &mut *held;
        let HeldEntry { len, ready, copy, only } = map.get_mut(&key).filter(|e| e.len == buf.len())?;
        if copy.is_none() {
            *copy = match spare.iter().position(|(c, _)| c.len() == *len) {
                Some(i) => Some(spare.swap_remove(i).0),
                // none fits, so this pass is of a new shape: the spares of an earlier pass are
                // of the old one, freed before this shape's copies are made (not both at once)
                None => {
                    spare.retain(|(_, released)| released == passes);
                    match self.alloc::<u16>(*len) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            self.fail(e);
                            return None;
                        }
                    }
                }
            };
        }
        let was = *ready;
        *ready = true;
        copy.as_ref().map(|c| (self.ptr(c), was, *only))
    }

    /// bf16 mode: makes `w`'s working copy unless it has one (see `Backend::keep_working_copy`);
    /// the entry lives under the rules of [`Cuda::weight_copy`].
    pub(super) fn keep_working_copy_op(&self, w: &CudaSlice<f32>) {
        if !self.0.bf16 || w.is_empty() || self.weight_copy(w).is_some() || self.failed() {
            return;
        }
        let copy = match self.alloc::<u16>(w.len()) {
            Ok(c) => c,
            Err(e) => return self.fail(e),
        };
        self.launch_n("cast_f32_bf16", w.len().div_ceil(4), &[self.p(&copy), self.p(w), A::L(w.len() as i64)]);
        self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).insert(self.ptr(w), copy);
    }

    /// bf16 mode: names the operands whose copies products share until the next call (none: the
    /// set ends). Their copies are made when a product first reads them.
    pub(super) fn begin_operand_reuse_op(&self, bufs: &[&CudaSlice<f32>]) {
        if !self.0.bf16 {
            return;
        }
        let mut reuse = self.0.reuse.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in bufs.iter().enumerate() {
            if i == reuse.len() {
                match self.0.stream.null::<u16>() {
                    Ok(copy) => reuse.push(Reused { src: 0, len: 0, ready: false, copy }),
                    Err(e) => return self.fail(device_error("operand copies", e)),
                }
            }
            let r = &mut reuse[i];
            (r.src, r.len, r.ready) = (self.ptr(b), b.len(), false);
        }
        for r in reuse.iter_mut().skip(bufs.len()) {
            r.src = 0;
        }
    }

    /// Whether `src` is one of the operands named by [`Cuda::begin_operand_reuse_op`].
    pub(super) fn named_for_reuse(&self, src: &CudaSlice<f32>) -> bool {
        let key = self.ptr(src);
        self.0.reuse.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|r| r.src == key && key != 0)
    }

    /// The shared bf16 copy of `src` when it is one of the operands named by
    /// [`Cuda::begin_operand_reuse_op`] (made now if no product has read it yet).
    pub(super) fn reused_copy(&self, src: &CudaSlice<f32>) -> Option<u64> {
        let key = self.ptr(src);
        let mut reuse = self.0.reuse.lock().unwrap_or_else(|e| e.into_inner());
        let r = reuse.iter_mut().find(|r| r.src == key && key != 0 && r.len == src.len())?;
        let dst = self.grown(&mut r.copy, r.len);
        if !r.ready {
            self.launch_n("cast_f32_bf16", r.len.div_ceil(4), &[A::P(dst), A::P(key), A::L(r.len as i64)]);
            r.ready = true;
        }
        Some(dst)
    }

    /// bf16 mode, `out` held with `Backend::hold_operand_only` and of an aligned width: writes
    /// `inp w^T (+ bias)` as its bf16 copy alone (the f32 bias added before the rounding, so the
    /// same bits as the cast of the f32 output) and returns true. When cuBLASLt has no algorithm
    /// for that form (or with `set_held_products(false)`), `out` stays held as by `hold_operand`
    /// (its f32 values written, the copy cast at its first read) and this returns false, as it
    /// does for any other `out`.
    pub(super) fn held_only_product(
        &self,
        out: &CudaSlice<f32>,
        w_p: u64,
        inp_p: u64,
        bias: Option<&CudaSlice<f32>>,
        (n, k, m): (usize, usize, usize),
    ) -> bool {
        if crate::backend::aligned_ld(m) != m {
            return false;
        }
        let g = Gemm { bias: bias.map(|b| self.ptr(b)), ..Gemm::forward(w_p, inp_p, 0, (n, k, m), Ty::Bf16) };
        self.held_only_gemm(out, g)
    }

    /// Runs `g` (a product of bf16 operands overwriting its output, `beta` 0) into `out`'s held
    /// copy, in bf16 and alone, when `out` is held with `Backend::hold_operand_only` and cuBLASLt
    /// has an algorithm for that form; returns whether it did. Otherwise `out` stays held as by
    /// `hold_operand` (the caller writes its f32 values; the copy is cast at its first read).
    pub(super) fn held_only_gemm(&self, out: &CudaSlice<f32>, g: Gemm) -> bool {
        let key = self.ptr(out);
        let only = {
            let held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
            !held.products_off && held.map.get(&key).is_some_and(|e| e.only && e.len == out.len())
        };
        if !only || g.beta != 0.0 || g.c != 0 {
            return false;
        }
        // the copy (allocated now if it has none), counted as made from here on
        let Some((d, _, _)) = self.held_entry(out) else { return false };
        let g = Gemm { d, out: Ty::Bf16, ..g };
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = held.map.get_mut(&key) else { return false };
        // SAFETY: the handle lives as long as the backend
        if self.failed() || !unsafe { self.0.lt.can_plan(&g) } {
            (e.ready, e.only) = (false, false);
            return false;
        }
        e.ready = true;
        drop(held);
        self.gemm(g);
        true
    }

    /// An input read by a kernel that has a bf16 form (the kernel's name suffix, `_x16` for an
    /// activation's input, `_d16` for a gradient, and the pointer): `x`'s held copy when `x` is
    /// held `only` and the copy is made (its f32 values may then never have been written:
    /// `held_only_gemm`), else `x` itself with no suffix.
    pub(super) fn held_input(&self, x: &CudaSlice<f32>, suffix: &'static str) -> (&'static str, A) {
        let held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        match self.made_copy(&held, x, true) {
            Some(c) => (suffix, A::P(c)),
            None => ("", self.p(x)),
        }
    }

    /// The address of `buf`'s held copy if it is made (and, with `only`, if `buf` is held `only`).
    fn made_copy(&self, held: &Held, buf: &CudaSlice<f32>, only: bool) -> Option<u64> {
        let e = held.map.get(&self.ptr(buf)).filter(|e| e.ready && e.len == buf.len() && (e.only || !only))?;
        e.copy.as_ref().map(|c| self.ptr(c))
    }

    /// `buf`'s held copy when it is made (by the op that computed `buf`, or cast at a product's
    /// read), whether or not the f32 values were written too; none with the held products off
    /// (`set_held_products`).
    pub(super) fn held_made(&self, buf: &CudaSlice<f32>) -> Option<u64> {
        let held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.products_off {
            return None;
        }
        self.made_copy(&held, buf, false)
    }

    /// Before a kernel that reads `buf`'s f32 values and has no bf16 form: when only `buf`'s held
    /// copy was written (`held_only_gemm`), widens it into `buf` and ends the hold (so nothing
    /// reads the copy after `buf` changes).
    pub(super) fn widen_held(&self, buf: &CudaSlice<f32>) {
        let key = self.ptr(buf);
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(copy) = self.made_copy(&held, buf, true) else { return };
        self.launch_n("cast_bf16_f32", buf.len(), &[A::P(key), A::P(copy), A::L(buf.len() as i64)]);
        held.drop_entries(Some(key));
    }
}

#[cfg(test)]
mod tests {
    use super::{Held, HOLDS_ENV};

    #[test]
    fn the_holds_setting_takes_three_values_and_names_itself_otherwise() {
        for (value, off, products_off) in
            [(None, false, false), (Some(""), false, false), (Some("on"), false, false), (Some("copies"), false, true), (Some(" off\n"), true, true)]
        {
            let h = Held::from_setting(value).unwrap();
            assert_eq!((h.off, h.products_off), (off, products_off), "{value:?}");
        }
        for bad in ["yes", "ON", "0"] {
            let e = Held::from_setting(Some(bad)).err().expect(bad).to_string();
            assert!(e.contains(HOLDS_ENV) && e.contains(&format!("{bad:?}")) && e.contains("copies"), "{e}");
        }
    }
}
