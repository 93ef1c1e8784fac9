//! LoRA and DoRA adapters on a linear map ([`Linear`]): the parts a map carries, their scratch,
//! and the adapters' forward and backward passes (PEFT's `LoraLayer` / `DoraLinearLayer`).

use super::{drop, GradsMut, Linear, Params};
use crate::backend::{Backend, ColBlock, MergedPart};

/// The most LoRA adapters one linear map carries: a fused map holds up to three transformers
/// modules (`q_proj`, `k_proj`, `v_proj`), each with its own adapter.
pub const MAX_LORA_PARTS: usize = 3;

/// A LoRA adapter on output columns `off..off + cols` of a linear map (one transformers module of
/// a fused map, or the whole map): `out[:, off..off + cols] += scale * (x A^T) B^T`, with `A`
/// `[r, in]` and `B` `[cols, r]` (PEFT's `lora_A` / `lora_B`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraPart {
    pub a: usize,
    pub b: usize,
    pub r: usize,
    pub off: usize,
    pub cols: usize,
    pub scale: f32,
    /// `lora_dropout`, on the adapter's input.
    pub dropout: f32,
    /// DoRA (`use_dora`): the magnitude vector (`lora_magnitude_vector`, `[cols]`). The output
    /// columns become `m / ||W + scale B A|| * (W x + scale B A x) + b`, the norm per output row
    /// and held constant in the backward pass, as PEFT's `DoraLinearLayer`.
    pub mag: Option<usize>,
}

/// The sizes the adapters' scratch is made for: the largest rank, adapted width, input width and
/// (with DoRA) output width of an adapted map; the largest adapted weight (`out x in`) and the
/// fewest rows at which some adapted map runs merged ([`merge_pays`]); all 0 without adapters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraDims {
    pub r: usize,
    pub cols: usize,
    pub inp: usize,
    pub out: usize,
    pub dora: bool,
    pub weight: usize,
    pub merge_rows: usize,
}

impl LoraDims {
    /// The floats [`LoraScratch::new`] allocates for `rows` rows (on a backend that merges).
    pub fn floats(&self, rows: usize, dropout: bool) -> usize {
        let dora = if self.dora { rows * (2 * self.cols + self.out) + MAX_LORA_PARTS * self.cols } else { 0 };
        rows * 2 * self.r + if dropout { 2 * rows * self.inp } else { 0 } + dora + self.merged(rows)
    }

    /// The merged weight's floats for `rows` rows: plain LoRA only, and only where some map
    /// merges at that many rows.
    fn merged(&self, rows: usize) -> usize {
        if !self.dora && rows >= self.merge_rows {
            self.weight
        } else {
            0
        }
    }

    /// Takes in an adapted map of input width `inp` and output width `out`.
    pub fn merging(self, inp: usize, out: usize) -> Self {
        let rows = (2 * inp * out).div_ceil((inp + out).max(1));
        let merge_rows = if self.weight == 0 { rows } else { self.merge_rows.min(rows) };
        LoraDims { weight: self.weight.max(inp * out), merge_rows, ..self }
    }
}

/// Whether a plain LoRA map (input width `k`, output width `o`) over `rows` rows runs as one
/// product with its merged weight `W + scale B A` rather than with the adapters' own products.
/// Making the merged weight is a pass over `o x k` values and `2 o k r` FLOPs per part, twice a
/// step (forward and backward); it saves the forward's `x A^T` and `t B^T` and the backward's
/// `dt A`, which pass over `rows x (k + o)` values and cost `2 rows r (2 k + cols)` FLOPs. Merged
/// when the rows' side is at least twice the weight's.
pub fn merge_pays(rows: usize, k: usize, o: usize) -> bool {
    rows * (k + o) >= 2 * k * o
}

/// Scratch of the LoRA branches, shared by every adapted linear of a pass: `t = x A^T`
/// (`[rows, r]`), `dt` (`[rows, r]`) and, with `lora_dropout`, the dropped-out input `xd` and
/// the input gradient through the mask `dx` (`[rows, in]` each); with DoRA, `u = t B^T` (`[rows, cols]`; plain LoRA adds
/// it into the output without keeping it), the gradient into `u` (`gu`), a map-wide
/// `[rows, out]` buffer (the base map's output without bias, or the gradient into it) and each
/// part's weight norm (`[cols]`); on a backend that merges adapters, a map's merged weight
/// (`[out, in]`, [`Linear::merged`]). Empty without adapters.
pub struct LoraScratch<B: Backend> {
    pub t: B::Buf,
    pub u: B::Buf,
    pub dt: B::Buf,
    pub dx: B::Buf,
    pub xd: B::Buf,
    pub gu: B::Buf,
    pub wide: B::Buf,
    pub norms: Vec<B::Buf>,
    pub merged: B::Buf,
}

