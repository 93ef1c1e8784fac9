//! `TrainingArguments` with transformers' names and defaults, loaded from a config file plus
//! command-line overrides, and validated the way `TrainingArguments.__post_init__` validates
//! (conflicting settings are errors before any work starts). An unknown key is an error that names
//! the closest known key; a transformers field this runtime does not implement is an error that
//! says so, rather than being silently ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// `eval_strategy` / `logging_strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    No,
    Steps,
    Epoch,
}

/// `save_strategy`: an interval, or `best` (save whenever the tracked metric improves).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveStrategy {
    No,
    Steps,
    Epoch,
    Best,
}

/// What happens when a training loss is NaN or infinite (the runtime's addition to HF's
/// `logging_nan_inf_filter`, which only affects logging): skip the update, or stop after keeping
/// the last good checkpoint. A NaN update is never applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NanInfPolicy {
    Skip,
    Stop,
}

/// The run's arguments. Field names and defaults are transformers 5's; where transformers 4.x
/// used another name that users still write (`warmup_ratio`, `evaluation_strategy`), it is
/// accepted and folded in.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingArguments {
    // --- run_clm.py model and data arguments
    pub model_name_or_path: Option<String>,
    pub config_name: Option<String>,
    pub tokenizer_name: Option<String>,
    pub train_file: Option<String>,
    pub validation_file: Option<String>,
    pub block_size: Option<usize>,
    pub max_seq_length: Option<usize>,
    /// Re-tokenize instead of reading the tokenization cache (run_clm.py's name).
    pub overwrite_cache: bool,
    pub torch_dtype: Option<String>,
    pub attn_implementation: String,
    /// PEFT's `LoraConfig` (a `[peft]` table under its field names): train a LoRA adapter.
    pub peft: Option<Map<String, Value>>,
    /// A PEFT adapter folder to start from (and continue training).
    pub adapter_name_or_path: Option<String>,

    // --- run_summarization.py data arguments (encoder-decoder models)
    /// The record field holding the source text (`source` when unset).
    pub text_column: Option<String>,
    /// The record field holding the target text (`target` when unset).
    pub summary_column: Option<String>,
    /// Sources are truncated to this many tokens (the special tokens kept).
    pub max_source_length: usize,
    /// Training targets are truncated to this many tokens.
    pub max_target_length: usize,
    /// Validation targets are truncated to this many tokens (`max_target_length` when unset);
    /// also the generation length when `generation_max_length` is unset.
    pub val_max_target_length: Option<usize>,
    /// Batches are padded to a multiple of this (`DataCollatorForSeq2Seq`'s argument).
    pub pad_to_multiple_of: Option<usize>,

    // --- TrainingArguments
    pub output_dir: String,
    pub overwrite_output_dir: bool,
    pub do_train: bool,
    pub do_eval: bool,
    pub do_predict: bool,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub learning_rate: f64,
    pub lr_scheduler_type: String,
    pub lr_scheduler_kwargs: Map<String, Value>,
    /// A step count, or below 1 a ratio of the total steps (transformers 5).
    pub warmup_steps: f64,
    /// transformers 4.x's ratio; folded into `warmup_steps`.
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// `adamw_torch` / `adamw_torch_fused` (the same update here; transformers 5's default name).
    pub optim: String,
    pub max_grad_norm: f64,
    pub label_smoothing_factor: f64,
    pub neftune_noise_alpha: Option<f64>,
    pub gradient_checkpointing: bool,
    pub auto_find_batch_size: bool,
    pub bf16: bool,
    pub fp16: bool,
    pub logging_strategy: IntervalStrategy,
    pub logging_steps: f64,
    pub logging_first_step: bool,
    pub logging_nan_inf_filter: bool,
    pub nan_inf_policy: NanInfPolicy,
    pub eval_strategy: IntervalStrategy,
    /// transformers 4.x's name for `eval_strategy`.
    pub evaluation_strategy: Option<IntervalStrategy>,
    pub eval_steps: Option<f64>,
    pub eval_delay: f64,
    pub eval_on_start: bool,
    pub prediction_loss_only: bool,
    pub include_for_metrics: Vec<String>,
    pub save_strategy: SaveStrategy,
    pub save_steps: f64,
    pub save_total_limit: Option<usize>,
    pub save_only_model: bool,
    pub load_best_model_at_end: bool,
    pub metric_for_best_model: Option<String>,
    pub greater_is_better: Option<bool>,
    pub seed: u64,
    pub data_seed: Option<u64>,
    pub full_determinism: bool,
    /// A checkpoint folder, or `true` for the newest complete checkpoint in `output_dir`.
    pub resume_from_checkpoint: Option<Value>,
    pub ignore_data_skip: bool,
    pub dataloader_drop_last: bool,
    /// `random` (a seeded permutation per epoch) or `sequential`.
    pub train_sampling_strategy: String,
    pub remove_unused_columns: bool,
    pub label_names: Option<Vec<String>>,
    pub disable_tqdm: bool,
    /// Integrations: `tensorboard` (also what `all` means here), or none (`"none"`, `[]`).
    pub report_to: Value,
    /// Where TensorBoard's event files go (transformers 4's argument; transformers 5 reads
    /// `$TENSORBOARD_LOGGING_DIR`). Unset: `output_dir/runs/<time>_<host>`.
    pub logging_dir: Option<String>,
    pub run_name: Option<String>,
    pub use_cpu: bool,
    pub device: String,
    /// Across processes (docs/DISTRIBUTED.md): `mpi` or `nccl`; unset: the launcher's default.
    pub ddp_backend: Option<String>,
    /// Normalise the loss by the label tokens of every process (true), or each process's by its
    /// own and average the gradients (false), as transformers.
    pub average_tokens_across_devices: bool,
    /// MiB of gradients summed per reduce-scatter and all-gather (unset: 25, torch DDP's bucket).
    pub ddp_bucket_cap_mb: Option<usize>,
    /// Seconds a process waits in one collective operation before it ends the run (transformers'
    /// default, 1800).
    pub ddp_timeout: u64,
    /// Unset or `""` (plain data parallel), `"shard_grad_op"` or `"full_shard"`, as transformers.
    pub fsdp: Value,

    // --- Seq2SeqTrainingArguments
    pub predict_with_generate: bool,
    pub generation_max_length: Option<usize>,
    pub generation_num_beams: Option<usize>,

    // --- WASM plugins (`[[plugins]] path = ..., options = {...}`)
    pub plugins: Vec<Value>,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        TrainingArguments {
            model_name_or_path: None,
            config_name: None,
            tokenizer_name: None,
            train_file: None,
            validation_file: None,
            block_size: None,
            max_seq_length: None,
            text_column: None,
            summary_column: None,
            max_source_length: 1024,
            max_target_length: 128,
            val_max_target_length: None,
            pad_to_multiple_of: None,
            overwrite_cache: false,
            torch_dtype: None,
            attn_implementation: "sdpa".into(),
            peft: None,
            adapter_name_or_path: None,
            output_dir: "trainer_output".into(),
            overwrite_output_dir: false,
            do_train: false,
            do_eval: false,
            do_predict: false,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: -1,
            learning_rate: 5e-5,
            lr_scheduler_type: "linear".into(),
            lr_scheduler_kwargs: Map::new(),
            warmup_steps: 0.0,
            warmup_ratio: None,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            optim: "adamw_torch_fused".into(),
            max_grad_norm: 1.0,
            label_smoothing_factor: 0.0,
            neftune_noise_alpha: None,
            gradient_checkpointing: false,
            auto_find_batch_size: false,
            bf16: false,
            fp16: false,
            logging_strategy: IntervalStrategy::Steps,
            logging_steps: 500.0,
            logging_first_step: false,
            logging_nan_inf_filter: true,
            nan_inf_policy: NanInfPolicy::Skip,
            eval_strategy: IntervalStrategy::No,
            evaluation_strategy: None,
            eval_steps: None,
            eval_delay: 0.0,
            eval_on_start: false,
            prediction_loss_only: false,
            include_for_metrics: Vec::new(),
            save_strategy: SaveStrategy::Steps,
            save_steps: 500.0,
            save_total_limit: None,
            save_only_model: false,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            seed: 42,
            data_seed: None,
            full_determinism: false,
            resume_from_checkpoint: None,
            ignore_data_skip: false,
            dataloader_drop_last: false,
            train_sampling_strategy: "random".into(),
            remove_unused_columns: true,
            label_names: None,
            disable_tqdm: false,
            report_to: Value::Array(Vec::new()),
            logging_dir: None,
            run_name: None,
            use_cpu: false,
            device: "auto".into(),
            ddp_backend: None,
            average_tokens_across_devices: true,
            ddp_bucket_cap_mb: None,
            ddp_timeout: 1800,
            fsdp: Value::Null,
            predict_with_generate: false,
            generation_max_length: None,
            generation_num_beams: None,
            plugins: Vec::new(),
        }
    }
}

