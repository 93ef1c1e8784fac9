//! `runtime cuda-check --bench`: the attention kernels and the fused AdamW step timed on the
//! device.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::cuda_check::{with_determinism, Rng};
use crate::backend::cuda::Cuda;
use crate::backend::{AdamWStep, AttnImpl, AttnShape, Backend};
use crate::error::Result;

/// One timed kernel case of [`kernel_bench`].
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub kernel: String,
    pub case: String,
    pub ms: f64,
    /// TFLOP/s for attention (causal FLOPs: forward `2*2*B*H*T*T*D/2`, backward 2.5x), GB/s of
    /// bytes moved for AdamW.
    pub rate: f64,
    pub unit: String,
}

fn best_ms(gpu: &Cuda, reps: usize, mut f: impl FnMut()) -> Result<f64> {
    f();
    gpu.synchronize()?;
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = std::time::Instant::now();
        f();
        gpu.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// Attention forward+backward at head dims 64 and 128 and sequences 1024 and 4096 (about
/// 98k query rows per head-batch, as `scripts/gpu_reference.py` times PyTorch's SDPA), and the
/// fused AdamW step over GPT-2 124M's parameter count.
pub fn kernel_bench(gpu: &Cuda) -> Result<Vec<Timing>> {
    let mut out = Vec::new();
    let mut rng = Rng(ChaCha8Rng::seed_from_u64(1));
    for (d, t) in [(64, 1024), (128, 1024), (64, 4096), (128, 4096)] {
        let h = 12;
        let b = 8 * 1024 / t;
        let s = AttnShape { batch: b, seq: t, n_head: h, n_kv_head: h, head_dim: d };
        let qkv = gpu.upload(&rng.vec(s.rows() * s.qkv_width(), 1.0))?;
        let mask = gpu.upload_ids(&vec![1; s.rows()])?;
        let dout = gpu.upload(&rng.vec(s.rows() * s.out_width(), 1.0))?;
        let (mut o, mut st, mut dqkv) = (gpu.zeros(s.rows() * s.out_width())?, gpu.zeros(s.stats_len(AttnImpl::Flash))?, gpu.zeros(s.rows() * s.qkv_width())?);
        let fwd_flops = 2.0 * 2.0 * (b * h * t * t * d) as f64 / 2.0;
        let case = format!("B {b}, H {h}, T {t}, D {d}");
        let ms = best_ms(gpu, 5, || gpu.attention_fwd(&mut o, &mut st, &qkv, &mask, s, AttnImpl::Flash))?;
        out.push(Timing { kernel: "attention fwd".into(), case: case.clone(), ms, rate: fwd_flops / ms / 1e9, unit: "TFLOP/s".into() });
        // bf16 mode at these head dims: FlashAttention-2's single backward kernel (atomic dq, for
        // comparison), then the deterministic two-kernel form that training uses
        let modes = if gpu.bf16() { vec![false, true] } else { vec![gpu.deterministic()] };
        for det in modes {
            let ms = with_determinism(gpu, det, || {
                best_ms(gpu, 5, || {
                    gpu.attention_fwd(&mut o, &mut st, &qkv, &mask, s, AttnImpl::Flash);
                    gpu.attention_bwd(&mut dqkv, &dout, &qkv, &o, &st, &mask, s, AttnImpl::Flash);
                })
            })?;
            let kernel = if gpu.bf16() && !det { "attention fwd+bwd (atomic dq)" } else { "attention fwd+bwd" };
            out.push(Timing { kernel: kernel.into(), case: case.clone(), ms, rate: 3.5 * fwd_flops / ms / 1e9, unit: "TFLOP/s".into() });
        }
    }
    // AdamW over 124M parameters in GPT-2-like tensors: reads p, g, m, v and writes p, m, v
    let sizes: Vec<usize> =
        std::iter::repeat_n([768 * 2304, 768 * 768, 768 * 3072, 3072 * 768, 768, 768], 12).flatten().chain([50257 * 768, 1024 * 768]).collect();
    let n: usize = sizes.iter().sum();
    let mk = |rng: &mut Rng| sizes.iter().map(|&k| gpu.upload(&rng.vec(k, 0.1))).collect::<Result<Vec<_>>>();
    let (mut p, g, mut m, mut v) = (mk(&mut rng)?, mk(&mut rng)?, mk(&mut rng)?, mk(&mut rng)?);
    let mut step = 0;
    let ms = best_ms(gpu, 5, || {
        step += 1;
        let hp = AdamWStep { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 1.0 };
        let mut t: Vec<_> = p.iter_mut().zip(&g).zip(m.iter_mut().zip(v.iter_mut())).map(|((p, g), (m, v))| (p, g, m, v, true)).collect();
        gpu.adamw_multi(&mut t, hp);
    })?;
    let bytes = (n * 4 * 7) as f64;
    out.push(Timing {
        kernel: "adamw_multi".into(),
        case: format!("{n} parameters, {} tensors", sizes.len()),
        ms,
        rate: bytes / ms / 1e6,
        unit: "GB/s".into(),
    });
    Ok(out)
}
