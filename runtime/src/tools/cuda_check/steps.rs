//! `runtime cuda-check`'s whole training steps: one step of small GPT-2 and Llama models (with
//! the LM head in chunks, at the tensor cores' head dim, with LoRA and DoRA) and 20-step loss
//! curves, on the CPU and on a device, compared; in bf16 also a step with its held outputs in
//! bf16 against one with them in f32; and all of it on the CPU model of the bf16 mode.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{op_parity_on, rel_err, rel_err_l2, Check, Rng};
use crate::backend::bf16_model::Bf16Model;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::Cuda;
use crate::backend::Backend;
use crate::engine::{AdamWConfig, MicroLoss, MicroOptions, Step};
use crate::error::{Error, Result};
use crate::model::{init::init_tensors, Batch, Layout, LoadOptions, LossOptions, Model, ModelConfig};

/// One whole step (forward, backward, clipping, AdamW) of a small model on both backends: the
/// loss, the gradient norm and every updated parameter compared.
pub fn step_parity(gpu: &Cuda) -> Result<Vec<Check>> {
    let mut checks = step_parity_on(gpu, gpu.bf16())?;
    if gpu.bf16() {
        checks.extend(held_parity(gpu)?);
    }
    Ok(checks)
}

/// bf16: a training step whose layers' product inputs are held from the forward to the backward
/// pass (one bf16 copy each) equals, bit for bit, the same step with every product casting its
/// own operands. The buffers held only as operands (GPT-2's qkv, the pre-activation, the input
/// gradients the next kernel reads, the attention's output) are written as bf16 copies alone,
/// by cuBLASLt products whose algorithm for a bf16 output may sum in another order, and read in
/// bf16 (the attention's delta): that step is compared with the bf16 limits instead, and the
/// bitwise one runs with the held products off (`Cuda::set_held_products`).
fn held_parity(gpu: &Cuda) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (case, cfg, tensors, batch, lora) in held_cases()? {
        let direct = one_step(gpu.clone(), cfg.clone(), tensors.clone(), &batch, None, lora)?;
        let was = gpu.set_held_products(false);
        let held = one_step(gpu.clone(), cfg.clone(), tensors.clone(), &batch, None, lora);
        gpu.set_held_products(was);
        let held = held?;
        let was = gpu.set_hold_operands(false);
        let cast = one_step(gpu.clone(), cfg, tensors, &batch, None, lora);
        gpu.set_hold_operands(was);
        let cast = cast?;
        for (name, e) in [
            ("loss", rel_err(&[held.0], &[cast.0])),
            ("grad_norm", rel_err(&[held.1], &[cast.1])),
            ("gradients", rel_err(&held.2, &cast.2)),
            ("parameters after one step", rel_err(&held.3, &cast.3)),
        ] {
            checks.push(Check { op: "training step (bitwise)".into(), case: case.clone(), output: name.into(), rel_err: e, limit: 0.0, pass: e == 0.0 });
        }
        checks.extend(held_only_rows(&case, &direct, &held));
    }
    Ok(checks)
}

/// The held-input rows' cases: GPT-2, Llama and Llama with LoRA r 8, each with its name, config,
/// initial weights, batch and adapter (`Some(use_dora)`).
#[allow(clippy::type_complexity)] // one case's five parts, as the loops take them apart
fn held_cases() -> Result<Vec<(String, ModelConfig, Vec<Vec<f32>>, Batch, Option<bool>)>> {
    let (gpt2, llama) = step_configs();
    [("gpt2", &gpt2, None), ("llama", &llama, None), ("llama", &llama, Some(false))]
        .into_iter()
        .map(|(arch, raw, lora)| {
            let cfg = step_config(raw)?;
            let tensors = init_tensors(&cfg, &Layout::new(&cfg), 5);
            let batch = step_batch(cfg.vocab_size as i32);
            let case = format!("{arch}, 2 layers{}: held inputs against a cast per product", if lora.is_some() { ", LoRA r 8" } else { "" });
            Ok((case, cfg, tensors, batch, lora))
        })
        .collect()
}

