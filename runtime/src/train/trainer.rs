//! The training loop: HF `Trainer` semantics on the engine. Gradient accumulation normalised by
//! the label tokens of the whole window, clipping fused into AdamW, the schedule, logging into
//! `log_history`, evaluation, checkpoints written atomically and rotated (never the best), exact
//! resume from the sampler's position, and HF-format output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::{json, Map, Value};

use super::callbacks::{Event, TrainerCallback, TrainerControl};
use super::optimizer::{clip_coefficient, grad_norm, AdamW, AdamWConfig};
use super::plugins::Plugins;
use super::sampler::{Sampler, SamplerState};
use super::schedule::{warmup_steps, Schedule, SchedulerType};
use super::state::TrainerState;
use crate::args::training::NanInfPolicy;
use crate::args::{IntervalStrategy, SaveStrategy, TrainingArguments};
use crate::backend::cpu::Cpu;
use crate::backend::AttnImpl;
use crate::backend::Backend;
use crate::backend::StatsWanted;
use crate::data::cache::load_examples_cached;
use crate::data::{pad_batch, Example, PadOptions, Padding, Tokenizer};
use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
use crate::model::decoder::{shifted_labels, CustomLoss};
use crate::model::{
    init::init_tensors, io, write_folder_atomically, Activations, Batch, Device, Dtype, Grads, Layout, LoadOptions, LossOptions, Model, ModelConfig,
};
use crate::plugin::{EvalBatch, PredictionKind};

/// The trainer on a backend: the CPU by default, or the CUDA backend (see [`Trainer::new_on`]).
pub struct Trainer<B: Backend = Cpu> {
    pub args: TrainingArguments,
    pub model: Model<B>,
    pub tokenizer: Arc<Tokenizer>,
    pub state: TrainerState,
    train: Vec<Example>,
    eval: Option<Vec<Example>>,
    /// The datasets' numeric columns, per example (empty when examples are packed blocks).
    train_columns: Vec<(String, Vec<f64>)>,
    eval_columns: Vec<(String, Vec<f64>)>,
    plugins: Plugins,
    /// Where the model came from (its `generation_config.json`, for `predict_with_generate`).
    model_dir: PathBuf,
    pad: PadOptions,
    opt: AdamW<B>,
    schedule: Schedule,
    sampler: Sampler,
    output_dir: PathBuf,
    logging_steps: u64,
    eval_steps: u64,
    save_steps: u64,
    callbacks: Vec<Box<dyn TrainerCallback>>,
    control: TrainerControl,
}

/// A step interval: at least 1 is a step count, below 1 a ratio of `max_steps` (rounded up).
fn interval(v: f64, max_steps: u64) -> u64 {
    if v >= 1.0 {
        v as u64
    } else {
        ((v * max_steps as f64).ceil() as u64).max(1)
    }
}

use crate::model::decoder::label_tokens;

/// The values of `columns` for the examples `ix`.
fn column_rows(columns: &[(String, Vec<f64>)], ix: &[usize]) -> Vec<(String, Vec<f64>)> {
    columns.iter().map(|(n, v)| (n.clone(), ix.iter().map(|&i| v[i]).collect())).collect()
}

/// The memory `auto_find_batch_size` plans for, in bytes: `RUNTIME_MEMORY_BUDGET_MB` when set,
/// else the device's free memory (a GPU), else the system's available memory (`MemAvailable`),
/// else unlimited.
fn memory_budget(be: &impl Backend) -> u128 {
    if let Some(mb) = std::env::var("RUNTIME_MEMORY_BUDGET_MB").ok().and_then(|v| v.trim().parse::<u128>().ok()) {
        return mb << 20;
    }
    if let Some(free) = be.free_memory() {
        return free;
    }
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u128>().ok()))
        .map_or(u128::MAX, |kb| kb << 10)
}

/// `auto_find_batch_size`: the largest divisor of the batch size whose step (weights,
/// gradients, AdamW's two moments and the activations at the longest example) fits in 90% of
/// `budget`, with the accumulation raised by the same factor so the examples per step do not
/// change (transformers only halves the batch). An error when even one example does not fit.
fn fit_batch_size<B: Backend>(model: &Model<B>, batch: usize, accum: usize, seq: usize, budget: u128) -> Result<(usize, usize)> {
    let fixed = 16 * model.layout.numel() as u128;
    let usable = budget / 10 * 9;
    for d in (1..=batch).filter(|&d| batch.is_multiple_of(d)) {
        let b = batch / d;
        if fixed + Activations::estimate_bytes(model, b, seq) <= usable {
            return Ok((b, accum * d));
        }
    }
    Err(Error::Invalid(format!(
        "auto_find_batch_size: even one example of {seq} tokens needs about {:.1} GiB, more than the {:.1} GiB available",
        (fixed + Activations::estimate_bytes(model, 1, seq)) as f64 / (1u64 << 30) as f64,
        usable as f64 / (1u64 << 30) as f64
    )))
}

