//! The jobs the command line runs on the backend a run asks for (`device`, `use_cpu`, `bf16`):
//! training, evaluation, prediction and the trials of a hyperparameter search; and stopping on
//! SIGTERM/SIGINT with a checkpoint to resume from.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::args::TrainingArguments;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::seq2seq::Seq2SeqModel;
use crate::model::{Device, Selected};
use crate::train::callbacks::{print_line, PrinterCallback, TrainerCallback};
use crate::train::model_kind::TrainerModel;
use crate::train::search::pruner::MedianPruner;
use crate::train::search::space::SamplerKind;
use crate::train::search::{self, SearchOptions};
use crate::train::trainer::Trainer;

/// SIGTERM and SIGINT (what Slurm, Kubernetes and Ctrl-C send) set `stop`: the trainer finishes
/// its optimizer step, writes a checkpoint and returns. A second signal exits at once (status
/// 143 or 130, as the default action's would be).
pub fn stop_on_signals(stop: &Arc<AtomicBool>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for (signal, status) in [(SIGTERM, 143), (SIGINT, 130)] {
        // the exit is registered first, armed by the flag the first signal sets
        signal_hook::flag::register_conditional_shutdown(signal, status, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    Ok(())
}

/// The backend `device` (or `use_cpu`) and `bf16` ask for.
pub fn select_backend(args: &TrainingArguments) -> Result<Selected> {
    let device = if args.use_cpu { Device::Cpu } else { crate::commands::parse_device(&args.device)? };
    // `full_determinism` needs nothing on a GPU: the CUDA backend's ops are deterministic by
    // default (`Cuda::set_deterministic`)
    device.select(args.bf16)
}

/// Whether the run's model (`model_name_or_path`, else `config_name`) is an encoder-decoder one.
fn encoder_decoder(args: &TrainingArguments) -> bool {
    match (&args.model_name_or_path, &args.config_name) {
        (Some(m), _) => crate::tools::seq2seq::is_encoder_decoder(Path::new(m)),
        (None, Some(c)) if Path::new(c).is_dir() => crate::tools::seq2seq::is_encoder_decoder(Path::new(c)),
        (None, Some(c)) => crate::tools::seq2seq::is_encoder_decoder_config(Path::new(c)),
        (None, None) => false,
    }
}

/// The trainer for the run: an encoder-decoder model's, or a decoder-only model's on the
/// backend asked for.
enum AnyTrainer {
    Cpu(Box<Trainer<Cpu>>),
    Cuda(Box<Trainer<crate::backend::cuda::Cuda>>),
    Seq2Seq(Box<Trainer<Cpu, Seq2SeqModel<Cpu>>>),
    CudaSeq2Seq(Box<Trainer<crate::backend::cuda::Cuda, Seq2SeqModel<crate::backend::cuda::Cuda>>>),
}

fn trainer(args: TrainingArguments, training: bool) -> Result<AnyTrainer> {
    let seq2seq = encoder_decoder(&args);
    Ok(match select_backend(&args)? {
        Selected::Cpu if seq2seq => AnyTrainer::Seq2Seq(Box::new(Trainer::new_seq2seq(Cpu, args, training)?)),
        Selected::Cpu => AnyTrainer::Cpu(Box::new(Trainer::new_on(Cpu, args, training)?)),
        Selected::Cuda(cuda) if seq2seq => AnyTrainer::CudaSeq2Seq(Box::new(Trainer::new_seq2seq(cuda, args, training)?)),
        Selected::Cuda(cuda) => AnyTrainer::Cuda(Box::new(Trainer::new_on(cuda, args, training)?)),
    })
}

/// `runtime train`: the log lines on stdout as they are logged, the final metrics, and where
/// the output went.
pub fn train(args: TrainingArguments) -> anyhow::Result<()> {
    match trainer(args, true)? {
        AnyTrainer::Cpu(t) => train_with(*t),
        AnyTrainer::Cuda(t) => train_with(*t),
        AnyTrainer::Seq2Seq(t) => train_with(*t),
        AnyTrainer::CudaSeq2Seq(t) => train_with(*t),
    }
}

fn train_with<B: Backend + Clone, M: TrainerModel<B>>(mut trainer: Trainer<B, M>) -> anyhow::Result<()> {
    // in a data parallel run, rank 0 prints
    let main_process = trainer.state.is_world_process_zero;
    if main_process {
        trainer.add_callback(Box::new(PrinterCallback { out: std::io::stdout() }));
    }
    stop_on_signals(&trainer.stop)?;
    tracing::info!(
        "training {} ({} parameters) on {} examples for {} steps ({})",
        trainer.step.model.architecture_name(),
        trainer.step.model.num_parameters(),
        trainer.train_len(),
        trainer.state.max_steps,
        trainer.step.model.backend().name()
    );
    let metrics = trainer.train()?;
    if main_process {
        print_line(&serde_json::to_string(&metrics)?);
        print_line(&format!("saved to {}", trainer.args.output_dir));
    }
    Ok(())
}

/// `runtime eval`: the evaluation's metrics.
pub fn eval(args: TrainingArguments) -> anyhow::Result<()> {
    let metrics = match trainer(args, false)? {
        AnyTrainer::Cpu(mut t) => t.evaluate()?,
        AnyTrainer::Cuda(mut t) => t.evaluate()?,
        AnyTrainer::Seq2Seq(mut t) => t.evaluate()?,
        AnyTrainer::CudaSeq2Seq(mut t) => t.evaluate()?,
    };
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
}

/// `runtime predict`: the metrics, and where the generated predictions went.
pub fn predict(args: TrainingArguments) -> anyhow::Result<()> {
    let out = Path::new(&args.output_dir).join("generated_predictions.jsonl");
    let metrics = match trainer(args, false)? {
        AnyTrainer::Cpu(mut t) => t.predict()?,
        AnyTrainer::Cuda(mut t) => t.predict()?,
        AnyTrainer::Seq2Seq(mut t) => t.predict()?,
        AnyTrainer::CudaSeq2Seq(mut t) => t.predict()?,
    };
    println!("{}", serde_json::to_string(&metrics)?);
    println!("wrote {}", out.display());
    Ok(())
}

/// The arguments of `runtime hp-search`.
#[derive(clap::Args)]
pub struct HpSearchArgs {
    /// The run config every trial starts from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The search space: one table per parameter (`[learning_rate] type = "float", low = 1e-4,
    /// high = 1e-2, log = true`).
    #[arg(long)]
    space: PathBuf,
    #[arg(long = "n_trials", default_value_t = 10)]
    n_trials: usize,
    /// minimize or maximize
    #[arg(long, default_value = "minimize")]
    direction: String,
    /// The evaluation metric each trial reports (`eval_` is added when missing).
    #[arg(long, default_value = "eval_loss")]
    metric: String,
    /// tpe, random or grid
    #[arg(long, default_value = "tpe")]
    sampler: String,
    /// Random trials before TPE takes over (Optuna's n_startup_trials).
    #[arg(long = "sampler_startup_trials", default_value_t = 10)]
    sampler_startup_trials: usize,
    /// median or none
    #[arg(long, default_value = "median")]
    pruner: String,
    /// Complete trials before the median pruner acts (Optuna's n_startup_trials).
    #[arg(long = "pruner_startup_trials", default_value_t = 5)]
    pruner_startup_trials: usize,
    /// Steps before the median pruner acts (Optuna's n_warmup_steps).
    #[arg(long = "pruner_warmup_steps", default_value_t = 0)]
    pruner_warmup_steps: u64,
    /// The study's folder (default: the config's output_dir).
    #[arg(long = "output_dir")]
    output_dir: Option<PathBuf>,
    /// The sampler's seed (default: the config's seed).
    #[arg(long)]
    seed: Option<u64>,
    /// `--name value` settings over the config file (the trial's parameters win).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    overrides: Vec<String>,
}

impl HpSearchArgs {
    /// The search's options, every flag checked.
    pub fn options(self) -> Result<SearchOptions> {
        let maximize = match self.direction.as_str() {
            "minimize" => false,
            "maximize" => true,
            d => return Err(Error::Invalid(format!("--direction `{d}`: expected minimize or maximize"))),
        };
        let pruner = match self.pruner.as_str() {
            "median" => Some(MedianPruner { n_startup_trials: self.pruner_startup_trials, n_warmup_steps: self.pruner_warmup_steps }),
            "none" => None,
            p => return Err(Error::Invalid(format!("--pruner `{p}`: expected median or none"))),
        };
        Ok(SearchOptions {
            config: self.config,
            overrides: crate::args::training::parse_overrides(&self.overrides)?,
            space: self.space,
            n_trials: self.n_trials,
            maximize,
            metric: self.metric,
            sampler: SamplerKind::parse(&self.sampler)?,
            sampler_startup_trials: self.sampler_startup_trials,
            pruner,
            output_dir: self.output_dir,
            seed: self.seed,
        })
    }
}

/// `runtime hp-search`: every trial on the backend its arguments ask for; a signal stops the
/// running trial with a checkpoint and ends the search (a rerun continues it).
pub fn hp_search(opts: &SearchOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(&stop)?;
    let mut run_trial = |args: TrainingArguments, callbacks: Vec<Box<dyn TrainerCallback>>| -> Result<()> {
        match trainer(args, true)? {
            AnyTrainer::Cpu(t) => trial_with(*t, callbacks, &stop),
            AnyTrainer::Cuda(t) => trial_with(*t, callbacks, &stop),
            AnyTrainer::Seq2Seq(t) => trial_with(*t, callbacks, &stop),
            AnyTrainer::CudaSeq2Seq(t) => trial_with(*t, callbacks, &stop),
        }
    };
    let trials = search::run(opts, &mut run_trial)?;
    let metric = if opts.metric.starts_with("eval_") { opts.metric.clone() } else { format!("eval_{}", opts.metric) };
    print_line(search::summary(&trials, &metric, opts.maximize).trim_end_matches('\n'));
    // as Optuna's `study.best_trial` raises when no trial completed: a script sees the failure
    if !trials.is_empty() && search::best(&trials, opts.maximize).is_none() {
        anyhow::bail!("hp-search: none of the {} trials completed (each trial's error is in trials.jsonl)", trials.len());
    }
    Ok(())
}

fn trial_with<B: Backend + Clone, M: TrainerModel<B>>(
    mut trainer: Trainer<B, M>,
    callbacks: Vec<Box<dyn TrainerCallback>>,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    for cb in callbacks {
        trainer.add_callback(cb);
    }
    trainer.stop = stop.clone();
    trainer.train()?;
    Ok(())
}