/// `report_to` as a list of integration names: as transformers, `"none"` (or null) is none, a
/// name is a list of one, and `"all"` is every integration this build has (TensorBoard).
pub(super) fn report_to_list(v: &Value) -> Result<Vec<String>> {
    let names = match v {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| Error::Invalid(format!("report_to: expected integration names, found {x}"))))
            .collect::<Result<_>>()?,
        other => return Err(Error::Invalid(format!("report_to: expected a name or a list of names, found {other}"))),
    };
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "none" => {}
            "all" => out.push("tensorboard".to_string()),
            _ => out.push(n),
        }
    }
    out.dedup();
    Ok(out)
}

/// Every key a config may hold.
pub fn known_keys() -> Vec<String> {
    match serde_json::to_value(TrainingArguments::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The known key closest to `key`, if any is close enough to be a likely typo.
pub fn closest_key(key: &str) -> Option<String> {
    known_keys().into_iter().map(|k| (strsim::jaro_winkler(key, &k), k)).filter(|(score, _)| *score >= 0.85).max_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, k)| k)
}

fn check_key(key: &str, source: &str) -> Result<()> {
    if known_keys().iter().any(|k| k == key) {
        return Ok(());
    }
    if super::distributed::HF_UNSUPPORTED.contains(&key) {
        return Err(Error::Invalid(format!("{source}: `{key}` is a transformers TrainingArguments field that runtime does not support")));
    }
    let hint = closest_key(key).map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_default();
    Err(Error::Invalid(format!("{source}: unknown key `{key}`{hint}")))
}

