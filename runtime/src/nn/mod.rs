//! Units with a forward and a backward pass over the op set, as the models compose them: a linear
//! map (with a trainable flag: a frozen weight gets no gradient and its product is not computed),
//! a normalisation (LayerNorm or RMSNorm), an activation (GELU or SwiGLU), attention (causal
//! self-attention with optional RoPE, over a whole sequence or one decoding step against a KV
//! cache), the token and position embedding, and the transformer block built from them.
//!
//! A unit holds indices into the model's parameter buffers and its sizes, not the buffers: the
//! parameters, their gradients and the trainable mask are passed in ([`Params`], [`GradsMut`]),
//! so one description serves training, evaluation and decoding. Units never allocate.

mod block;

pub use block::{AttnCall, Block, BlockBufs, BlockGrads};

pub use crate::backend::Activation;
use crate::backend::{AttnImpl, AttnShape, Backend, ColBlock, DropoutMask};

/// The dropout stream of one site: `key` (a training pass's, already mixed with the layer) mixed
/// with the site's number.
pub fn site_key(key: u64, site: u64) -> u64 {
    let mut z = key ^ (site.wrapping_add(1)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z ^ (z >> 32)
}

/// Dropout of probability `p` on site `site` of the pass keyed `key`; nothing when `p` is 0 or
/// the pass is not a training pass (`key` is `None`).
pub fn drop<B: Backend>(be: &B, x: &mut B::Buf, p: f32, key: Option<u64>, site: u64) {
    if let Some(k) = key.filter(|_| p > 0.0) {
        be.dropout(x, DropoutMask::new(p, site_key(k, site)));
    }
}

/// Beam search's reordering of per-row caches: in each buffer (`rows` rows of equal width), row
/// `r` takes row `src[r]`'s values. The rows are copied on the device into `spare`, which then
/// becomes the buffer (no download, no upload).
pub fn reorder_rows<'a, B: Backend>(
    be: &B,
    bufs: impl Iterator<Item = &'a mut B::Buf>,
    spare: &mut B::Buf,
    rows: usize,
    src: &[usize],
) -> crate::error::Result<()>
where
    B::Buf: 'a,
{
    for buf in bufs {
        let len = be.len(buf);
        if be.len(spare) != len {
            *spare = be.zeros(len)?;
        }
        let w = len / rows;
        for (r, &s) in src.iter().enumerate() {
            be.copy_range(spare, r * w, buf, s * w, w);
        }
        std::mem::swap(buf, spare);
    }
    Ok(())
}

/// The model's parameter buffers and which of them train.
pub struct Params<'a, B: Backend> {
    pub bufs: ParamBufs<'a, B>,
    pub trainable: &'a [bool],
}

impl<'a, B: Backend> Params<'a, B> {
    pub fn new(bufs: &'a [B::Buf], trainable: &'a [bool]) -> Self {
        Params { bufs: ParamBufs { own: bufs, expanded: &[] }, trainable }
    }

    /// Before a product reads weight `i`: when it does not train, tells the backend it keeps its
    /// value ([`Backend::keep_working_copy`]; the model's own buffers only, not a unit's expanded
    /// copy).
    pub fn keep_if_frozen(&self, be: &B, i: usize) {
        if !self.trainable[i] && matches!(self.bufs.expanded.get(i), None | Some(None)) {
            be.keep_working_copy(&self.bufs.own[i]);
        }
    }
}

/// A unit's parameter buffers, indexed by parameter: the model's own, except where `expanded`
/// holds one for the unit's run (a frozen weight kept in bf16 and made f32 around the unit,
/// `model::frozen`).
pub struct ParamBufs<'a, B: Backend> {
    pub own: &'a [B::Buf],
    pub expanded: &'a [Option<B::Buf>],
}

impl<B: Backend> std::ops::Index<usize> for ParamBufs<'_, B> {
    type Output = B::Buf;
    fn index(&self, i: usize) -> &B::Buf {
        match self.expanded.get(i) {
            Some(Some(b)) => b,
            _ => &self.own[i],
        }
    }
}

/// The gradient buffers, one per parameter, accumulated into (`+=`).
pub struct GradsMut<'a, B: Backend> {
    pub bufs: &'a mut [B::Buf],
    pub trainable: &'a [bool],
}

impl<B: Backend> GradsMut<'_, B> {
    /// The gradients of `a` and `b` (when given), each `None` when frozen.
    fn pair(&mut self, a: usize, b: Option<usize>) -> (Option<&mut B::Buf>, Option<&mut B::Buf>) {
        let (ta, tb) = (self.trainable[a], b.is_some_and(|b| self.trainable[b]));
        let (ga, gb) = pair(self.bufs, a, b);
        (ta.then_some(ga), gb.filter(|_| tb))
    }
}

