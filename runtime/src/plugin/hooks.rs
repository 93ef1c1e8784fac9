//! The hooks, called with the runtime's checks on what comes back: lengths, finiteness, ids in
//! range, a rectangular padded batch. Anything else is an error naming the plugin and the hook.

use super::*;

fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// A statistic's gradient: empty (zero) or one value per position, all finite.
fn check_grad(p: &Plugin, hook: &str, what: &str, d: &[f32], n: usize) -> Result<()> {
    if !d.is_empty() && d.len() != n {
        return Err(p.invalid(hook, format!("`{what}` has {} values, expected {n} (one per position) or none", d.len())));
    }
    if !all_finite(d) {
        return Err(p.invalid(hook, format!("`{what}` contains NaN or infinite values")));
    }
    Ok(())
}

fn check_metrics(p: &Plugin, hook: &str, metrics: &[Metric]) -> Result<()> {
    for m in metrics {
        if m.name.is_empty() || m.name.len() > 256 {
            return Err(p.invalid(hook, "a metric has an empty (or over-long) name"));
        }
        if !m.value.is_finite() {
            return Err(p.invalid(hook, format!("metric `{}` is {}", m.name, m.value)));
        }
    }
    Ok(())
}

impl Plugin {
    fn require(&self, hook: Hook, name: &str) -> Result<()> {
        if self.has_hook(hook) {
            Ok(())
        } else {
            Err(self.invalid(name, "the plugin does not declare this hook in `describe`"))
        }
    }

    /// `loss.requested-statistics`.
    pub fn loss_statistics(&mut self) -> Result<Statistics> {
        self.require(Hook::Loss, "loss.requested-statistics")?;
        self.call("loss.requested-statistics", |i, s| i.trainer_plugin_loss().call_requested_statistics(s))
    }

    /// `loss.compute-loss`, with its result checked against the batch.
    pub fn compute_loss(&mut self, batch: &TokenBatch) -> Result<LossOutput> {
        const HOOK: &str = "loss.compute-loss";
        self.require(Hook::Loss, HOOK)?;
        let r = self.call(HOOK, |i, s| i.trainer_plugin_loss().call_compute_loss(s, batch))?;
        let out = self.reported(HOOK, r)?;
        if !out.loss.is_finite() {
            return Err(self.invalid(HOOK, format!("the loss is {}", out.loss)));
        }
        let n = batch.labels.len();
        check_grad(self, HOOK, "d-label-logprob", &out.d_label_logprob, n)?;
        check_grad(self, HOOK, "d-logsumexp", &out.d_logsumexp, n)?;
        check_grad(self, HOOK, "d-mean-logprob", &out.d_mean_logprob, n)?;
        check_grad(self, HOOK, "d-entropy", &out.d_entropy, n)?;
        Ok(out)
    }

    /// `loss-logits.compute-chunk`, with its result checked against the chunk.
    pub fn compute_chunk(&mut self, chunk: &LogitsChunk) -> Result<ChunkOutput> {
        const HOOK: &str = "loss-logits.compute-chunk";
        self.require(Hook::LossLogits, HOOK)?;
        let r = self.call(HOOK, |i, s| i.trainer_plugin_loss_logits().call_compute_chunk(s, chunk))?;
        let out = self.reported(HOOK, r)?;
        if !out.loss.is_finite() {
            return Err(self.invalid(HOOK, format!("the loss is {}", out.loss)));
        }
        if out.d_logits.len() != chunk.logits.len() {
            return Err(self.invalid(HOOK, format!("`d-logits` has {} values, expected {} (rows x vocab)", out.d_logits.len(), chunk.logits.len())));
        }
        if !all_finite(&out.d_logits) {
            return Err(self.invalid(HOOK, "`d-logits` contains NaN or infinite values"));
        }
        Ok(out)
    }

    pub fn metrics_reset(&mut self) -> Result<()> {
        self.require(Hook::Metrics, "metrics.reset")?;
        self.call("metrics.reset", |i, s| i.trainer_plugin_metrics().call_reset(s))
    }

    pub fn metrics_update(&mut self, batch: &EvalBatch) -> Result<()> {
        const HOOK: &str = "metrics.update";
        self.require(Hook::Metrics, HOOK)?;
        let r = self.call(HOOK, |i, s| i.trainer_plugin_metrics().call_update(s, batch))?;
        self.reported(HOOK, r)
    }

