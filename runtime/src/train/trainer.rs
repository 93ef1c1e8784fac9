//! The training loop: HF `Trainer` semantics on the engine's [`Step`]. Gradient accumulation
//! normalised by the label tokens of the whole window, clipping fused into AdamW, the schedule,
//! the NaN policy, callbacks at transformers' points, and `auto_find_batch_size` retrying a step
//! that ran out of memory with a smaller batch. Building the trainer is `setup.rs`; checkpoints,
//! evaluation and the flow rules have their own files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::batch_size::smaller_batch;
use super::callbacks::{Event, TrainerCallback, TrainerControl};
use super::flow::LossLog;
use super::model_kind::TrainerModel;
use super::sampler::{shard, Sampler, SamplerState};
use super::schedule::Schedule;
use super::state::TrainerState;
use crate::args::training::NanInfPolicy;
use crate::args::TrainingArguments;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::data::{Example, PadOptions, Tokenizer};
use crate::engine::{MicroLoss, MicroOptions, Step};
use crate::error::{Error, Result};
use crate::model::{Batch, LossOptions, Model, Neftune, TrainModel};
use crate::plugin::roles::{LossHook, Plugins};
use crate::protocol::{label_tokens, CustomLoss};

/// The trainer on a backend: the CPU by default, or the CUDA backend (see [`Trainer::new_on`]).
pub struct Trainer<B: Backend = Cpu, M: TrainModel<B> = Model<B>> {
    pub args: TrainingArguments,
    /// The model, its gradients and activations, and the optimizer.
    pub step: Step<B, M>,
    pub tokenizer: Arc<Tokenizer>,
    pub state: TrainerState,
    pub(super) train: Vec<Example>,
    pub(super) eval: Option<Vec<Example>>,
    /// The datasets' numeric columns, per example (empty when examples are packed blocks).
    pub(super) train_columns: Vec<(String, Vec<f64>)>,
    pub(super) eval_columns: Vec<(String, Vec<f64>)>,
    pub(super) plugins: Plugins,
    /// Where the model came from (its `generation_config.json`, for `predict_with_generate`).
    pub(super) model_dir: PathBuf,
    pub(super) pad: PadOptions,
    pub(super) schedule: Schedule,
    pub(super) sampler: Sampler,
    pub(super) output_dir: PathBuf,
    pub(super) logging_steps: u64,
    pub(super) eval_steps: u64,
    pub(super) save_steps: u64,
    pub(super) callbacks: Vec<Box<dyn TrainerCallback>>,
    pub(super) control: TrainerControl,
    /// The output folder's lock, held from the start of `train()` to the end of the trainer.
    pub(super) lock: Option<std::fs::File>,
    /// Set from outside (the command line's SIGTERM/SIGINT handler) to stop at the end of the
    /// current optimizer step: a checkpoint is written and `train()` returns
    /// [`Error::Interrupted`]; `resume_from_checkpoint` then continues exactly.
    pub stop: Arc<AtomicBool>,
}

/// The values of `columns` for the examples `ix`.
fn column_rows(columns: &[(String, Vec<f64>)], ix: &[usize]) -> Vec<(String, Vec<f64>)> {
    columns.iter().map(|(n, v)| (n.clone(), ix.iter().map(|&i| v[i]).collect())).collect()
}

pub(crate) fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// What one optimizer step did.
struct StepOutcome {
    /// The window's mean loss (NaN when a plugin loss failed and the step was skipped).
    loss: f64,
    grad_norm: f32,
    lr: f64,
    /// Whether the loss and the norm were finite (and so the update applied).
    finite: bool,
    /// Attended tokens of the micro-batches that ran (on every process).
    tokens: u64,
    /// A stop was asked ([`Trainer::stop`]) of this process or, in a data parallel run, of any:
    /// every process stops after the same step.
    stop: bool,
}

/// Where the loop goes after a step.
enum Flow {
    Continue,
    NextEpoch,
    Stop,
}

/// The run's clock and token count, for the progress bar and the final metrics.
struct RunClock {
    started: Instant,
    start_step: u64,
    tokens: u64,
}

