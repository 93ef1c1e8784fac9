//! Token accuracy and perplexity: `eval_accuracy` is the share of labelled positions whose argmax
//! prediction equals the label, `eval_perplexity` is `exp` of the mean negative log-probability
//! of the labels (over all labelled tokens of the evaluation set, not averaged per batch).

use runtime_plugin::{export, EvalBatch, Metric, Metrics, Plugin, PredictionKind, IGNORE_INDEX};

#[derive(Default)]
struct TokenMetrics {
    correct: u64,
    total: u64,
    nll: f64,
}

impl Plugin for TokenMetrics {
    const NAME: &'static str = "token-metrics";
    const VERSION: &'static str = "0.1.0";
}

impl Metrics for TokenMetrics {
    fn reset(&mut self) {
        *self = Self::default();
    }

    fn update(&mut self, batch: EvalBatch) -> Result<(), String> {
        if batch.kind != PredictionKind::Argmax {
            return Err("token-metrics scores argmax predictions; with predict_with_generate use text-metrics".into());
        }
        for (i, &label) in batch.labels.iter().enumerate() {
            if label == IGNORE_INDEX {
                continue;
            }
            self.total += 1;
            self.correct += u64::from(batch.predictions[i] == label as u32);
            self.nll -= batch.label_logprob[i] as f64;
        }
        Ok(())
    }

    fn compute(&mut self) -> Result<Vec<Metric>, String> {
        if self.total == 0 {
            return Err("no labelled tokens were evaluated".into());
        }
        let n = self.total as f64;
        Ok(vec![
            Metric { name: "accuracy".into(), value: self.correct as f64 / n },
            Metric { name: "perplexity".into(), value: (self.nll / n).exp() },
        ])
    }
}

export!(TokenMetrics: Metrics);
