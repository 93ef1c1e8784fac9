//! Checkpoints: `output_dir/checkpoint-N/` written under a temporary name and renamed into place
//! (model, optimizer moments, scheduler, trainer state, arguments), the one to resume from, its
//! loading, rotation under `save_total_limit`, and the final HF-format output folder.

use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex, MutexGuard};

use safetensors::tensor::Dtype as StDtype;
use serde_json::{json, Map, Value};

use super::callbacks::Event;
use super::model_kind::TrainerModel;
use super::output_dir;
use super::state::TrainerState;
use super::trainer::Trainer;
use crate::backend::Backend;
use crate::engine::full_shard::{FullShard, Part};
use crate::error::{Error, Result};
use crate::files::{write_file, write_folder_atomically};
use crate::model::{io, Dtype};

/// Where a checkpoint's AdamW moments come from: the optimizer's own, gathered from a sharded
/// optimizer on rank 0 (`None` on the others), or fetched a tensor at a time from sharded weights.
#[allow(clippy::type_complexity)] // per parameter: (first, second) moment
enum Moments<B: Backend> {
    Own,
    Gathered(Option<Vec<Option<(Vec<f32>, Vec<f32>)>>>),
    Full(Arc<Mutex<FullShard<B>>>),
}

fn lock_full<B: Backend>(full: &Mutex<FullShard<B>>) -> Result<MutexGuard<'_, FullShard<B>>> {
    full.lock().map_err(|_| Error::Invalid("the sharded weights were left inconsistent by an earlier failure".into()))
}

impl<B: Backend + Clone, M: TrainerModel<B>> Trainer<B, M> {
    /// The start of `train()`: refuses a non-empty `output_dir` unless resuming or overwriting,
    /// takes the folder's lock, removes what an earlier run left half-done (and, when
    /// overwriting without resuming, the earlier run's checkpoints, which rotation would otherwise
    /// keep as the newest), checks the folder is writable with room for a checkpoint, and loads
    /// the checkpoint to resume from.
    ///
    /// In a data parallel run, rank 0 alone checks, locks and cleans the folder; the others wait
    /// for it, then load the same checkpoint.
    pub(super) fn begin_run(&mut self) -> Result<()> {
        if self.state.is_world_process_zero {
            self.prepare_output_dir()?;
        }
        self.step.collective.barrier()?;
        if let Some(dir) = &self.resume_target()? {
            self.load_checkpoint(dir)?;
            if self.args.ignore_data_skip {
                // as transformers: restart the current epoch's data instead of skipping ahead
                self.state.sampler.batch = 0;
            }
            tracing::info!("resuming from {} at step {}", dir.display(), self.state.global_step);
        }
        Ok(())
    }

    fn prepare_output_dir(&mut self) -> Result<()> {
        let resume = self.resume_target()?;
        if output_dir::occupied(&self.output_dir)? && resume.is_none() && !self.args.overwrite_output_dir {
            return Err(Error::Invalid(format!(
                "{}: output_dir exists and is not empty; pass --resume_from_checkpoint true to continue, or --overwrite_output_dir",
                self.output_dir.display()
            )));
        }
        std::fs::create_dir_all(&self.output_dir).map_err(|e| Error::io(&self.output_dir, e))?;
        self.lock = Some(output_dir::lock(&self.output_dir)?);
        output_dir::clean_leftovers(&self.output_dir)?;
        if resume.is_none() && self.args.overwrite_output_dir {
            let old = self.checkpoints();
            for (_, dir) in &old {
                output_dir::remove(dir)?;
            }
            if !old.is_empty() {
                let names: Vec<String> = old.iter().map(|(s, _)| format!("checkpoint-{s}")).collect();
                tracing::warn!("overwrite_output_dir: removed the earlier run's {}", names.join(", "));
            }
        }
        output_dir::preflight(&self.output_dir, self.save_bytes())
    }

    /// Bytes one checkpoint (f32 weights, and the moments of the trainable parameters) and the
    /// final model take on disk, roughly (the JSON files are small).
    fn save_bytes(&self) -> u64 {
        let model = &self.step.model;
        let trainable: u64 = model.specs().iter().zip(model.trainable()).filter(|(_, &t)| t).map(|(s, _)| s.numel() as u64).sum();
        // with LoRA, checkpoints and the output hold the adapter (and what else trains) only
        let numel = model.saved_numel() as u64;
        let moments = if self.args.save_only_model { 0 } else { 8 * trainable };
        4 * numel + moments + model.dtype().size() as u64 * numel
    }

