//! Evaluation (the loss and the metrics plugins over the validation set, as transformers'
//! evaluation loop), best-model tracking, prediction with generation (`runtime predict`,
//! `predict_with_generate`) and the generation settings they use.

use std::time::Instant;

use serde_json::{json, Map, Value};

use super::callbacks::Event;
use super::model_kind::TrainerModel;
use super::trainer::{num, Trainer};
use crate::backend::{Backend, StatsWanted, TokenStats};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::files::write_file;
use crate::generate::GenerationConfig;
use crate::model::decoder::{shifted_labels, Batch, CustomLoss};
use crate::model::{LossOptions, LossOutput};
use crate::plugin::roles::LossHook;
use crate::plugin::{EvalBatch, PredictionKind};

impl<B: Backend + Clone, M: TrainerModel<B>> Trainer<B, M> {
    /// Mean loss over the validation set, weighted by batch size as transformers' evaluation
    /// loop weights it, and the metrics plugins' results (`eval_` + name). Logs them and calls
    /// `on_evaluate`; best-model tracking happens after, as in transformers.
    pub fn evaluate(&mut self) -> Result<Map<String, Value>> {
        let eval = self.eval.take().ok_or_else(|| Error::Invalid("evaluation needs validation_file".into()))?;
        let r = self.evaluate_on(&eval);
        self.eval = Some(eval);
        let mut m = r?;
        let n = self.state.log_history.len();
        self.log(m.clone())?;
        self.emit(Event::Evaluate, Some(&mut m))?;
        // what on_evaluate added also goes into the logged entry
        if let Some(entry) = self.state.log_history.get_mut(n) {
            for (k, v) in &m {
                entry.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        Ok(m)
    }

    pub(super) fn evaluate_on(&mut self, eval: &[Example]) -> Result<Map<String, Value>> {
        let t = Instant::now();
        let (mut total, mut count, mut batches) = (0.0f64, 0usize, 0usize);
        let mut acts = self.step.model.workspace(1, 2)?;
        let with_metrics = !self.plugins.metrics.is_empty();
        if with_metrics {
            self.plugins.metrics_reset()?;
        }
        let mut hook = self.plugins.loss_hook();
        let indices: Vec<usize> = (0..eval.len()).collect();
        // in a data parallel run each process takes every N-th batch, and its metrics batches
        // are kept for rank 0 (shared_eval.rs)
        let (rank, world) = (self.step.collective.rank(), self.step.collective.world_size());
        let mut kept = Vec::new();
        for (k, ix) in indices.chunks(self.args.per_device_eval_batch_size).enumerate() {
            if k % world != rank {
                continue;
            }
            let b = self.collate(eval, &self.eval_columns, ix)?;
            // as transformers: the label smoother (or the custom loss) applies to the evaluation loss too
            let opts = LossOptions { label_smoothing: self.args.label_smoothing_factor as f32, num_items_in_batch: None };
            // the argmax-aligned metrics read per-token statistics of the same forward pass
            let want =
                (with_metrics && !self.args.predict_with_generate).then_some(StatsWanted { label_logprob: true, argmax: true, ..StatsWanted::default() });
            let (out, stats) = self.eval_batch_loss(&mut acts, &b, hook.as_mut(), opts, want)?;
            if let Some(out) = out {
                if out.n_tokens > 0 {
                    total += out.mean as f64 * ix.len() as f64;
                    count += ix.len();
                }
            }
            let batch = if self.args.predict_with_generate {
                let (batch, _) = self.generate_batch(eval, ix)?;
                with_metrics.then_some(batch)
            } else {
                stats.map(|stats| {
                    let include_inputs = self.args.include_for_metrics.iter().any(|x| x == "inputs");
                    let inputs = include_inputs.then(|| b.input_ids.iter().map(|&x| x as u32).collect());
                    EvalBatch::argmax(b.batch, b.label_seq(), shifted_labels(&b), stats, inputs, Some(self.pad.pad_id))
                })
            };
            match batch {
                Some(batch) if world > 1 => kept.push((k, batch)),
                Some(batch) => self.plugins.metrics_update(&batch)?,
                None => {}
            }
            batches += 1;
            self.emit(Event::PredictionStep, None)?;
        }
        self.idle_eval_pass(&mut acts, eval)?;
        let mut sums = [total, count as f64, batches as f64];
        self.step.collective.sum_f64(&mut sums)?;
        let [total, count, batches] = sums;
        let secs = t.elapsed().as_secs_f64();
        let mut m = Map::new();
        m.insert("eval_loss".into(), num(total / count.max(1.0)));
        if with_metrics && world > 1 {
            m.extend(self.shared_metrics(&kept, "eval")?);
        } else if with_metrics {
            self.plugins.metrics_compute(&mut m, "eval")?;
        }
        m.insert("eval_runtime".into(), num((secs * 1e4).round() / 1e4));
        m.insert("eval_samples_per_second".into(), num((eval.len() as f64 / secs * 1e3).round() / 1e3));
        m.insert("eval_steps_per_second".into(), num((batches / secs * 1e3).round() / 1e3));
        Ok(m)
    }

    /// One evaluation batch's loss (the loss plugin's when there is one and the batch has label
    /// tokens, else the built-in one) and the per-token statistics `want`s.
    fn eval_batch_loss(
        &self,
        acts: &mut M::Acts,
        b: &Batch,
        hook: Option<&mut LossHook>,
        opts: LossOptions,
        want: Option<StatsWanted>,
    ) -> Result<(Option<LossOutput>, Option<TokenStats>)> {
        match hook {
            Some(h) if crate::model::decoder::label_tokens(b) > 0 => {
                let continues = h.continues();
                let mut custom = if h.uses_rows() { CustomLoss::Rows(h) } else { CustomLoss::Stats(h) };
                match self.step.model.eval_custom(acts, b, &mut custom, want) {
                    Ok((out, stats)) => Ok((Some(out), stats)),
                    // (with the weights sharded a second pass would leave the processes out of step)
                    Err(e @ Error::Plugin(_)) if continues && self.step.full.is_none() => {
                        tracing::warn!("evaluation: {e}; this batch's loss is the built-in one (on_error = \"continue\")");
                        self.step.model.eval_loss(acts, b, opts, want)
                    }
                    Err(e) => Err(e),
                }
            }
            _ => self.step.model.eval_loss(acts, b, opts, want),
        }
    }

    /// With the weights sharded every process takes part in every pass of an evaluation split
    /// over the processes: those with one batch fewer than the others run one that is not counted.
    fn idle_eval_pass(&self, acts: &mut M::Acts, eval: &[Example]) -> Result<()> {
        let (rank, world) = (self.step.collective.rank(), self.step.collective.world_size());
        let n = eval.len().div_ceil(self.args.per_device_eval_batch_size);
        if self.step.full.is_some() && !n.is_multiple_of(world) && rank >= n % world && !eval.is_empty() {
            let b = self.idle_batch(eval, &self.eval_columns, &[0])?;
            self.step.model.eval_loss(acts, &b, LossOptions::default(), None)?;
        }
        Ok(())
    }

    /// `runtime predict`: generates for every example of the evaluation set, writes
    /// `output_dir/generated_predictions.jsonl` (per example: the prompt's ids, the reference's
    /// ids, the generated ids, and both decoded) and `output_dir/predict_results.json` (the
    /// metrics plugins' results with the `predict_` prefix, and timings). Returns the metrics.
    pub fn predict(&mut self) -> Result<Map<String, Value>> {
        let eval = self.eval.take().ok_or_else(|| Error::Invalid("predict needs a test file".into()))?;
        let r = self.predict_on(&eval);
        self.eval = Some(eval);
        r
    }

    pub(super) fn predict_on(&mut self, examples: &[Example]) -> Result<Map<String, Value>> {
        let t = Instant::now();
        let with_metrics = !self.plugins.metrics.is_empty();
        if with_metrics {
            self.plugins.metrics_reset()?;
        }
        let mut lines = String::new();
        let indices: Vec<usize> = (0..examples.len()).collect();
        let eos = self.generation_config()?.eos_ids();
        for ix in indices.chunks(self.args.per_device_eval_batch_size) {
            let (batch, generated) = self.generate_batch(examples, ix)?;
            if with_metrics {
                self.plugins.metrics_update(&batch)?;
            }
            for (&i, gen) in ix.iter().zip(&generated) {
                let (prompt, reference) = self.step.model.prompt_and_reference(&examples[i]).expect("generate_batch checked every example");
                // up to and including the first EOS (a finished row is padded after it)
                let end = gen.iter().position(|t| eos.contains(t)).map_or(gen.len(), |p| p + 1);
                let line = json!({
                    "index": i,
                    "input_ids": prompt,
                    "label_ids": reference,
                    "prediction_ids": &gen[..end],
                    "label": self.tokenizer.decode(&reference, true)?,
                    "prediction": self.tokenizer.decode(&gen[..end], true)?,
                });
                lines.push_str(&line.to_string());
                lines.push('\n');
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let mut m = Map::new();
        if with_metrics {
            self.plugins.metrics_compute(&mut m, "predict")?;
        }
        m.insert("predict_runtime".into(), num((secs * 1e4).round() / 1e4));
        m.insert("predict_samples".into(), json!(examples.len()));
        m.insert("predict_samples_per_second".into(), num((examples.len() as f64 / secs * 1e3).round() / 1e3));
        std::fs::create_dir_all(&self.output_dir).map_err(|e| Error::io(&self.output_dir, e))?;
        for (name, body) in [("generated_predictions.jsonl", lines), ("predict_results.json", serde_json::to_string_pretty(&m).unwrap_or_default() + "\n")] {
            let path = self.output_dir.join(name);
            let tmp = self.output_dir.join(format!(".{name}.partial-{}", std::process::id()));
            write_file(&tmp, body.as_bytes())?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        }
        Ok(m)
    }

    /// The generation settings for evaluation: the model's `generation_config.json`, then
    /// `generation_max_length` and `generation_num_beams` (as `Seq2SeqTrainer` passes them).
    pub fn generation_config(&self) -> Result<GenerationConfig> {
        let mut overrides = Vec::new();
        if let Some(m) = self.args.generation_max_length {
            overrides.push(("max_length".to_string(), json!(m)));
        }
        if let Some(b) = self.args.generation_num_beams {
            overrides.push(("num_beams".to_string(), json!(b)));
        }
        let mut cfg = GenerationConfig::load(&self.model_dir, &overrides)?;
        if cfg.eos_ids().is_empty() {
            if let Some(e) = &self.tokenizer.eos {
                cfg.eos_token_id = json!(e.id);
            }
        }
        if cfg.pad_token_id.is_none() {
            cfg.pad_token_id = Some(self.pad.pad_id);
        }
        Ok(cfg)
    }

    /// Generates for the examples `ix` of `examples`: each prompt is the example's unlabelled
    /// prefix (a prompt/completion record's prompt, a conversation up to the reply), the
    /// reference its labelled tokens. Returns the metrics batch (generated ids and references,
    /// each padded with the pad id as `_pad_tensors_to_max_len` does) and the generated rows.
    pub fn generate_batch(&self, examples: &[Example], ix: &[usize]) -> Result<(EvalBatch, Vec<Vec<u32>>)> {
        let cfg = self.generation_config()?;
        let pad = cfg.pad_token_id.unwrap_or(self.pad.pad_id);
        let mut prompts = Vec::with_capacity(ix.len());
        let mut refs = Vec::with_capacity(ix.len());
        for &i in ix {
            match self.step.model.prompt_and_reference(&examples[i]) {
                Some((prompt, reference)) => {
                    prompts.push(prompt);
                    refs.push(reference);
                }
                None => {
                    return Err(Error::Invalid(format!(
                        "predict_with_generate: evaluation example {} has nothing to generate from or to compare with (it needs {})",
                        i + 1,
                        self.step.model.prompt_needed()
                    )))
                }
            }
        }
        let generated = self.step.model.generate(&prompts, &cfg)?;
        let pred_len = generated.iter().map(Vec::len).max().unwrap_or(0);
        let label_len = refs.iter().map(Vec::len).max().unwrap_or(0);
        let padded = |rows: &[Vec<u32>], len: usize| -> Vec<u32> {
            rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(pad, len - r.len()))).collect()
        };
        let include_inputs = self.args.include_for_metrics.iter().any(|x| x == "inputs");
        let input_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let batch = EvalBatch {
            kind: PredictionKind::Generated,
            batch_size: ix.len() as u32,
            label_len: label_len as u32,
            labels: padded(&refs, label_len).into_iter().map(|x| x as i32).collect(),
            prediction_len: pred_len as u32,
            predictions: padded(&generated, pred_len),
            label_logprob: Vec::new(),
            inputs: include_inputs.then(|| padded(&prompts, input_len)),
            input_len: input_len as u32,
            pad_token_id: Some(pad),
        };
        Ok((batch, generated))
    }

    /// transformers' `_determine_best_metric`: whether `metrics` beat the best so far.
    pub(super) fn determine_best_metric(&mut self, m: &Map<String, Value>) -> Result<bool> {
        let (Some(key), Some(greater)) = (self.args.best_metric_key(), self.args.greater_is_better) else { return Ok(false) };
        let v = m.get(&key).and_then(Value::as_f64).ok_or_else(|| {
            Error::Invalid(format!("metric_for_best_model `{key}` is not among the evaluation metrics ({})", m.keys().cloned().collect::<Vec<_>>().join(", ")))
        })?;
        let better = match self.state.best_metric {
            None => true,
            Some(b) => {
                if greater {
                    v > b
                } else {
                    v < b
                }
            }
        };
        if better {
            self.state.best_metric = Some(v);
            self.state.best_global_step = Some(self.state.global_step);
        }
        Ok(better)
    }
}
