//! Building a [`Trainer`]: the settings refused rather than ignored, the model (loaded, or
//! initialised from a config), the tokenizer, the datasets and their numeric columns, the
//! plugins, `auto_find_batch_size`'s plan, the sampler, the schedule and the optimizer. Everything
//! is checked here, before any training step.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::batch_size::{fit_batch_size, memory_budget};
use super::callbacks::{TrainerCallback, TrainerControl};
use super::flow::interval;
use super::model_kind::TrainerModel;
use super::plugin_callbacks::plugin_callbacks;
use super::sampler::Sampler;
use super::schedule::{warmup_steps, Schedule, SchedulerType};
use super::state::TrainerState;
use super::tensorboard::TensorBoardCallback;
use super::trainer::Trainer;
use crate::args::distributed::Sharding;
use crate::args::{IntervalStrategy, TrainingArguments};
use crate::backend::{AttnImpl, Backend};
use crate::data::cache::load_examples_cached;
use crate::data::{Example, PadOptions, Padding, Tokenizer};
use crate::engine::full_shard::PieceStash;
use crate::engine::{AdamWConfig, Collective, Step};
use crate::error::{Error, Result};
use crate::model::lora::LoraConfig;
use crate::model::{init::init_each, Device, Dtype, Layout, LoadOptions, Model, ModelConfig, TrainModel};
use crate::plugin::roles::Plugins;
use crate::protocol::TokenDecoder;

/// Settings transformers honours that this build does not implement, and backends that cannot
/// run what was asked: refused, never silently ignored.
pub(super) fn check_supported(args: &TrainingArguments, backend: &str) -> Result<()> {
    let unsupported = [(args.include_for_metrics.iter().any(|x| x != "inputs"), "include_for_metrics other than \"inputs\"")];
    if let Some((_, name)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(Error::Unsupported(format!("`{name}` is not supported by this build yet")));
    }
    if let Some(other) = args.report_to.as_array().into_iter().flatten().filter_map(Value::as_str).find(|n| *n != "tensorboard") {
        return Err(Error::Unsupported(format!("report_to `{other}` is not supported by this build (supported: tensorboard, none)")));
    }
    if args.device == "cuda" && !args.use_cpu && backend != "cuda" {
        return Err(Error::Invalid(format!("device `cuda` was asked for but the trainer was given the {backend} backend")));
    }
    if args.bf16 && backend != "cuda" {
        return Err(Error::Unsupported("bf16 mixed precision runs on the CUDA backend (`device = \"cuda\"`); the CPU backend trains in f32".into()));
    }
    Ok(())
}

/// Host bytes per parameter that the `local` processes of this node hold together, of a run of
/// `world` processes. On the CPU each process holds the f32 weights, gradients and both moments
/// (16 bytes), `shard_grad_op` its 1/world of the moments (8 + 8 / world), `full_shard` its
/// 1/world of everything; on a GPU the host holds the initialised weights (8 bytes: the tensors
/// and their upload), a `full_shard` process its pieces.
fn node_bytes_per_parameter(cpu: bool, sharding: Sharding, world: usize, local: usize) -> f64 {
    let w = world.max(1) as f64;
    let per_process = match (cpu, sharding) {
        (true, Sharding::ShardGradOp) => 8.0 + 8.0 / w,
        (true, Sharding::FullShard) => 16.0 / w,
        (true, Sharding::None) => 16.0,
        (false, Sharding::FullShard) => 8.0 / w,
        (false, _) => 8.0,
    };
    per_process * local.max(1) as f64
}

