//! Cross-entropy through the full-logits hook (`loss-logits`), with the SDK's default
//! `compute_chunk`: the tests check it against the built-in loss.

use runtime_plugin::{export, LossLogits, Plugin};

#[derive(Default)]
struct RowsCe;

impl Plugin for RowsCe {
    const NAME: &'static str = "rows-ce";
    const VERSION: &'static str = "0.1.0";
}

impl LossLogits for RowsCe {}

export!(RowsCe: LossLogits);
