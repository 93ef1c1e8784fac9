//! Trainer callbacks: transformers' `TrainerCallback` events, emitted by the training loop at the
//! points and in the order transformers emits them (checked against a recording of
//! `transformers.Trainer` in `tests/trainer_parity.rs`), with the `TrainerControl` flags a
//! callback may set. Plugins' `callbacks` hooks attach here (`train::plugins`).

use serde_json::{Map, Value};

use super::state::TrainerState;
use crate::args::TrainingArguments;
use crate::error::Result;

/// One `TrainerCallback` event, under transformers' method names (`on_` + the snake-case name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    InitEnd,
    TrainBegin,
    TrainEnd,
    EpochBegin,
    EpochEnd,
    StepBegin,
    SubstepEnd,
    PreOptimizerStep,
    OptimizerStep,
    StepEnd,
    Evaluate,
    Save,
    Log,
    PredictionStep,
}

impl Event {
    /// transformers' method name, e.g. `on_step_end`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Event::InitEnd => "on_init_end",
            Event::TrainBegin => "on_train_begin",
            Event::TrainEnd => "on_train_end",
            Event::EpochBegin => "on_epoch_begin",
            Event::EpochEnd => "on_epoch_end",
            Event::StepBegin => "on_step_begin",
            Event::SubstepEnd => "on_substep_end",
            Event::PreOptimizerStep => "on_pre_optimizer_step",
            Event::OptimizerStep => "on_optimizer_step",
            Event::StepEnd => "on_step_end",
            Event::Evaluate => "on_evaluate",
            Event::Save => "on_save",
            Event::Log => "on_log",
            Event::PredictionStep => "on_prediction_step",
        }
    }
}

/// `TrainerControl`: what the loop should do next. The default flow sets these at `on_step_end`
/// and `on_epoch_end` (as `DefaultFlowCallback` does) before the callbacks see them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainerControl {
    pub should_training_stop: bool,
    pub should_epoch_stop: bool,
    pub should_save: bool,
    pub should_evaluate: bool,
    pub should_log: bool,
}

/// A callback. `logs` carries the entry for `Log` and the metrics for `Evaluate`; what a
/// callback adds to it is kept (in `log_history` for `Log`, in the evaluation's metrics for
/// `Evaluate`). An error stops training with that error.
pub trait TrainerCallback: Send {
    fn on_event(
        &mut self,
        event: Event,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
        logs: Option<&mut Map<String, Value>>,
    ) -> Result<()>;

    /// State to keep in checkpoints (in `trainer_state.json`'s `stateful_callbacks`, under the
    /// returned name), as transformers' `ExportableState` does.
    fn state(&mut self) -> Result<Option<(String, Value)>> {
        Ok(None)
    }

    /// Restores what [`TrainerCallback::state`] saved, given all of `stateful_callbacks`.
    fn load_state(&mut self, _saved: &Map<String, Value>) -> Result<()> {
        Ok(())
    }
}

/// transformers' `PrinterCallback`: each training-loss and evaluation log entry as one JSON line
/// on `out` (with its `step`) the moment it is logged, flushed at once, so a redirected output
/// keeps every line up to a crash, a signal or a kill.
pub struct PrinterCallback<W: std::io::Write + Send> {
    pub out: W,
}

impl<W: std::io::Write + Send> TrainerCallback for PrinterCallback<W> {
    fn on_event(
        &mut self,
        event: Event,
        _: &TrainingArguments,
        state: &TrainerState,
        _: &mut TrainerControl,
        logs: Option<&mut Map<String, Value>>,
    ) -> Result<()> {
        let Some(logs) = logs.filter(|l| event == Event::Log && (l.contains_key("loss") || l.contains_key("eval_loss"))) else { return Ok(()) };
        let mut entry = logs.clone();
        entry.insert("step".into(), Value::from(state.global_step));
        let line = serde_json::to_string(&entry).expect("JSON of JSON");
        // stdout closed (a pipe whose reader left) is not a training failure
        let _ = writeln!(self.out, "{line}").and_then(|_| self.out.flush());
        Ok(())
    }
}

/// Prints one line on stdout for a training job (`train`, `hp-search`), whose product is its
/// files: a closed stdout (a pipe whose reader left) is not the job's failure, so the line is
/// dropped rather than ending the job.
pub fn print_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}