impl Trainer<Cpu> {
    /// Loads (or initialises) the model, the tokenizer and the datasets on the CPU backend, and
    /// checks everything before any training step.
    pub fn new(args: TrainingArguments) -> Result<Self> {
        Self::new_on(Cpu, args, true)
    }

    /// For `runtime eval`: the model, tokenizer and validation set only.
    pub fn for_eval(args: TrainingArguments) -> Result<Self> {
        Self::new_on(Cpu, args, false)
    }
}

impl<B: Backend + Clone, M: TrainerModel<B>> Trainer<B, M> {
    /// The model being trained.
    pub fn model(&self) -> &M {
        &self.step.model
    }

    /// Adds a callback; it receives `on_init_end` when training starts, then every event.
    pub fn add_callback(&mut self, cb: Box<dyn TrainerCallback>) {
        self.callbacks.push(cb);
    }

    pub(super) fn emit(&mut self, event: Event, mut logs: Option<&mut Map<String, Value>>) -> Result<()> {
        let mut control = self.control;
        for cb in &mut self.callbacks {
            cb.on_event(event, &self.args, &self.state, &mut control, logs.as_deref_mut())?;
        }
        self.control = control;
        Ok(())
    }

    /// Pads the examples `ix` of `examples` into a batch (through the padding plugin when there
    /// is one) with their numeric columns.
    pub(super) fn collate(&self, examples: &[Example], columns: &[(String, Vec<f64>)], ix: &[usize]) -> Result<Batch> {
        let chosen: Vec<Example> = ix.iter().map(|&i| examples[i].clone()).collect();
        let mut b = self.step.model.collate(&chosen, &self.pad, &self.plugins)?;
        b.columns = column_rows(columns, ix);
        Ok(b)
    }

    /// A batch of the examples `ix` with every label ignored: a pass over it (with the weights
    /// sharded, a process without a share of the batch still takes part) adds nothing.
    pub(super) fn idle_batch(&self, examples: &[Example], columns: &[(String, Vec<f64>)], ix: &[usize]) -> Result<Batch> {
        let mut b = self.collate(examples, columns, ix)?;
        let n = b.labels.as_ref().map_or(b.batch * b.seq, Vec::len);
        b.labels = Some(vec![crate::protocol::IGNORE_INDEX; n]);
        Ok(b)
    }

    /// Number of training examples (blocks, for packed text).
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Appends an entry to `log_history` (with what callbacks add to it in `on_log`).
    pub(super) fn log(&mut self, mut entry: Map<String, Value>) -> Result<()> {
        entry.insert("epoch".into(), num(self.state.epoch));
        self.emit(Event::Log, Some(&mut entry))?;
        entry.insert("step".into(), json!(self.state.global_step));
        self.state.log_history.push(entry);
        Ok(())
    }

