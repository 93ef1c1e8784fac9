//! The step as the roofline account models it (`runtime bench --roofline CHIP`, no GPU needed)
//! and as measured op by op (`--profile`): the two sides of the measured-against-modeled table
//! `scripts/gpu-check.sh` prints.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{train_steps, BenchConfig, BenchResult};
use crate::backend::profiled::Profiled;
use crate::backend::roofline::{flops_per_token, Account, Chip, Family, Roofline};
use crate::backend::Backend;
use crate::error::Result;

/// What `runtime bench --device cuda --roofline CHIP` reports: the CUDA backend's training step
/// (after a warm-up step) driven through the [`Roofline`] account, op family by op family.
#[derive(Debug, Serialize)]
pub struct RooflineResult {
    pub arch: String,
    pub parameters: usize,
    pub tokens_per_step: usize,
    pub chip: Chip,
    pub bf16: bool,
    pub launches_per_step: u64,
    pub bytes_per_step: f64,
    pub tensor_flops_per_step: f64,
    pub other_flops_per_step: f64,
    /// llm.c's `6 N + 12 L C T` per token, times the tokens of a step.
    pub model_flops_per_step: f64,
    pub modeled_step_seconds: f64,
    pub modeled_tokens_per_second: f64,
    /// `model_flops_per_step / modeled_step_seconds` over the chip's bf16 tensor rate.
    pub modeled_mfu: f64,
    pub ops: BTreeMap<String, Family>,
    /// Modeled seconds per op kind, as `--profile` names them on a device.
    pub op_kinds: BTreeMap<String, f64>,
}

impl RooflineResult {
    /// The human-readable report: the totals, then the per-op table.
    pub fn report(&self) -> String {
        let mode = if self.bf16 { "bf16" } else { "f32" };
        format!(
            "{} ({} parameters), {} tokens per step, CUDA backend in {mode} as modeled on {} ({:.2} TB/s, {:.0} TFLOP/s bf16 tensor, {:.1} TFLOP/s FP32, {:.1} us per launch)\n  \
             modeled step {:.2} ms, {:.0} tokens/s, MFU {:.1}%; {} launches, {:.2} GB moved, {:.1} TFLOP on tensor cores, {:.2} TFLOP other\n\n{}",
            self.arch,
            self.parameters,
            self.tokens_per_step,
            self.chip.name,
            self.chip.bandwidth / 1e12,
            self.chip.tensor / 1e12,
            self.chip.fp32 / 1e12,
            self.chip.launch * 1e6,
            self.modeled_step_seconds * 1e3,
            self.modeled_tokens_per_second,
            100.0 * self.modeled_mfu,
            self.launches_per_step,
            self.bytes_per_step / 1e9,
            self.tensor_flops_per_step / 1e12,
            self.other_flops_per_step / 1e12,
            Account { families: self.ops.clone(), kinds: self.op_kinds.clone(), ..Account::default() }.table()
        )
    }
}

/// One training step of the benchmark's model through the roofline account of the CUDA backend
/// on `chip` (`bf16`: its bf16 mode), after `cfg.warmup` (at least one) steps.
pub fn run_roofline(cfg: &BenchConfig, chip: Chip, bf16: bool) -> Result<RooflineResult> {
    let one = BenchConfig { steps: 1, warmup: cfg.warmup.max(1), ..cfg.clone() };
    let (r, model) = train_steps(Roofline::new(chip, bf16), &one, |b| b.reset())?;
    let acc = model.backend.account().checked()?;
    let c = &model.config;
    let model_flops = flops_per_token(r.parameters, c.n_layer, c.hidden_size, cfg.seq) * r.tokens_per_step as f64;
    let seconds = acc.seconds();
    Ok(RooflineResult {
        arch: r.arch,
        parameters: r.parameters,
        tokens_per_step: r.tokens_per_step,
        chip,
        bf16,
        launches_per_step: acc.launches(),
        bytes_per_step: acc.bytes(),
        tensor_flops_per_step: acc.tensor_flops(),
        other_flops_per_step: acc.fp32_flops(),
        model_flops_per_step: model_flops,
        modeled_step_seconds: seconds,
        modeled_tokens_per_second: r.tokens_per_step as f64 / seconds,
        modeled_mfu: model_flops / seconds / chip.tensor,
        ops: acc.families,
        op_kinds: acc.kinds,
    })
}

/// The training benchmark on a CUDA device with each op timed (the profiled backend waits for
/// the device after every op, so the step is slower than [`run_cuda`](super::run_cuda)'s): `ops` holds each op
/// kind's share of the step, for the comparison with the roofline account.
pub fn run_cuda_profiled(cfg: &BenchConfig, be: crate::backend::cuda::Cuda) -> Result<BenchResult> {
    run_profiled(cfg, Profiled::new(be))
}

/// [`run_cuda_profiled`] on any backend (the CPU in the tests).
pub fn run_profiled<B: Backend>(cfg: &BenchConfig, be: Profiled<B>) -> Result<BenchResult> {
    let (mut r, model) = train_steps(be, cfg, |b| b.reset())?;
    let (ops, _) = model.backend.report();
    let elapsed = r.step_seconds * cfg.steps as f64;
    r.ops = ops.into_iter().map(|(k, v)| (k.to_string(), v / elapsed)).collect();
    r.op_calls_per_step = model.backend.calls().into_iter().map(|(k, n)| (k.to_string(), n as f64 / cfg.steps as f64)).collect();
    r.sync_seconds = model.backend.idle_sync_seconds();
    Ok(r)
}
