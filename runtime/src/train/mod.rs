//! Training: the optimizer, learning-rate schedules, the deterministic sampler, the trainer state
//! and the training loop with checkpoints.

mod batch_size;
pub mod callbacks;
mod checkpoint;
mod evaluate;
mod flow;
pub mod model_kind;
pub mod output_dir;
pub mod plot;
pub mod plugin_callbacks;
pub mod sampler;
pub mod schedule;
pub mod search;
mod setup;
mod setup_seq2seq;
mod shared_eval;
pub mod state;
pub mod tensorboard;
pub mod trainer;
