//! Training: the optimizer for now; the loop, schedules and checkpoints arrive with the trainer.

pub mod optimizer;