impl<B: Backend> LoraScratch<B> {
    /// Scratch for `rows` rows and the sizes `d` (all 0: none), with room for the dropped-out
    /// input when `dropout`.
    pub fn new(be: &B, rows: usize, d: LoraDims, dropout: bool) -> crate::error::Result<Self> {
        let xd = be.zeros(if dropout { rows * d.inp } else { 0 })?;
        let dora = |n: usize| be.zeros(if d.dora { n } else { 0 });
        let norms = (0..if d.dora { MAX_LORA_PARTS } else { 0 }).map(|_| be.zeros(d.cols)).collect::<crate::error::Result<Vec<_>>>()?;
        Ok(LoraScratch {
            t: be.zeros(rows * d.r)?,
            u: dora(rows * d.cols)?,
            dt: be.zeros(rows * d.r)?,
            dx: be.zeros(if dropout { rows * d.inp } else { 0 })?,
            xd,
            gu: dora(rows * d.cols)?,
            wide: dora(rows * d.out)?,
            norms,
            merged: be.zeros(if be.merges_adapters() { d.merged(rows) } else { 0 })?,
        })
    }

    pub fn bytes(&self, be: &B) -> usize {
        let norms: usize = self.norms.iter().map(|b| be.len(b)).sum();
        4 * ([&self.t, &self.u, &self.dt, &self.dx, &self.xd, &self.gu, &self.wide, &self.merged].iter().map(|b| be.len(b)).sum::<usize>() + norms)
    }
}

/// Part `i`'s `lora_dropout` mask on `x` (its own stream, as each PEFT module has its own
/// dropout).
fn drop_part<B: Backend>(be: &B, x: &mut B::Buf, part: LoraPart, key: Option<u64>, i: usize) {
    drop(be, x, part.dropout, key, 16 + i as u64);
}

impl Linear {
    /// Writes the map's merged weight `W + scale B A` into the scratch and returns true when the
    /// map runs merged in this pass: plain LoRA parts, none dropping out (`drop`: a training pass's
    /// key), a backend that merges ([`Backend::lora_merge`]) and enough rows ([`merge_pays`]).
    /// The product with it is the base's and the adapters' together, the same sums in another
    /// order (the adapters' share `scale * B A` is f32 like every product's operands here).
    pub(super) fn merged<B: Backend>(&self, be: &B, p: &Params<B>, s: &mut LoraScratch<B>, rows: usize, drop: Option<u64>) -> bool {
        let (k, o) = (self.in_features, self.out_features);
        let parts = self.lora.iter().flatten();
        if !merge_pays(rows, k, o) || be.len(&s.merged) < o * k || parts.clone().any(|q| q.mag.is_some() || (drop.is_some() && q.dropout > 0.0)) {
            return false;
        }
        let parts: Vec<_> = parts.map(|q| MergedPart { a: &p.bufs[q.a], b: &p.bufs[q.b], off: q.off, cols: q.cols, r: q.r, scale: q.scale }).collect();
        be.lora_merge(&mut s.merged, &p.bufs[self.w], &parts, o, k)
    }

