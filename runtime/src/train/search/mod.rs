//! `runtime hp-search`: transformers' `Trainer.hyperparameter_search` with Optuna's sampling and
//! median pruning. Each trial trains in `output_dir/run-N` with the run config plus the trial's
//! parameters; a callback reports every evaluation's metric (HF's `_report_to_hp_search`) and
//! stops a trial whose best value so far is worse than the median of the complete trials at the
//! same step (`should_training_stop`, through the trainer's own control flow). The study lives
//! in its folder: `study.json` (the settings), `trials.jsonl` (one line per finished trial,
//! rewritten whole after each), `best_run.json` (HF's `BestRun`). Rerunning the same command
//! continues: finished trials are not rerun, and a trial that was interrupted starts again.

pub mod pruner;
pub mod space;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::Digest;

use super::callbacks::{print_line, Event, TrainerCallback, TrainerControl};
use super::output_dir;
use super::state::TrainerState;
use crate::args::training::read_config_file;
use crate::args::TrainingArguments;
use crate::error::{Error, Result};
use crate::files::write_file;
use pruner::MedianPruner;
use space::{Observation, Param, SamplerKind};

/// What the command line gives.
#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub config: Option<PathBuf>,
    /// `--name value` settings over the config file (the trial's parameters win over both).
    pub overrides: Vec<(String, Value)>,
    pub space: PathBuf,
    pub n_trials: usize,
    pub maximize: bool,
    /// The evaluation metric to optimise (`eval_` is prefixed when missing).
    pub metric: String,
    pub sampler: SamplerKind,
    /// Random trials before TPE takes over (Optuna's `n_startup_trials`, 10).
    pub sampler_startup_trials: usize,
    pub pruner: Option<MedianPruner>,
    /// The study's folder; the config's `output_dir` when unset.
    pub output_dir: Option<PathBuf>,
    /// The sampler's seed; the config's `seed` when unset.
    pub seed: Option<u64>,
}

/// How a trial ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrialState {
    Complete,
    Pruned,
    Failed,
}

/// One line of `trials.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub number: usize,
    pub state: TrialState,
    pub params: Map<String, Value>,
    /// The metric at the trial's last evaluation (null for a failed trial).
    pub objective: Option<f64>,
    /// `[step, value]` of every evaluation.
    pub intermediate_values: Vec<(u64, f64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_s: f64,
}

/// What one trial's training reports (shared between its callback and the search).
#[derive(Default)]
struct Report {
    values: Vec<(u64, f64)>,
    pruned: bool,
}

/// HF's `_report_to_hp_search` as a callback: every evaluation's metric is recorded, and the
/// pruner may stop the trial.
struct Reporter {
    metric: String,
    maximize: bool,
    pruner: Option<MedianPruner>,
    /// The intermediate values of the complete trials.
    completed: Vec<Vec<(u64, f64)>>,
    report: Arc<Mutex<Report>>,
}

impl TrainerCallback for Reporter {
    fn on_event(
        &mut self,
        event: Event,
        _: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
        logs: Option<&mut Map<String, Value>>,
    ) -> Result<()> {
        let (Event::Evaluate, Some(metrics)) = (event, logs) else { return Ok(()) };
        let value = match metrics.get(&self.metric) {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(Value::Null) => f64::NAN,
            _ => {
                let names: Vec<&str> = metrics.keys().map(String::as_str).collect();
                return Err(Error::Invalid(format!("hp-search: the evaluation reports no `{}` (it reports {})", self.metric, names.join(", "))));
            }
        };
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        report.values.push((state.global_step, value));
        if let Some(p) = &self.pruner {
            if p.should_prune(&report.values, &self.completed, self.maximize) {
                tracing::info!("hp-search: pruned at step {} ({} = {value})", state.global_step, self.metric);
                report.pruned = true;
                control.should_training_stop = true;
            }
        }
        Ok(())
    }
}

/// Runs one trial's training: the arguments and the callbacks to add. An
/// [`Error::Interrupted`] stops the search; any other error fails the trial only.
pub type RunTrial<'a> = dyn FnMut(TrainingArguments, Vec<Box<dyn TrainerCallback>>) -> Result<()> + 'a;

/// The study's settings, kept in `study.json`: a rerun with other settings is refused.
fn settings(opts: &SearchOptions, params: &[Param], seed: u64, config_text: &str) -> Value {
    let space: Vec<String> = params.iter().map(|p| format!("{} {:?}", p.name, p.dist)).collect();
    json!({
        "space": space,
        "direction": if opts.maximize { "maximize" } else { "minimize" },
        "metric": opts.metric,
        "sampler": opts.sampler.name(),
        "sampler_startup_trials": opts.sampler_startup_trials,
        "pruner": opts.pruner.map(|p| json!({"type": "median", "n_startup_trials": p.n_startup_trials, "n_warmup_steps": p.n_warmup_steps})),
        "seed": seed,
        "config_sha256": hex::encode(sha2::Sha256::digest(config_text.as_bytes())),
        "overrides": opts.overrides,
    })
}