/// The model from `model_name_or_path`, or initialised from `config_name` with the run's seed;
/// and the folder it came from.
///
/// `pieces`: (rank, processes) when the weights are sharded (`fsdp = "full_shard"`): each tensor
/// is cut as it is read or made, this process keeps its pieces (returned) and the model none.
fn load_model<B: Backend>(backend: B, args: &TrainingArguments, pieces: Option<(usize, usize)>) -> Result<(Model<B>, PathBuf, Option<PieceStash>)> {
    let device = Device::parse(&args.device).unwrap_or(Device::Auto);
    let opts = LoadOptions {
        torch_dtype: args.torch_dtype.as_deref().map(|d| Dtype::parse(d).ok_or_else(|| Error::Invalid(format!("unknown torch_dtype `{d}`")))).transpose()?,
        attn_implementation: AttnImpl::parse(&args.attn_implementation).unwrap_or(AttnImpl::Flash),
        device: if args.use_cpu { Device::Cpu } else { device },
    };
    let config_path = |c: &str| if Path::new(c).is_dir() { Path::new(c).join("config.json") } else { PathBuf::from(c) };
    let mut stash = match (pieces, &args.model_name_or_path, &args.config_name) {
        (Some((rank, world)), Some(m), _) => Some(PieceStash::new(&Layout::new(&ModelConfig::from_dir(Path::new(m))?), rank, world)),
        (Some((rank, world)), None, Some(c)) => Some(PieceStash::new(&Layout::new(&ModelConfig::from_file(&config_path(c))?), rank, world)),
        _ => None,
    };
    let mut keep = |i: usize, t: Vec<f32>| match &mut stash {
        Some(s) => s.keep(i, t),
        None => t,
    };
    let (mut model, dir) = match (&args.model_name_or_path, &args.config_name) {
        (Some(m), _) => (Model::load_keeping(backend, Path::new(m), opts, &mut keep)?, PathBuf::from(m)),
        (None, Some(c)) => {
            let path = config_path(c);
            let cfg = ModelConfig::from_file(&path)?;
            let (world, local) = crate::engine::mpi::launcher_sizes();
            let bytes = node_bytes_per_parameter(backend.name() == "cpu", args.sharding()?, world, local);
            let what = match (backend.name() == "cpu", local) {
                (true, 1) => "train (weights, gradients and AdamW's two moments, in f32)".to_string(),
                (true, _) => format!("train on this node ({local} processes, each with its share of the weights, gradients and moments)"),
                (false, 1) => "initialise the weights on the host".to_string(),
                (false, _) => format!("initialise the weights on this node's host ({local} processes)"),
            };
            cfg.check_memory(&path, bytes, &what)?;
            let layout = Layout::new(&cfg);
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let init = cfg.clone();
            (Model::from_each(backend, cfg, opts, |put| init_each(&init, &layout, args.seed, put), &mut keep)?, dir)
        }
        (None, None) => return Err(Error::Invalid("set model_name_or_path (a model folder) or config_name (a config.json to train from scratch)".into())),
    };
    model.gradient_checkpointing = args.gradient_checkpointing;
    attach_adapter(&mut model, args)?;
    model.hold_frozen_base()?;
    // what loading freed (file buffers, f32 copies of weights now held in bf16) goes back to the
    // system rather than staying in the resident set
    crate::mem::release_free_memory();
    let d = model.config.dropout;
    if d.embd > 0.0 || d.resid > 0.0 || d.attn > 0.0 {
        tracing::info!("dropout in training: embeddings {}, residual branches {}, attention probabilities {}", d.embd, d.resid, d.attn);
    }
    if d.attn > 0.0 && !model.backend.has_attention_dropout() {
        tracing::warn!(
            "the config's attention dropout ({}) is not applied: the {} backend's attention kernels do not implement it yet (embedding and residual dropout are applied)",
            d.attn,
            model.backend.name()
        );
    }
    Ok((model, dir, stash))
}

/// A LoRA adapter: a new one from the `peft` table, or an existing PEFT folder
/// (`adapter_name_or_path`) to continue.
fn attach_adapter<B: Backend>(model: &mut Model<B>, args: &TrainingArguments) -> Result<()> {
    if let Some(dir) = &args.adapter_name_or_path {
        model.load_adapter(Path::new(dir))?;
    } else if let Some(table) = &args.peft {
        model.add_lora(LoraConfig::from_map(table, "peft")?, None, args.seed)?;
    }
    if let Some(state) = &model.lora {
        let trainable: usize = model.layout.specs.iter().zip(&model.trainable).filter(|(_, t)| **t).map(|(s, _)| s.numel()).sum();
        tracing::info!("LoRA on {} modules: {trainable} trainable parameters of {}", state.modules.len(), model.num_parameters());
    }
    Ok(())
}

