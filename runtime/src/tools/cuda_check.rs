//! Op-by-op parity of the CUDA backend against the CPU backend on random inputs (never zeros),
//! then whole training steps of small GPT-2 and Llama models: `runtime cuda-check` and the GPU
//! tests. Every accumulating output starts from random values, so `+=` and `=` are told apart.
//!
//! The error measure is the largest absolute difference over the largest magnitude of the CPU
//! result (`max|gpu - cpu| / max|cpu|`), and the relative L2 error for parameters after an AdamW
//! step (see [`rel_err_l2`]); limits are 1e-4 in f32 and 1e-2 where bf16 operands are involved.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

mod products;
mod steps;

use crate::backend::bf16_model::rounded;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::Cuda;
use crate::backend::{Activation, AdamWStep, AttnImpl, AttnShape, Backend, ColBlock, StatGrads, StatsWanted};
use crate::error::Result;
use products::{act_matmul, adapter, head_loss, matmul, matmul_after_step};
pub use steps::{model_parity, step_parity, step_parity_on};

/// One compared output.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub op: String,
    pub case: String,
    pub output: String,
    pub rel_err: f64,
    pub limit: f64,
    pub pass: bool,
}

/// `max|a - b| / max|b|` (NaN anywhere counts as an infinite error).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs())).max(1e-30);
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| if x.is_nan() || y.is_nan() { f64::INFINITY } else { m.max((x as f64 - y as f64).abs()) });
    diff / scale
}

/// The relative L2 error `||a - b|| / ||b||`, for whole parameter vectors after an AdamW step:
/// AdamW's first step moves each weight by about `lr * sign(g)`, so a gradient within rounding of
/// zero can flip one weight by `2 lr` without anything being wrong; the L2 measure weighs that
/// by how few such weights there are.
pub fn rel_err_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (d / n.max(1e-300)).sqrt()
}

/// The checks' random inputs.
pub(crate) struct Rng(pub(crate) ChaCha8Rng);

impl Rng {
    /// Uniform in `[-s, s]`, never exactly zero.
    pub(crate) fn vec(&mut self, n: usize, s: f32) -> Vec<f32> {
        (0..n)
            .map(|_| loop {
                let x = self.0.random_range(-s..s);
                if x != 0.0 {
                    break x;
                }
            })
            .collect()
    }
    fn ids(&mut self, n: usize, hi: i32) -> Vec<i32> {
        (0..n).map(|_| self.0.random_range(0..hi)).collect()
    }
}

/// The outputs of one op on one backend, downloaded.
type Outs = Vec<(&'static str, Vec<f32>)>;

struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn compare(&mut self, op: &str, case: &str, gpu: Outs, cpu: Outs, limit: f64) {
        for ((name, g), (_, c)) in gpu.into_iter().zip(cpu) {
            let e = rel_err(&g, &c);
            self.checks.push(Check { op: op.into(), case: case.into(), output: name.into(), rel_err: e, limit, pass: e <= limit });
        }
    }
}

fn pointwise<B: Backend>(be: &B, x: &[f32], y: &[f32], d: &[f32], dx0: &[f32], i: usize) -> Result<Outs> {
    let (xb, yb, db) = (be.upload(x)?, be.upload(y)?, be.upload(d)?);
    let mut out = be.upload(dx0)?;
    let mut res = Vec::new();
    be.gelu_fwd(&mut out, &xb);
    res.push(("gelu_fwd", be.download(&out)?));
    be.gelu_bwd(&mut out, &xb, &db);
    res.push(("gelu_bwd", be.download(&out)?));
    be.add(&mut out, &xb, &yb);
    res.push(("add", be.download(&out)?));
    let mut s = be.upload(x)?;
    be.scale(&mut s, 0.37);
    res.push(("scale", be.download(&s)?));
    be.fill(&mut s, 1.25);
    res.push(("fill", be.download(&s)?));
    res.push(("sum_squares", vec![be.sum_squares(&xb)? as f32]));
    res.push(("sum_squares_multi", be.sum_squares_multi(&[&xb, &yb, &db])?.into_iter().map(|v| v as f32).collect()));
    let mut dr = be.upload(x)?;
    be.dropout(&mut dr, crate::backend::DropoutMask::new(0.3, 0x5eed));
    res.push(("dropout", be.download(&dr)?));
    // a column block of a [rows, 2i] buffer, in and out (the LoRA branches' ops)
    let (rows, w) = (x.len() / (2 * i), i / 2);
    let mut blk = be.upload(&dx0[..rows * w])?;
    be.take_cols(&mut blk, &xb, rows, w, 2 * i, 3, -0.75);
    res.push(("take_cols", be.download(&blk)?));
    let mut acc = be.upload(y)?;
    be.add_cols(&mut acc, &blk, rows, w, 2 * i, i + 1, 0.5);
    res.push(("add_cols", be.download(&acc)?));
    // swiglu on [rows, 2i] input
    let mut o = be.upload(&dx0[..x.len() / 2])?;
    be.swiglu_fwd(&mut o, &xb, i);
    res.push(("swiglu_fwd", be.download(&o)?));
    let mut dxs = be.upload(dx0)?;
    be.swiglu_bwd(&mut dxs, &xb, &be.upload(&d[..x.len() / 2])?, i);
    res.push(("swiglu_bwd", be.download(&dxs)?));
    Ok(res)
}