    pub fn metrics_compute(&mut self) -> Result<Vec<Metric>> {
        const HOOK: &str = "metrics.compute";
        self.require(Hook::Metrics, HOOK)?;
        let r = self.call(HOOK, |i, s| i.trainer_plugin_metrics().call_compute(s))?;
        let out = self.reported(HOOK, r)?;
        check_metrics(self, HOOK, &out)?;
        Ok(out)
    }

    /// `padding.pad`, with the rectangle checked: sizes, a 0/1 mask, ids below `vocab`, labels
    /// -100 or below `vocab`, positions below `max_positions`, no longer than `max_positions`.
    pub fn pad(&mut self, examples: &[PadExample], options: &WitPadOptions, vocab: usize, max_positions: usize) -> Result<Padded> {
        const HOOK: &str = "padding.pad";
        self.require(Hook::Padding, HOOK)?;
        let r = self.call(HOOK, |i, s| i.trainer_plugin_padding().call_pad(s, examples, *options))?;
        let p = self.reported(HOOK, r)?;
        let (b, t) = (p.batch_size as usize, p.seq_len as usize);
        if b != examples.len() {
            return Err(self.invalid(HOOK, format!("returned {b} rows for {} examples", examples.len())));
        }
        if t == 0 || t > max_positions {
            return Err(self.invalid(HOOK, format!("returned rows of {t} tokens; the model takes 1 to {max_positions}")));
        }
        let n = b * t;
        for (what, len) in [("input-ids", p.input_ids.len()), ("attention-mask", p.attention_mask.len()), ("labels", p.labels.len())] {
            if len != n {
                return Err(self.invalid(HOOK, format!("`{what}` has {len} values, not batch-size x seq-len = {b} x {t} (not rectangular)")));
            }
        }
        if let Some(pos) = &p.position_ids {
            if pos.len() != n {
                return Err(self.invalid(HOOK, format!("`position-ids` has {} values, not {b} x {t}", pos.len())));
            }
            if let Some(bad) = pos.iter().find(|&&x| x as usize >= max_positions) {
                return Err(self.invalid(HOOK, format!("position id {bad} is out of range (the model has {max_positions} positions)")));
            }
        }
        if let Some(bad) = p.input_ids.iter().find(|&&x| x as usize >= vocab) {
            return Err(self.invalid(HOOK, format!("token id {bad} is out of range (vocabulary of {vocab})")));
        }
        if let Some(bad) = p.attention_mask.iter().find(|&&x| x > 1) {
            return Err(self.invalid(HOOK, format!("attention mask value {bad} is not 0 or 1")));
        }
        if let Some(bad) = p.labels.iter().find(|&&x| x != -100 && (x < 0 || x as usize >= vocab)) {
            return Err(self.invalid(HOOK, format!("label {bad} is out of range (-100 or a token id below {vocab})")));
        }
        Ok(p)
    }

    /// `callbacks.on-event`; extra log entries are checked.
    pub fn on_event(&mut self, event: WitEvent, state: &WitState, control: WitControl) -> Result<Response> {
        const HOOK: &str = "callbacks.on-event";
        self.require(Hook::Callbacks, HOOK)?;
        let r = self.call(HOOK, |i, s| i.trainer_plugin_callbacks().call_on_event(s, event, state, control))?;
        let out = self.reported(HOOK, r)?;
        check_metrics(self, HOOK, &out.logs)?;
        Ok(out)
    }

    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        const HOOK: &str = "callbacks.save-state";
        self.require(Hook::Callbacks, HOOK)?;
        let bytes = self.call(HOOK, |i, s| i.trainer_plugin_callbacks().call_save_state(s))?;
        if bytes.len() > 16 << 20 {
            return Err(self.invalid(HOOK, format!("returned {} bytes of state; the limit is 16 MiB", bytes.len())));
        }
        Ok(bytes)
    }

    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        const HOOK: &str = "callbacks.load-state";
        self.require(Hook::Callbacks, HOOK)?;
        let r = self.call(HOOK, |i, s| i.trainer_plugin_callbacks().call_load_state(s, bytes))?;
        self.reported(HOOK, r)
    }
}