    /// Trains to `max_steps` (resuming when asked), then writes the HF-format output.
    pub fn train(&mut self) -> Result<Map<String, Value>> {
        self.begin_run()?;
        let mut clock = RunClock { started: Instant::now(), start_step: self.state.global_step, tokens: 0 };
        let bar = if self.args.disable_tqdm || !self.state.is_world_process_zero {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(self.state.max_steps)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(clock.start_step);
        self.emit(Event::InitEnd, None)?;
        self.emit(Event::TrainBegin, None)?;
        if self.args.eval_on_start && clock.start_step == 0 && self.eval.is_some() {
            let m = self.evaluate()?;
            self.determine_best_metric(&m)?;
        }
        let mut logbook = LossLog::default();
        let mut loss_hook = self.plugins.loss_hook();
        'outer: while self.state.global_step < self.state.max_steps {
            let SamplerState { epoch, batch: first } = self.state.sampler;
            let mut batches = self.sampler.epoch_batches(epoch);
            self.emit(Event::EpochBegin, None)?;
            let mut b = first as usize;
            while b < batches.len() {
                let end = (b + self.args.gradient_accumulation_steps).min(batches.len());
                let outcome = match self.optimizer_step(&batches[b..end], &mut loss_hook) {
                    Err(Error::OutOfMemory(why)) if self.args.auto_find_batch_size => {
                        // the same examples again, in smaller micro-batches, on a device that
                        // forgot the failure (recorded by an op that could not return it)
                        self.step.model.backend().recover_out_of_memory()?;
                        b *= self.shrink_batch(&why)?;
                        batches = self.sampler.epoch_batches(epoch);
                        continue;
                    }
                    other => other?,
                };
                b = end;
                clock.tokens += outcome.tokens;
                bar.set_position(self.state.global_step + 1);
                bar.set_message(format!(
                    "loss {:.4} lr {:.2e} grad norm {:.3} {:.0} tok/s",
                    outcome.loss,
                    outcome.lr,
                    outcome.grad_norm,
                    clock.tokens as f64 / clock.started.elapsed().as_secs_f64()
                ));
                let flow = self.after_step(epoch, b, batches.len(), &outcome, clock.tokens, &mut logbook)?;
                let one_process = self.step.collective.world_size() == 1;
                if (one_process && self.stop.load(Ordering::SeqCst)) || outcome.stop {
                    bar.finish_and_clear();
                    return Err(self.stop_with_checkpoint()?);
                }
                match flow {
                    Flow::Continue => {}
                    Flow::NextEpoch => continue 'outer,
                    Flow::Stop => break 'outer,
                }
            }
            if b >= batches.len() {
                self.state.sampler = SamplerState { epoch: epoch + 1, batch: 0 };
            }
        }
        bar.finish_and_clear();
        self.finish(&clock, &logbook)
    }

    /// A stop asked from outside ([`Trainer::stop`]) after a finished step: a checkpoint of this
    /// step (unless one was just written), and the error that says where to resume from.
    fn stop_with_checkpoint(&mut self) -> Result<Error> {
        let step = self.state.global_step;
        let dir = match self.checkpoints().into_iter().find(|c| c.0 == step) {
            Some((_, dir)) => dir,
            None => self.save_checkpoint()?,
        };
        Ok(Error::Interrupted(format!("stopped after step {step}; {} holds it: rerun with --resume_from_checkpoint true to continue", dir.display())))
    }

    /// `auto_find_batch_size` after an out-of-memory error: the next smaller per-device batch
    /// and the accumulation that keeps the examples per step. Returns the factor, by which the
    /// sampler's batch index grows. An error when one example already did not fit.
    fn shrink_batch(&mut self, why: &str) -> Result<usize> {
        let (batch, accum) = (self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps);
        let (b, acc) = smaller_batch(batch, accum)
            .ok_or_else(|| Error::OutOfMemory(format!("{why} (auto_find_batch_size: even per_device_train_batch_size 1 does not fit)")))?;
        tracing::warn!("auto_find_batch_size: {why}; retrying the step with per_device_train_batch_size {b} and gradient_accumulation_steps {acc}");
        (self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps) = (b, acc);
        self.sampler.batch_size = b;
        self.state.train_batch_size = b;
        Ok(batch / b)
    }

