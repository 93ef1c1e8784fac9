//! The run's plugins, by role: at most one loss (`loss` or `loss-logits`), at most one padding,
//! any number of metrics and callbacks (in the order given). The loss role is what the models
//! call out to ([`StatsLoss`], [`RowsLoss`]); padding and metrics speak the protocol's types.
//! The trainer adapts the callbacks role to its own callback trait.

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::plugin::{self, Column, EvalBatch, Hook, LogitsChunk, Plugin, PluginSpec, Statistics, TokenBatch};
use crate::protocol::{Batch, Example, PadOptions, RowsLoss, Side, StatGrads, StatsLoss, StatsWanted, TokenDecoder, TokenStats};

pub type Shared = Arc<Mutex<Plugin>>;

/// A JSON number (null when not finite).
fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

pub fn lock(p: &Shared) -> MutexGuard<'_, Plugin> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
pub struct Plugins {
    pub all: Vec<Shared>,
    pub loss: Option<Shared>,
    pub padding: Option<Shared>,
    pub metrics: Vec<Shared>,
    pub callbacks: Vec<Shared>,
    /// Metrics plugins that failed during the current evaluation (`on_error = "continue"`).
    metrics_failed: Mutex<Vec<bool>>,
}

/// `Err` passes through unless the plugin continues on errors: then it is logged and `None`
/// comes back.
pub fn tolerate<T>(p: &Plugin, r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if p.continues() => {
            tracing::warn!("{e} (on_error = \"continue\": going on without this result)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl Plugins {
    /// Loads the plugins the run config lists.
    pub fn load(entries: &[Value], tokenizer: Option<Arc<dyn TokenDecoder>>) -> Result<Self> {
        let mut out = Plugins::default();
        for entry in entries {
            let spec = PluginSpec::from_value(entry)?;
            let p = Plugin::load(&spec, tokenizer.clone())?;
            tracing::info!(
                "plugin `{}` {} from {} ({:?}; {} in {:.1} ms)",
                p.info.name,
                p.info.version,
                spec.path.display(),
                p.info.hooks,
                if p.cache_hit { "cached" } else { "compiled" },
                p.load_time.as_secs_f64() * 1e3
            );
            let hooks = p.info.hooks.clone();
            let name = p.info.name.clone();
            let shared = Arc::new(Mutex::new(p));
            if hooks.contains(&Hook::Loss) || hooks.contains(&Hook::LossLogits) {
                if let Some(other) = &out.loss {
                    return Err(Error::Plugin(format!("two loss plugins: `{}` and `{name}`; a run takes one", lock(other).name())));
                }
                out.loss = Some(shared.clone());
            }
            if hooks.contains(&Hook::Padding) {
                if let Some(other) = &out.padding {
                    return Err(Error::Plugin(format!("two padding plugins: `{}` and `{name}`; a run takes one", lock(other).name())));
                }
                out.padding = Some(shared.clone());
            }
            if hooks.contains(&Hook::Metrics) {
                out.metrics.push(shared.clone());
            }
            if hooks.contains(&Hook::Callbacks) {
                out.callbacks.push(shared.clone());
            }
            out.all.push(shared);
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The loss plugin as the engine's custom loss.
    pub fn loss_hook(&self) -> Option<LossHook> {
        self.loss.clone().map(|p| LossHook { plugin: p, wanted: None })
    }

    /// Collates examples through the padding plugin.
    pub fn pad(&self, examples: &[Example], opts: &PadOptions, vocab: usize, max_positions: usize) -> Option<Result<Batch>> {
        let p = self.padding.as_ref()?;
        let wit_examples: Vec<plugin::PadExample> =
            examples.iter().map(|e| plugin::PadExample { input_ids: e.input_ids.clone(), labels: e.labels.clone() }).collect();
        let options = plugin::WitPadOptions {
            side: match opts.side {
                Side::Left => plugin::Side::Left,
                Side::Right => plugin::Side::Right,
            },
            pad_token_id: opts.pad_id,
            max_length: opts.max_length.map(|m| m as u32),
            pad_to_multiple_of: opts.pad_to_multiple_of.map(|m| m as u32),
        };
        let mut plugin = lock(p);
        let r = plugin.pad(&wit_examples, &options, vocab, max_positions);
        let r = match tolerate(&plugin, r) {
            Ok(None) => return None,
            Ok(Some(out)) => Ok(out),
            Err(e) => Err(e),
        };
        Some(r.map(|out| Batch {
            batch: out.batch_size as usize,
            seq: out.seq_len as usize,
            input_ids: out.input_ids.iter().map(|&x| x as i32).collect(),
            attention_mask: Some(out.attention_mask.iter().map(|&x| x as i32).collect()),
            labels: Some(out.labels),
            position_ids: out.position_ids.map(|p| p.into_iter().map(|x| x as i32).collect()),
            ..Batch::default()
        }))
    }

    /// Whether a padding plugin is loaded.
    pub fn has_padding(&self) -> bool {
        self.padding.is_some()
    }

    /// Whether a metrics plugin is loaded.
    pub fn has_metrics(&self) -> bool {
        !self.metrics.is_empty()
    }

    /// Statistics the metrics plugins need per evaluation batch.
    pub fn metrics_reset(&self) -> Result<()> {
        let mut failed = self.metrics_failed.lock().unwrap_or_else(|e| e.into_inner());
        *failed = vec![false; self.metrics.len()];
        for (i, p) in self.metrics.iter().enumerate() {
            let mut p = lock(p);
            let r = p.metrics_reset();
            failed[i] = tolerate(&p, r)?.is_none();
        }
        Ok(())
    }

    pub fn metrics_update(&self, batch: &EvalBatch) -> Result<()> {
        let mut failed = self.metrics_failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.resize(self.metrics.len(), false);
        for (i, p) in self.metrics.iter().enumerate() {
            if failed[i] {
                continue;
            }
            let mut p = lock(p);
            let r = p.metrics_update(batch);
            failed[i] = tolerate(&p, r)?.is_none();
        }
        Ok(())
    }

    /// Every metrics plugin's results, prefixed with `{prefix}_` (`eval_` in evaluation, as
    /// transformers prefixes `compute_metrics`' keys; `predict_` in `runtime predict`). Two plugins reporting the same name is an error.
    pub fn metrics_compute(&self, into: &mut Map<String, Value>, prefix: &str) -> Result<()> {
        let failed = self.metrics_failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (i, p) in self.metrics.iter().enumerate() {
            let mut p = lock(p);
            if failed.get(i).copied().unwrap_or(false) {
                tracing::warn!("plugin `{}` failed during this evaluation; its metrics are left out", p.name());
                continue;
            }
            let r = p.metrics_compute();
            let Some(metrics) = tolerate(&p, r)? else { continue };
            for m in metrics {
                let key = if m.name.starts_with(&format!("{prefix}_")) { m.name.clone() } else { format!("{prefix}_{}", m.name) };
                if into.contains_key(&key) {
                    return Err(p.invalid("metrics.compute", format!("metric `{key}` is already reported")));
                }
                into.insert(key, num(m.value));
            }
        }
        Ok(())
    }
}

pub fn wanted(s: Statistics) -> StatsWanted {
    StatsWanted {
        label_logprob: s.contains(Statistics::LABEL_LOGPROB),
        logsumexp: s.contains(Statistics::LOGSUMEXP),
        mean_logprob: s.contains(Statistics::MEAN_LOGPROB),
        entropy: s.contains(Statistics::ENTROPY),
        argmax: s.contains(Statistics::ARGMAX),
    }
}

fn columns(b: &Batch) -> Vec<Column> {
    b.columns.iter().map(|(name, values)| Column { name: name.clone(), values: values.clone() }).collect()
}

/// The loss plugin, seen by the engine.
pub struct LossHook {
    plugin: Shared,
    wanted: Option<StatsWanted>,
}

impl LossHook {
    /// Whether a failure of the loss plugin skips the step instead of ending the run.
    pub fn continues(&self) -> bool {
        lock(&self.plugin).continues()
    }

    pub fn uses_rows(&self) -> bool {
        let p = lock(&self.plugin);
        !p.has_hook(Hook::Loss) && p.has_hook(Hook::LossLogits)
    }
}

impl StatsLoss for LossHook {
    fn wanted(&mut self) -> Result<StatsWanted> {
        if let Some(w) = self.wanted {
            return Ok(w);
        }
        let w = wanted(lock(&self.plugin).loss_statistics()?);
        self.wanted = Some(w);
        Ok(w)
    }

    fn loss(&mut self, b: &Batch, targets: &[i32], stats: TokenStats, num_items: usize) -> Result<(f32, StatGrads)> {
        let batch = TokenBatch {
            batch_size: b.batch as u32,
            seq_len: b.label_seq() as u32,
            vocab_size: 0,
            labels: targets.to_vec(),
            label_logprob: stats.label_logprob,
            logsumexp: stats.logsumexp,
            mean_logprob: stats.mean_logprob,
            entropy: stats.entropy,
            argmax: stats.argmax,
            columns: columns(b),
            num_items_in_batch: num_items as u32,
        };
        let out = lock(&self.plugin).compute_loss(&batch)?;
        let grads = StatGrads { label_logprob: out.d_label_logprob, logsumexp: out.d_logsumexp, mean_logprob: out.d_mean_logprob, entropy: out.d_entropy };
        Ok((out.loss, grads))
    }
}

impl RowsLoss for LossHook {
    fn chunk(&mut self, b: &Batch, positions: &[u32], labels: &[i32], logits: &[f32], v: usize, num_items: usize) -> Result<(f32, Vec<f32>)> {
        let chunk = LogitsChunk {
            vocab_size: v as u32,
            first_row: positions.first().copied().unwrap_or(0),
            seq_len: b.label_seq() as u32,
            logits: logits.to_vec(),
            positions: positions.to_vec(),
            labels: labels.to_vec(),
            columns: columns(b),
            num_items_in_batch: num_items as u32,
        };
        let out = lock(&self.plugin).compute_chunk(&chunk)?;
        Ok((out.loss, out.d_logits))
    }
}
