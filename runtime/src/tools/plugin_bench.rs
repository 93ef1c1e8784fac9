//! `runtime plugin bench`: what plugins cost, measured side by side in one run: a loss plugin's
//! training step against the built-in fused cross-entropy at the engine benchmark's shapes
//! (alternating, best of N each), one callback event, one metrics update per evaluation batch,
//! and a plugin's cold (compiling) versus cached start.

use std::fmt::Write as _;
use std::time::Instant;

use rand::{RngExt, SeedableRng};

use std::path::{Path, PathBuf};

use crate::backend::cpu::Cpu;
use crate::backend::{AttnImpl, StatsWanted};
use crate::bench::BenchConfig;
use crate::engine::{AdamWConfig, MicroLoss, MicroOptions, Step};
use crate::error::{Error, Result};
use crate::model::decoder::{shifted_labels, CustomLoss};
use crate::model::{init::init_tensors, Activations, Batch, LoadOptions, LossOptions, Model};
use crate::plugin::roles::Plugins;
use crate::plugin::*;

pub struct PluginBenchArgs {
    pub loss: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    pub callbacks: Option<PathBuf>,
    pub model: BenchConfig,
}

fn best(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Cold start (an empty compile cache) and cached start of one plugin, in milliseconds.
fn start_times(path: &Path) -> Result<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("runtime-plugin-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // the cache folder is read at each load; point it at an empty folder for this measurement
    let old = std::env::var_os("RUNTIME_PLUGIN_CACHE_DIR");
    // SAFETY: single-threaded at this point of the benchmark; restored below
    unsafe { std::env::set_var("RUNTIME_PLUGIN_CACHE_DIR", &dir) };
    let spec = PluginSpec::new(path);
    let cold = Plugin::load(&spec, None).map(|p| p.load_time.as_secs_f64() * 1e3);
    let warm = Plugin::load(&spec, None).map(|p| p.load_time.as_secs_f64() * 1e3);
    match old {
        // SAFETY: as above
        Some(v) => unsafe { std::env::set_var("RUNTIME_PLUGIN_CACHE_DIR", v) },
        None => unsafe { std::env::remove_var("RUNTIME_PLUGIN_CACHE_DIR") },
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((cold?, warm?))
}

pub fn run(a: &PluginBenchArgs) -> Result<String> {
    let mut out = String::new();
    let cfg = &a.model;
    let mcfg = cfg.model_config()?;
    let layout = crate::model::Layout::new(&mcfg);
    let tensors = init_tensors(&mcfg, &layout, 42);
    let mut model = Model::from_tensors(Cpu, mcfg, tensors, LoadOptions { attn_implementation: AttnImpl::Flash, ..LoadOptions::default() })?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let rows = cfg.batch * cfg.seq;
    let ids: Vec<i32> = (0..rows).map(|_| rng.random_range(0..cfg.vocab as i32)).collect();
    let batch = Batch { batch: cfg.batch, seq: cfg.seq, input_ids: ids.clone(), labels: Some(ids), ..Batch::default() };
    let _ = writeln!(
        out,
        "model: {} {} layers, hidden {}, vocab {}, batch {} x seq {} ({} threads)",
        cfg.arch,
        cfg.n_layer,
        cfg.hidden,
        cfg.vocab,
        cfg.batch,
        cfg.seq,
        rayon::current_num_threads()
    );

    for path in [&a.loss, &a.metrics, &a.callbacks].into_iter().flatten() {
        let (cold, warm) = start_times(path)?;
        let _ = writeln!(out, "start {}: cold (compile) {cold:.1} ms, cached {warm:.1} ms ({:.0}x faster)", path.display(), cold / warm);
    }

    if let Some(path) = &a.loss {
        let plugins = Plugins::load(&[serde_json::Value::String(path.display().to_string())], None)?;
        let mut hook = plugins.loss_hook().ok_or_else(|| Error::Invalid(format!("{}: declares no loss hook", path.display())))?;
        let mut step = Step::new(model, AdamWConfig { lr: 1e-5, ..AdamWConfig::default() })?;
        let (mut builtin, mut plugin, mut ratios) = (f64::MAX, f64::MAX, Vec::new());
        // one training step as the trainer takes it, with the built-in loss or the plugin's
        let one_step = |step: &mut Step<Cpu>, loss: MicroLoss| -> Result<()> {
            step.zero_grad()?;
            step.micro_batch(&batch, loss, MicroOptions::default())?;
            let (_, coef) = step.grad_norm(1.0)?;
            step.apply(1e-5, coef).map(|_| ())
        };
        for round in 0..cfg.warmup + cfg.steps {
            let b = best(1, || one_step(&mut step, MicroLoss::BuiltIn(LossOptions::default())))?;
            let p = best(1, || {
                let mut custom = if hook.uses_rows() { CustomLoss::Rows(&mut hook) } else { CustomLoss::Stats(&mut hook) };
                one_step(&mut step, MicroLoss::Custom(&mut custom, None))
            })?;
            if round >= cfg.warmup {
                builtin = builtin.min(b);
                plugin = plugin.min(p);
                ratios.push(p / b);
            }
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        let _ = writeln!(
            out,
            "loss hook ({}): training step {:.1} ms vs built-in cross-entropy {:.1} ms (best of {} each, alternating): overhead {:+.2}%; median of the paired steps {:+.2}%",
            path.display(),
            plugin * 1e3,
            builtin * 1e3,
            cfg.steps,
            (plugin / builtin - 1.0) * 100.0,
            (median - 1.0) * 100.0
        );
        model = step.model;
    }

    if let Some(path) = &a.metrics {
        let mut p = Plugin::load(&PluginSpec::new(path), None)?;
        let mut acts = Activations::new(&model, cfg.batch, cfg.seq)?;
        model.forward(&mut acts, &batch, LossOptions::default(), false)?;
        let want = StatsWanted { label_logprob: true, argmax: true, ..StatsWanted::default() };
        let mut stats = model.token_stats(&acts, want)?;
        let stats_s = best(5, || {
            stats = model.token_stats(&acts, want)?;
            Ok(())
        })?;
        let eb = EvalBatch::argmax(cfg.batch, cfg.seq, shifted_labels(&batch), stats, None, Some(0));
        p.metrics_reset()?;
        let upd = best(20, || p.metrics_update(&eb))?;
        let fwd = best(3, || model.forward(&mut acts, &batch, LossOptions::default(), false).map(|_| ()))?;
        let _ = writeln!(
            out,
            "metrics ({}): update per eval batch {:.3} ms + statistics {:.3} ms, vs the batch's forward pass {:.1} ms ({:.2}%)",
            path.display(),
            upd * 1e3,
            stats_s * 1e3,
            fwd * 1e3,
            (upd + stats_s) / fwd * 100.0
        );
    }

    if let Some(path) = &a.callbacks {
        let mut p = Plugin::load(&PluginSpec::new(path), None)?;
        let state = WitState {
            global_step: 10,
            max_steps: 100,
            epoch: 0.1,
            num_train_epochs: 1,
            best_metric: Some(1.0),
            best_model_checkpoint: None,
            metric_for_best_model: Some("loss".into()),
            greater_is_better: Some(false),
            logs: vec![],
        };
        let control = WitControl { should_training_stop: false, should_epoch_stop: false, should_save: false, should_evaluate: false, should_log: false };
        let n = 20_000;
        let per = best(3, || {
            for _ in 0..n {
                p.on_event(WitEvent::OnStepEnd, &state, control)?;
            }
            Ok(())
        })? / n as f64;
        let logs = vec![
            Metric { name: "loss".into(), value: 2.0 },
            Metric { name: "learning_rate".into(), value: 1e-3 },
            Metric { name: "grad_norm".into(), value: 0.5 },
        ];
        let with_logs = WitState { logs, ..state };
        let per_log = best(3, || {
            for _ in 0..n {
                p.on_event(WitEvent::OnLog, &with_logs, control)?;
            }
            Ok(())
        })? / n as f64;
        let _ = writeln!(out, "callbacks ({}): {:.2} us per event (on_step_end), {:.2} us per on_log with 3 entries", path.display(), per * 1e6, per_log * 1e6);
    }
    Ok(out)
}