fn read_trials(path: &Path) -> Result<Vec<Trial>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::config(path, format!("line {}: {e}", i + 1))))
        .collect()
}

/// Writes `bytes` under a temporary name and renames it over `path`.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    write_file(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The best complete trial.
pub fn best(trials: &[Trial], maximize: bool) -> Option<&Trial> {
    let key = |t: &&Trial| t.objective.filter(|o| !o.is_nan()).map(|o| if maximize { -o } else { o });
    trials
        .iter()
        .filter(|t| t.state == TrialState::Complete && key(t).is_some())
        .min_by(|a, b| key(a).unwrap_or(f64::INFINITY).total_cmp(&key(b).unwrap_or(f64::INFINITY)))
}

/// Runs the study to `n_trials` finished trials; returns every trial.
pub fn run(opts: &SearchOptions, run_trial: &mut RunTrial) -> Result<Vec<Trial>> {
    let params = space::read_space(&opts.space)?;
    let base = match &opts.config {
        Some(c) => read_config_file(c)?,
        None => Map::new(),
    };
    space::check_names(&params, &base)?;
    let config_text = opts.config.as_deref().map(crate::files::read_text).transpose()?.unwrap_or_default();
    // the arguments without a trial's parameters, checked once before any trial
    let plain = TrainingArguments::load(opts.config.as_deref(), &opts.overrides)?;
    if plain.eval_strategy == crate::args::IntervalStrategy::No {
        return Err(Error::Invalid("hp-search reports each trial's evaluations: set eval_strategy to steps or epoch (and validation_file)".into()));
    }
    let n_trials = match opts.sampler {
        SamplerKind::Grid => {
            let n = space::grid_size(&params)?;
            if n < opts.n_trials {
                tracing::warn!("hp-search: the grid has {n} points; running {n} trials, not {}", opts.n_trials);
            }
            opts.n_trials.min(n)
        }
        _ => opts.n_trials,
    };
    let seed = opts.seed.unwrap_or(plain.seed);
    let dir = opts.output_dir.clone().unwrap_or_else(|| PathBuf::from(&plain.output_dir));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let _lock = output_dir::lock(&dir)?;
    let study = settings(opts, &params, seed, &config_text);
    let study_path = dir.join("study.json");
    if study_path.exists() {
        let text = std::fs::read_to_string(&study_path).map_err(|e| Error::io(&study_path, e))?;
        let old: Value = serde_json::from_str(&text).map_err(|e| Error::config(&study_path, e.to_string()))?;
        if let Some((k, _)) = study.as_object().into_iter().flatten().find(|(k, v)| old.get(k.as_str()) != Some(v)) {
            return Err(Error::Invalid(format!(
                "{}: the study there was started with another `{k}`; continue it with the same settings (only --n_trials may change) or use another --output_dir",
                dir.display()
            )));
        }
    } else {
        replace_file(&study_path, serde_json::to_string_pretty(&study).unwrap_or_default().as_bytes())?;
    }
    let trials_path = dir.join("trials.jsonl");
    let mut trials = read_trials(&trials_path)?;
    if !trials.is_empty() {
        tracing::info!("hp-search: {} trials already finished in {}", trials.len(), dir.display());
    }
    let metric = if opts.metric.starts_with("eval_") { opts.metric.clone() } else { format!("eval_{}", opts.metric) };
    while trials.len() < n_trials {
        let number = trials.len();
        let trial = run_one(opts, &params, &base, seed, number, &dir, &metric, &trials, run_trial)?;
        let objective = trial.objective.map_or("-".to_string(), |o| format!("{o}"));
        let state = format!("{:?}", trial.state).to_lowercase();
        print_line(&format!("trial {number} {state}: {metric} {objective} {}", Value::Object(trial.params.clone())));
        trials.push(trial);
        let lines: String = trials.iter().map(|t| serde_json::to_string(t).unwrap_or_default() + "\n").collect();
        replace_file(&trials_path, lines.as_bytes())?;
        if let Some(b) = best(&trials, opts.maximize) {
            let best_run = json!({"run_id": b.number.to_string(), "objective": b.objective, "hyperparameters": b.params, "run_summary": null});
            replace_file(&dir.join("best_run.json"), serde_json::to_string_pretty(&best_run).unwrap_or_default().as_bytes())?;
        }
    }
    Ok(trials)
}

