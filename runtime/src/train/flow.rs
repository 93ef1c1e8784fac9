//! The flow rules of transformers' `DefaultFlowCallback` (when a step or an epoch end asks to
//! log, evaluate and save), `_maybe_log_save_evaluate` acting on those flags, and the running
//! training losses that logging reports.

use serde_json::Map;

use super::model_kind::TrainerModel;
use super::trainer::{num, Trainer};
use crate::args::{IntervalStrategy, SaveStrategy};
use crate::backend::Backend;
use crate::error::Result;

/// A step interval: at least 1 is a step count, below 1 a ratio of `max_steps` (rounded up).
pub(super) fn interval(v: f64, max_steps: u64) -> u64 {
    if v >= 1.0 {
        v as u64
    } else {
        ((v * max_steps as f64).ceil() as u64).max(1)
    }
}

/// Running training losses: since the last log, and over the whole run.
#[derive(Default)]
pub(super) struct LossLog {
    sum: f64,
    pub(super) steps: u64,
    pub(super) total: f64,
    pub(super) total_steps: u64,
    pub(super) norm: f32,
    pub(super) lr: f64,
}

impl LossLog {
    pub(super) fn add(&mut self, loss: f64) {
        (self.sum, self.steps, self.total, self.total_steps) = (self.sum + loss, self.steps + 1, self.total + loss, self.total_steps + 1);
    }
    /// transformers' `logging_nan_inf_filter`: a non-finite step is logged as the running average.
    pub(super) fn average(&self) -> f64 {
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

impl<B: Backend + Clone, M: TrainerModel<B>> Trainer<B, M> {
    /// transformers' `DefaultFlowCallback.on_step_end`, after step `global_step`.
    pub(super) fn flow_on_step_end(&mut self) {
        let (a, c, step) = (&self.args, &mut self.control, self.state.global_step);
        c.should_log |= (a.logging_first_step && step == 1) || (a.logging_strategy == IntervalStrategy::Steps && step.is_multiple_of(self.logging_steps));
        c.should_evaluate |= a.eval_strategy == IntervalStrategy::Steps && step.is_multiple_of(self.eval_steps) && a.eval_delay <= step as f64;
        c.should_save |= a.save_strategy == SaveStrategy::Steps && step.is_multiple_of(self.save_steps);
        if step >= self.state.max_steps {
            c.should_training_stop = true;
            c.should_evaluate |= a.eval_strategy == IntervalStrategy::Steps && a.eval_delay <= step as f64;
            c.should_save |= a.save_strategy == SaveStrategy::Steps;
        }
    }

    /// transformers' `DefaultFlowCallback.on_epoch_end`.
    pub(super) fn flow_on_epoch_end(&mut self) {
        let (a, c) = (&self.args, &mut self.control);
        c.should_log |= a.logging_strategy == IntervalStrategy::Epoch;
        c.should_evaluate |= a.eval_strategy == IntervalStrategy::Epoch && a.eval_delay <= self.state.epoch;
        c.should_save |= a.save_strategy == SaveStrategy::Epoch;
    }

    /// transformers' `_maybe_log_save_evaluate`: acts on the control flags (log, then evaluate,
    /// then save) and clears them.
    pub(super) fn log_save_evaluate(&mut self, logbook: &mut LossLog) -> Result<()> {
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
}
