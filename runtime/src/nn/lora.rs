//! LoRA and DoRA adapters on a linear map ([`Linear`]): the parts a map carries, their scratch,
//! and the adapters' forward and backward passes (PEFT's `LoraLayer` / `DoraLinearLayer`).

use super::{drop, GradsMut, Linear, Params};
use crate::backend::{Backend, ColBlock};

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
/// (with DoRA) output width of an adapted map; all 0 without adapters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraDims {
    pub r: usize,
    pub cols: usize,
    pub inp: usize,
    pub out: usize,
    pub dora: bool,
}

impl LoraDims {
    /// The floats [`LoraScratch::new`] allocates for `rows` rows.
    pub fn floats(&self, rows: usize, dropout: bool) -> usize {
        let dora = if self.dora { rows * (2 * self.cols + self.out) + MAX_LORA_PARTS * self.cols } else { 0 };
        rows * 2 * self.r + if dropout { 2 * rows * self.inp } else { 0 } + dora
    }
}

/// Scratch of the LoRA branches, shared by every adapted linear of a pass: `t = x A^T`
/// (`[rows, r]`), `dt` (`[rows, r]`) and, with `lora_dropout`, the dropped-out input `xd` and
/// the input gradient through the mask `dx` (`[rows, in]` each); with DoRA, `u = t B^T` (`[rows, cols]`; plain LoRA adds
/// it into the output without keeping it), the gradient into `u` (`gu`), a map-wide
/// `[rows, out]` buffer (the base map's output without bias, or the gradient into it) and each
/// part's weight norm (`[cols]`). Empty without adapters.
pub struct LoraScratch<B: Backend> {
    pub t: B::Buf,
    pub u: B::Buf,
    pub dt: B::Buf,
    pub dx: B::Buf,
    pub xd: B::Buf,
    pub gu: B::Buf,
    pub wide: B::Buf,
    pub norms: Vec<B::Buf>,
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
        })
    }

    pub fn bytes(&self, be: &B) -> usize {
        let norms: usize = self.norms.iter().map(|b| be.len(b)).sum();
        4 * ([&self.t, &self.u, &self.dt, &self.dx, &self.xd, &self.gu, &self.wide].iter().map(|b| be.len(b)).sum::<usize>() + norms)
    }
}

/// Part `i`'s `lora_dropout` mask on `x` (its own stream, as each PEFT module has its own
/// dropout).
fn drop_part<B: Backend>(be: &B, x: &mut B::Buf, part: LoraPart, key: Option<u64>, i: usize) {
    drop(be, x, part.dropout, key, 16 + i as u64);
}

impl Linear {
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
                None => be.lora_up(out, &s.t, &p.bufs[part.b], blk, part.r, part.scale),
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
                    be.lora_up_bwd(&mut s.dt, db, dout, &s.t, &p.bufs[part.b], blk(part), r, part.scale);
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
            be.lora_up_bwd(&mut s.dt, db, dout, &s.t, &p.bufs[part.b], blk, r, part.scale);
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