/// Two distinct elements of a slice, the second optional.
pub fn pair<T>(v: &mut [T], a: usize, b: Option<usize>) -> (&mut T, Option<&mut T>) {
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

/// `y = x W^T + b` with `W` `[out, in]`, plus its LoRA adapters.
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub w: usize,
    pub b: Option<usize>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: [Option<LoraPart>; MAX_LORA_PARTS],
}

impl Linear {
    /// A linear map without adapters.
    pub fn new(w: usize, b: Option<usize>, in_features: usize, out_features: usize) -> Self {
        Linear { w, b, in_features, out_features, lora: [None; MAX_LORA_PARTS] }
    }

    /// [`Linear::fwd`], then [`Linear::lora_fwd`]. With adapters, `inp` is named for operand
    /// reuse (`Backend::begin_operand_reuse`) while the base product and the adapters read it.
    #[allow(clippy::too_many_arguments)] // as Linear::lora_fwd
    pub fn fwd_all<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, inp: &B::Buf, rows: usize, s: &mut LoraScratch<B>, drop: Option<u64>) {
        if !self.adapted() {
            return self.fwd(be, p, out, inp, rows);
        }
        be.begin_operand_reuse(&[inp]);
        self.fwd(be, p, out, inp, rows);
        self.lora_fwd(be, p, out, inp, rows, s, drop);
        be.end_operand_reuse();
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

    /// The backward pass of [`Linear::fwd`] and [`Linear::lora_fwd`]: writes `dinp` (when asked)
    /// and accumulates the trainable parameters' gradients.
    #[allow(clippy::too_many_arguments)] // as Linear::lora_bwd
    pub fn bwd_all<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        dinp: Option<&mut B::Buf>,
        dout: &B::Buf,
        inp: &B::Buf,
        rows: usize,
        s: &mut LoraScratch<B>,
        drop: Option<u64>,
    ) {
        if !self.adapted() {
            return self.bwd(be, p, g, dinp, dout, inp, rows);
        }
        // the input and the output gradient are read by the base map's products and each
        // adapter's, and written by none of them
        be.begin_operand_reuse(&[inp, dout]);
        self.bwd_adapted(be, p, g, dinp, dout, inp, rows, s, drop);
        be.end_operand_reuse();
    }

    #[allow(clippy::too_many_arguments)] // as Linear::bwd_all
    fn bwd_adapted<B: Backend>(
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

    /// `out = res + self(inp)` for a map without adapters ([`Backend::matmul_fwd_add`]).
    pub fn fwd_add<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, inp: &B::Buf, res: &B::Buf, rows: usize) {
        p.keep_if_frozen(be, self.w);
        be.matmul_fwd_add(out, inp, &p.bufs[self.w], self.b.map(|b| &p.bufs[b]), res, rows, self.in_features, self.out_features);
    }

    pub fn fwd<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, inp: &B::Buf, rows: usize) {
        p.keep_if_frozen(be, self.w);
        be.matmul_fwd(out, inp, &p.bufs[self.w], self.b.map(|b| &p.bufs[b]), rows, self.in_features, self.out_features);
    }

    /// Writes `dinp` (when asked) and accumulates the trainable parameters' gradients.
    #[allow(clippy::too_many_arguments)] // the unit's parameters, gradients, and the pass's tensors
    pub fn bwd<B: Backend>(&self, be: &B, p: &Params<B>, g: &mut GradsMut<B>, dinp: Option<&mut B::Buf>, dout: &B::Buf, inp: &B::Buf, rows: usize) {
        p.keep_if_frozen(be, self.w);
        let (dw, db) = g.pair(self.w, self.b);
        be.matmul_bwd(dinp, dw, db, dout, inp, &p.bufs[self.w], rows, self.in_features, self.out_features);
    }

    /// Whether the map has LoRA adapters.
    pub fn adapted(&self) -> bool {
        self.lora.iter().any(Option::is_some)
    }

    /// [`Linear::bwd`] for a map whose output `pre` went through the activation `act`, from the
    /// activation's gradient `dact` (`Backend::act_matmul_bwd`: `dpre` is scratch the backend may
    /// leave unwritten). Not for adapted maps, whose adapters read `dpre`.
    #[allow(clippy::too_many_arguments)] // as Linear::bwd, with the activation's tensors
    pub fn bwd_act<B: Backend>(
        &self,
        be: &B,
        p: &Params<B>,
        g: &mut GradsMut<B>,
        dinp: Option<&mut B::Buf>,
        dpre: &mut B::Buf,
        (act, dact, pre): (Activation, &B::Buf, &B::Buf),
        inp: &B::Buf,
        rows: usize,
    ) {
        debug_assert!(!self.adapted());
        p.keep_if_frozen(be, self.w);
        let (dw, db) = g.pair(self.w, self.b);
        be.act_matmul_bwd(act, dinp, dw, db, dpre, dact, pre, inp, &p.bufs[self.w], rows, self.in_features, self.out_features);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

/// LayerNorm (GPT-2) or RMSNorm (Llama) over rows of `width`; keeps the per-row statistics its
/// backward pass needs (`mean` is unused by RMSNorm).
#[derive(Clone, Copy, Debug)]
pub struct Norm {
    pub kind: NormKind,
    pub w: usize,
    pub b: Option<usize>,
    pub width: usize,
    pub eps: f32,
}

impl Norm {
    /// Its parameters' indices.
    pub fn params(&self) -> Vec<usize> {
        std::iter::once(self.w).chain(self.b).collect()
    }

    pub fn fwd<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, mean: &mut B::Buf, rstd: &mut B::Buf, x: &B::Buf) {
        let (w, c) = (&p.bufs[self.w], self.width);
        match self.kind {
            NormKind::LayerNorm => be.layernorm_fwd(out, mean, rstd, x, w, self.b.map(|b| &p.bufs[b]), c, self.eps),
            NormKind::RmsNorm => be.rmsnorm_fwd(out, rstd, x, w, c, self.eps),
        }
    }

    /// Accumulates into `dx` and into the parameters' gradients (a frozen norm's gradient is
    /// computed and left unused: the norm ops always produce it).
    #[allow(clippy::too_many_arguments)] // the pass's tensors and the saved statistics
    pub fn bwd<B: Backend>(&self, be: &B, p: &Params<B>, g: &mut GradsMut<B>, dx: &mut B::Buf, dout: &B::Buf, x: &B::Buf, mean: &B::Buf, rstd: &B::Buf) {
        let (w, c) = (&p.bufs[self.w], self.width);
        let (dw, db) = pair(g.bufs, self.w, self.b);
        match self.kind {
            NormKind::LayerNorm => be.layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, c),
            NormKind::RmsNorm => be.rmsnorm_bwd(dx, dw, dout, x, w, rstd, c),
        }
    }
}