/// The tokenizer (`tokenizer_name`, else the model's folder), checked against the vocabulary;
/// its files travel with the saved model.
/// `source`: where the model's companion files come from (the tokenizer's folder when unset).
pub(super) fn load_tokenizer(args: &TrainingArguments, source: &mut Option<PathBuf>, vocab_size: usize, model_dir: &Path) -> Result<Arc<Tokenizer>> {
    let tok_dir = args.tokenizer_name.clone().map(PathBuf::from).unwrap_or(model_dir.to_path_buf());
    let tokenizer = Arc::new(Tokenizer::from_dir(&tok_dir)?);
    if source.is_none() {
        *source = Some(tok_dir.clone());
    }
    if tokenizer.len() > vocab_size {
        return Err(Error::Invalid(format!(
            "the tokenizer in {} has {} tokens but the model's vocab_size is {vocab_size}",
            tok_dir.display(),
            tokenizer.len()
        )));
    }
    Ok(tokenizer)
}

/// The training and validation examples, tokenized once and cached.
type Datasets = (Vec<Example>, Option<Vec<Example>>);

fn load_datasets(args: &TrainingArguments, tokenizer: &Tokenizer, max_positions: usize, train_file: Option<&str>) -> Result<Datasets> {
    let block = match (args.block_size, args.max_seq_length) {
        (Some(b), _) => Some(b),
        (None, Some(_)) => None,
        // run_clm.py's default: min(1024, the model's context)
        (None, None) => Some(1024.min(tokenizer.model_max_length.unwrap_or(usize::MAX)).min(max_positions)),
    };
    let cache_dir = crate::data::cache::default_dir();
    let load = |f: &str| -> Result<Vec<Example>> {
        let (_, examples, hit) = load_examples_cached(Path::new(f), tokenizer, block, args.max_seq_length, cache_dir.as_deref(), args.overwrite_cache)?;
        if hit {
            tracing::info!("{f}: tokenized examples from the cache");
        }
        Ok(examples)
    };
    let train = train_file.map(load).transpose()?.unwrap_or_default();
    let eval = args.validation_file.as_deref().map(load).transpose()?;
    Ok((train, eval))
}

/// A dataset file's numeric columns, when plugins may read them and there is one example per
/// record (packed blocks have none).
pub(super) fn columns_of(file: Option<&str>, n: usize, plugins: &Plugins) -> Result<Vec<(String, Vec<f64>)>> {
    match file {
        Some(f) if !plugins.is_empty() => {
            let cols = crate::data::dataset::numeric_columns(Path::new(f))?;
            Ok(if cols.first().is_some_and(|c| c.1.len() == n) { cols } else { Vec::new() })
        }
        _ => Ok(Vec::new()),
    }
}

/// `auto_find_batch_size`'s plan before training: the batch and accumulation that fit.
fn plan_batch_size<B: Backend>(args: &mut TrainingArguments, model: &Model<B>, longest: usize) -> Result<()> {
    let budget = memory_budget(&model.backend);
    let (b, acc) = fit_batch_size(model, args.per_device_train_batch_size, args.gradient_accumulation_steps, longest.max(1), budget, args.bf16)?;
    if b != args.per_device_train_batch_size {
        tracing::warn!(
            "auto_find_batch_size: per_device_train_batch_size {} does not fit in memory; training with {b} and gradient_accumulation_steps {acc} (the same {} examples per step)",
            args.per_device_train_batch_size,
            b * acc
        );
        (args.per_device_train_batch_size, args.gradient_accumulation_steps) = (b, acc);
    }
    Ok(())
}

