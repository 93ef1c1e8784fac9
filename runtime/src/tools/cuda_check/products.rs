//! The product ops of the parity check: products with and without an activation's backward pass,
//! a product after the fused AdamW step, LoRA's up-projection, the fused LM head and loss.

use super::Outs;
use crate::backend::bf16_model::rounded;
use crate::backend::{Activation, AdamWStep, Backend, ColBlock};
use crate::error::Result;

#[allow(clippy::too_many_arguments)] // an op's inputs
pub(super) fn matmul<B: Backend>(be: &B, inp: &[f32], w: &[f32], bias: &[f32], d: &[f32], dw0: &[f32], (n, k, m): (usize, usize, usize)) -> Result<Outs> {
    let (ib, wb, bb, db) = (be.upload(inp)?, be.upload(w)?, be.upload(bias)?, be.upload(d)?);
    let mut out = be.zeros(n * m)?;
    be.matmul_fwd(&mut out, &ib, &wb, Some(&bb), n, k, m);
    let mut res = vec![("out", be.download(&out)?)];
    let (mut dinp, mut dw, mut dbias) = (be.zeros(n * k)?, be.upload(dw0)?, be.upload(&bias.iter().map(|x| x * 0.5).collect::<Vec<_>>())?);
    be.matmul_bwd(Some(&mut dinp), Some(&mut dw), Some(&mut dbias), &db, &ib, &wb, n, k, m);
    res.extend([("dinp", be.download(&dinp)?), ("dw", be.download(&dw)?), ("dbias", be.download(&dbias)?)]);
    Ok(res)
}

/// The backward pass of a product whose output went through an activation (on CUDA in bf16, one
/// pass makes the gradient through it and its bf16 operand, with the bias gradient for GELU).
#[allow(clippy::too_many_arguments)] // an op's inputs
pub(super) fn act_matmul<B: Backend>(
    be: &B,
    act: Activation,
    pre: &[f32],
    dact: &[f32],
    inp: &[f32],
    w: &[f32],
    dw0: &[f32],
    (n, k, m): (usize, usize, usize),
) -> Result<Outs> {
    let (pb, ab, ib, wb) = (be.upload(pre)?, be.upload(dact)?, be.upload(inp)?, be.upload(w)?);
    let (mut dinp, mut dw, mut dpre) = (be.zeros(n * k)?, be.upload(dw0)?, be.zeros(n * m)?);
    let mut dbias = if act == Activation::Gelu { Some(be.zeros(m)?) } else { None };
    be.act_matmul_bwd(act, Some(&mut dinp), Some(&mut dw), dbias.as_mut(), &mut dpre, &ab, &pb, &ib, &wb, n, k, m);
    let mut res = vec![("dinp", be.download(&dinp)?), ("dw", be.download(&dw)?)];
    if let Some(db) = dbias {
        res.push(("dbias", be.download(&db)?));
    }
    Ok(res)
}

/// A product with a weight the fused AdamW step just updated (on CUDA in bf16, through the
/// step's bf16 working copy of the weight). Every buffer is made before the step, since making
/// one drops the working copies.
///
/// `round` (for the CPU side of a bf16 comparison) rounds the updated weight and the other
/// operands to bf16, as the GPU's products see them.
#[allow(clippy::too_many_arguments)] // an op's inputs
pub(super) fn matmul_after_step<B: Backend>(
    be: &B,
    w: &[f32],
    g: &[f32],
    inp: &[f32],
    d: &[f32],
    (n, k, m): (usize, usize, usize),
    round: bool,
) -> Result<Outs> {
    let r = |x: &[f32]| if round { rounded(x) } else { x.to_vec() };
    let (mut wb, gb, mut mb, mut vb) = (be.upload(w)?, be.upload(g)?, be.zeros(w.len())?, be.zeros(w.len())?);
    let (ib, db, mut out, mut dinp, mut dw) = (be.upload(&r(inp))?, be.upload(&r(d))?, be.zeros(n * m)?, be.zeros(n * k)?, be.zeros(m * k)?);
    let hp = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 1, grad_scale: 1.0 };
    be.adamw_multi(&mut [(&mut wb, &gb, &mut mb, &mut vb, true)], hp);
    if round {
        wb = be.upload(&rounded(&be.download(&wb)?))?;
    }
    be.matmul_fwd(&mut out, &ib, &wb, None, n, k, m);
    be.matmul_bwd(Some(&mut dinp), Some(&mut dw), None, &db, &ib, &wb, n, k, m);
    Ok(vec![("out", be.download(&out)?), ("dinp", be.download(&dinp)?)])
}

/// LoRA's up-projection into a column block of a map's `[rows, ld]` output, and its backward pass
/// with the output gradient named for operand reuse and read first by the map's own backward
/// product, as `Linear::bwd_all` runs them (`x` `[rows, k]`, `w` `[ld, k]`, `t` `[rows, r]`, `b`
/// `[width, r]`).
#[allow(clippy::too_many_arguments)] // an op's inputs
pub(super) fn adapter<B: Backend>(
    be: &B,
    out0: &[f32],
    x: &[f32],
    w: &[f32],
    t: &[f32],
    b: &[f32],
    dout: &[f32],
    db0: &[f32],
    blk: ColBlock,
    r: usize,
) -> Result<Outs> {
    let (k, ld) = (x.len() / blk.rows, blk.ld);
    let (xb, wb, tb, bb, doutb) = (be.upload(x)?, be.upload(w)?, be.upload(t)?, be.upload(b)?, be.upload(dout)?);
    let (mut out, mut db, mut dt, mut dinp) = (be.upload(out0)?, be.upload(db0)?, be.zeros(blk.rows * r)?, be.zeros(blk.rows * k)?);
    be.lora_up(&mut out, &tb, &bb, blk, r, 1.5, true);
    be.begin_operand_reuse(&[&xb, &doutb]);
    be.matmul_bwd(Some(&mut dinp), None, None, &doutb, &xb, &wb, blk.rows, k, ld);
    be.lora_up_bwd((&mut dt, false), Some(&mut db), &doutb, &tb, &bb, blk, r, 1.5);
    be.end_operand_reuse();
    Ok(vec![("out", be.download(&out)?), ("dinp", be.download(&dinp)?), ("dt", be.download(&dt)?), ("db", be.download(&db)?)])
}

/// The fused LM head and loss (`Backend::head_loss`): the losses without and with the backward
/// pass, the input gradient and the accumulated weight gradient.
pub(super) fn head_loss<B: Backend>(be: &B, x: &[f32], w: &[f32], targets: &[i32], dw0: &[f32], (n, k, v): (usize, usize, usize)) -> Result<Outs> {
    let (xb, wb, tb) = (be.upload(x)?, be.upload(w)?, be.upload_ids(targets)?);
    let (mut logits, mut loss, mut dx, mut dw) = (be.zeros(n * v)?, be.zeros(n + 3)?, be.zeros(n * k)?, be.upload(dw0)?);
    be.head_loss(&mut logits, &xb, &wb, &tb, (n, k, v), 0.1, None, &mut loss, 3, None);
    let eval = be.download(&loss)?;
    be.head_loss(&mut logits, &xb, &wb, &tb, (n, k, v), 0.1, Some(0.25), &mut loss, 3, Some((&mut dx, Some(&mut dw))));
    Ok(vec![("loss (evaluation)", eval), ("loss", be.download(&loss)?), ("dx", be.download(&dx)?), ("dw", be.download(&dw)?)])
}