pub use super::config_file::{parse_overrides, read_config_file};

impl TrainingArguments {
    /// The arguments from an optional config file and overrides (which win), validated.
    pub fn load(file: Option<&Path>, overrides: &[(String, Value)]) -> Result<Self> {
        let mut map = match file {
            Some(p) => read_config_file(p)?,
            None => Map::new(),
        };
        let file_name = file.map_or_else(|| "config".to_string(), |p| p.display().to_string());
        for key in map.keys() {
            check_key(key, &file_name)?;
        }
        for (key, value) in overrides {
            // `--plugin FILE.wasm` (repeatable) adds to the config's `plugins`
            if key == "plugin" {
                let list = map.entry("plugins").or_insert_with(|| Value::Array(Vec::new()));
                match list {
                    Value::Array(a) => a.push(value.clone()),
                    other => return Err(Error::Invalid(format!("`plugins` must be a list, found {other}"))),
                }
                continue;
            }
            check_key(key, "command line")?;
            map.insert(key.clone(), value.clone());
        }
        let cli: std::collections::HashSet<&str> = overrides.iter().map(|(k, _)| k.as_str()).collect();
        loop {
            let e = match serde_path_to_error::deserialize::<_, TrainingArguments>(Value::Object(map.clone())) {
                Ok(args) => return args.validated(),
                Err(e) => e,
            };
            let key = match e.path().iter().next() {
                Some(serde_path_to_error::Segment::Map { key }) if cli.contains(key.as_str()) => key.clone(),
                _ => return Err(Self::setting_error(&e, file)),
            };
            // a command-line value that reads as a number or true/false (`--output_dir 2024`)
            // is the text it was typed as where the setting wants text
            let retyped = match map.get(&key) {
                Some(v @ (Value::Number(_) | Value::Bool(_))) if e.inner().to_string().contains("expected a string") => Value::String(v.to_string()),
                _ => return Err(Error::Invalid(format!("--{key}: {}", e.inner()))),
            };
            map.insert(key, retyped);
        }
    }

    /// A config's value that does not deserialize, named by where it was set.
    fn setting_error(e: &serde_path_to_error::Error<serde_json::Error>, file: Option<&Path>) -> Error {
        let msg = format!("setting `{}`: {}", e.path(), e.inner());
        match file {
            Some(p) => Error::config(p, msg),
            None => Error::Invalid(msg),
        }
    }

    /// The arguments from a config's map (as [`read_config_file`] gives it, with any edits),
    /// every key checked, validated; `file` names the source in messages.
    pub fn from_config_map(map: Map<String, Value>, file: Option<&Path>) -> Result<Self> {
        let source = file.map_or_else(|| "config".to_string(), |p| p.display().to_string());
        for key in map.keys() {
            check_key(key, &source)?;
        }
        Self::from_map(map, file.map(Path::to_path_buf))
    }

    fn from_map(map: Map<String, Value>, file: Option<PathBuf>) -> Result<Self> {
        let de = Value::Object(map);
        let args: TrainingArguments = serde_path_to_error::deserialize(de).map_err(|e| Self::setting_error(&e, file.as_deref()))?;
        args.validated()
    }