fn adamw_config(args: &TrainingArguments) -> AdamWConfig {
    AdamWConfig {
        lr: args.learning_rate as f32,
        beta1: args.adam_beta1 as f32,
        beta2: args.adam_beta2 as f32,
        eps: args.adam_epsilon as f32,
        weight_decay: args.weight_decay as f32,
    }
}

/// The sampler over the training examples, the accumulation windows per epoch, the number of
/// optimizer steps and the learning-rate schedule.
/// With `world` processes a step's batch is `world` times the per-device batch, each process
/// taking its share ([`super::sampler::shard`]).
fn plan_steps(args: &TrainingArguments, n_train: usize, training: bool, world: usize) -> Result<(Sampler, u64, u64, Schedule)> {
    let sampler = Sampler {
        seed: args.data_seed.unwrap_or(args.seed),
        n_examples: n_train,
        batch_size: args.per_device_train_batch_size * world,
        drop_last: args.dataloader_drop_last,
        sequential: args.train_sampling_strategy == "sequential",
    };
    let batches = sampler.batches_per_epoch().max(usize::from(!training));
    if batches == 0 {
        return Err(Error::Invalid(format!("{n_train} examples make no full batch of {} (dataloader_drop_last)", sampler.batch_size)));
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
    Ok((sampler, windows, max_steps, schedule))
}

/// The datasets of a run and their numeric columns.
pub(super) struct Data {
    pub train: Vec<Example>,
    pub eval: Option<Vec<Example>>,
    pub train_columns: Vec<(String, Vec<f64>)>,
    pub eval_columns: Vec<(String, Vec<f64>)>,
}

impl<B: Backend + Clone> Trainer<B> {
    /// The trainer on `backend` (see [`crate::backend::device::Device::select`]); `training =
    /// false` loads what evaluation and prediction need only.
    pub fn new_on(backend: B, args: TrainingArguments, training: bool) -> Result<Self> {
        check_supported(&args, backend.name())?;
        // the other processes of a data parallel run, when a launcher started several
        let collective = if training {
            crate::engine::nccl::start(&backend, args.ddp_backend.as_deref(), args.ddp_bucket_cap_mb, Some(args.ddp_timeout))?
        } else {
            Box::new(crate::engine::SingleProcess)
        };
        let world = collective.world_size();
        let full = training && args.sharding()? == Sharding::FullShard;
        let (mut model, model_dir, stash) = load_model(backend, &args, full.then_some((collective.rank(), world)))?;
        let tokenizer = load_tokenizer(&args, &mut model.source, model.config.vocab_size, &model_dir)?;
        let train_file = train_file(&args, training)?;
        let (train, eval) = load_datasets(&args, &tokenizer, model.config.max_positions, train_file)?;
        let plugins = Plugins::load(&args.plugins, Some(tokenizer.clone() as Arc<dyn TokenDecoder>))?;
        let train_columns = columns_of(train_file, train.len(), &plugins)?;
        let eval_columns = columns_of(args.validation_file.as_deref(), eval.as_ref().map_or(0, Vec::len), &plugins)?;
        let longest = train.iter().chain(eval.iter().flatten()).map(|e| e.input_ids.len()).max().unwrap_or(0);
        check_lengths(&model.config, longest)?;
        if world > 1 && args.auto_find_batch_size {
            return Err(Error::Unsupported("auto_find_batch_size across several processes is not supported yet: set per_device_train_batch_size".into()));
        }
        let mut args = args;
        if args.auto_find_batch_size && training {
            plan_batch_size(&mut args, &model, longest)?;
        }
        let fully = |m, o, c| Step::fully_sharded(m, o, c, 1, 2, stash);
        let step = make_step(model, &args, collective, training, (&train, eval.as_deref()), fully)?;
        let pad_id = tokenizer.pad.as_ref().or(tokenizer.eos.as_ref()).map_or(0, |t| t.id);
        let pad = PadOptions { padding: Padding::Longest, side: tokenizer.padding_side, pad_id, max_length: None, truncation: false, pad_to_multiple_of: None };
        Self::assemble(args, step, tokenizer, model_dir, Data { train, eval, train_columns, eval_columns }, plugins, pad, training)
    }
}

/// `train_file` when training (an error when it is missing).
pub(super) fn train_file(args: &TrainingArguments, training: bool) -> Result<Option<&str>> {
    match (&args.train_file, training) {
        (Some(f), true) => Ok(Some(f.as_str())),
        (None, true) => Err(Error::Invalid("set train_file (a .jsonl or .json dataset)".into())),
        (_, false) => Ok(None),
    }
}

impl<B: Backend + Clone, M: TrainerModel<B>> Trainer<B, M> {
    /// The trainer around a step made for either model kind: the checks that need the plugins,
    /// the plan of steps, the state and the callbacks.
    #[allow(clippy::too_many_arguments)] // the parts each model kind makes its own way
    pub(super) fn assemble(
        args: TrainingArguments,
        step: Step<B, M>,
        tokenizer: Arc<Tokenizer>,
        model_dir: PathBuf,
        data: Data,
        plugins: Plugins,
        pad: PadOptions,
        training: bool,
    ) -> Result<Self> {
        let (rank, world) = (step.collective.rank(), step.collective.world_size());
        if (args.eval_strategy != IntervalStrategy::No || !training) && data.eval.is_none() {
            return Err(Error::Invalid(format!("eval_strategy {:?} needs validation_file", args.eval_strategy).to_lowercase()));
        }
        check_metric(&args, &plugins)?;
        let (sampler, windows, max_steps, schedule) = plan_steps(&args, data.train.len(), training, world)?;
        let (logging_steps, save_steps) = (interval(args.logging_steps, max_steps), interval(args.save_steps, max_steps));
        let eval_steps = interval(args.eval_steps.unwrap_or(args.logging_steps), max_steps);
        let state = TrainerState {
            max_steps,
            num_train_epochs: max_steps.div_ceil(windows),
            logging_steps,
            eval_steps,
            save_steps,
            train_batch_size: args.per_device_train_batch_size,
            is_local_process_zero: rank == 0,
            is_world_process_zero: rank == 0,
            ..TrainerState::default()
        };
        let output_dir = PathBuf::from(&args.output_dir);
        // as transformers: the reporting integrations come before the user's callbacks
        let mut callbacks: Vec<Box<dyn TrainerCallback>> = Vec::new();
        if args.report_to.as_array().is_some_and(|a| a.iter().any(|n| n == "tensorboard")) {
            let config = serde_json::to_string_pretty(step.model.raw_config()).unwrap_or_default();
            callbacks.push(Box::new(TensorBoardCallback::new(config)));
        }
        callbacks.extend(plugin_callbacks(&plugins));
        let Data { train, eval, train_columns, eval_columns } = data;
        Ok(Trainer {
            args,
            step,
            tokenizer,
            state,
            train,
            eval,
            train_columns,
            eval_columns,
            plugins,
            model_dir,
            pad,
            schedule,
            sampler,
            output_dir,
            logging_steps,
            eval_steps,
            save_steps,
            callbacks,
            control: TrainerControl::default(),
            lock: None,
            stop: Default::default(),
        })
    }
}

/// The step: with the optimizer sharded over the processes when `fsdp = "shard_grad_op"`, the
/// weights too when `"full_shard"` (`fully` makes that step, or refuses); in a data parallel
/// run, after checking that every process was given the same run.
pub(super) fn make_step<B: Backend, M: TrainModel<B>>(
    model: M,
    args: &TrainingArguments,
    collective: Box<dyn Collective<B>>,
    training: bool,
    (train, eval): (&[Example], Option<&[Example]>),
    fully: impl FnOnce(M, AdamWConfig, Box<dyn Collective<B>>) -> Result<Step<B, M>>,
) -> Result<Step<B, M>> {
    let world = collective.world_size();
    let mut step = match args.sharding()? {
        Sharding::ShardGradOp if training => Step::sharded(model, adamw_config(args), collective, 1, 2)?,
        Sharding::FullShard if training => fully(model, adamw_config(args), collective)?,
        _ => {
            let mut step = Step::new(model, adamw_config(args))?;
            step.collective = collective;
            step
        }
    };
    if world > 1 {
        same_run_everywhere(&mut step, args, train, eval)?;
        // the launcher names a process that dies by its PID
        let pids = step.collective.all_gather_u64(u64::from(std::process::id()))?;
        let pids: Vec<String> = pids.iter().enumerate().map(|(r, p)| format!("rank {r}: PID {p}")).collect();
        tracing::info!("data parallel over {world} processes ({})", pids.join(", "));
    }
    Ok(step)
}

/// Refuses to start when the processes of a data parallel run were given different runs: the
/// arguments, the model's size and every example's tokens, hashed on each process and compared.
fn same_run_everywhere<B: Backend, M: TrainModel<B>>(
    step: &mut Step<B, M>,
    args: &TrainingArguments,
    train: &[Example],
    eval: Option<&[Example]>,
) -> Result<()> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(args.to_json().as_bytes());
    h.update(step.model.num_parameters().to_le_bytes());
    for e in train.iter().chain(eval.into_iter().flatten()) {
        h.update(e.input_ids.len().to_le_bytes());
        e.input_ids.iter().for_each(|t| h.update(t.to_le_bytes()));
        e.labels.iter().for_each(|t| h.update(t.to_le_bytes()));
    }
    let digest = h.finalize();
    let mine = u64::from_le_bytes(digest[..8].try_into().unwrap_or_default());
    let all = step.collective.all_gather_u64(mine)?;
    let differ: Vec<String> = all.iter().enumerate().filter(|(_, &x)| x != all[0]).map(|(r, _)| r.to_string()).collect();
    if !differ.is_empty() {
        return Err(Error::Agreed(format!(
            "the processes of this run were not given the same run: rank(s) {} differ from rank 0 in their arguments, model or data",
            differ.join(", ")
        )));
    }
    Ok(())
}