    pub(super) fn checkpoints(&self) -> Vec<(u64, PathBuf)> {
        output_dir::checkpoint_dirs(&self.output_dir)
    }

    /// The checkpoint to resume from, if `resume_from_checkpoint` asks for one.
    pub(super) fn resume_target(&self) -> Result<Option<PathBuf>> {
        match &self.args.resume_from_checkpoint {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
            Some(Value::String(s)) if s == "true" || s == "True" => self.newest_checkpoint().map(Some),
            Some(Value::Bool(true)) => self.newest_checkpoint().map(Some),
            Some(Value::String(s)) => {
                // checked here, before the start cleans the output folder: a named folder without
                // its state is refused as it is, never cleaned away as a half-deleted checkpoint
                let dir = PathBuf::from(s);
                if dir.is_dir() && !dir.join("trainer_state.json").is_file() {
                    return Err(Error::Invalid(format!(
                        "{}: resume_from_checkpoint names a folder without trainer_state.json (not a complete checkpoint)",
                        dir.display()
                    )));
                }
                Ok(Some(dir))
            }
            Some(v) => Err(Error::Invalid(format!("resume_from_checkpoint must be a checkpoint folder or true, found {v}"))),
        }
    }

    pub(super) fn newest_checkpoint(&self) -> Result<PathBuf> {
        for (step, dir) in self.checkpoints().into_iter().rev() {
            if dir.join("trainer_state.json").is_file() && dir.join("optimizer.safetensors").is_file() {
                return Ok(dir);
            }
            tracing::warn!("skipping {} (step {step}): incomplete checkpoint", dir.display());
        }
        Err(Error::Invalid(format!("{}: no valid checkpoint found to resume from", self.output_dir.display())))
    }

