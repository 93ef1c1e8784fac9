//! Focal loss (Lin et al., 2017): `-(1 - p)^gamma * log p` for the label's probability `p`,
//! summed over labelled tokens and divided by `num_items_in_batch` like the built-in loss.
//! Option `gamma` (default 2.0); `gamma = 0` is plain cross-entropy.
//!
//! With `l = log p`: `d/dl [-(1 - e^l)^g * l] = -(1 - p)^g + g * (1 - p)^(g - 1) * p * l`.

use runtime_plugin::{export, host, Loss, LossOutput, Plugin, Statistics, TokenBatch, IGNORE_INDEX};

#[derive(Default)]
struct Focal {
    gamma: Option<f64>,
}

impl Plugin for Focal {
    const NAME: &'static str = "focal-loss";
    const VERSION: &'static str = "0.1.0";
}

impl Loss for Focal {
    fn statistics(&mut self) -> Statistics {
        Statistics::LABEL_LOGPROB
    }

    fn compute_loss(&mut self, batch: TokenBatch) -> Result<LossOutput, String> {
        let gamma = match self.gamma {
            Some(g) => g,
            None => {
                let g = host::option_f64("gamma", 2.0)?;
                if !(g >= 0.0) {
                    return Err(format!("option `gamma` must be >= 0, found {g}"));
                }
                *self.gamma.insert(g)
            }
        };
        let n = batch.num_items_in_batch.max(1) as f64;
        let mut loss = 0.0f64;
        let mut d = vec![0.0f32; batch.labels.len()];
        for (i, &y) in batch.labels.iter().enumerate() {
            if y == IGNORE_INDEX {
                continue;
            }
            let l = batch.label_logprob[i] as f64;
            let p = l.exp();
            let q = (1.0 - p).max(0.0);
            loss -= q.powf(gamma) * l;
            let dq = if gamma == 0.0 { 0.0 } else { gamma * q.powf(gamma - 1.0) * p * l };
            d[i] = ((-q.powf(gamma) + dq) / n) as f32;
        }
        Ok(LossOutput { loss: (loss / n) as f32, d_label_logprob: d, d_logsumexp: vec![], d_mean_logprob: vec![], d_entropy: vec![] })
    }
}

export!(Focal: Loss);