#[allow(clippy::too_many_arguments)] // an op's inputs
fn norms<B: Backend>(be: &B, x: &[f32], w: &[f32], bias: &[f32], d: &[f32], dx0: &[f32], dw0: &[f32], c: usize) -> Result<Outs> {
    let rows = x.len() / c;
    let (xb, wb, bb, db) = (be.upload(x)?, be.upload(w)?, be.upload(bias)?, be.upload(d)?);
    let (mut out, mut mean, mut rstd) = (be.zeros(x.len())?, be.zeros(rows)?, be.zeros(rows)?);
    be.layernorm_fwd(&mut out, &mut mean, &mut rstd, &xb, &wb, Some(&bb), c, 1e-5);
    let mut res = vec![("layernorm_fwd", be.download(&out)?), ("layernorm_mean", be.download(&mean)?), ("layernorm_rstd", be.download(&rstd)?)];
    let (mut dx, mut dw, mut dbias) = (be.upload(dx0)?, be.upload(dw0)?, be.upload(dw0)?);
    be.layernorm_bwd(&mut dx, &mut dw, Some(&mut dbias), &db, &xb, &wb, &mean, &rstd, c);
    res.extend([("layernorm_dx", be.download(&dx)?), ("layernorm_dw", be.download(&dw)?), ("layernorm_db", be.download(&dbias)?)]);
    be.rmsnorm_fwd(&mut out, &mut rstd, &xb, &wb, c, 1e-6);
    res.extend([("rmsnorm_fwd", be.download(&out)?), ("rmsnorm_rstd", be.download(&rstd)?)]);
    let (mut dx, mut dw) = (be.upload(dx0)?, be.upload(dw0)?);
    be.rmsnorm_bwd(&mut dx, &mut dw, &db, &xb, &wb, &rstd, c);
    res.extend([("rmsnorm_dx", be.download(&dx)?), ("rmsnorm_dw", be.download(&dw)?)]);
    Ok(res)
}

fn attention<B: Backend>(be: &B, qkv: &[f32], mask: &[i32], d: &[f32], s: AttnShape) -> Result<Outs> {
    let (qb, mb, db) = (be.upload(qkv)?, be.upload_ids(mask)?, be.upload(d)?);
    let (mut out, mut stats) = (be.zeros(s.rows() * s.out_width())?, be.zeros(s.stats_len(AttnImpl::Flash))?);
    be.attention_fwd(&mut out, &mut stats, &qb, &mb, s, AttnImpl::Flash);
    let mut dqkv = be.upload(&vec![7.0; qkv.len()])?;
    be.attention_bwd(&mut dqkv, &db, &qb, &out, &stats, &mb, s, AttnImpl::Flash);
    let mut res = vec![("out", be.download(&out)?), ("dqkv", be.download(&dqkv)?)];
    // with dropout on the probabilities (the same mask on both backends)
    let drop = crate::backend::DropoutMask::new(0.2, 0xd20b);
    be.attention_fwd_dropout(&mut out, &mut stats, &qb, &mb, s, AttnImpl::Flash, drop);
    be.attention_bwd_dropout(&mut dqkv, &db, &qb, &out, &stats, &mb, s, AttnImpl::Flash, drop);
    res.push(("out with dropout", be.download(&out)?));
    res.push(("dqkv with dropout", be.download(&dqkv)?));
    Ok(res)
}