    /// One optimizer step over the micro-batches `window` (example indices of each): forward and
    /// backward each with the loss divided by the window's label tokens, then the gradient norm,
    /// the NaN policy and the update. An error leaves the weights and the optimizer as they were.
    fn optimizer_step(&mut self, window: &[Vec<usize>], loss_hook: &mut Option<LossHook>) -> Result<StepOutcome> {
        // this process's share of each micro-batch of the window (all of it in one process)
        let (rank, world) = (self.step.collective.rank(), self.step.collective.world_size());
        let (mut micro, mut idle) = (Vec::new(), Vec::new());
        for ix in window {
            let mine = shard(ix, rank, world);
            if !mine.is_empty() {
                micro.push(self.collate(&self.train, &self.train_columns, mine)?);
                idle.push(false);
            } else if self.step.full.is_some() {
                // with the weights sharded every process takes part in every pass: an empty
                // share runs one that contributes nothing
                micro.push(self.idle_batch(&self.train, &self.train_columns, &ix[..1])?);
                idle.push(true);
            }
        }
        // the loss is normalised by the window's label tokens over every process; without
        // `average_tokens_across_devices`, by this process's times the processes (each process's
        // mean, and the summed gradients their mean, as DDP averages them)
        let local = micro.iter().map(label_tokens).sum::<usize>();
        let mut items = [local as f64];
        self.step.collective.sum_f64(&mut items)?;
        let global = items[0] as usize;
        let items = if self.args.average_tokens_across_devices { global } else { (local * world).max(1) };
        if global == 0 {
            return Err(Error::Invalid(format!("step {}: the batches of this accumulation window have no label tokens", self.state.global_step + 1)));
        }
        self.emit(Event::StepBegin, None)?;
        self.step.zero_grad()?;
        let (loss_sum, tokens, plugin_failed) = self.micro_batches(&micro, &idle, items, loss_hook)?;
        // summed over the processes: each one's share of the loss, the tokens, a failed plugin,
        // a stop asked
        let share = loss_sum / items as f64;
        let mut agreed = [share, tokens as f64, f64::from(u8::from(plugin_failed)), f64::from(u8::from(self.stop.load(Ordering::SeqCst)))];
        self.step.collective.sum_f64(&mut agreed)?;
        let [loss, tokens, failed, stop] = agreed;
        let (tokens, plugin_failed, stop) = (tokens as u64, failed > 0.0, stop > 0.0);
        let loss = if plugin_failed { f64::NAN } else { loss };
        let (grad_norm, coef) = self.step.grad_norm(self.args.max_grad_norm as f32)?;
        let lr = self.schedule.lr(self.state.global_step);
        let finite = loss.is_finite() && grad_norm.is_finite();
        let mut refused = None;
        if finite {
            self.emit(Event::PreOptimizerStep, None)?;
            if self.step.apply(lr as f32, coef)? {
                self.emit(Event::OptimizerStep, None)?;
            } else {
                refused = Some(format!("the update at learning rate {lr:e} would make a weight or an optimizer moment non-finite"));
            }
        } else if !plugin_failed {
            // (a failed plugin is logged where it failed; the step's gradients are incomplete)
            refused = Some(format!("the loss is {loss} (gradient norm {grad_norm})"));
        }
        if let Some(why) = refused {
            let step = self.state.global_step + 1;
            if self.args.nan_inf_policy == NanInfPolicy::Stop {
                let last = self.checkpoints().last().map_or("none".to_string(), |c| c.1.display().to_string());
                return Err(Error::Invalid(format!("step {step}: {why}; stopping without applying the update. Last good checkpoint: {last}")));
            }
            tracing::warn!("step {step}: {why}; update skipped");
        }
        Ok(StepOutcome { loss, grad_norm, lr, finite, tokens, stop })
    }

    /// Forward and backward for each micro-batch of a window: the summed loss, the attended
    /// tokens, and whether a plugin loss failed (`on_error = "continue"`: the rest is skipped).
    /// With the weights sharded, a plugin that fails mid-pass would leave this process out of
    /// step with the others' gathers, so `on_error = "continue"` does not apply: the run stops.
    fn micro_batches(&mut self, micro: &[Batch], idle: &[bool], items: usize, loss_hook: &mut Option<LossHook>) -> Result<(f64, u64, bool)> {
        let opts = LossOptions { label_smoothing: self.args.label_smoothing_factor as f32, num_items_in_batch: Some(items) };
        let (mut sum, mut tokens) = (0.0, 0u64);
        for (i, mb) in micro.iter().enumerate() {
            // NEFTune noise from (seed, step, micro-batch): the same after a resume
            let neftune = self.args.neftune_noise_alpha.map(|a| Neftune { alpha: a as f32, seed: self.args.seed ^ (self.state.global_step << 20) ^ i as u64 });
            // dropout masks from (seed, step, micro-batch): the same after a resume
            let dropout = Some(crate::nn::site_key(self.args.seed, (self.state.global_step << 16) + i as u64));
            let o = MicroOptions { neftune, accumulating: i + 1 < micro.len(), dropout };
            sum += match loss_hook.as_mut() {
                _ if idle[i] => self.step.micro_batch(mb, MicroLoss::BuiltIn(opts), o)?.sum,
                Some(h) => {
                    let continues = h.continues();
                    let mut custom = if h.uses_rows() { CustomLoss::Rows(h) } else { CustomLoss::Stats(h) };
                    match self.step.micro_batch(mb, MicroLoss::Custom(&mut custom, Some(items)), o) {
                        Ok(out) => out.sum,
                        Err(e @ Error::Plugin(_)) if continues && self.step.full.is_none() => {
                            tracing::warn!("step {}: {e}; the step is skipped (on_error = \"continue\")", self.state.global_step + 1);
                            return Ok((sum, tokens, true));
                        }
                        Err(e) => return Err(e),
                    }
                }
                None => self.step.micro_batch(mb, MicroLoss::BuiltIn(opts), o)?.sum,
            };
            if !idle[i] {
                tokens += mb.attention_mask.as_ref().map_or(0, |m| m.iter().filter(|&&x| x == 1).count() as u64);
            }
            if i + 1 < micro.len() {
                self.emit(Event::SubstepEnd, None)?;
            }
        }
        Ok((sum, tokens, false))
    }