/// One training step's outputs: loss, gradient norm, gradients, parameters after the step.
type StepOut = (f32, f32, Vec<f32>, Vec<f32>);

/// The "training step (bf16 product outputs)" rows: a step with the holds on (`direct`: outputs
/// held only as operands written in bf16 alone) against one whose held outputs are f32.
fn held_only_rows(case: &str, direct: &StepOut, held: &StepOut) -> Vec<Check> {
    [
        ("loss", rel_err(&[direct.0], &[held.0]), 1e-2),
        ("gradients (L2)", rel_err_l2(&direct.2, &held.2), 2e-2),
        ("parameters after one step (L2)", rel_err_l2(&direct.3, &held.3), 1e-2),
    ]
    .into_iter()
    .map(|(name, e, lim)| Check {
        op: "training step (bf16 product outputs)".into(),
        case: case.into(),
        output: name.into(),
        rel_err: e,
        limit: lim,
        pass: e <= lim,
    })
    .collect()
}

/// The bf16 checks on the CPU model of the bf16 mode ([`Bf16Model`]; `holds`: with its holds on,
/// as `RUNTIME_CUDA_HOLDS` unset or `on`): every op, the training steps and curves, and the
/// "training step (bf16 product outputs)" rows (holds on against off). `runtime cuda-check
/// --model`, on any machine.
pub fn model_parity(holds: bool) -> Result<Vec<Check>> {
    let model = if holds { Bf16Model::new() } else { Bf16Model::without_holds() };
    let mut checks = op_parity_on(&model, true)?;
    checks.extend(step_parity_on(&model, true)?);
    for (case, cfg, tensors, batch, lora) in held_cases()? {
        let direct = one_step(Bf16Model::new(), cfg.clone(), tensors.clone(), &batch, None, lora)?;
        let held = one_step(Bf16Model::without_holds(), cfg, tensors, &batch, None, lora)?;
        checks.extend(held_only_rows(&case, &direct, &held));
    }
    // the encoder-decoder part, with the decoder-only step's limits (as `runtime cuda-check --bf16`)
    checks.extend(crate::tools::seq2seq::device_parity(&model, true)?);
    Ok(checks)
}

/// The head dim of a configuration of [`step_configs`].
fn cfg_head_dim(raw: &serde_json::Value) -> u64 {
    let width = raw.get("n_embd").or(raw.get("hidden_size")).and_then(|v| v.as_u64()).unwrap_or(0);
    let heads = raw.get("n_head").or(raw.get("num_attention_heads")).and_then(|v| v.as_u64()).unwrap_or(1);
    width / heads.max(1)
}

/// One of [`step_configs`], read as a `config.json` is.
fn step_config(raw: &serde_json::Value) -> Result<ModelConfig> {
    let serde_json::Value::Object(map) = raw.clone() else { unreachable!("a JSON object literal") };
    ModelConfig::from_json(std::path::Path::new("<cuda-check>"), map)
}