/// Generation's view of an example: the prompt is its unlabelled prefix, the reference its
/// labelled tokens. `None` when there is no prompt or nothing labelled.
fn prompt_and_reference(e: &Example) -> Option<(&[u32], Vec<u32>)> {
    let start = e.labels.iter().position(|&l| l != crate::backend::cpu::IGNORE_INDEX).filter(|&s| s > 0)?;
    Some((&e.input_ids[..start], e.labels[start..].iter().filter(|&&l| l >= 0).map(|&l| l as u32).collect()))
}

/// Running training losses: since the last log, and over the whole run.
#[derive(Default)]
struct LossLog {
    sum: f64,
    steps: u64,
    total: f64,
    total_steps: u64,
    norm: f32,
    lr: f64,
}

impl LossLog {
    fn add(&mut self, loss: f64) {
        (self.sum, self.steps, self.total, self.total_steps) = (self.sum + loss, self.steps + 1, self.total + loss, self.total_steps + 1);
    }
    /// transformers' `logging_nan_inf_filter`: a non-finite step is logged as the running average.
    fn average(&self) -> f64 {
        if self.total_steps > 0 {
            self.total / self.total_steps as f64
        } else {
            0.0
        }
    }
    fn take(&mut self) -> f64 {
        let mean = self.sum / self.steps as f64;
        (self.sum, self.steps) = (0.0, 0);
        mean
    }
}

pub(crate) fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
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