    /// The state after a step (global step, sampler position, epoch, tokens, the running loss),
    /// then `on_step_end` with transformers' flow rules, and `on_epoch_end` when the epoch is over.
    fn after_step(&mut self, epoch: u64, b: usize, n_batches: usize, o: &StepOutcome, tokens: u64, logbook: &mut LossLog) -> Result<Flow> {
        self.state.global_step += 1;
        self.state.sampler = if b >= n_batches { SamplerState { epoch: epoch + 1, batch: 0 } } else { SamplerState { epoch, batch: b as u64 } };
        self.state.epoch = epoch as f64 + b as f64 / n_batches as f64;
        self.state.num_input_tokens_seen = tokens;
        logbook.add(if o.finite || !self.args.logging_nan_inf_filter { o.loss } else { logbook.average() });
        logbook.norm = o.grad_norm;
        logbook.lr = o.lr;
        self.flow_on_step_end();
        self.emit(Event::StepEnd, None)?;
        self.log_save_evaluate(logbook)?;
        if b >= n_batches || self.control.should_training_stop || self.control.should_epoch_stop {
            self.flow_on_epoch_end();
            self.emit(Event::EpochEnd, None)?;
            self.log_save_evaluate(logbook)?;
        }
        if self.control.should_training_stop {
            return Ok(Flow::Stop);
        }
        if self.control.should_epoch_stop {
            self.control.should_epoch_stop = false;
            self.state.sampler = SamplerState { epoch: epoch + 1, batch: 0 };
            return Ok(Flow::NextEpoch);
        }
        Ok(Flow::Continue)
    }

    /// The end of training: the best model loaded back (`load_best_model_at_end`), the run's
    /// metrics logged, the output folder written, `on_train_end`.
    fn finish(&mut self, clock: &RunClock, logbook: &LossLog) -> Result<Map<String, Value>> {
        let secs = clock.started.elapsed().as_secs_f64();
        if self.args.load_best_model_at_end {
            if let Some(best) = self.state.best_model_checkpoint.clone() {
                self.load_weights_from(Path::new(&best))?;
                tracing::info!("loaded the best model from {best} ({} = {:?})", self.args.best_metric_key().unwrap_or_default(), self.state.best_metric);
            }
        }
        let steps_run = (self.state.global_step - clock.start_step).max(1) as f64;
        let examples_per_step = (self.sampler.batch_size * self.args.gradient_accumulation_steps) as f64;
        let mut metrics = Map::new();
        metrics.insert("epoch".into(), num(self.state.epoch));
        metrics.insert("total_flos".into(), num(self.state.total_flos));
        metrics.insert("train_loss".into(), num(logbook.total / logbook.total_steps.max(1) as f64));
        metrics.insert("train_runtime".into(), num((secs * 1e4).round() / 1e4));
        metrics.insert("train_samples_per_second".into(), num(steps_run * examples_per_step / secs));
        metrics.insert("train_steps_per_second".into(), num(steps_run / secs));
        metrics.insert("train_tokens_per_second".into(), num(clock.tokens as f64 / secs));
        self.log(metrics.clone())?;
        self.save_output(&metrics)?;
        self.emit(Event::TrainEnd, None)?;
        Ok(metrics)
    }
}
