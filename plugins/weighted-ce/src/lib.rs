//! Cross-entropy with a weight per example, read from a numeric dataset column (option `column`,
//! default `weight`): `sum_i w[example(i)] * -log p[y_i] / num_items_in_batch`. An example
//! without the column is an error naming the column.

use runtime_plugin::{export, host, Loss, LossOutput, Plugin, Statistics, TokenBatch, IGNORE_INDEX};

#[derive(Default)]
struct WeightedCe;

impl Plugin for WeightedCe {
    const NAME: &'static str = "weighted-ce";
    const VERSION: &'static str = "0.1.0";
}

impl Loss for WeightedCe {
    fn statistics(&mut self) -> Statistics {
        Statistics::LABEL_LOGPROB
    }

    fn compute_loss(&mut self, batch: TokenBatch) -> Result<LossOutput, String> {
        let name = host::option("column").unwrap_or_else(|| "weight".into());
        let col = batch
            .columns
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("the batch has no numeric column `{name}` (columns: {:?})", batch.columns.iter().map(|c| &c.name).collect::<Vec<_>>()))?;
        if col.values.len() != batch.batch_size as usize {
            return Err(format!("column `{name}` has {} values for {} examples", col.values.len(), batch.batch_size));
        }
        if let Some(w) = col.values.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(format!("column `{name}` has weight {w}; weights must be finite and >= 0"));
        }
        let seq = batch.seq_len as usize;
        let n = batch.num_items_in_batch.max(1) as f64;
        let mut loss = 0.0f64;
        let mut d = vec![0.0f32; batch.labels.len()];
        for (i, &y) in batch.labels.iter().enumerate() {
            if y != IGNORE_INDEX {
                let w = col.values[i / seq];
                loss -= w * batch.label_logprob[i] as f64;
                d[i] = (-w / n) as f32;
            }
        }
        Ok(LossOutput { loss: (loss / n) as f32, d_label_logprob: d, d_logsumexp: vec![], d_mean_logprob: vec![], d_entropy: vec![] })
    }
}

export!(WeightedCe: Loss);
