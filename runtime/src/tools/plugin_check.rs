//! `runtime plugin inspect` and `runtime plugin check`: what a component is, and whether each
//! hook it declares works on synthetic input. A loss hook's gradient is checked against central
//! finite differences through the host's chain rule, so a plugin author finds a wrong derivative
//! before training with it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use rand::{RngExt, SeedableRng};

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, StatGrads, StatsWanted};
use crate::error::{Error, Result};
use crate::plugin::*;

/// `runtime plugin inspect FILE.wasm`.
pub fn inspect(spec: &PluginSpec) -> Result<String> {
    let bytes = read_plugin_file(&spec.path)?;
    let t = Instant::now();
    let (component, hit) =
        cache::compile(engine(), &bytes).map_err(|e| Error::Plugin(format!("{}: not a loadable WebAssembly component: {e:#}", spec.path.display())))?;
    let compile = t.elapsed();
    let ins = inspect_component(&component);
    let mut out = String::new();
    let _ = writeln!(out, "file: {} ({} bytes)", spec.path.display(), bytes.len());
    let _ = writeln!(out, "{}: {:.1} ms", if hit { "loaded from the compile cache" } else { "compiled" }, compile.as_secs_f64() * 1e3);
    let versions = if ins.interface_versions.is_empty() {
        "none".to_string()
    } else {
        ins.interface_versions.iter().map(|v| format!("{PACKAGE}@{v}")).collect::<Vec<_>>().join(", ")
    };
    let _ = writeln!(
        out,
        "interface: {versions} (this runtime supports {})",
        SUPPORTED_VERSIONS.iter().map(|v| format!("{PACKAGE}@{v}")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(out, "exports: {}", ins.exports.join(", "));
    let _ = writeln!(out, "imports: {}", ins.imports.join(", "));
    match Plugin::load(spec, None) {
        Ok(p) => {
            let _ = writeln!(out, "plugin: {} {}", p.info.name, p.info.version);
            let _ = writeln!(out, "hooks: {}", p.info.hooks.iter().map(hook_name).collect::<Vec<_>>().join(", "));
        }
        Err(e) => {
            let _ = writeln!(out, "not loadable: {e}");
        }
    }
    Ok(out)
}

pub fn hook_name(h: &Hook) -> &'static str {
    match h {
        Hook::Loss => "loss",
        Hook::LossLogits => "loss-logits",
        Hook::Metrics => "metrics",
        Hook::Padding => "padding",
        Hook::Callbacks => "callbacks",
    }
}

/// A synthetic micro-batch: logits, shifted labels (some -100) and a `weight` column.
struct Synthetic {
    batch: usize,
    seq: usize,
    v: usize,
    logits: Vec<f32>,
    targets: Vec<i32>,
    weight: Vec<f64>,
}

impl Synthetic {
    fn new(seed: u64) -> Self {
        let (batch, seq, v) = (2, 6, 11);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let logits = (0..batch * seq * v).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let targets = (0..batch * seq).map(|i| if i % seq == seq - 1 || i % 5 == 1 { -100 } else { rng.random_range(0..v as i32) }).collect();
        Synthetic { batch, seq, v, logits, targets, weight: vec![1.0, 0.5] }
    }
    fn items(&self) -> usize {
        self.targets.iter().filter(|&&t| t != -100).count()
    }
    fn columns(&self) -> Vec<Column> {
        vec![Column { name: "weight".into(), values: self.weight.clone() }]
    }
}

/// The loss of `logits` through the plugin's `loss` hook, and `dloss/dlogits` when asked.
fn stats_loss(p: &mut Plugin, s: &Synthetic, logits: &[f32], want: StatsWanted, grad: bool) -> Result<(f64, Vec<f32>)> {
    let be = Cpu;
    let (z, t) = (logits.to_vec(), s.targets.clone());
    let mut stats = be.token_stats(&z, &t, s.v, want)?;
    let saved = stats.take_backward_state();
    let batch = TokenBatch {
        batch_size: s.batch as u32,
        seq_len: s.seq as u32,
        vocab_size: s.v as u32,
        labels: t.clone(),
        label_logprob: stats.label_logprob,
        logsumexp: stats.logsumexp,
        mean_logprob: stats.mean_logprob,
        entropy: stats.entropy,
        argmax: stats.argmax,
        columns: s.columns(),
        num_items_in_batch: s.items() as u32,
    };
    let out = p.compute_loss(&batch)?;
    let mut d = z;
    if grad {
        let g = StatGrads { label_logprob: out.d_label_logprob, logsumexp: out.d_logsumexp, mean_logprob: out.d_mean_logprob, entropy: out.d_entropy };
        g.check(want, t.len()).map_err(|e| p.invalid("loss.compute-loss", e))?;
        be.token_stats_bwd(&mut d, &t, s.v, &saved, &g);
    }
    Ok((out.loss as f64, d))
}

/// The loss of `logits` through the plugin's `loss-logits` hook (one chunk of labelled rows).
fn rows_loss(p: &mut Plugin, s: &Synthetic, logits: &[f32]) -> Result<(f64, Vec<f32>)> {
    let rows: Vec<u32> = (0..s.targets.len() as u32).filter(|&r| s.targets[r as usize] != -100).collect();
    let z: Vec<f32> = rows.iter().flat_map(|&r| logits[r as usize * s.v..(r as usize + 1) * s.v].iter().copied()).collect();
    let chunk = LogitsChunk {
        vocab_size: s.v as u32,
        first_row: rows[0],
        seq_len: s.seq as u32,
        logits: z,
        positions: rows.clone(),
        labels: rows.iter().map(|&r| s.targets[r as usize]).collect(),
        columns: s.columns(),
        num_items_in_batch: s.items() as u32,
    };
    let out = p.compute_chunk(&chunk)?;
    let mut d = vec![0.0f32; logits.len()];
    for (i, &r) in rows.iter().enumerate() {
        d[r as usize * s.v..(r as usize + 1) * s.v].copy_from_slice(&out.d_logits[i * s.v..(i + 1) * s.v]);
    }
    Ok((out.loss as f64, d))
}

/// Central differences on every logit of the synthetic batch; the largest error relative to
/// the largest gradient.
fn gradient_check(s: &Synthetic, mut f: impl FnMut(&[f32]) -> Result<f64>, analytic: &[f32]) -> Result<(f64, f64)> {
    let h = 1e-2f32;
    let mut worst = 0.0f64;
    let scale = analytic.iter().fold(0.0f64, |a, &g| a.max(g.abs() as f64)).max(1e-6);
    let mut z = s.logits.clone();
    for i in 0..z.len() {
        let x = z[i];
        z[i] = x + h;
        let up = f(&z)?;
        z[i] = x - h;
        let down = f(&z)?;
        z[i] = x;
        let fd = (up - down) / (2.0 * h as f64);
        worst = worst.max((fd - analytic[i] as f64).abs());
    }
    Ok((worst / scale, scale))
}

/// `runtime plugin check FILE.wasm`: each declared hook once, on synthetic input.
pub fn check(spec: &PluginSpec, tokenizer: Option<Arc<dyn crate::protocol::TokenDecoder>>) -> Result<String> {
    let mut p = Plugin::load(spec, tokenizer)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plugin {} {} ({PACKAGE}@{}): hooks {}",
        p.info.name,
        p.info.version,
        SUPPORTED_VERSIONS[0],
        p.info.hooks.iter().map(hook_name).collect::<Vec<_>>().join(", ")
    );
    let s = Synthetic::new(7);
    const TOL: f64 = 2e-2;
    for hook in p.info.hooks.clone() {
        let t = Instant::now();
        match hook {
            Hook::Loss => {
                let st = p.loss_statistics()?;
                let want = crate::plugin::roles::wanted(st);
                let (loss, d) = stats_loss(&mut p, &s, &s.logits, want, true)?;
                let (err, scale) = gradient_check(&s, |z| stats_loss(&mut p, &s, z, want, false).map(|r| r.0), &d)?;
                if err > TOL {
                    return Err(p.invalid(
                        "loss.compute-loss",
                        format!("the gradient disagrees with finite differences: max error {err:.2e} of the largest gradient {scale:.3e}"),
                    ));
                }
                let _ = writeln!(
                    out,
                    "loss: statistics {st:?}; loss {loss:.6} on a {}x{} batch (vocab {}); gradient vs finite differences: max error {err:.1e} (ok)",
                    s.batch, s.seq, s.v
                );
            }
            Hook::LossLogits => {
                let (loss, d) = rows_loss(&mut p, &s, &s.logits)?;
                let (err, scale) = gradient_check(&s, |z| rows_loss(&mut p, &s, z).map(|r| r.0), &d)?;
                if err > TOL {
                    return Err(p.invalid(
                        "loss-logits.compute-chunk",
                        format!("the gradient disagrees with finite differences: max error {err:.2e} of the largest gradient {scale:.3e}"),
                    ));
                }
                let _ = writeln!(out, "loss-logits: loss {loss:.6}; gradient vs finite differences: max error {err:.1e} (ok)");
            }
            Hook::Metrics => {
                let be = Cpu;
                let stats = be.token_stats(&s.logits, &s.targets, s.v, StatsWanted { label_logprob: true, argmax: true, ..Default::default() })?;
                p.metrics_reset()?;
                let batch = EvalBatch::argmax(s.batch, s.seq, s.targets.clone(), stats, None, Some(0));
                p.metrics_update(&batch)?;
                let m = p.metrics_compute()?;
                let _ = writeln!(out, "metrics: {}", m.iter().map(|m| format!("{} = {:.6}", m.name, m.value)).collect::<Vec<_>>().join(", "));
            }
            Hook::Padding => {
                let examples: Vec<PadExample> =
                    [3usize, 5, 1].iter().map(|&n| PadExample { input_ids: (1..=n as u32).collect(), labels: (1..=n as i32).collect() }).collect();
                let opts = WitPadOptions { side: Side::Right, pad_token_id: 0, max_length: None, pad_to_multiple_of: None };
                let r = p.pad(&examples, &opts, s.v, 64)?;
                let _ = writeln!(
                    out,
                    "padding: 3 examples of 3, 5 and 1 tokens -> {}x{}{}",
                    r.batch_size,
                    r.seq_len,
                    if r.position_ids.is_some() { " with position ids" } else { "" }
                );
            }
            Hook::Callbacks => {
                let mut control =
                    WitControl { should_training_stop: false, should_epoch_stop: false, should_save: false, should_evaluate: false, should_log: false };
                let events = [
                    (WitEvent::OnInitEnd, vec![]),
                    (WitEvent::OnTrainBegin, vec![]),
                    (WitEvent::OnStepEnd, vec![]),
                    (WitEvent::OnLog, vec![Metric { name: "loss".into(), value: 2.5 }]),
                    (WitEvent::OnEvaluate, vec![Metric { name: "eval_loss".into(), value: 2.0 }]),
                    (WitEvent::OnSave, vec![]),
                    (WitEvent::OnTrainEnd, vec![]),
                ];
                let mut added = Vec::new();
                for (i, (event, logs)) in events.into_iter().enumerate() {
                    let state = WitState {
                        global_step: i as u64,
                        max_steps: 10,
                        epoch: i as f64 / 10.0,
                        num_train_epochs: 1,
                        best_metric: None,
                        best_model_checkpoint: None,
                        metric_for_best_model: Some("loss".into()),
                        greater_is_better: Some(false),
                        logs,
                    };
                    let r = p.on_event(event, &state, control)?;
                    control = r.control;
                    added.extend(r.logs.into_iter().map(|m| m.name));
                }
                let state = p.save_state()?;
                p.load_state(&state)?;
                let _ =
                    writeln!(out, "callbacks: 7 events; logs added: [{}]; final control {control:?}; state {} bytes, restored", added.join(", "), state.len());
            }
        }
        let _ = writeln!(out, "  ({:.2} ms)", t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}