impl<B: Backend + Clone> Trainer<B> {
    /// The trainer on `backend` (see [`crate::model::Device::select`]); `training = false` loads
    /// what evaluation and prediction need only.
    pub fn new_on(backend: B, args: TrainingArguments, training: bool) -> Result<Self> {
        // settings transformers honours that this build does not implement yet: refused, never
        // silently ignored
        let unsupported = [
            (args.include_for_metrics.iter().any(|x| x != "inputs"), "include_for_metrics other than \"inputs\""),
            (args.report_to.as_array().is_some_and(|a| !a.is_empty()) || args.report_to.is_string(), "report_to (integrations)"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(Error::Unsupported(format!("`{name}` is not supported by this build yet")));
        }
        if args.device == "cuda" && !args.use_cpu && backend.name() != "cuda" {
            return Err(Error::Invalid(format!("device `cuda` was asked for but the trainer was given the {} backend", backend.name())));
        }
        if args.bf16 && backend.name() != "cuda" {
            return Err(Error::Unsupported("bf16 mixed precision runs on the CUDA backend (`device = \"cuda\"`); the CPU backend trains in f32".into()));
        }
        let device = Device::parse(&args.device).unwrap_or(Device::Auto);
        let opts = LoadOptions {
            torch_dtype: args
                .torch_dtype
                .as_deref()
                .map(|d| Dtype::parse(d).ok_or_else(|| Error::Invalid(format!("unknown torch_dtype `{d}`"))))
                .transpose()?,
            attn_implementation: AttnImpl::parse(&args.attn_implementation).unwrap_or(AttnImpl::Flash),
            device: if args.use_cpu { Device::Cpu } else { device },
        };
        let (mut model, model_dir) = match (&args.model_name_or_path, &args.config_name) {
            (Some(m), _) => (Model::load(backend.clone(), Path::new(m), opts)?, PathBuf::from(m)),
            (None, Some(c)) => {
                let path = if Path::new(c).is_dir() { Path::new(c).join("config.json") } else { PathBuf::from(c) };
                let cfg = ModelConfig::from_file(&path)?;
                let tensors = init_tensors(&cfg, &Layout::new(&cfg), args.seed);
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (Model::from_tensors(backend.clone(), cfg, tensors, opts)?, dir)
            }
            (None, None) => return Err(Error::Invalid("set model_name_or_path (a model folder) or config_name (a config.json to train from scratch)".into())),
        };
        model.gradient_checkpointing = args.gradient_checkpointing;
        let model_dir_kept = model_dir.clone();
        let tok_dir = args.tokenizer_name.clone().map(PathBuf::from).unwrap_or(model_dir);
        let tokenizer = Arc::new(Tokenizer::from_dir(&tok_dir)?);
        if model.source.is_none() {
            model.source = Some(tok_dir.clone()); // the tokenizer files travel with the saved model
        }
        if tokenizer.len() > model.config.vocab_size {
            return Err(Error::Invalid(format!(
                "the tokenizer in {} has {} tokens but the model's vocab_size is {}",
                tok_dir.display(),
                tokenizer.len(),
                model.config.vocab_size
            )));
        }
        let train_file = match (&args.train_file, training) {
            (Some(f), true) => Some(f.clone()),
            (None, true) => return Err(Error::Invalid("set train_file (a .jsonl or .json dataset)".into())),
            (_, false) => None,
        };
        let block = match (args.block_size, args.max_seq_length) {
            (Some(b), _) => Some(b),
            (None, Some(_)) => None,
            // run_clm.py's default: min(1024, the model's context)
            (None, None) => Some(1024.min(tokenizer.model_max_length.unwrap_or(usize::MAX)).min(model.config.max_positions)),
        };
        let cache_dir = crate::data::cache::default_dir();
        let load = |f: &str| -> Result<Vec<Example>> {
            let (_, examples, hit) = load_examples_cached(Path::new(f), &tokenizer, block, args.max_seq_length, cache_dir.as_deref(), args.overwrite_cache)?;
            if hit {
                tracing::info!("{f}: tokenized examples from the cache");
            }
            Ok(examples)
        };
        let train = match &train_file {
            Some(f) => load(f)?,
            None => Vec::new(),
        };
        let eval = match &args.validation_file {
            Some(f) => Some(load(f)?),
            None => None,
        };
        let plugins = Plugins::load(&args.plugins, Some(tokenizer.clone()))?;
        // numeric columns travel with unpacked examples (one example per record), for plugins
        let columns_of = |f: &Option<String>, n: usize| -> Result<Vec<(String, Vec<f64>)>> {
            match f {
                Some(f) if !plugins.is_empty() => {
                    let cols = crate::data::dataset::numeric_columns(Path::new(f))?;
                    Ok(if cols.first().is_some_and(|c| c.1.len() == n) { cols } else { Vec::new() })
                }
                _ => Ok(Vec::new()),
            }
        };
        let train_columns = columns_of(&train_file, train.len())?;
        let eval_columns = columns_of(&args.validation_file, eval.as_ref().map_or(0, Vec::len))?;
        let callbacks = plugins.callbacks();
        if (args.eval_strategy != IntervalStrategy::No || !training) && eval.is_none() {
            return Err(Error::Invalid(format!("eval_strategy {:?} needs validation_file", args.eval_strategy).to_lowercase()));
        }
        let longest = train.iter().chain(eval.iter().flatten()).map(|e| e.input_ids.len()).max().unwrap_or(0);
        if model.config.arch == crate::model::Arch::Gpt2 && longest > model.config.max_positions {
            return Err(Error::Invalid(format!(
                "examples of {longest} tokens exceed the model's n_positions ({}); set block_size or max_seq_length",
                model.config.max_positions
            )));
        }
        let mut args = args;
        if args.auto_find_batch_size && training {
            let (b, acc) =
                fit_batch_size(&model, args.per_device_train_batch_size, args.gradient_accumulation_steps, longest.max(1), memory_budget(&model.backend))?;
            if b != args.per_device_train_batch_size {
                tracing::warn!(
                    "auto_find_batch_size: per_device_train_batch_size {} does not fit in memory; training with {b} and gradient_accumulation_steps {acc} (the same {} examples per step)",
                    args.per_device_train_batch_size,
                    b * acc
                );
                (args.per_device_train_batch_size, args.gradient_accumulation_steps) = (b, acc);
            }
        }
        let pad_id = tokenizer.pad.as_ref().or(tokenizer.eos.as_ref()).map_or(0, |t| t.id);
        let pad = PadOptions { padding: Padding::Longest, side: tokenizer.padding_side, pad_id, max_length: None, truncation: false, pad_to_multiple_of: None };
        let sampler = Sampler {
            seed: args.data_seed.unwrap_or(args.seed),
            n_examples: train.len(),
            batch_size: args.per_device_train_batch_size,
            drop_last: args.dataloader_drop_last,
            sequential: args.train_sampling_strategy == "sequential",
        };
        let batches = sampler.batches_per_epoch().max(usize::from(!training));
        if batches == 0 {
            return Err(Error::Invalid(format!("{} examples make no full batch of {} (dataloader_drop_last)", train.len(), args.per_device_train_batch_size)));
        }
        let windows = batches.div_ceil(args.gradient_accumulation_steps) as u64;
        let max_steps = if args.max_steps > 0 { args.max_steps as u64 } else { (args.num_train_epochs * windows as f64).ceil() as u64 };
        let schedule = Schedule::new(
            SchedulerType::parse(&args.lr_scheduler_type)?,
            args.learning_rate,
            warmup_steps(args.warmup_steps, max_steps),
            max_steps,
            &args.lr_scheduler_kwargs,
        )?;
        let opt = AdamW::new(
            &model,
            AdamWConfig {
                lr: args.learning_rate as f32,
                beta1: args.adam_beta1 as f32,
                beta2: args.adam_beta2 as f32,
                eps: args.adam_epsilon as f32,
                weight_decay: args.weight_decay as f32,
            },
        );
        let logging_steps = interval(args.logging_steps, max_steps);
        let eval_steps = interval(args.eval_steps.unwrap_or(args.logging_steps), max_steps);
        let save_steps = interval(args.save_steps, max_steps);
        let state = TrainerState {
            max_steps,
            num_train_epochs: max_steps.div_ceil(windows),
            logging_steps,
            eval_steps,
            save_steps,
            train_batch_size: args.per_device_train_batch_size,
            is_local_process_zero: true,
            is_world_process_zero: true,
            ..TrainerState::default()
        };
        let output_dir = PathBuf::from(&args.output_dir);
        Ok(Trainer {
            args,
            model,
            tokenizer,
            state,
            train,
            eval,
            train_columns,
            eval_columns,
            plugins,
            model_dir: model_dir_kept,
            pad,
            opt,
            schedule,
            sampler,
            output_dir,
            logging_steps,
            eval_steps,
            save_steps,
            callbacks,
            control: TrainerControl::default(),
        })
    }

    /// Adds a callback; it receives `on_init_end` when training starts, then every event.
    pub fn add_callback(&mut self, cb: Box<dyn TrainerCallback>) {
        self.callbacks.push(cb);
    }

    fn emit(&mut self, event: Event, mut logs: Option<&mut Map<String, Value>>) -> Result<()> {
        let mut control = self.control;
        for cb in &mut self.callbacks {
            cb.on_event(event, &self.args, &self.state, &mut control, logs.as_deref_mut())?;
        }
        self.control = control;
        Ok(())
    }

    /// Pads the examples `ix` of `examples` into a batch (through the padding plugin when there
    /// is one) with their numeric columns.
    fn collate(&self, examples: &[Example], columns: &[(String, Vec<f64>)], ix: &[usize]) -> Result<Batch> {
        let chosen: Vec<Example> = ix.iter().map(|&i| examples[i].clone()).collect();
        let c = &self.model.config;
        let mut b = match self.plugins.pad(&chosen, &self.pad, c.vocab_size, c.max_positions) {
            Some(b) => b?,
            None => pad_batch(&chosen, &self.pad)?,
        };
        b.columns = column_rows(columns, ix);
        Ok(b)
    }

    /// Number of training examples (blocks, for packed text).
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    fn checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.output_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
                Some((step, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// The checkpoint to resume from, if `resume_from_checkpoint` asks for one.
    fn resume_target(&self) -> Result<Option<PathBuf>> {
        match &self.args.resume_from_checkpoint {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
            Some(Value::String(s)) if s == "true" || s == "True" => self.newest_checkpoint().map(Some),
            Some(Value::Bool(true)) => self.newest_checkpoint().map(Some),
            Some(Value::String(s)) => Ok(Some(PathBuf::from(s))),
            Some(v) => Err(Error::Invalid(format!("resume_from_checkpoint must be a checkpoint folder or true, found {v}"))),
        }
    }

    fn newest_checkpoint(&self) -> Result<PathBuf> {
        for (step, dir) in self.checkpoints().into_iter().rev() {
            if dir.join("trainer_state.json").is_file() && dir.join("optimizer.safetensors").is_file() {
                return Ok(dir);
            }
            tracing::warn!("skipping {} (step {step}): incomplete checkpoint", dir.display());
        }
        Err(Error::Invalid(format!("{}: no valid checkpoint found to resume from", self.output_dir.display())))
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state = TrainerState::read(&dir.join("trainer_state.json"))?;
        let loaded =
            Model::load(self.model.backend.clone(), dir, LoadOptions { torch_dtype: None, attn_implementation: self.model.attn_impl, device: Device::Cpu })?;
        if loaded.layout.numel() != self.model.layout.numel() {
            return Err(Error::Invalid(format!("{}: the checkpoint's model differs from the run's", dir.display())));
        }
        self.model.params = loaded.params;
        let path = dir.join("optimizer.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let st = io::deserialize(&path, &bytes)?;
        for (i, spec) in self.model.layout.specs.iter().enumerate() {
            for (prefix, dst) in [("exp_avg", &mut self.opt.exp_avg[i]), ("exp_avg_sq", &mut self.opt.exp_avg_sq[i])] {
                let name = format!("{prefix}.{}", spec.name);
                let view = st.tensor(&name).map_err(|_| Error::tensor(&path, &name, "missing"))?;
                if view.dtype() != StDtype::F32 || view.shape() != [spec.numel()] {
                    return Err(Error::tensor(&path, &name, format!("expected F32 [{}], found {:?} {:?}", spec.numel(), view.dtype(), view.shape())));
                }
                let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                *dst = self.model.backend.upload(&values);
            }
        }
        self.opt.step = state.optimizer_step;
        for cb in &mut self.callbacks {
            cb.load_state(&state.stateful_callbacks)?;
        }
        let keep = (self.state.max_steps, self.state.num_train_epochs, self.state.logging_steps, self.state.eval_steps, self.state.save_steps);
        self.state = state;
        (self.state.max_steps, self.state.num_train_epochs, self.state.logging_steps, self.state.eval_steps, self.state.save_steps) = keep;
        Ok(())
    }

    fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let dir = self.output_dir.join(format!("checkpoint-{}", self.state.global_step));
        if self.state.best_global_step == Some(self.state.global_step) {
            self.state.best_model_checkpoint = Some(dir.to_string_lossy().to_string());
        }
        self.state.optimizer_step = self.opt.step;
        for cb in &mut self.callbacks {
            if let Some((name, value)) = cb.state()? {
                self.state.stateful_callbacks.insert(name, value);
            }
        }
        let (model, opt, state, args) = (&self.model, &self.opt, &self.state, &self.args);
        write_folder_atomically(&dir, true, |tmp| {
            // f32 whatever the model's dtype, so resume is exact
            model.write_into(tmp, Some(Dtype::F32), u64::MAX)?;
            let mut bytes: Vec<(String, Vec<u8>)> = Vec::new();
            for (i, spec) in model.layout.specs.iter().enumerate() {
                for (prefix, t) in [("exp_avg", &opt.exp_avg[i]), ("exp_avg_sq", &opt.exp_avg_sq[i])] {
                    bytes.push((format!("{prefix}.{}", spec.name), model.backend.download(t).iter().flat_map(|v| v.to_le_bytes()).collect()));
                }
            }
            let views = bytes
                .iter()
                .map(|(n, b)| TensorView::new(StDtype::F32, vec![b.len() / 4], b).map(|v| (n.clone(), v)).map_err(|e| Error::Invalid(e.to_string())))
                .collect::<Result<Vec<_>>>()?;
            if !args.save_only_model {
                let path = tmp.join("optimizer.safetensors");
                let data = safetensors::serialize(views, None).map_err(|e| Error::weights(&path, e.to_string()))?;
                io::write_file(&path, &data)?;
            }
            io::write_file(
                &tmp.join("scheduler.json"),
                json!({"last_epoch": state.global_step, "lr_scheduler_type": args.lr_scheduler_type}).to_string().as_bytes(),
            )?;
            io::write_file(&tmp.join("training_args.json"), args.to_json().as_bytes())?;
            io::write_file(&tmp.join("trainer_state.json"), state.to_json().as_bytes())
        })?;
        self.rotate()?;
        self.emit(Event::Save, None)?;
        Ok(dir)
    }

    /// `save_total_limit`: delete the oldest checkpoints, never the best one.
    fn rotate(&self) -> Result<()> {
        let Some(limit) = self.args.save_total_limit else { return Ok(()) };
        let mut cps = self.checkpoints();
        let best = self.state.best_model_checkpoint.as_ref().map(PathBuf::from);
        // as transformers: the best checkpoint counts as the most recent
        if let Some(b) = &best {
            if let Some(pos) = cps.iter().position(|c| &c.1 == b) {
                let item = cps.remove(pos);
                cps.push(item);
            }
        }
        let limit =
            if self.args.load_best_model_at_end && limit == 1 && best.is_some() && cps.last().map(|c| &c.1) != best.as_ref() { 2 } else { limit.max(1) };
        let excess = cps.len().saturating_sub(limit);
        for (_, dir) in cps.into_iter().take(excess) {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(())
    }

    /// Appends an entry to `log_history` (with what callbacks add to it in `on_log`).
    fn log(&mut self, mut entry: Map<String, Value>) -> Result<()> {
        entry.insert("epoch".into(), num(self.state.epoch));
        self.emit(Event::Log, Some(&mut entry))?;
        entry.insert("step".into(), json!(self.state.global_step));
        self.state.log_history.push(entry);
        Ok(())
    }

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

    fn evaluate_on(&mut self, eval: &[Example]) -> Result<Map<String, Value>> {
        let t = Instant::now();
        let (mut total, mut count, mut batches) = (0.0f64, 0usize, 0usize);
        let mut acts = Activations::new(&self.model, 1, 2);
        let with_metrics = !self.plugins.metrics.is_empty();
        if with_metrics {
            self.plugins.metrics_reset()?;
        }
        let mut hook = self.plugins.loss_hook();
        let indices: Vec<usize> = (0..eval.len()).collect();
        for ix in indices.chunks(self.args.per_device_eval_batch_size) {
            let b = self.collate(eval, &self.eval_columns, ix)?;
            // as transformers: the label smoother (or the custom loss) applies to the evaluation loss too
            let opts = LossOptions { label_smoothing: self.args.label_smoothing_factor as f32, num_items_in_batch: None };
            // the argmax-aligned metrics read per-token statistics of the same forward pass
            let want =
                (with_metrics && !self.args.predict_with_generate).then_some(StatsWanted { label_logprob: true, argmax: true, ..StatsWanted::default() });
            let (out, stats) = match hook.as_mut() {
                Some(h) if crate::model::decoder::label_tokens(&b) > 0 => {
                    let continues = h.continues();
                    let mut custom = if h.uses_rows() { CustomLoss::Rows(h) } else { CustomLoss::Stats(h) };
                    match self.model.eval_custom(&mut acts, &b, &mut custom, want) {
                        Ok((out, stats)) => (Some(out), stats),
                        Err(e @ Error::Plugin(_)) if continues => {
                            tracing::warn!("evaluation: {e}; this batch's loss is the built-in one (on_error = \"continue\")");
                            self.model.eval_loss(&mut acts, &b, opts, want)?
                        }
                        Err(e) => return Err(e),
                    }
                }
                _ => self.model.eval_loss(&mut acts, &b, opts, want)?,
            };
            if let Some(out) = out {
                if out.n_tokens > 0 {
                    total += out.mean as f64 * ix.len() as f64;
                    count += ix.len();
                }
            }
            if self.args.predict_with_generate {
                let (batch, _) = self.generate_batch(eval, ix)?;
                if with_metrics {
                    self.plugins.metrics_update(&batch)?;
                }
            } else if let Some(stats) = stats {
                let include_inputs = self.args.include_for_metrics.iter().any(|x| x == "inputs");
                let inputs = include_inputs.then(|| b.input_ids.iter().map(|&x| x as u32).collect());
                let batch = EvalBatch::argmax(b.batch, b.seq, shifted_labels(&b), stats, inputs, Some(self.pad.pad_id));
                self.plugins.metrics_update(&batch)?;
            }
            batches += 1;
            self.emit(Event::PredictionStep, None)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let mut m = Map::new();
        m.insert("eval_loss".into(), num(total / count.max(1) as f64));
        if with_metrics {
            self.plugins.metrics_compute(&mut m, "eval")?;
        }
        m.insert("eval_runtime".into(), num((secs * 1e4).round() / 1e4));
        m.insert("eval_samples_per_second".into(), num((eval.len() as f64 / secs * 1e3).round() / 1e3));
        m.insert("eval_steps_per_second".into(), num((batches as f64 / secs * 1e3).round() / 1e3));
        Ok(m)
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

    fn predict_on(&mut self, examples: &[Example]) -> Result<Map<String, Value>> {
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
                let (prompt, reference) = prompt_and_reference(&examples[i]).expect("generate_batch checked every example");
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
            io::write_file(&tmp, body.as_bytes())?;
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
            match prompt_and_reference(&examples[i]) {
                Some((prompt, reference)) => {
                    prompts.push(prompt.to_vec());
                    refs.push(reference);
                }
                None => {
                    return Err(Error::Invalid(format!(
                        "predict_with_generate: evaluation example {} has no prompt to generate from (it needs unlabelled prompt tokens followed by labelled ones: prompt/completion or messages records)",
                        i + 1
                    )))
                }
            }
        }
        let generated = crate::generate::generate(&self.model, &prompts, &cfg, |_, _| {})?;
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
    fn determine_best_metric(&mut self, m: &Map<String, Value>) -> Result<bool> {
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

    /// Trains to `max_steps` (resuming when asked), then writes the HF-format output.
    pub fn train(&mut self) -> Result<Map<String, Value>> {
        let occupied = self.output_dir.is_dir() && std::fs::read_dir(&self.output_dir).map_err(|e| Error::io(&self.output_dir, e))?.next().is_some();
        let resume = self.resume_target()?;
        if occupied && resume.is_none() && !self.args.overwrite_output_dir {
            return Err(Error::Invalid(format!(
                "{}: output_dir exists and is not empty; pass --resume_from_checkpoint true to continue, or --overwrite_output_dir",
                self.output_dir.display()
            )));
        }
        std::fs::create_dir_all(&self.output_dir).map_err(|e| Error::io(&self.output_dir, e))?;
        // what a killed run left half-written (never picked up by resume): remove it
        for e in std::fs::read_dir(&self.output_dir).map_err(|e| Error::io(&self.output_dir, e))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && (name.contains(".partial-") || name.contains(".old-")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        if let Some(dir) = &resume {
            self.load_checkpoint(dir)?;
            if self.args.ignore_data_skip {
                // as transformers: restart the current epoch's data instead of skipping ahead
                self.state.sampler.batch = 0;
            }
            tracing::info!("resuming from {} at step {}", dir.display(), self.state.global_step);
        }
        let started = Instant::now();
        let start_step = self.state.global_step;
        let accum = self.args.gradient_accumulation_steps;
        let mut grads = Grads::zeros(&self.model);
        let mut acts = Activations::new(&self.model, 1, 2);
        let mut tokens = 0u64;
        let bar = if self.args.disable_tqdm { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(self.state.max_steps) };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(start_step);
        self.emit(Event::InitEnd, None)?;
        self.emit(Event::TrainBegin, None)?;
        if self.args.eval_on_start && start_step == 0 && self.eval.is_some() {
            let m = self.evaluate()?;
            self.determine_best_metric(&m)?;
        }
        let mut logbook = LossLog::default();
        let mut loss_hook = self.plugins.loss_hook();
        'outer: while self.state.global_step < self.state.max_steps {
            let SamplerState { epoch, batch: first } = self.state.sampler;
            let batches = self.sampler.epoch_batches(epoch);
            self.emit(Event::EpochBegin, None)?;
            let mut b = first as usize;
            while b < batches.len() {
                let end = (b + accum).min(batches.len());
                let micro = batches[b..end].iter().map(|ix| self.collate(&self.train, &self.train_columns, ix)).collect::<Result<Vec<_>>>()?;
                let items: usize = micro.iter().map(label_tokens).sum();
                if items == 0 {
                    return Err(Error::Invalid(format!("step {}: the batches of this accumulation window have no label tokens", self.state.global_step + 1)));
                }
                self.emit(Event::StepBegin, None)?;
                grads.zero(&self.model.backend);
                let mut loss_sum = 0.0;
                let mut plugin_failed = false;
                let opts = LossOptions { label_smoothing: self.args.label_smoothing_factor as f32, num_items_in_batch: Some(items) };
                for (i, mb) in micro.iter().enumerate() {
                    // NEFTune noise from (seed, step, micro-batch): the same after a resume
                    self.model.neftune = self.args.neftune_noise_alpha.map(|a| (a as f32, self.args.seed ^ (self.state.global_step << 20) ^ i as u64));
                    loss_sum += match loss_hook.as_mut() {
                        Some(h) => {
                            let continues = h.continues();
                            let mut custom = if h.uses_rows() { CustomLoss::Rows(h) } else { CustomLoss::Stats(h) };
                            match self.model.forward_backward_custom(&mut acts, mb, &mut grads, &mut custom, Some(items)) {
                                Ok(out) => out.sum,
                                Err(e @ Error::Plugin(_)) if continues => {
                                    tracing::warn!("step {}: {e}; the step is skipped (on_error = \"continue\")", self.state.global_step + 1);
                                    plugin_failed = true;
                                    break;
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        None => self.model.forward_backward(&mut acts, mb, &mut grads, opts)?.sum,
                    };
                    tokens += mb.attention_mask.as_ref().map_or(0, |m| m.iter().filter(|&&x| x == 1).count() as u64);
                    if i + 1 < micro.len() {
                        self.emit(Event::SubstepEnd, None)?;
                    }
                }
                let loss = if plugin_failed { f64::NAN } else { loss_sum / items as f64 };
                let (norm, coef) = if self.args.max_grad_norm > 0.0 {
                    clip_coefficient(&self.model.backend, &grads, self.args.max_grad_norm as f32)
                } else {
                    (grad_norm(&self.model.backend, &grads), 1.0)
                };
                let lr = self.schedule.lr(self.state.global_step);
                let finite = loss.is_finite() && norm.is_finite();
                if finite {
                    self.emit(Event::PreOptimizerStep, None)?;
                    self.opt.step(&mut self.model, &grads, lr as f32, coef);
                    self.emit(Event::OptimizerStep, None)?;
                } else if plugin_failed {
                    // logged above; the step's gradients are incomplete, so no update
                } else if self.args.nan_inf_policy == NanInfPolicy::Stop {
                    let last = self.checkpoints().last().map_or("none".to_string(), |c| c.1.display().to_string());
                    return Err(Error::Invalid(format!(
                        "step {}: the loss is {loss} (gradient norm {norm}); stopping without applying the update. Last good checkpoint: {last}",
                        self.state.global_step + 1
                    )));
                } else {
                    tracing::warn!("step {}: the loss is {loss} (gradient norm {norm}); update skipped", self.state.global_step + 1);
                }
                b = end;
                self.state.global_step += 1;
                self.state.sampler = if b >= batches.len() { SamplerState { epoch: epoch + 1, batch: 0 } } else { SamplerState { epoch, batch: b as u64 } };
                self.state.epoch = epoch as f64 + b as f64 / batches.len() as f64;
                self.state.num_input_tokens_seen = tokens;
                logbook.add(if finite || !self.args.logging_nan_inf_filter { loss } else { logbook.average() });
                logbook.norm = norm;
                logbook.lr = lr;
                let step = self.state.global_step;
                bar.set_position(step);
                bar.set_message(format!("loss {:.4} lr {:.2e} grad norm {:.3} {:.0} tok/s", loss, lr, norm, tokens as f64 / started.elapsed().as_secs_f64()));
                // transformers' DefaultFlowCallback.on_step_end
                let (a, c) = (&self.args, &mut self.control);
                c.should_log |=
                    (a.logging_first_step && step == 1) || (a.logging_strategy == IntervalStrategy::Steps && step.is_multiple_of(self.logging_steps));
                c.should_evaluate |= a.eval_strategy == IntervalStrategy::Steps && step.is_multiple_of(self.eval_steps) && a.eval_delay <= step as f64;
                c.should_save |= a.save_strategy == SaveStrategy::Steps && step.is_multiple_of(self.save_steps);
                if step >= self.state.max_steps {
                    c.should_training_stop = true;
                    c.should_evaluate |= a.eval_strategy == IntervalStrategy::Steps && a.eval_delay <= step as f64;
                    c.should_save |= a.save_strategy == SaveStrategy::Steps;
                }
                self.emit(Event::StepEnd, None)?;
                self.log_save_evaluate(&mut logbook)?;
                let epoch_over = b >= batches.len() || self.control.should_training_stop || self.control.should_epoch_stop;
                if epoch_over {
                    // transformers' DefaultFlowCallback.on_epoch_end
                    let (a, c) = (&self.args, &mut self.control);
                    c.should_log |= a.logging_strategy == IntervalStrategy::Epoch;
                    c.should_evaluate |= a.eval_strategy == IntervalStrategy::Epoch && a.eval_delay <= self.state.epoch;
                    c.should_save |= a.save_strategy == SaveStrategy::Epoch;
                    self.emit(Event::EpochEnd, None)?;
                    self.log_save_evaluate(&mut logbook)?;
                }
                if self.control.should_training_stop {
                    break 'outer;
                }
                if self.control.should_epoch_stop {
                    self.control.should_epoch_stop = false;
                    self.state.sampler = SamplerState { epoch: epoch + 1, batch: 0 };
                    continue 'outer;
                }
            }
            if b >= batches.len() {
                self.state.sampler = SamplerState { epoch: epoch + 1, batch: 0 };
            }
        }
        let (total_loss, total_steps) = (logbook.total, logbook.total_steps);
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        if self.args.load_best_model_at_end {
            if let Some(best) = self.state.best_model_checkpoint.clone() {
                let loaded = Model::load(
                    self.model.backend.clone(),
                    Path::new(&best),
                    LoadOptions { torch_dtype: None, attn_implementation: self.model.attn_impl, device: Device::Cpu },
                )?;
                self.model.params = loaded.params;
                tracing::info!("loaded the best model from {best} ({} = {:?})", self.args.best_metric_key().unwrap_or_default(), self.state.best_metric);
            }
        }
        let steps_run = (self.state.global_step - start_step).max(1) as f64;
        let mut metrics = Map::new();
        metrics.insert("epoch".into(), num(self.state.epoch));
        metrics.insert("total_flos".into(), num(self.state.total_flos));
        metrics.insert("train_loss".into(), num(total_loss / total_steps.max(1) as f64));
        metrics.insert("train_runtime".into(), num((secs * 1e4).round() / 1e4));
        metrics.insert("train_samples_per_second".into(), num(steps_run * (self.args.per_device_train_batch_size * accum) as f64 / secs));
        metrics.insert("train_steps_per_second".into(), num(steps_run / secs));
        metrics.insert("train_tokens_per_second".into(), num(tokens as f64 / secs));
        self.log(metrics.clone())?;
        self.save_output(&metrics)?;
        self.emit(Event::TrainEnd, None)?;
        Ok(metrics)
    }

    /// transformers' `_maybe_log_save_evaluate`: acts on the control flags (log, then evaluate,
    /// then save) and clears them.
    fn log_save_evaluate(&mut self, logbook: &mut LossLog) -> Result<()> {
        if self.control.should_log && logbook.steps > 0 {
            let mut e = Map::new();
            e.insert("loss".into(), num(logbook.take()));
            e.insert("grad_norm".into(), num(logbook.norm as f64));
            e.insert("learning_rate".into(), num(logbook.lr));
            self.log(e)?;
        }
        self.control.should_log = false;
        let mut new_best = false;
        if self.control.should_evaluate {
            let m = self.evaluate()?;
            new_best = self.determine_best_metric(&m)?;
        }
        self.control.should_evaluate = false;
        if self.args.save_strategy == SaveStrategy::Best {
            self.control.should_save = new_best;
        }
        if self.control.should_save {
            self.save_checkpoint()?;
        }
        self.control.should_save = false;
        Ok(())
    }

    /// The final `output_dir`: the model in HF format, `trainer_state.json`,
    /// `training_args.json`, `train_results.json` and `all_results.json`.
    fn save_output(&self, train_metrics: &Map<String, Value>) -> Result<()> {
        let out = &self.output_dir;
        let tmp = out.join(format!(".final.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.model.write_into(&tmp, None, io::parse_size("5GB").unwrap_or(u64::MAX))?;
        let mut all = train_metrics.clone();
        if let Some(last_eval) = self.state.log_history.iter().rev().find(|e| e.contains_key("eval_loss")) {
            for (k, v) in last_eval {
                if k.starts_with("eval_") {
                    all.insert(k.clone(), v.clone());
                }
            }
        }
        io::write_file(&tmp.join("trainer_state.json"), self.state.to_json().as_bytes())?;
        io::write_file(&tmp.join("training_args.json"), self.args.to_json().as_bytes())?;
        io::write_file(&tmp.join("train_results.json"), serde_json::to_string_pretty(train_metrics).unwrap_or_default().as_bytes())?;
        io::write_file(&tmp.join("all_results.json"), serde_json::to_string_pretty(&all).unwrap_or_default().as_bytes())?;
        let title = format!("{} - {}", self.model.config.architecture_name(), self.args.run_name.clone().unwrap_or_else(|| self.args.output_dir.clone()));
        if let Some(svg) = super::plot::svg(&self.state.log_history, &title) {
            io::write_file(&tmp.join("loss.svg"), svg.as_bytes())?;
        }
        // each file renamed into place: a reader never sees a half-written file
        for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
            let entry = entry.map_err(|e| Error::io(&tmp, e))?;
            let dst = out.join(entry.file_name());
            std::fs::rename(entry.path(), &dst).map_err(|e| Error::io(&dst, e))?;
        }
        std::fs::remove_dir(&tmp).map_err(|e| Error::io(&tmp, e))
    }
}
