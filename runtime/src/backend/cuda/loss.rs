//! The fused losses on the device: softmax cross-entropy with the gradient written in place,
//! and the per-token statistics of plugin losses with their chain rule.
// the launchers take their trait method's operands one by one, as the op set passes them
#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaSlice;

use super::blas::Ty;
use super::{Cuda, A};
use crate::backend::{Backend, LossRows, StatGrads, StatsWanted, TokenStats};
use crate::error::{Error, Result};

impl Cuda {
    pub(super) fn cross_entropy_op(
        &self,
        logits: &mut CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        v: usize,
        smoothing: f32,
        grad_scale: Option<f32>,
    ) -> Result<LossRows> {
        let mut loss: CudaSlice<f32> = self.alloc(targets.len())?;
        self.cross_entropy_into(logits, targets, v, smoothing, grad_scale, &mut loss, 0);
        let n_targets = self.host(targets)?.iter().filter(|&&t| t != crate::backend::IGNORE_INDEX).count();
        Ok(LossRows { loss: self.host(&loss)?, n_targets })
    }

    pub(super) fn cross_entropy_into_op(
        &self,
        logits: &mut CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        v: usize,
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut CudaSlice<f32>,
        row0: usize,
    ) {
        let rows = targets.len();
        if rows == 0 {
            return;
        }
        if row0 + rows > loss.len() {
            // a caller's broken contract: recorded, as a kernel failure is, rather than a panic
            return self.fail(Error::Invalid(format!("cross_entropy_into: {rows} losses from row {row0} do not fit in {}", loss.len())));
        }
        let z = (self.ptr(logits), v, Some(0));
        self.launch_cross_entropy(
            z,
            self.ptr(loss) + (row0 * std::mem::size_of::<f32>()) as u64,
            targets,
            (rows, v),
            (smoothing, grad_scale),
            grad_scale.is_some(),
        );
    }

    /// `cross_entropy` over `rows` rows of `z = (f32 logits, row stride, Some(bf16 gradient or
    /// 0))`, or `cross_entropy_bf16` over bf16 logits (`None`: the gradient goes over them); the
    /// losses at `loss`; `write_grad` writes the gradient (see kernels/cross_entropy.cu).
    fn launch_cross_entropy(
        &self,
        (logits, ld, grad16): (u64, usize, Option<u64>),
        loss: u64,
        targets: &CudaSlice<i32>,
        (rows, v): (usize, usize),
        (smoothing, grad_scale): (f32, Option<f32>),
        write_grad: bool,
    ) {
        let mut args = vec![A::P(logits), A::L(ld as i64)];
        args.extend(grad16.map(A::P));
        args.extend([
            A::P(loss),
            self.p(targets),
            A::I(rows as i32),
            A::I(v as i32),
            A::F(smoothing),
            A::F(grad_scale.unwrap_or(0.0)),
            A::I(write_grad as i32),
        ]);
        // bf16 logits with the gradient: the row staged in shared memory when it fits
        // (`loss_row_staged`), so it is read from device memory once
        let (kernel, shared) = match grad16 {
            Some(_) => ("cross_entropy", 0),
            None if write_grad && crate::backend::loss_row_staged(v, self.0.smem) => ("cross_entropy_bf16_staged", 2 * v as u32),
            None => ("cross_entropy_bf16", 0),
        };
        self.launch_shared(kernel, (rows as u32, 1, 1), (512, 1, 1), shared, &args);
    }

