//! Training: the optimizer and learning-rate schedules (the loop and checkpoints arrive with the
//! trainer).

pub mod optimizer;
pub mod schedule;