    pub(super) fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state = TrainerState::read(&dir.join("trainer_state.json"))?;
        self.load_weights_from(dir)?;
        let path = dir.join("optimizer.safetensors");
        // mapped, not read: the moments are taken a tensor at a time
        let bytes = io::map_file(&path)?;
        let st = io::deserialize(&path, &bytes)?;
        for (i, spec) in self.step.model.specs().iter().enumerate() {
            // a frozen parameter has no optimizer state (and a checkpoint holds none for it)
            if !self.step.model.trainable()[i] {
                continue;
            }
            for (prefix, dst) in [("exp_avg", &mut self.step.opt.exp_avg[i]), ("exp_avg_sq", &mut self.step.opt.exp_avg_sq[i])] {
                let name = format!("{prefix}.{}", spec.name);
                let view = st.tensor(&name).map_err(|_| Error::tensor(&path, &name, "missing"))?;
                if view.dtype() != StDtype::F32 || view.shape() != [spec.numel()] {
                    return Err(Error::tensor(&path, &name, format!("expected F32 [{}], found {:?} {:?}", spec.numel(), view.dtype(), view.shape())));
                }
                let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                match &self.step.full {
                    // with the weights sharded, this process keeps its pieces only
                    Some(full) => {
                        let part = if prefix == "exp_avg" { Part::ExpAvg } else { Part::ExpAvgSq };
                        lock_full(full)?.take_tensor(self.step.model.backend(), part, i, &values)?;
                    }
                    None => *dst = Some(self.step.model.backend().upload(&values)?),
                }
            }
        }
        self.step.opt.step = state.optimizer_step;
        if self.step.shard.is_some() {
            // this process keeps its part of the loaded moments
            self.step.shard_optimizer()?;
        }
        self.step.state_replaced();
        for cb in &mut self.callbacks {
            cb.load_state(&state.stateful_callbacks)?;
        }
        // this run's plan, and this process's place in it (a checkpoint is written by rank 0)
        let s = &self.state;
        let keep = (s.max_steps, s.num_train_epochs, s.logging_steps, s.eval_steps, s.save_steps, s.is_local_process_zero, s.is_world_process_zero);
        self.state = state;
        let s = &mut self.state;
        (s.max_steps, s.num_train_epochs, s.logging_steps, s.eval_steps, s.save_steps, s.is_local_process_zero, s.is_world_process_zero) = keep;
        Ok(())
    }

    /// The weights a checkpoint (or the best one) holds: the model's, or with LoRA the adapter's.
    pub(super) fn load_weights_from(&mut self, dir: &Path) -> Result<()> {
        match self.step.full.clone() {
            // with the weights sharded, this process keeps its pieces of each tensor as it is read
            Some(full) => {
                let be = self.step.model.backend().clone();
                let mut full = lock_full(&full)?;
                let mut failed = None;
                self.step.model.reload(
                    dir,
                    Some(&mut |i, t| {
                        if let Err(e) = full.take_tensor(&be, Part::Weight, i, &t) {
                            failed.get_or_insert(e);
                        }
                        Vec::new()
                    }),
                )?;
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            None => self.step.model.reload(dir, None)?,
        }
        self.step.state_replaced();
        Ok(())
    }

    pub(super) fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let dir = self.output_dir.join(format!("checkpoint-{}", self.state.global_step));
        if self.state.best_global_step == Some(self.state.global_step) {
            self.state.best_model_checkpoint = Some(dir.to_string_lossy().to_string());
        }
        self.state.optimizer_step = self.step.opt.step;
        for cb in &mut self.callbacks {
            if let Some((name, value)) = cb.state()? {
                self.state.stateful_callbacks.insert(name, value);
            }
        }
        // in a data parallel run every process holds the same state: rank 0 writes it, and the
        // others wait until it is in place
        // a sharded optimizer's moments are gathered on rank 0 first (every process takes part);
        // sharded weights are gathered a tensor at a time as rank 0 writes them
        let moments = match (&mut self.step.shard, &self.step.full) {
            (_, Some(full)) => Moments::Full(full.clone()),
            (Some(shard), None) => Moments::Gathered(shard.gather_moments(&self.step.model, self.step.collective.as_mut())?),
            (None, None) => Moments::Own,
        };
        let written = self.serving(|t| {
            if t.state.is_world_process_zero {
                t.write_checkpoint(&dir, &moments)?;
                t.rotate()?;
            }
            Ok(())
        });
        written?;
        self.step.collective.barrier()?;
        self.emit(Event::Save, None)?;
        Ok(dir)
    }

    /// Runs `write` on every process; with the weights sharded, the processes other than rank 0
    /// meanwhile serve rank 0's gathers, until it is done.
    fn serving(&mut self, write: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let Some(full) = self.step.full.clone() else { return write(self) };
        if !self.state.is_world_process_zero {
            return lock_full(&full)?.serve(self.step.model.backend());
        }
        let written = write(self);
        // the others stop serving whether or not the write worked
        lock_full(&full)?.end_serving()?;
        written
    }

    /// Parameter `i`'s whole weights, for a save on rank 0 ([`Trainer::serving`]).
    fn whole_weights(&self, i: usize) -> Result<Vec<f32>> {
        match &self.step.full {
            Some(full) => lock_full(full)?.whole(self.step.model.backend(), Part::Weight, i),
            None => self.step.model.backend().download(&self.step.model.params()[i]),
        }
    }

    fn write_checkpoint(&self, dir: &Path, moments: &Moments<B>) -> Result<()> {
        let (model, opt, state, args) = (&self.step.model, &self.step.opt, &self.state, &self.args);
        write_folder_atomically(dir, true, |tmp| {
            // f32 whatever the model's dtype, so resume is exact
            model.write_into_from(tmp, Some(Dtype::F32), u64::MAX, &mut |i| self.whole_weights(i))?;
            if !args.save_only_model {
                // the moments of each parameter that has them, a tensor at a time
                let has = |i: usize| match moments {
                    Moments::Own => opt.exp_avg[i].is_some(),
                    Moments::Gathered(g) => g.as_ref().is_some_and(|g| g[i].is_some()),
                    Moments::Full(_) => model.trainable()[i],
                };
                let mut entries = Vec::new();
                let mut which = Vec::new();
                for (i, spec) in model.specs().iter().enumerate().filter(|(i, _)| has(*i)) {
                    for (k, prefix) in ["exp_avg", "exp_avg_sq"].into_iter().enumerate() {
                        entries.push((format!("{prefix}.{}", spec.name), StDtype::F32, vec![spec.numel()]));
                        which.push((i, k));
                    }
                }
                let path = tmp.join("optimizer.safetensors");
                io::write_streamed(&path, &entries, Dtype::F32, None, &mut |e| {
                    let (i, k) = which[e];
                    let values = match moments {
                        Moments::Own => model.backend().download(if k == 0 { &opt.exp_avg[i] } else { &opt.exp_avg_sq[i] }.as_ref().expect("listed"))?,
                        Moments::Gathered(g) => {
                            let (m, v) = g.as_ref().and_then(|g| g[i].as_ref()).expect("listed");
                            if k == 0 { m } else { v }.clone()
                        }
                        Moments::Full(full) => lock_full(full)?.whole(model.backend(), if k == 0 { Part::ExpAvg } else { Part::ExpAvgSq }, i)?,
                    };
                    Ok(values)
                })?;
            }
            write_file(
                &tmp.join("scheduler.json"),
                json!({"last_epoch": state.global_step, "lr_scheduler_type": args.lr_scheduler_type}).to_string().as_bytes(),
            )?;
            write_file(&tmp.join("training_args.json"), args.to_json().as_bytes())?;
            write_file(&tmp.join("trainer_state.json"), state.to_json().as_bytes())
        })
    }

    /// `save_total_limit`: delete the oldest checkpoints, never the best one. As in
    /// transformers, no limit or a limit of 0 deletes nothing.
    pub(super) fn rotate(&self) -> Result<()> {
        let Some(limit) = self.args.save_total_limit.filter(|&l| l > 0) else { return Ok(()) };
        let mut cps = self.checkpoints();
        let best = self.state.best_model_checkpoint.as_ref().map(PathBuf::from);
        // as transformers: a limit of 1 keeps the newest checkpoint too when it is not the best,
        // so that the run can still be resumed
        let newest_is_best = cps.last().map(|c| &c.1) == best.as_ref();
        let limit = if limit == 1 && best.is_some() && !newest_is_best { 2 } else { limit };
        // as transformers: the best checkpoint counts as the most recent
        if let Some(b) = &best {
            if let Some(pos) = cps.iter().position(|c| &c.1 == b) {
                let item = cps.remove(pos);
                cps.push(item);
            }
        }
        let excess = cps.len().saturating_sub(limit);
        for (_, dir) in cps.into_iter().take(excess) {
            output_dir::remove(&dir)?;
        }
        Ok(())
    }

    /// The final `output_dir`: the model in HF format, `trainer_state.json`,
    /// `training_args.json`, `train_results.json` and `all_results.json`.
    /// In a data parallel run, rank 0 writes it and the others wait.
    pub(super) fn save_output(&mut self, train_metrics: &Map<String, Value>) -> Result<()> {
        // the memory the save takes on top of the run's (RUST_LOG=debug)
        let (before, fresh) = (crate::mem::rss_mib(), crate::mem::reset_peak_rss());
        self.serving(|t| if t.state.is_world_process_zero { t.write_output(train_metrics) } else { Ok(()) })?;
        if fresh {
            tracing::debug!("final save: peak RSS {:.1} MiB, {before:.1} MiB before it", crate::mem::peak_rss_mib());
        }
        self.step.collective.barrier()
    }

    fn write_output(&self, train_metrics: &Map<String, Value>) -> Result<()> {
        let out = &self.output_dir;
        let tmp = out.join(format!(".final.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let result = self.fill_output(&tmp, train_metrics);
        if result.is_err() {
            // a full disk or a failed write: the staging folder goes, the old output stays
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Writes the final output into the staging folder `tmp`, then renames each file into
    /// `output_dir`.
    fn fill_output(&self, tmp: &Path, train_metrics: &Map<String, Value>) -> Result<()> {
        let out = &self.output_dir;
        self.step.model.write_into_from(tmp, None, io::parse_size("5GB").unwrap_or(u64::MAX), &mut |i| self.whole_weights(i))?;
        let mut all = train_metrics.clone();
        if let Some(last_eval) = self.state.log_history.iter().rev().find(|e| e.contains_key("eval_loss")) {
            for (k, v) in last_eval {
                if k.starts_with("eval_") {
                    all.insert(k.clone(), v.clone());
                }
            }
        }
        write_file(&tmp.join("trainer_state.json"), self.state.to_json().as_bytes())?;
        write_file(&tmp.join("training_args.json"), self.args.to_json().as_bytes())?;
        write_file(&tmp.join("train_results.json"), serde_json::to_string_pretty(train_metrics).unwrap_or_default().as_bytes())?;
        write_file(&tmp.join("all_results.json"), serde_json::to_string_pretty(&all).unwrap_or_default().as_bytes())?;
        let title = format!("{} - {}", self.step.model.architecture_name(), self.args.run_name.clone().unwrap_or_else(|| self.args.output_dir.clone()));
        if let Some(svg) = super::plot::svg(&self.state.log_history, &title) {
            write_file(&tmp.join("loss.svg"), svg.as_bytes())?;
        }
        // each file renamed into place: a reader never sees a half-written file
        for entry in std::fs::read_dir(tmp).map_err(|e| Error::io(tmp, e))? {
            let entry = entry.map_err(|e| Error::io(tmp, e))?;
            let dst = out.join(entry.file_name());
            std::fs::rename(entry.path(), &dst).map_err(|e| Error::io(&dst, e))?;
        }
        std::fs::remove_dir(tmp).map_err(|e| Error::io(tmp, e))
    }
}