fn rope<B: Backend>(be: &B, qkv: &[f32], pos: &[i32], s: AttnShape) -> Result<Outs> {
    let (mut qb, pb) = (be.upload(qkv)?, be.upload_ids(pos)?);
    be.rope(&mut qb, &pb, s, 10000.0, false);
    let fwd = be.download(&qb)?;
    be.rope(&mut qb, &pb, s, 10000.0, true);
    Ok(vec![("rope", fwd), ("rope_inverse", be.download(&qb)?)])
}

/// Appends a prompt to the KV cache, then decodes one token attending to it.
fn decode<B: Backend>(be: &B, prompt_qkv: &[f32], tok_qkv: &[f32], mask: &[i32], s: AttnShape, max_len: usize) -> Result<Outs> {
    let kvw = s.n_kv_head * s.head_dim;
    let (mut kc, mut vc) = (be.zeros(s.batch * max_len * kvw)?, be.zeros(s.batch * max_len * kvw)?);
    be.kv_append(&mut kc, &mut vc, &be.upload(prompt_qkv)?, 0, s, max_len);
    let one = AttnShape { seq: 1, ..s };
    be.kv_append(&mut kc, &mut vc, &be.upload(tok_qkv)?, s.seq, one, max_len);
    let mut out = be.zeros(s.batch * s.out_width())?;
    be.attention_decode(&mut out, &be.upload(tok_qkv)?, &kc, &vc, &be.upload_ids(mask)?, s.seq, one, max_len);
    Ok(vec![("k_cache", be.download(&kc)?), ("v_cache", be.download(&vc)?), ("out", be.download(&out)?)])
}

fn embedding<B: Backend>(be: &B, ids: &[i32], pos: &[i32], wte: &[f32], wpe: &[f32], d: &[f32], c: usize) -> Result<Outs> {
    let (ib, pb, wb, pwb) = (be.upload_ids(ids)?, be.upload_ids(pos)?, be.upload(wte)?, be.upload(wpe)?);
    let mut out = be.zeros(ids.len() * c)?;
    be.embedding_fwd(&mut out, &ib, &wb, Some((&pwb, &pb)), c);
    let (mut dwte, mut dwpe) = (be.upload(wte)?, be.upload(wpe)?);
    be.embedding_bwd(&mut dwte, Some((&mut dwpe, &pb)), &ib, &be.upload(d)?, c);
    Ok(vec![("out", be.download(&out)?), ("dwte", be.download(&dwte)?), ("dwpe", be.download(&dwpe)?)])
}

fn losses<B: Backend>(be: &B, logits: &[f32], targets: &[i32], v: usize, g: &StatGrads) -> Result<Outs> {
    let tb = be.upload_ids(targets)?;
    let mut lb = be.upload(logits)?;
    let rows = be.cross_entropy(&mut lb, &tb, v, 0.1, Some(0.5))?;
    let mut res = vec![("ce_loss", rows.loss), ("ce_n_targets", vec![rows.n_targets as f32]), ("ce_grad", be.download(&lb)?)];
    // the chunked head's form: the losses of rows 5.. land at an offset of a longer buffer that
    // holds other values, and a range copy moves part of the logits
    let n = targets.len();
    let (mut lb, mut into) = (be.upload(logits)?, be.upload(&(0..n + 9).map(|i| i as f32 + 0.5).collect::<Vec<_>>())?);
    be.cross_entropy_into(&mut lb, &be.upload_ids(&targets[5..])?, v, 0.0, None, &mut into, 7);
    be.copy_range(&mut lb, 3, &be.upload(&logits[v..])?, 2 * v + 1, v + 5);
    res.extend([("cross_entropy_into", be.download(&into)?), ("copy_range", be.download(&lb)?)]);
    let want = StatsWanted { label_logprob: true, logsumexp: true, mean_logprob: true, entropy: true, argmax: true };
    let lb = be.upload(logits)?;
    let mut st = be.token_stats(&lb, &tb, v, want)?;
    res.extend([
        ("label_logprob", st.label_logprob.clone()),
        ("logsumexp", st.logsumexp.clone()),
        ("mean_logprob", st.mean_logprob.clone()),
        ("entropy", st.entropy.clone()),
        ("argmax", st.argmax.iter().map(|&a| a as f32).collect()),
    ]);
    let back = st.take_backward_state();
    let mut lb = be.upload(logits)?;
    be.token_stats_bwd(&mut lb, &tb, v, &back, g);
    res.push(("token_stats_bwd", be.download(&lb)?));
    Ok(res)
}

