//! transformers' `EarlyStoppingCallback`: after each evaluation, the metric named by
//! `metric_for_best_model` must beat the best so far by more than `threshold` (option
//! `early_stopping_threshold`, default 0); after `patience` evaluations without that
//! (option `early_stopping_patience`, default 1) training stops. The counter is saved in
//! checkpoints, so a resumed run stops where the uninterrupted one would.

use runtime_plugin::{export, host, Callbacks, Event, Metric, Plugin, Response, TrainerControl, TrainerState};

#[derive(Default)]
struct EarlyStopping {
    /// Evaluations in a row without improvement.
    counter: u32,
}

impl Plugin for EarlyStopping {
    const NAME: &'static str = "early-stopping";
    const VERSION: &'static str = "0.1.0";
}

impl Callbacks for EarlyStopping {
    fn on_event(&mut self, event: Event, state: TrainerState, mut control: TrainerControl) -> Result<Response, String> {
        let patience = host::option_f64("early_stopping_patience", 1.0)? as u32;
        let threshold = host::option_f64("early_stopping_threshold", 0.0)?;
        match event {
            Event::OnTrainBegin => {
                if state.metric_for_best_model.is_none() {
                    return Err("early stopping needs metric_for_best_model (and an eval_strategy)".into());
                }
            }
            Event::OnEvaluate => {
                let key = state.metric_for_best_model.clone().unwrap_or_default();
                let key = if key.starts_with("eval_") { key } else { format!("eval_{key}") };
                let Some(value) = state.logs.iter().find(|m| m.name == key).map(|m| m.value) else {
                    host::warn(&format!("early stopping needs the metric `{key}`, which this evaluation did not report; skipping"));
                    return Ok(Response { control, logs: vec![] });
                };
                let greater = state.greater_is_better.unwrap_or(false);
                let improved = match state.best_metric {
                    None => true,
                    Some(best) if greater => value > best && (value - best).abs() > threshold,
                    Some(best) => value < best && (value - best).abs() > threshold,
                };
                self.counter = if improved { 0 } else { self.counter + 1 };
                if self.counter >= patience {
                    host::info(&format!("no improvement of {key} in {} evaluations; stopping", self.counter));
                    control.should_training_stop = true;
                }
                let logs = vec![Metric { name: "early_stopping_counter".into(), value: self.counter as f64 }];
                return Ok(Response { control, logs });
            }
            _ => {}
        }
        Ok(Response { control, logs: vec![] })
    }

    fn save_state(&mut self) -> Vec<u8> {
        self.counter.to_le_bytes().to_vec()
    }

    fn load_state(&mut self, state: Vec<u8>) -> Result<(), String> {
        let bytes: [u8; 4] = state.as_slice().try_into().map_err(|_| format!("expected 4 bytes of state, found {}", state.len()))?;
        self.counter = u32::from_le_bytes(bytes);
        Ok(())
    }
}

export!(EarlyStopping: Callbacks);
