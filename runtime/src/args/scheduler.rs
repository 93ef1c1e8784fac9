//! `lr_scheduler_type`: the names of transformers' learning-rate schedules (the formulas are
//! the trainer's, in `train::schedule`).

use crate::error::{Error, Result};

/// `lr_scheduler_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerType {
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    Constant,
    ConstantWithWarmup,
    InverseSqrt,
    CosineWithMinLr,
    WarmupStableDecay,
}

pub const SCHEDULER_NAMES: &[&str] = &[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
];

impl SchedulerType {
    pub fn parse(name: &str) -> Result<Self> {
        use SchedulerType::*;
        Ok(match name {
            "linear" => Linear,
            "cosine" => Cosine,
            "cosine_with_restarts" => CosineWithRestarts,
            "polynomial" => Polynomial,
            "constant" => Constant,
            "constant_with_warmup" => ConstantWithWarmup,
            "inverse_sqrt" => InverseSqrt,
            "cosine_with_min_lr" => CosineWithMinLr,
            "warmup_stable_decay" => WarmupStableDecay,
            other => return Err(Error::Invalid(format!("unknown lr_scheduler_type `{other}` (expected one of: {})", SCHEDULER_NAMES.join(", ")))),
        })
    }
}
