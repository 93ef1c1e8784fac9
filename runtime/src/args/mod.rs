//! Run configuration under Hugging Face's names: `TrainingArguments` (with
//! `Seq2SeqTrainingArguments`' generation fields and `run_clm.py`'s model and data arguments),
//! read from a TOML, JSON or YAML file and `--name value` overrides.

mod checks;
pub mod config_file;
pub mod distributed;
pub mod scheduler;
pub mod training;

pub use training::{IntervalStrategy, SaveStrategy, TrainingArguments};
