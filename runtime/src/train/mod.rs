//! Training: the optimizer, learning-rate schedules, the deterministic sampler, the trainer state
//! and the training loop with checkpoints.

pub mod callbacks;
pub mod optimizer;
pub mod plot;
pub mod plugins;
pub mod sampler;
pub mod schedule;
pub mod state;
pub mod trainer;
