//! `trainer_state.json` with transformers' field names: the step, epoch, log history and
//! best-model tracking, plus the runtime's sampler position (kept in `stateful_callbacks`-free
//! extra fields transformers ignores).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::sampler::SamplerState;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerState {
    pub best_global_step: Option<u64>,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    pub epoch: f64,
    pub eval_steps: u64,
    pub global_step: u64,
    pub is_hyper_param_search: bool,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub log_history: Vec<Map<String, Value>>,
    pub logging_steps: u64,
    pub max_steps: u64,
    pub num_input_tokens_seen: u64,
    pub num_train_epochs: u64,
    pub save_steps: u64,
    pub stateful_callbacks: Map<String, Value>,
    pub total_flos: f64,
    pub train_batch_size: usize,
    pub trial_name: Option<String>,
    pub trial_params: Option<Value>,
    /// The runtime's: where the sampler stands (the next batch to read).
    pub sampler: SamplerState,
    /// The runtime's: AdamW's step count (bias correction).
    pub optimizer_step: u64,
}

impl TrainerState {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not a valid trainer state: {e}")))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("trainer state is plain data") + "\n"
    }
}
