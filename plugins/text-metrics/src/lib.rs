//! Text metrics over decoded predictions (through the host's `decode`):
//! - `exact_match`: the share of examples whose prediction, decoded and trimmed, equals the
//!   reference;
//! - `f1`: SQuAD-style word-overlap F1 (lower-cased, punctuation removed), averaged over examples.
//!
//! With generated predictions (`predict_with_generate`) each row's generated ids are compared
//! with its label ids (pad and -100 dropped). With argmax predictions (teacher forcing) the
//! labelled positions of each row are the reference and the argmax at those positions the
//! prediction.

use runtime_plugin::{export, host, EvalBatch, Metric, Metrics, Plugin, PredictionKind, IGNORE_INDEX};

#[derive(Default)]
struct TextMetrics {
    examples: u64,
    exact: u64,
    f1: f64,
}

impl Plugin for TextMetrics {
    const NAME: &'static str = "text-metrics";
    const VERSION: &'static str = "0.1.0";
}

fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() || c.is_whitespace() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn f1(pred: &str, reference: &str) -> f64 {
    let (p, r) = (words(pred), words(reference));
    if p.is_empty() || r.is_empty() {
        return f64::from(u8::from(p == r));
    }
    let mut rest = r.clone();
    let mut common = 0usize;
    for w in &p {
        if let Some(i) = rest.iter().position(|x| x == w) {
            rest.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (prec, rec) = (common as f64 / p.len() as f64, common as f64 / r.len() as f64);
    2.0 * prec * rec / (prec + rec)
}

impl Metrics for TextMetrics {
    fn reset(&mut self) {
        *self = Self::default();
    }

    fn update(&mut self, b: EvalBatch) -> Result<(), String> {
        let pad = b.pad_token_id;
        for r in 0..b.batch_size as usize {
            let labels = &b.labels[r * b.label_len as usize..(r + 1) * b.label_len as usize];
            let preds = &b.predictions[r * b.prediction_len as usize..(r + 1) * b.prediction_len as usize];
            let (reference, prediction): (Vec<u32>, Vec<u32>) = match b.kind {
                PredictionKind::Generated => (
                    labels.iter().filter(|&&l| l != IGNORE_INDEX && Some(l as u32) != pad).map(|&l| l as u32).collect(),
                    preds.iter().copied().filter(|&p| Some(p) != pad).collect(),
                ),
                PredictionKind::Argmax => labels.iter().zip(preds).filter(|(l, _)| **l != IGNORE_INDEX).map(|(&l, &p)| (l as u32, p)).unzip(),
            };
            let reference = host::decode(&reference, true)?;
            let prediction = host::decode(&prediction, true)?;
            self.examples += 1;
            self.exact += u64::from(prediction.trim() == reference.trim());
            self.f1 += f1(&prediction, &reference);
        }
        Ok(())
    }

    fn compute(&mut self) -> Result<Vec<Metric>, String> {
        let n = self.examples.max(1) as f64;
        Ok(vec![Metric { name: "exact_match".into(), value: self.exact as f64 / n }, Metric { name: "f1".into(), value: self.f1 / n }])
    }
}

export!(TextMetrics: Metrics);