    /// `training_args.json` as transformers writes it: every argument, sorted by name.
    pub fn to_json(&self) -> String {
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        let sorted: std::collections::BTreeMap<String, Value> = match v {
            Value::Object(m) => m.into_iter().collect(),
            _ => Default::default(),
        };
        serde_json::to_string_pretty(&sorted).unwrap_or_default()
    }

    /// The metric name as HF compares it: `eval_` prefixed unless it already is.
    pub fn best_metric_key(&self) -> Option<String> {
        self.metric_for_best_model.as_ref().map(|m| if m.starts_with("eval_") { m.clone() } else { format!("eval_{m}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(v: Value) -> Result<TrainingArguments> {
        let overrides: Vec<(String, Value)> = v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        TrainingArguments::load(None, &overrides)
    }

    #[test]
    fn typos_name_the_closest_key() {
        let e = load(json!({"learnig_rate": 1e-3})).unwrap_err().to_string();
        assert!(e.contains("unknown key `learnig_rate`") && e.contains("did you mean `learning_rate`"), "{e}");
        let e = load(json!({"per_device_train_batchsize": 4})).unwrap_err().to_string();
        assert!(e.contains("per_device_train_batch_size"), "{e}");
        let e = load(json!({"zzzz": 1})).unwrap_err().to_string();
        assert!(e.contains("unknown key `zzzz`") && !e.contains("did you mean"), "{e}");
        let e = load(json!({"deepspeed": "ds.json"})).unwrap_err().to_string();
        assert!(e.contains("does not support"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_setting() {
        let e = load(json!({"learning_rate": "fast"})).unwrap_err().to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = load(json!({"eval_strategy": "sometimes"})).unwrap_err().to_string();
        assert!(e.contains("eval_strategy"), "{e}");
    }

    #[test]
    fn conflicts_are_errors_as_in_transformers() {
        let e = load(json!({"load_best_model_at_end": true, "eval_strategy": "epoch", "save_strategy": "steps"})).unwrap_err().to_string();
        assert!(e.contains("save and eval strategy to match"), "{e}");
        let e = load(json!({"load_best_model_at_end": true, "eval_strategy": "steps", "eval_steps": 30, "save_steps": 50})).unwrap_err().to_string();
        assert!(e.contains("multiple of eval_steps"), "{e}");
        assert!(load(json!({"bf16": true, "fp16": true})).is_err());
        assert!(load(json!({"warmup_steps": 10, "warmup_ratio": 0.1})).is_err());
        assert!(load(json!({"lr_scheduler_type": "cosinus"})).unwrap_err().to_string().contains("cosine"));
        assert!(load(json!({"save_strategy": "best"})).is_err());
    }

    #[test]
    fn derived_defaults_follow_transformers() {
        let a = load(json!({"load_best_model_at_end": true, "eval_strategy": "steps", "eval_steps": 25, "save_steps": 50})).unwrap();
        assert_eq!(a.metric_for_best_model.as_deref(), Some("loss"));
        assert_eq!(a.greater_is_better, Some(false));
        assert_eq!(a.best_metric_key().as_deref(), Some("eval_loss"));
        let a = load(json!({"eval_strategy": "steps", "logging_steps": 20, "metric_for_best_model": "accuracy"})).unwrap();
        assert_eq!(a.eval_steps, Some(20.0));
        assert_eq!(a.greater_is_better, Some(true));
        let a = load(json!({"warmup_ratio": 0.1, "evaluation_strategy": "epoch"})).unwrap();
        assert_eq!(a.warmup_steps, 0.1);
        assert_eq!(a.eval_strategy, IntervalStrategy::Epoch);
    }

    #[test]
    fn overrides_parse_like_a_shell_user_expects() {
        let args: Vec<String> = ["--learning_rate", "3e-4", "--bf16", "--run_name=x y", "--include_for_metrics", "[\"inputs\"]", "--output_dir", "out"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = parse_overrides(&args).unwrap();
        assert_eq!(o[0], ("learning_rate".into(), json!(3e-4)));
        assert_eq!(o[1], ("bf16".into(), json!(true)));
        assert_eq!(o[2], ("run_name".into(), json!("x y")));
        assert_eq!(o[3], ("include_for_metrics".into(), json!(["inputs"])));
        assert_eq!(o[4], ("output_dir".into(), json!("out")));
        assert!(parse_overrides(&["stray".to_string()]).is_err());
    }
}