    /// Adds the LoRA branches to `out` (after [`Linear::fwd`]): as PEFT, `result +
    /// lora_B(lora_A(dropout(x))) * scaling`, or DoRA's rescaled output for a part with a
    /// magnitude. `drop`: a training pass's dropout key for this map.
    #[allow(clippy::too_many_arguments)] // as Linear::fwd, the scratch and the dropout key
    pub fn lora_fwd<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, inp: &B::Buf, rows: usize, s: &mut LoraScratch<B>, drop: Option<u64>) {
        let (k, o) = (self.in_features, self.out_features);
        for (i, part) in self.lora.iter().enumerate().filter_map(|(i, p)| p.map(|p| (i, p))) {
            let dropped = Self::lora_input(be, inp, s, part, drop, i);
            let x = dropped.as_ref().unwrap_or(inp);
            be.matmul_fwd(&mut s.t, x, &p.bufs[part.a], None, rows, k, part.r);
            let blk = ColBlock { rows, width: part.cols, ld: o, off: part.off };
            match part.mag {
                None => be.lora_up(out, &s.t, &p.bufs[part.b], blk, part.r, part.scale, true),
                Some(m) => {
                    be.matmul_fwd(&mut s.u, &s.t, &p.bufs[part.b], None, rows, part.r, part.cols);
                    let w = &p.bufs[self.w];
                    be.dora_norm(&mut s.norms[0], w, &p.bufs[part.a], &p.bufs[part.b], part.off, part.cols, k, part.r, part.scale);
                    if dropped.is_some() {
                        // PEFT recomputes the base map on the dropped-out input for the rescale
                        be.matmul_fwd(&mut s.wide, x, w, None, rows, k, o);
                        be.dora_fwd(out, Some(&s.wide), None, &s.u, &p.bufs[m], &s.norms[0], blk, part.scale);
                    } else {
                        be.dora_fwd(out, None, self.b.map(|b| &p.bufs[b]), &s.u, &p.bufs[m], &s.norms[0], blk, part.scale);
                    }
                }
            }
            if let Some(x) = dropped {
                s.xd = x;
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // as Linear::bwd_all
    pub(super) fn bwd_adapted<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        mut dinp: Option<&mut B::Buf>,
        dout: &B::Buf,
        inp: &B::Buf,
        rows: usize,
        s: &mut LoraScratch<B>,
        drop: Option<u64>,
    ) {
        if self.merged(be, p, s, rows, drop) {
            // the input gradient through the merged weight carries the adapters' share: they
            // add only their own gradients
            let (dw, db) = g.pair(self.w, self.b);
            be.matmul_bwd(dinp, dw, db, dout, inp, &s.merged, rows, self.in_features, self.out_features);
            return self.lora_bwd(be, p, g, None, dout, inp, rows, s, drop);
        }
        if self.lora.iter().flatten().all(|p| p.mag.is_none()) {
            self.bwd(be, p, g, dinp.as_deref_mut(), dout, inp, rows);
            self.lora_bwd(be, p, g, dinp, dout, inp, rows, s, drop);
            return;
        }
        let (k, o, w) = (self.in_features, self.out_features, &p.bufs[self.w]);
        let parts: Vec<(usize, LoraPart)> = self.lora.iter().enumerate().filter_map(|(i, p)| p.map(|p| (i, p))).collect();
        let blk = |part: LoraPart| ColBlock { rows, width: part.cols, ld: o, off: part.off };
        for &(i, part) in &parts {
            if part.mag.is_some() {
                be.dora_norm(&mut s.norms[i], w, &p.bufs[part.a], &p.bufs[part.b], part.off, part.cols, k, part.r, part.scale);
            }
        }
        let dropping = drop.is_some() && parts.iter().any(|(_, p)| p.dropout > 0.0);
        if dropping {
            self.bwd(be, p, g, dinp.as_deref_mut(), dout, inp, rows);
        } else {
            // without dropout the adapted columns are `s * (W x + scale B A x) + b`: the base
            // map's backward pass takes the output gradient with those columns rescaled by `s`
            // (the bias's takes it as it is)
            be.copy_range(&mut s.wide, 0, dout, 0, rows * o);
            for &(i, part) in &parts {
                if let Some(m) = part.mag {
                    be.dora_bwd(None, None, Some((&mut s.wide, 0.0)), dout, &p.bufs[m], &s.norms[i], blk(part), part.scale);
                }
            }
            let (dw, db) = g.pair(self.w, self.b);
            be.matmul_bwd(dinp.as_deref_mut(), dw, None, &s.wide, inp, w, rows, k, o);
            if let Some(db) = db {
                be.matmul_bwd(None, None, Some(db), dout, inp, w, rows, k, o);
            }
            // the base output without bias, for the magnitudes' gradients
            be.matmul_fwd(&mut s.wide, inp, w, None, rows, k, o);
        }
        for (i, part) in parts {
            let r = part.r;
            let dropped = Self::lora_input(be, inp, s, part, drop, i);
            let x = dropped.as_ref().unwrap_or(inp);
            be.matmul_fwd(&mut s.t, x, &p.bufs[part.a], None, rows, k, r);
            match part.mag {
                None => {
                    let (_, db) = g.pair(part.a, Some(part.b));
                    be.lora_up_bwd((&mut s.dt, false), db, dout, &s.t, &p.bufs[part.b], blk(part), r, part.scale);
                }
                Some(m) => {
                    be.matmul_fwd(&mut s.u, &s.t, &p.bufs[part.b], None, rows, r, part.cols);
                    if dropping {
                        be.matmul_fwd(&mut s.wide, x, w, None, rows, k, o);
                    }
                    let (mb, n) = (&p.bufs[m], &s.norms[i]);
                    let dm = if g.trainable[m] { Some((&mut g.bufs[m], &s.wide, &s.u)) } else { None };
                    be.dora_bwd(dm, Some(&mut s.gu), None, dout, mb, n, blk(part), part.scale);
                    if dropping {
                        // the base map on the dropped-out input, scaled by `s - 1`
                        be.fill(&mut s.wide, 0.0);
                        be.dora_bwd(None, None, Some((&mut s.wide, 1.0)), dout, mb, n, blk(part), part.scale);
                        let dw = if g.trainable[self.w] { Some(&mut g.bufs[self.w]) } else { None };
                        be.matmul_bwd(dinp.is_some().then_some(&mut s.dx), dw, None, &s.wide, x, w, rows, k, o);
                        if let Some(d) = dinp.as_deref_mut() {
                            drop_part(be, &mut s.dx, part, drop, i);
                            be.add_cols(d, &s.dx, rows, k, k, 0, 1.0);
                        }
                    }
                    let (_, db) = g.pair(part.a, Some(part.b));
                    be.matmul_bwd(Some(&mut s.dt), db, None, &s.gu, &s.t, &p.bufs[part.b], rows, r, part.cols);
                }
            }
            self.lora_down_bwd(be, p, g, dinp.as_deref_mut(), s, x, part, (i, drop, dropped.is_some()), rows);
            if let Some(x) = dropped {
                s.xd = x;
            }
        }
    }

    /// The down-projection's backward pass of part `i` (after its `dt` is in the scratch): `dA
    /// += dt^T x`, and `dt A` into `dinp`, through the part's dropout mask when `dropped`.
    #[allow(clippy::too_many_arguments)] // the pass's state and the part's dropout
    fn lora_down_bwd<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        dinp: Option<&mut B::Buf>,
        s: &mut LoraScratch<B>,
        x: &B::Buf,
        part: LoraPart,
        (i, drop, dropped): (usize, Option<u64>, bool),
        rows: usize,
    ) {
        let (k, r) = (self.in_features, part.r);
        let (da, _) = g.pair(part.a, None);
        if !dropped {
            return be.lora_down_bwd(dinp, da, &s.dt, x, &p.bufs[part.a], rows, k, r);
        }
        let dx = if dinp.is_some() { Some(&mut s.dx) } else { None };
        be.matmul_bwd(dx, da, None, &s.dt, x, &p.bufs[part.a], rows, k, r);
        if let Some(d) = dinp {
            // the dropout's backward pass: the same mask on the gradient
            drop_part(be, &mut s.dx, part, drop, i);
            be.add_cols(d, &s.dx, rows, k, k, 0, 1.0);
        }
    }

    /// The LoRA branches' backward pass (after [`Linear::bwd`], which wrote `dinp`): adds their
    /// share to `dinp` and accumulates the adapters' gradients. `x A^T` (and the dropped-out
    /// input) is recomputed, not kept. Plain LoRA only ([`Linear::bwd_all`] handles DoRA).
    #[allow(clippy::too_many_arguments)] // as Linear::bwd, the scratch and the dropout key
    fn lora_bwd<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        mut dinp: Option<&mut B::Buf>,
        dout: &B::Buf,
        inp: &B::Buf,
        rows: usize,
        s: &mut LoraScratch<B>,
        drop: Option<u64>,
    ) {
        for (i, part) in self.lora.iter().enumerate().filter_map(|(i, p)| p.map(|p| (i, p))) {
            let (k, r) = (self.in_features, part.r);
            let dropped = Self::lora_input(be, inp, s, part, drop, i);
            let x = dropped.as_ref().unwrap_or(inp);
            be.matmul_fwd(&mut s.t, x, &p.bufs[part.a], None, rows, k, r);
            let blk = ColBlock { rows, width: part.cols, ld: self.out_features, off: part.off };
            let (_, db) = g.pair(part.a, Some(part.b));
            be.lora_up_bwd((&mut s.dt, false), db, dout, &s.t, &p.bufs[part.b], blk, r, part.scale);
            self.lora_down_bwd(be, p, g, dinp.as_deref_mut(), s, x, part, (i, drop, dropped.is_some()), rows);
            if let Some(x) = dropped {
                s.xd = x;
            }
        }
    }

    /// The adapter input of part `i`: `inp` dropped out into the scratch (returned, to be put
    /// back), or `None` when there is no dropout in this pass.
    fn lora_input<B: Backend>(be: &B, inp: &B::Buf, s: &mut LoraScratch<B>, part: LoraPart, drop: Option<u64>, i: usize) -> Option<B::Buf> {
        drop.filter(|_| part.dropout > 0.0)?;
        let mut x = std::mem::replace(&mut s.xd, be.zeros(0).ok()?);
        be.copy_range(&mut x, 0, inp, 0, be.len(inp));
        drop_part(be, &mut x, part, drop, i);
        Some(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect()
    }

    fn close(what: &str, got: &[f32], want: &[f32]) {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(want).fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        assert!(worst <= 1e-5 * scale, "{what}: off by {worst} (largest value {scale})");
    }

    /// A fused map of width 24 -> 3 x 40 with a bias, adapters on its first and last parts (ranks 4
    /// and 3, the middle one plain), whose parts' rows cross the merge's 32-row blocks.
    fn setup(rows: usize) -> (Linear, Vec<Vec<f32>>, Vec<bool>) {
        let (k, o) = (24, 120);
        let mut bufs = vec![values(o * k, 1), values(o, 2)];
        let mut lin = Linear::new(0, Some(1), k, o);
        for (i, (off, r, scale)) in [(0, 4, 2.0f32), (80, 3, 0.5)].into_iter().enumerate() {
            bufs.push(values(r * k, 10 + i as u64));
            bufs.push(values(40 * r, 20 + i as u64));
            let (a, b) = (bufs.len() - 2, bufs.len() - 1);
            lin.lora[2 * i] = Some(LoraPart { a, b, r, off, cols: 40, scale, dropout: 0.1, mag: None });
        }
        bufs.push(values(rows * k, 3));
        bufs.push(values(rows * o, 4));
        // the base weight frozen, its bias and the adapters trained
        let trainable = vec![false, true, true, true, true, true];
        (lin, bufs, trainable)
    }

    #[test]
    fn a_merged_map_equals_its_adapters_products() {
        let be = Cpu;
        let rows = 64;
        let (lin, mut all, trainable) = setup(rows);
        let (x, dout) = (all[6].clone(), all[7].clone());
        all.truncate(6);
        let (k, o) = (24, 120);
        assert!(merge_pays(rows, k, o) && !merge_pays(rows / 2, k, o));
        let dims = LoraDims { r: 4, cols: 40, inp: k, out: o, ..LoraDims::default() }.merging(k, o);
        assert_eq!((dims.weight, dims.merge_rows), (o * k, 40));
        let mut s = LoraScratch::new(&be, rows, dims, true).unwrap();
        let p = Params::new(&all, &trainable);
        // merged: the whole pass through `fwd_all` / `bwd_all`, without dropout
        assert!(lin.merged(&be, &p, &mut s, rows, None));
        assert!(!lin.merged(&be, &p, &mut s, rows, Some(7)), "a part that drops out is not merged");
        assert!(!lin.merged(&be, &p, &mut s, rows / 2, None), "too few rows");
        let mut out = vec![0.0; rows * o];
        lin.fwd_all(&be, &p, &mut out, &x, rows, &mut s, None);
        let mut grads: Vec<Vec<f32>> = all.iter().map(|b| vec![0.0; b.len()]).collect();
        let mut dinp = vec![0.0; rows * k];
        lin.bwd_all(&be, &p, &mut GradsMut { bufs: &mut grads, trainable: &trainable }, Some(&mut dinp), &dout, &x, rows, &mut s, None);
        // the adapters' own products
        let mut want = vec![0.0; rows * o];
        lin.fwd(&be, &p, &mut want, &x, rows);
        lin.lora_fwd(&be, &p, &mut want, &x, rows, &mut s, None);
        close("output", &out, &want);
        let mut want_grads: Vec<Vec<f32>> = all.iter().map(|b| vec![0.0; b.len()]).collect();
        let mut want_dinp = vec![0.0; rows * k];
        let mut g = GradsMut { bufs: &mut want_grads, trainable: &trainable };
        lin.bwd(&be, &p, &mut g, Some(&mut want_dinp), &dout, &x, rows);
        lin.lora_bwd(&be, &p, &mut g, Some(&mut want_dinp), &dout, &x, rows, &mut s, None);
        close("input gradient", &dinp, &want_dinp);
        assert!(grads[0].iter().all(|&v| v == 0.0), "the frozen weight has no gradient");
        for i in 1..6 {
            assert!(want_grads[i].iter().any(|&v| v != 0.0));
            close(&format!("gradient {i}"), &grads[i], &want_grads[i]);
        }
        // the adapters' share is in the output: without them it differs
        let mut base = vec![0.0; rows * o];
        lin.fwd(&be, &p, &mut base, &x, rows);
        assert!(base.iter().zip(&out).any(|(b, m)| (b - m).abs() > 1e-3));
    }
}