/// One trial: its parameters, its arguments, its training.
#[allow(clippy::too_many_arguments)]
fn run_one(
    opts: &SearchOptions,
    params: &[Param],
    base: &Map<String, Value>,
    seed: u64,
    number: usize,
    dir: &Path,
    metric: &str,
    trials: &[Trial],
    run_trial: &mut RunTrial,
) -> Result<Trial> {
    let finished: Vec<&Trial> = trials.iter().filter(|t| t.state != TrialState::Failed).collect();
    let sign = if opts.maximize { -1.0 } else { 1.0 };
    let observed: Vec<Observation> =
        finished.iter().filter_map(|t| t.objective.filter(|o| o.is_finite()).map(|o| Observation { params: &t.params, value: sign * o })).collect();
    let suggested = space::suggest(params, opts.sampler, seed, number, finished.len(), &observed, opts.sampler_startup_trials)?;
    let run_dir = dir.join(format!("run-{number}"));
    if run_dir.exists() {
        // what an interrupted attempt at this trial left: the trial starts again
        output_dir::remove(&run_dir)?;
    }
    let started = Instant::now();
    let report = Arc::new(Mutex::new(Report::default()));
    let outcome = trial_args(opts, base, &suggested, &run_dir).and_then(|args| {
        let completed = trials.iter().filter(|t| t.state == TrialState::Complete).map(|t| t.intermediate_values.clone()).collect();
        let reporter = Reporter { metric: metric.to_string(), maximize: opts.maximize, pruner: opts.pruner, completed, report: report.clone() };
        run_trial(args, vec![Box::new(reporter)])
    });
    let report = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
    let (state, error) = match outcome {
        Err(Error::Interrupted(_)) => {
            return Err(Error::Interrupted(format!(
                "the search stopped during trial {number}; rerun the same command to continue the study (trial {number} starts again)"
            )));
        }
        Err(e) => {
            tracing::warn!("hp-search: trial {number} failed: {e}");
            (TrialState::Failed, Some(e.to_string()))
        }
        Ok(()) if report.values.is_empty() => (TrialState::Failed, Some("the trial ran no evaluation".to_string())),
        Ok(()) if report.pruned => (TrialState::Pruned, None),
        Ok(()) => (TrialState::Complete, None),
    };
    let objective = if state == TrialState::Failed { None } else { report.values.last().map(|v| v.1) };
    Ok(Trial { number, state, params: suggested, objective, intermediate_values: report.values, error, duration_s: started.elapsed().as_secs_f64() })
}

/// The run config with the trial's parameters: file < command line < parameters; the trial's
/// own `output_dir`, no resuming, and an explicit logging folder given its own `run-N`.
fn trial_args(opts: &SearchOptions, base: &Map<String, Value>, params: &Map<String, Value>, run_dir: &Path) -> Result<TrainingArguments> {
    let plain = TrainingArguments::load(opts.config.as_deref(), &opts.overrides)?;
    let mut map = base.clone();
    for (k, v) in &opts.overrides {
        if k == "plugin" {
            if let Value::Array(a) = map.entry("plugins").or_insert_with(|| Value::Array(Vec::new())) {
                a.push(v.clone());
            }
        } else {
            map.insert(k.clone(), v.clone());
        }
    }
    for (name, v) in params {
        space::set_path(&mut map, name, v.clone()).map_err(|e| Error::Invalid(format!("search space: `{name}`: {e}")))?;
    }
    let run = run_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    map.insert("output_dir".into(), json!(run_dir));
    map.insert("resume_from_checkpoint".into(), Value::Null);
    map.insert("overwrite_output_dir".into(), json!(false));
    if let Some(d) = &plain.logging_dir {
        map.insert("logging_dir".into(), json!(Path::new(d).join(&run)));
    } else if let Some(d) = std::env::var_os("TENSORBOARD_LOGGING_DIR").filter(|d| !d.is_empty()) {
        map.insert("logging_dir".into(), json!(Path::new(&d).join(&run)));
    }
    TrainingArguments::from_config_map(map, opts.config.as_deref())
}

/// The summary printed at the end: one row per trial, then the best.
pub fn summary(trials: &[Trial], metric: &str, maximize: bool) -> String {
    let mut out = format!("{:>5}  {:<8}  {:>14}  parameters\n", "trial", "state", metric);
    for t in trials {
        let obj = t.objective.map_or("-".to_string(), |o| format!("{o:.6}"));
        let state = format!("{:?}", t.state).to_lowercase();
        out += &format!("{:>5}  {:<8}  {:>14}  {}\n", t.number, state, obj, Value::Object(t.params.clone()));
    }
    match best(trials, maximize) {
        Some(b) => out += &format!("best: trial {} ({metric} {}) {}\n", b.number, b.objective.unwrap_or(f64::NAN), Value::Object(b.params.clone())),
        None => out += "best: none (no trial completed)\n",
    }
    out
}