/// Checks before training that the longest example fits the model's positions.
fn check_lengths(config: &crate::model::ModelConfig, longest: usize) -> Result<()> {
    if longest > config.max_positions {
        // GPT-2's position table ends there; the Llama family's rotary positions would run
        // past what the model was trained for (rope scaling is not implemented)
        let field = if config.position_limit().is_some() { "n_positions" } else { "max_position_embeddings" };
        return Err(Error::Invalid(format!(
            "examples of {longest} tokens exceed the model's {field} ({}); set block_size or max_seq_length",
            config.max_positions
        )));
    }
    Ok(())
}

/// Checks that `metric_for_best_model` names a metric the evaluation will report.
fn check_metric(args: &TrainingArguments, plugins: &Plugins) -> Result<()> {
    if let Some(m) = args.metric_for_best_model.as_deref() {
        let known = ["loss", "runtime", "samples_per_second", "steps_per_second"];
        if !known.contains(&m.strip_prefix("eval_").unwrap_or(m)) && !plugins.has_metrics() {
            return Err(Error::Invalid(format!(
                "metric_for_best_model `{m}`: without a metrics plugin, evaluation reports only eval_loss (load one with --plugin, or use metric_for_best_model loss)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_holds_every_local_process_share() {
        // one process: the whole state on the CPU, the initialised weights on a GPU's host
        assert_eq!(node_bytes_per_parameter(true, Sharding::None, 1, 1), 16.0);
        assert_eq!(node_bytes_per_parameter(false, Sharding::None, 1, 1), 8.0);
        // 4 processes, 2 on this node: plain holds 2 whole states, ZeRO-2 shards the moments,
        // ZeRO-3 everything
        assert_eq!(node_bytes_per_parameter(true, Sharding::None, 4, 2), 32.0);
        assert_eq!(node_bytes_per_parameter(true, Sharding::ShardGradOp, 4, 2), 2.0 * (8.0 + 2.0));
        assert_eq!(node_bytes_per_parameter(true, Sharding::FullShard, 4, 2), 8.0);
        assert_eq!(node_bytes_per_parameter(false, Sharding::FullShard, 4, 2), 4.0);
    }
}