/// The small GPT-2 and Llama configurations of the training-step checks.
fn step_configs() -> (serde_json::Value, serde_json::Value) {
    let gpt2 = serde_json::json!({"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 500, "n_positions": 128});
    let llama = serde_json::json!({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 344, "vocab_size": 500, "max_position_embeddings": 128});
    (gpt2, llama)
}

/// The training-step checks' batch: 3 x 64 random tokens, the first 7 labels ignored, 4 keys of
/// the second row masked.
fn step_batch(vocab: i32) -> Batch {
    let (b, t) = (3, 64);
    let mut rng = Rng(ChaCha8Rng::seed_from_u64(9));
    let ids = rng.ids(b * t, vocab);
    let mut labels = ids.clone();
    labels[..7].iter_mut().for_each(|l| *l = -100);
    let mut mask = vec![1; b * t];
    mask[t..t + 4].iter_mut().for_each(|m| *m = 0);
    Batch { batch: b, seq: t, input_ids: ids, labels: Some(labels), attention_mask: Some(mask), ..Batch::default() }
}

/// [`step_parity`] against any backend.
pub fn step_parity_on<G: Backend + Clone>(gpu: &G, bf16: bool) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let lim = if bf16 { 1e-2 } else { 1e-4 };
    // gradients by norm in bf16: 2e-2 in relative L2, as docs/KERNELS.md states for bf16 training
    // (adapter gradients pass through two more bf16-rounded products than the base weights' do, and
    // bf16 logits: 1.2e-2 to 1.3e-2 in the CPU model of the bf16 mode, `Bf16Model`); in f32 every
    // element to 1e-4 of the largest
    let grad_lim = if bf16 { 2e-2 } else { 1e-4 };
    let (gpt2, llama) = step_configs();
    // GPT-2 at head dim 64: the tensor-core attention of bf16 mode
    let mut gpt2_d64 = gpt2.clone();
    gpt2_d64["n_head"] = 2.into();
    // (architecture, config, rows per LM-head chunk, a LoRA adapter: Some(use_dora))
    let cases = [
        ("gpt2", &gpt2, None, None),
        ("gpt2", &gpt2, Some(50), None),
        ("gpt2", &gpt2_d64, None, None),
        ("llama", &llama, None, None),
        ("llama", &llama, None, Some(false)),
        ("gpt2", &gpt2, None, Some(true)),
    ];
    for (arch, raw, chunk, lora) in cases {
        let cfg = step_config(raw)?;
        let tensors = init_tensors(&cfg, &Layout::new(&cfg), 5);
        let batch = step_batch(cfg.vocab_size as i32);
        let (b, t) = (batch.batch, batch.seq);
        let cpu = one_step(Cpu, cfg.clone(), tensors.clone(), &batch, chunk, lora)?;
        let dev = one_step(gpu.clone(), cfg, tensors, &batch, chunk, lora)?;
        let head = chunk.map_or(String::new(), |c| format!(", LM head in chunks of {c} rows"));
        let adapter = match lora {
            Some(false) => ", LoRA r 8 on every linear (base frozen)",
            Some(true) => ", DoRA r 8 on every linear (base frozen)",
            None => "",
        };
        let case = format!("{arch}, 2 layers, head dim {}, batch {b}x{t}{head}{adapter}", cfg_head_dim(raw));
        let grads = if bf16 { ("gradients (L2)", rel_err_l2(&dev.2, &cpu.2)) } else { ("gradients", rel_err(&dev.2, &cpu.2)) };
        for (name, e) in [
            ("loss", rel_err(&[dev.0], &[cpu.0])),
            ("grad_norm", rel_err(&[dev.1], &[cpu.1])),
            grads,
            ("parameters after one step (L2)", rel_err_l2(&dev.3, &cpu.3)),
        ] {
            let lim = if name.starts_with("gradients") { grad_lim } else { lim };
            checks.push(Check { op: "training step".into(), case: case.clone(), output: name.into(), rel_err: e, limit: lim, pass: e <= lim });
        }
    }
    // 20 steps of AdamW on the same batch: each step's loss against the CPU's in f32, at most 2%
    // apart in bf16 (issue 18's bar), 1e-4 in f32; the worst step is reported
    let curve_lim = if bf16 { 2e-2 } else { 1e-4 };
    for (arch, raw) in [("gpt2", &gpt2), ("llama", &llama)] {
        let cfg = step_config(raw)?;
        let tensors = init_tensors(&cfg, &Layout::new(&cfg), 5);
        let batch = step_batch(cfg.vocab_size as i32);
        let cpu = loss_curve(Cpu, cfg.clone(), tensors.clone(), &batch, 20)?;
        let dev = loss_curve(gpu.clone(), cfg, tensors, &batch, 20)?;
        let e = dev.iter().zip(&cpu).map(|(d, c)| rel_err(&[*d], &[*c])).fold(0.0, f64::max);
        let case = format!("{arch}, 2 layers, 20 steps (loss {:.4} -> {:.4} on the CPU)", cpu[0], cpu[cpu.len() - 1]);
        checks.push(Check { op: "training curve".into(), case, output: "loss at every step".into(), rel_err: e, limit: curve_lim, pass: e <= curve_lim });
    }
    Ok(checks)
}

/// The loss of each of `steps` AdamW steps on `batch` (lr 1e-3, clipped at norm 1).
fn loss_curve<B: Backend>(be: B, cfg: ModelConfig, tensors: Vec<Vec<f32>>, batch: &Batch, steps: usize) -> Result<Vec<f32>> {
    let model = Model::from_tensors(be, cfg, tensors, LoadOptions::default())?;
    let mut step = Step::new(model, AdamWConfig { lr: 1e-3, weight_decay: 0.01, ..AdamWConfig::default() })?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        step.zero_grad()?;
        losses.push(step.micro_batch(batch, MicroLoss::BuiltIn(LossOptions::default()), MicroOptions::default())?.mean);
        let (_, coef) = step.grad_norm(1.0)?;
        if !step.apply(1e-3, coef)? {
            return Err(Error::Invalid("the check's update made the state non-finite".into()));
        }
    }
    Ok(losses)
}