fn adamw<B: Backend>(be: &B, p: &[Vec<f32>], g: &[Vec<f32>], m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<Outs> {
    let up = |x: &[Vec<f32>]| x.iter().map(|t| be.upload(t)).collect::<Result<Vec<_>>>();
    let (mut pb, gb, mut mb, mut vb) = (up(p)?, up(g)?, up(m)?, up(v)?);
    let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.7 };
    let mut t: Vec<_> =
        pb.iter_mut().zip(&gb).zip(mb.iter_mut().zip(vb.iter_mut())).enumerate().map(|(i, ((p, g), (m, v)))| (p, g, m, v, i % 2 == 0)).collect();
    be.adamw_multi(&mut t, hp);
    let cat = |x: &[B::Buf]| x.iter().map(|b| be.download(b)).collect::<Result<Vec<_>>>().map(|v| v.concat());
    Ok(vec![("param", cat(&pb)?), ("exp_avg", cat(&mb)?), ("exp_avg_sq", cat(&vb)?)])
}

/// Every op of the set on the CPU and on `gpu`, compared. In bf16 mode the products and the
/// attention read bf16-rounded operands on the GPU; the CPU gets the same rounded operands, so
/// the comparison measures the kernels, not the rounding of the inputs.
pub fn op_parity(gpu: &Cuda) -> Result<Vec<Check>> {
    let mut checks = with_determinism(gpu, true, || op_parity_on(gpu, gpu.bf16()))?;
    if gpu.bf16() {
        // the tensor-core backward's two forms: the two kernels training uses (above), and the
        // single kernel with atomic dq
        let more = with_determinism(gpu, false, || op_parity_on(gpu, true))?;
        checks.extend(more.into_iter().filter(|c| c.op == "attention").map(|c| Check { case: format!("{}, atomic dq", c.case), ..c }));
    }
    Ok(checks)
}

/// `f` with `gpu`'s deterministic attention backward set to `on`, then restored.
pub(crate) fn with_determinism<R>(gpu: &Cuda, on: bool, f: impl FnOnce() -> R) -> R {
    let was = gpu.deterministic();
    gpu.set_deterministic(on);
    let r = f();
    gpu.set_deterministic(was);
    r
}

