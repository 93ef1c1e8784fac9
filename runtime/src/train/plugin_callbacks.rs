//! A `callbacks` plugin as a trainer callback: HF events, the trainer state and control
//! translated to and from the plugin interface's types.

use serde_json::{Map, Value};

use super::callbacks::{Event, TrainerCallback, TrainerControl};
use super::state::TrainerState;
use crate::args::TrainingArguments;
use crate::error::Result;
use crate::plugin::roles::{lock, tolerate, Plugins, Shared};
use crate::plugin::{self};

/// The callbacks plugins of a run as trainer callbacks.
pub fn plugin_callbacks(plugins: &Plugins) -> Vec<Box<dyn TrainerCallback>> {
    plugins.callbacks.iter().map(|p| Box::new(PluginCallback(p.clone())) as Box<dyn TrainerCallback>).collect()
}

/// A `callbacks` plugin as a trainer callback.
struct PluginCallback(Shared);

fn wit_event(e: Event) -> plugin::WitEvent {
    use plugin::WitEvent as W;
    match e {
        Event::InitEnd => W::OnInitEnd,
        Event::TrainBegin => W::OnTrainBegin,
        Event::TrainEnd => W::OnTrainEnd,
        Event::EpochBegin => W::OnEpochBegin,
        Event::EpochEnd => W::OnEpochEnd,
        Event::StepBegin => W::OnStepBegin,
        Event::SubstepEnd => W::OnSubstepEnd,
        Event::PreOptimizerStep => W::OnPreOptimizerStep,
        Event::OptimizerStep => W::OnOptimizerStep,
        Event::StepEnd => W::OnStepEnd,
        Event::Evaluate => W::OnEvaluate,
        Event::Save => W::OnSave,
        Event::Log => W::OnLog,
        Event::PredictionStep => W::OnPredictionStep,
    }
}

impl TrainerCallback for PluginCallback {
    fn on_event(
        &mut self,
        event: Event,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
        logs: Option<&mut Map<String, Value>>,
    ) -> Result<()> {
        let metrics =
            logs.as_ref().map_or_else(Vec::new, |l| l.iter().filter_map(|(k, v)| v.as_f64().map(|x| plugin::Metric { name: k.clone(), value: x })).collect());
        let ws = plugin::WitState {
            global_step: state.global_step,
            max_steps: state.max_steps,
            epoch: state.epoch,
            num_train_epochs: state.num_train_epochs,
            best_metric: state.best_metric,
            best_model_checkpoint: state.best_model_checkpoint.clone(),
            metric_for_best_model: args.metric_for_best_model.clone(),
            greater_is_better: args.greater_is_better,
            logs: metrics,
        };
        let c = plugin::WitControl {
            should_training_stop: control.should_training_stop,
            should_epoch_stop: control.should_epoch_stop,
            should_save: control.should_save,
            should_evaluate: control.should_evaluate,
            should_log: control.should_log,
        };
        let mut plugin = lock(&self.0);
        let r = plugin.on_event(wit_event(event), &ws, c);
        let Some(r) = tolerate(&plugin, r)? else { return Ok(()) };
        *control = TrainerControl {
            should_training_stop: r.control.should_training_stop,
            should_epoch_stop: r.control.should_epoch_stop,
            should_save: r.control.should_save,
            should_evaluate: r.control.should_evaluate,
            should_log: r.control.should_log,
        };
        if let Some(l) = logs {
            for m in r.logs {
                l.insert(m.name, super::trainer::num(m.value));
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Option<(String, Value)>> {
        let mut p = lock(&self.0);
        let bytes = p.save_state()?;
        Ok(Some((p.name().to_string(), serde_json::json!({ "plugin": p.path.display().to_string(), "state": hex::encode(bytes) }))))
    }

    fn load_state(&mut self, saved: &Map<String, Value>) -> Result<()> {
        let mut p = lock(&self.0);
        let Some(entry) = saved.get(p.name()) else { return Ok(()) };
        let bytes = entry
            .get("state")
            .and_then(Value::as_str)
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| p.invalid("callbacks.load-state", "the checkpoint's saved state is not valid hex"))?;
        p.load_state(&bytes)
    }
}