/// Loss, gradient norm, gradients and parameters after one step (with `lora = Some(use_dora)`, of
/// an adapter with random A and B on every linear map).
fn one_step<B: Backend>(be: B, cfg: ModelConfig, tensors: Vec<Vec<f32>>, batch: &Batch, chunk: Option<usize>, lora: Option<bool>) -> Result<StepOut> {
    let mut model = Model::from_tensors(be, cfg, tensors, LoadOptions::default())?;
    model.loss_chunk_rows = chunk;
    if let Some(use_dora) = lora {
        let peft = serde_json::json!({"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": false, "use_dora": use_dora});
        let config = crate::model::lora::LoraConfig::from_map(peft.as_object().expect("an object"), "cuda-check")?;
        model.add_lora(config, None, 3)?;
    }
    let mut step = Step::new(model, AdamWConfig { lr: 1e-3, weight_decay: 0.01, ..AdamWConfig::default() })?;
    step.zero_grad()?;
    let loss = step.micro_batch(batch, MicroLoss::BuiltIn(LossOptions { label_smoothing: 0.1, num_items_in_batch: None }), MicroOptions::default())?.mean;
    let (norm, coef) = step.grad_norm(1.0)?;
    let g = step.grads.tensors.iter().map(|t| step.model.backend.download(t)).collect::<Result<Vec<_>>>()?.concat();
    if !step.apply(1e-3, coef)? {
        return Err(Error::Invalid("the check's update made the state non-finite".into()));
    }
    let params = step.model.params.iter().map(|p| step.model.backend.download(p)).collect::<Result<Vec<_>>>()?.concat();
    Ok((loss, norm, g, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 design, modeled on the CPU: every training-step and curve check within the bf16
    /// limits, and none exact (the model rounds).
    #[test]
    fn the_bf16_model_keeps_every_check_within_the_bf16_limits() {
        for holds in [true, false] {
            let checks = model_parity(holds).unwrap();
            let ops: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.op.as_str()).collect();
            for op in ["matmul", "attention", "lm head + loss (fused)", "training step", "training curve", "training step (bf16 product outputs)"] {
                assert!(ops.contains(op), "no check of {op}");
            }
            for c in &checks {
                assert!(c.pass, "{c:?}");
                // every step and curve rounds somewhere (against the f32 CPU)
                if c.op == "training step" || c.op == "training curve" {
                    assert!(c.rel_err > 0.0, "{c:?}");
                }
            }
        }
    }

    /// The curve the GPU's 20 steps are compared with is a training run: its loss falls.
    #[test]
    fn the_training_curve_learns() {
        let (gpt2, _) = step_configs();
        let cfg = step_config(&gpt2).unwrap();
        let tensors = init_tensors(&cfg, &Layout::new(&cfg), 5);
        let losses = loss_curve(Cpu, cfg.clone(), tensors, &step_batch(cfg.vocab_size as i32), 20).unwrap();
        assert_eq!(losses.len(), 20);
        assert!(losses[19] < 0.9 * losses[0], "{losses:?}");
    }
}