/// [`op_parity`] against any backend (`bf16`: whether it rounds product and attention operands).
pub fn op_parity_on<G: Backend>(gpu: &G, bf16: bool) -> Result<Vec<Check>> {
    let cpu = Cpu;
    let rounded = |x: &[f32]| if bf16 { rounded(x) } else { x.to_vec() };
    let mut r = Report { checks: Vec::new() };
    let mut rng = Rng(ChaCha8Rng::seed_from_u64(2024));
    let lim = if bf16 { 1e-2 } else { 1e-4 };

    let (rows, i) = (37, 300);
    let (x, y, d, dx0) = (rng.vec(rows * 2 * i, 3.0), rng.vec(rows * 2 * i, 1.0), rng.vec(rows * 2 * i, 1.0), rng.vec(rows * 2 * i, 1.0));
    r.compare("pointwise", &format!("{} values", x.len()), pointwise(gpu, &x, &y, &d, &dx0, i)?, pointwise(&cpu, &x, &y, &d, &dx0, i)?, 1e-4);

    // 2100: wider than the fused norm backward kernels take (the two-kernel path)
    for c in [64, 768, 1000, 2100] {
        let rows = 45;
        let (x, w, b, d, dx0, dw0) =
            (rng.vec(rows * c, 2.0), rng.vec(c, 1.0), rng.vec(c, 1.0), rng.vec(rows * c, 1.0), rng.vec(rows * c, 1.0), rng.vec(c, 1.0));
        r.compare("norm", &format!("rows {rows}, width {c}"), norms(gpu, &x, &w, &b, &d, &dx0, &dw0, c)?, norms(&cpu, &x, &w, &b, &d, &dx0, &dw0, c)?, 1e-4);
    }

    for (n, k, m) in [(64, 48, 80), (257, 768, 300), (1024, 768, 2304)] {
        let (inp, w, b, d, dw0) = (rng.vec(n * k, 1.0), rng.vec(m * k, 0.1), rng.vec(m, 1.0), rng.vec(n * m, 1.0), rng.vec(m * k, 1.0));
        let case = format!("n {n}, k {k}, m {m}");
        let (ri, rw, rd) = (rounded(&inp), rounded(&w), rounded(&d));
        r.compare("matmul", &case, matmul(gpu, &inp, &w, &b, &d, &dw0, (n, k, m))?, matmul(&cpu, &ri, &rw, &b, &rd, &dw0, (n, k, m))?, lim);
        // SwiGLU: m is the packed gate and up (m even here), the activation's gradient half as wide
        let pre = rng.vec(n * m, 3.0);
        for (name, act, dact) in [
            ("gelu then matmul backward", Activation::Gelu, &d[..]),
            ("swiglu then matmul backward", Activation::SwiGlu { intermediate: m / 2 }, &d[..n * m / 2]),
        ] {
            let gpu_out = act_matmul(gpu, act, &pre, dact, &inp, &w, &dw0, (n, k, m))?;
            r.compare(name, &case, gpu_out, act_matmul(&cpu, act, &pre, dact, &ri, &rw, &dw0, (n, k, m))?, lim);
        }
    }

    let (n, k, m) = (96, 256, 320);
    let (w, g, inp, d) = (rng.vec(m * k, 0.1), rng.vec(m * k, 1.0), rng.vec(n * k, 1.0), rng.vec(n * m, 1.0));
    r.compare(
        "matmul after adamw",
        &format!("n {n}, k {k}, m {m}"),
        matmul_after_step(gpu, &w, &g, &inp, &d, (n, k, m), false)?,
        matmul_after_step(&cpu, &w, &g, &inp, &d, (n, k, m), bf16)?,
        lim,
    );

    // a block starting inside a row (its first column 3: operands 12 bytes into it) and one at 64
    for (rows, k, ld, off, width, rank) in [(45, 48, 100, 3, 37, 8), (64, 96, 192, 64, 64, 16)] {
        let (out0, x, w, t) = (rng.vec(rows * ld, 1.0), rng.vec(rows * k, 1.0), rng.vec(ld * k, 0.1), rng.vec(rows * rank, 1.0));
        let (b, dout, db0) = (rng.vec(width * rank, 0.1), rng.vec(rows * ld, 1.0), rng.vec(width * rank, 1.0));
        let blk = ColBlock { rows, width, ld, off };
        let case = format!("rows {rows}, columns {off}..{} of {ld}, rank {rank}", off + width);
        let (gpu_out, cpu_out) = (
            adapter(gpu, &out0, &x, &w, &t, &b, &dout, &db0, blk, rank)?,
            adapter(&cpu, &out0, &rounded(&x), &rounded(&w), &rounded(&t), &rounded(&b), &rounded(&dout), &db0, blk, rank)?,
        );
        r.compare("lora_up + backward (dout reused)", &case, gpu_out, cpu_out, lim);
    }

    for (batch, seq, n_head, n_kv_head, head_dim) in [(2, 70, 4, 2, 16), (1, 130, 2, 2, 64), (2, 100, 4, 1, 128), (1, 256, 12, 12, 64)] {
        let s = AttnShape { batch, seq, n_head, n_kv_head, head_dim };
        let qkv = rng.vec(s.rows() * s.qkv_width(), 1.0);
        // left padding on the first sequence: a row with every key masked, and masked keys
        let mask: Vec<i32> = (0..s.rows()).map(|r| i32::from(!(r < s.seq && r % s.seq < 5))).collect();
        let d = rng.vec(s.rows() * s.out_width(), 1.0);
        let case = format!("b {batch}, t {seq}, heads {n_head}/{n_kv_head}, d {head_dim}");
        r.compare("attention", &case, attention(gpu, &qkv, &mask, &d, s)?, attention(&cpu, &rounded(&qkv), &mask, &rounded(&d), s)?, lim);
        let pos: Vec<i32> = (0..s.rows()).map(|r| (r % s.seq) as i32 + 3).collect();
        r.compare("rope", &case, rope(gpu, &qkv, &pos, s)?, rope(&cpu, &qkv, &pos, s)?, 1e-4);
        let max_len = seq + 9;
        let tok = rng.vec(batch * s.qkv_width(), 1.0);
        let dmask: Vec<i32> = (0..batch * max_len).map(|j| i32::from(j % max_len >= 3 || j / max_len == 1)).collect();
        r.compare("kv_append + attention_decode", &case, decode(gpu, &qkv, &tok, &dmask, s, max_len)?, decode(&cpu, &qkv, &tok, &dmask, s, max_len)?, 1e-4);
    }

    let (vocab, c, rows) = (1000, 96, 300);
    let (ids, pos) = (rng.ids(rows, vocab as i32), rng.ids(rows, 64));
    let (wte, wpe, d) = (rng.vec(vocab * c, 1.0), rng.vec(64 * c, 1.0), rng.vec(rows * c, 1.0));
    r.compare(
        "embedding",
        &format!("rows {rows}, width {c}"),
        embedding(gpu, &ids, &pos, &wte, &wpe, &d, c)?,
        embedding(&cpu, &ids, &pos, &wte, &wpe, &d, c)?,
        1e-4,
    );

    for v in [1000, 50257] {
        let rows = 24;
        let logits = rng.vec(rows * v, 8.0);
        let targets: Vec<i32> = (0..rows).map(|r| if r % 5 == 3 { -100 } else { rng.0.random_range(0..v as i32) }).collect();
        let g = StatGrads { label_logprob: rng.vec(rows, 1.0), logsumexp: rng.vec(rows, 1.0), mean_logprob: rng.vec(rows, 1.0), entropy: rng.vec(rows, 1.0) };
        r.compare("loss", &format!("rows {rows}, vocab {v}"), losses(gpu, &logits, &targets, v, &g)?, losses(&cpu, &logits, &targets, v, &g)?, 1e-4);
    }

    for v in [1000, 50257] {
        let (n, k) = (40, 64);
        let (x, w, dw0) = (rng.vec(n * k, 1.0), rng.vec(v * k, 0.2), rng.vec(v * k, 1.0));
        let targets: Vec<i32> = (0..n).map(|r| if r % 7 == 2 { -100 } else { rng.0.random_range(0..v as i32) }).collect();
        let case = format!("rows {n}, k {k}, vocab {v}");
        let (gpu_out, cpu_out) = (head_loss(gpu, &x, &w, &targets, &dw0, (n, k, v))?, head_loss(&cpu, &rounded(&x), &rounded(&w), &targets, &dw0, (n, k, v))?);
        r.compare("lm head + loss (fused)", &case, gpu_out, cpu_out, lim);
    }

    let sizes = [1000, 4096 * 3 + 5, 17, 300_000];
    let mk = |rng: &mut Rng, s: f32| sizes.iter().map(|&n| rng.vec(n, s)).collect::<Vec<_>>();
    let (p, g, m) = (mk(&mut rng, 1.0), mk(&mut rng, 1.0), mk(&mut rng, 0.1));
    let v: Vec<Vec<f32>> = mk(&mut rng, 0.01).into_iter().map(|t| t.into_iter().map(|x| x.abs()).collect()).collect();
    r.compare("adamw_multi", &format!("{} tensors", sizes.len()), adamw(gpu, &p, &g, &m, &v)?, adamw(&cpu, &p, &g, &m, &v)?, 1e-5);
    Ok(r.checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself, with the CPU standing in for the GPU: every op and the training steps
    /// run, every output is compared, and a backend compared with itself agrees exactly.
    #[test]
    fn the_parity_harness_runs_every_check_and_the_cpu_agrees_with_itself() {
        let mut checks = op_parity_on(&Cpu, false).unwrap();
        checks.extend(step_parity_on(&Cpu, false).unwrap());
        let ops: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.op.as_str()).collect();
        for op in [
            "pointwise",
            "norm",
            "matmul",
            "gelu then matmul backward",
            "swiglu then matmul backward",
            "matmul after adamw",
            "lora_up + backward (dout reused)",
            "lm head + loss (fused)",
            "attention",
            "rope",
            "kv_append + attention_decode",
            "embedding",
            "loss",
            "adamw_multi",
            "training step",
            "training curve",
        ] {
            assert!(ops.contains(op), "no check of {op}");
        }
        assert!(checks.len() > 80, "{} checks", checks.len());
        for c in &checks {
            assert_eq!(c.rel_err, 0.0, "{c:?}");
        }
    }

    #[test]
    fn the_error_measures_see_a_difference() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.2], &[1.0, 2.0]) - 0.1).abs() < 1e-6);
        assert!(rel_err(&[f32::NAN], &[1.0]).is_infinite());
        assert!((rel_err_l2(&[3.0, 4.0], &[3.0, 0.0]) - 4.0 / 3.0).abs() < 1e-9);
    }
}
