//! `report_to = ["tensorboard"]`: transformers' `TensorBoardCallback`. At `on_train_begin` it
//! opens an event file in the logging folder and writes the run's arguments and the model's
//! config as text; at every `on_log` each entry of the log (renamed by `rewrite_logs`:
//! `eval_x` -> `eval/x`, `test_x` -> `test/x`, anything else `train/x`) becomes a scalar at the
//! global step, and the file is flushed, so a running TensorBoard shows the run as it goes.
//!
//! The logging folder is `logging_dir` when set (transformers 4's argument, kept), else
//! `$TENSORBOARD_LOGGING_DIR` (transformers 5's), else transformers' default,
//! `output_dir/runs/<Mon><DD>_<HH>-<MM>-<SS>_<host>`. A folder that cannot be created stops the
//! run before step 1; a write that fails later (a full disk) is reported once and the run goes on
//! without TensorBoard, since losing a training run to its logging would cost more.

pub mod events;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::callbacks::{Event, TrainerCallback, TrainerControl};
use super::state::TrainerState;
use crate::args::TrainingArguments;
use crate::error::{Error, Result};
use events::EventWriter;

/// transformers' `default_logdir()`: `runs/<Mon><DD>_<HH>-<MM>-<SS>_<host>`, in local time.
pub fn default_logdir() -> PathBuf {
    let time = chrono::Local::now().format("%b%d_%H-%M-%S");
    let host = gethostname::gethostname().to_string_lossy().to_string();
    Path::new("runs").join(format!("{time}_{host}"))
}

/// The folder a run's event files go to (see the module's documentation).
pub fn logging_dir(args: &TrainingArguments) -> PathBuf {
    if let Some(d) = &args.logging_dir {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("TENSORBOARD_LOGGING_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return match (d.strip_prefix("~"), std::env::var_os("HOME")) {
            (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
            _ => d,
        };
    }
    Path::new(&args.output_dir).join(default_logdir())
}

/// transformers' `rewrite_logs`: the TensorBoard tag of a log entry's key.
pub fn tag_of(key: &str) -> String {
    if let Some(k) = key.strip_prefix("eval_") {
        format!("eval/{k}")
    } else if let Some(k) = key.strip_prefix("test_") {
        format!("test/{k}")
    } else {
        format!("train/{key}")
    }
}

/// The callback; see the module's documentation.
pub struct TensorBoardCallback {
    /// `config.json` of the model, written as the `model_config` text.
    model_config: String,
    writer: Option<EventWriter>,
    /// Set after a failed write: nothing more is written.
    failed: bool,
}

impl TensorBoardCallback {
    pub fn new(model_config: String) -> Self {
        TensorBoardCallback { model_config, writer: None, failed: false }
    }

    fn open(&mut self, args: &TrainingArguments) -> Result<&mut EventWriter> {
        if self.writer.is_none() {
            let dir = logging_dir(args);
            let w = EventWriter::create(&dir).map_err(|e| Error::Invalid(format!("report_to tensorboard: cannot write the logging folder: {e}")))?;
            tracing::info!("TensorBoard event file: {}", w.path().display());
            self.writer = Some(w);
        }
        Ok(self.writer.as_mut().expect("opened above"))
    }

    /// Runs `write`; a failure is reported once and turns the callback off.
    fn guarded(&mut self, write: impl FnOnce(&mut EventWriter) -> Result<()>) {
        let Some(w) = self.writer.as_mut() else { return };
        if let Err(e) = write(w) {
            tracing::warn!("report_to tensorboard: {e}; no more TensorBoard events are written for this run");
            (self.writer, self.failed) = (None, true);
        }
    }
}

impl TrainerCallback for TensorBoardCallback {
    fn on_event(
        &mut self,
        event: Event,
        args: &TrainingArguments,
        state: &TrainerState,
        _: &mut TrainerControl,
        logs: Option<&mut Map<String, Value>>,
    ) -> Result<()> {
        if self.failed || !state.is_world_process_zero {
            return Ok(());
        }
        match event {
            Event::TrainBegin => {
                self.open(args)?;
                let (args_json, config) = (args.to_json(), self.model_config.clone());
                self.guarded(|w| {
                    w.add_text("args", &args_json, 0)?;
                    w.add_text("model_config", &config, 0)?;
                    w.flush()
                });
            }
            Event::Log => {
                let Some(logs) = logs else { return Ok(()) };
                self.open(args)?;
                let step = state.global_step as i64;
                let logs = logs.clone();
                self.guarded(|w| {
                    for (k, v) in &logs {
                        let tag = tag_of(k);
                        match v {
                            Value::Number(n) => w.add_scalar(&tag, n.as_f64().unwrap_or(f64::NAN) as f32, step)?,
                            Value::Bool(b) => w.add_scalar(&tag, f32::from(u8::from(*b)), step)?,
                            // a NaN or infinite value is logged as null (JSON has no NaN)
                            Value::Null => w.add_scalar(&tag, f32::NAN, step)?,
                            Value::String(s) => w.add_text(&tag, s, step)?,
                            other => tracing::warn!("report_to tensorboard: the log value {other} of `{k}` is not a scalar; dropped"),
                        }
                    }
                    w.flush()
                });
            }
            Event::TrainEnd => {
                self.guarded(EventWriter::flush);
                self.writer = None;
            }
            _ => {}
        }
        Ok(())
    }
}
