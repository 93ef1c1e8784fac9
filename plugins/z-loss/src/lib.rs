//! Cross-entropy plus z-loss (PaLM, Chowdhery et al., 2022): `-log p[y] + alpha * logsumexp(z)^2`
//! per labelled token, divided by `num_items_in_batch`. Option `alpha` (default 1e-4).

use runtime_plugin::{export, host, Loss, LossOutput, Plugin, Statistics, TokenBatch, IGNORE_INDEX};

#[derive(Default)]
struct ZLoss;

impl Plugin for ZLoss {
    const NAME: &'static str = "z-loss";
    const VERSION: &'static str = "0.1.0";
}

impl Loss for ZLoss {
    fn statistics(&mut self) -> Statistics {
        Statistics::LABEL_LOGPROB | Statistics::LOGSUMEXP
    }

    fn compute_loss(&mut self, batch: TokenBatch) -> Result<LossOutput, String> {
        let alpha = host::option_f64("alpha", 1e-4)?;
        let n = batch.num_items_in_batch.max(1) as f64;
        let len = batch.labels.len();
        let (mut loss, mut d_lp, mut d_lse) = (0.0f64, vec![0.0f32; len], vec![0.0f32; len]);
        for (i, &y) in batch.labels.iter().enumerate() {
            if y != IGNORE_INDEX {
                let lse = batch.logsumexp[i] as f64;
                loss += -(batch.label_logprob[i] as f64) + alpha * lse * lse;
                d_lp[i] = (-1.0 / n) as f32;
                d_lse[i] = (2.0 * alpha * lse / n) as f32;
            }
        }
        Ok(LossOutput { loss: (loss / n) as f32, d_label_logprob: d_lp, d_logsumexp: d_lse, d_mean_logprob: vec![], d_entropy: vec![] })
    }
}

export!(ZLoss: Loss);