impl Activation {
    pub fn fwd<B: Backend>(&self, be: &B, out: &mut B::Buf, x: &B::Buf) {
        match *self {
            Activation::Gelu => be.gelu_fwd(out, x),
            Activation::SwiGlu { intermediate } => be.swiglu_fwd(out, x, intermediate),
        }
    }

    pub fn bwd<B: Backend>(&self, be: &B, dx: &mut B::Buf, x: &B::Buf, dout: &B::Buf) {
        match *self {
            Activation::Gelu => be.gelu_bwd(dx, x, dout),
            Activation::SwiGlu { intermediate } => be.swiglu_bwd(dx, x, dout, intermediate),
        }
    }
}

/// Causal (grouped-query) self-attention over the fused `qkv` activation, with RoPE applied to
/// the query and key heads when `rope_theta` is set.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_theta: Option<f32>,
    pub imp: AttnImpl,
    /// Dropout on the attention probabilities in training (`attn_pdrop`, `attention_dropout`),
    /// where the backend implements it.
    pub pdrop: f32,
}

impl Attention {
    pub fn shape(&self, batch: usize, seq: usize) -> AttnShape {
        AttnShape { batch, seq, n_head: self.n_head, n_kv_head: self.n_kv_head, head_dim: self.head_dim }
    }
}

/// The token embedding and, for learned positions (GPT-2), the position embedding.
#[derive(Clone, Copy, Debug)]
pub struct Embedding {
    pub wte: usize,
    pub wpe: Option<usize>,
    pub width: usize,
}

impl Embedding {
    /// Its parameters' indices.
    pub fn params(&self) -> Vec<usize> {
        std::iter::once(self.wte).chain(self.wpe).collect()
    }

    pub fn fwd<B: Backend>(&self, be: &B, p: &Params<B>, out: &mut B::Buf, ids: &B::Ids, pos: &B::Ids) {
        be.embedding_fwd(out, ids, &p.bufs[self.wte], self.wpe.map(|i| (&p.bufs[i], pos)), self.width);
    }

    /// Accumulates into the embeddings' gradients. Nothing runs when both are frozen; when only
    /// one is, its gradient (a scatter-add the op always makes) is computed and left unused.
    pub fn bwd<B: Backend>(&self, be: &B, g: &mut GradsMut<B>, ids: &B::Ids, pos: &B::Ids, dout: &B::Buf) {
        if !g.trainable[self.wte] && !self.wpe.is_some_and(|i| g.trainable[i]) {
            return;
        }
        let (dwte, dwpe) = pair(g.bufs, self.wte, self.wpe);
        be.embedding_bwd(dwte, dwpe.map(|d| (d, pos)), ids, dout, self.width);
    }
}