    /// The fused head and loss (`Backend::head_loss`): the product writes the logits straight
    /// into rows padded to `aligned_ld(v)` (no copy out) and the loss reads them there. In bf16
    /// mode the logits are bf16 (f32 accumulation, rounded once, as autocast's head writes them),
    /// and the loss writes the gradient over them in bf16: the operand of the backward products
    /// (no f32 gradient and no cast), which reuse the forward's bf16 input and weight.
    pub(super) fn head_loss_op(
        &self,
        logits: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        (n, k, v): (usize, usize, usize),
        (smoothing, grad_scale): (f32, Option<f32>),
        loss: &mut CudaSlice<f32>,
        row0: usize,
        back: Option<(&mut CudaSlice<f32>, Option<&mut CudaSlice<f32>>)>,
    ) {
        if n == 0 {
            return;
        }
        if row0 + n > loss.len() || targets.len() != n {
            return self.fail(Error::Invalid(format!("head_loss: {n} rows from row {row0}, {} losses, {} targets", loss.len(), targets.len())));
        }
        self.forget_weight(logits);
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ([w_p, x_p], ty) = self.operands(&mut scratch, [w, x], 0, [true, true]);
        let ld = crate::backend::aligned_ld(v);
        let back = back.filter(|_| grad_scale.is_some());
        let loss_p = self.ptr(loss) + (row0 * std::mem::size_of::<f32>()) as u64;
        let z = if ty == Ty::Bf16 {
            let z = self.grown(&mut scratch.bf16[2], n * ld);
            self.product_into_as(z, ld, w_p, x_p, None, (n, k, v), ty, Ty::Bf16);
            self.launch_cross_entropy((z, ld, None), loss_p, targets, (n, v), (smoothing, grad_scale), back.is_some());
            z
        } else {
            let z = if ld == v && logits.len() >= n * v { self.ptr(logits) } else { self.grown(&mut scratch.padded, n * ld) };
            self.product_into(z, ld, w_p, x_p, None, (n, k, v), ty);
            self.launch_cross_entropy((z, ld, Some(0)), loss_p, targets, (n, v), (smoothing, grad_scale), back.is_some());
            z
        };
        if let Some((dx, dw)) = back {
            self.forget_weight(dx);
            // the gradient, where the logits were: bf16 in bf16 mode, else f32
            self.products_from(Some((self.ptr(dx), 0.0)), dw.map(|d| self.ptr(d)), z, ld, x_p, w_p, (n, k, v), ty);
        }
    }

    pub(super) fn token_stats_op(&self, logits: &CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, want: StatsWanted) -> Result<TokenStats> {
        let rows = targets.len();
        let needs_lse = want.label_logprob || want.logsumexp || want.mean_logprob || want.entropy;
        let buf = |on: bool| on.then(|| self.alloc::<f32>(rows)).transpose();
        let (lp, lse, mlp, ent, rlse, rmz) =
            (buf(want.label_logprob)?, buf(want.logsumexp)?, buf(want.mean_logprob)?, buf(want.entropy)?, buf(needs_lse)?, buf(want.entropy)?);
        let am = want.argmax.then(|| self.alloc::<i32>(rows)).transpose()?;
        let args = [
            self.opt(lp.as_ref()),
            self.opt(lse.as_ref()),
            self.opt(mlp.as_ref()),
            self.opt(ent.as_ref()),
            self.opt(am.as_ref()),
            self.opt(rlse.as_ref()),
            self.opt(rmz.as_ref()),
            self.p(logits),
            self.p(targets),
            A::I(rows as i32),
            A::I(v as i32),
        ];
        self.launch("token_stats", (rows as u32, 1, 1), (512, 1, 1), &args);
        let get = |b: Option<CudaSlice<f32>>| b.map(|b| self.host(&b)).transpose().map(Option::unwrap_or_default);
        Ok(TokenStats {
            label_logprob: get(lp)?,
            logsumexp: get(lse)?,
            mean_logprob: get(mlp)?,
            entropy: get(ent)?,
            argmax: am.map(|b| self.host(&b)).transpose()?.map(|a| a.into_iter().map(|x| x as u32).collect()).unwrap_or_default(),
            row_lse: get(rlse)?,
            row_mean_z: get(rmz)?,
        })
    }

    pub(super) fn token_stats_bwd_op(&self, logits: &mut CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, stats: &TokenStats, grads: &StatGrads) {
        let rows = targets.len();
        let up = |x: &Vec<f32>| (!x.is_empty()).then(|| self.dev(x)).transpose();
        let uploaded = (|| {
            Ok::<_, Error>((
                (up(&stats.row_lse)?, up(&stats.row_mean_z)?),
                (up(&grads.label_logprob)?, up(&grads.logsumexp)?, up(&grads.mean_logprob)?, up(&grads.entropy)?),
            ))
        })();
        let ((rlse, rmz), (g_lp, g_lse, g_mlp, g_h)) = match uploaded {
            Ok(u) => u,
            Err(e) => return self.fail(e),
        };
        let args = [
            self.p(logits),
            self.p(targets),
            self.opt(rlse.as_ref()),
            self.opt(rmz.as_ref()),
            self.opt(g_lp.as_ref()),
            self.opt(g_lse.as_ref()),
            self.opt(g_mlp.as_ref()),
            self.opt(g_h.as_ref()),
            A::I(rows as i32),
            A::I(v as i32),
        ];
        self.launch("token_stats_bwd", (rows as u32, 1, 1), (512, 1, 1), &args);
    }
}
