//! Evaluation split over the processes of a data parallel run: process r evaluates the batches
//! `k` with `k % N == r` (the same batches one process would make), the losses are summed over the
//! processes, and the metrics plugins' batches travel to rank 0, which feeds them to its plugins
//! in batch order, so the plugins see every example exactly once, and sends the metrics back.

use serde_json::{Map, Value};

use super::model_kind::TrainerModel;
use super::trainer::Trainer;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::plugin::{EvalBatch, PredictionKind};

/// A metrics batch as bytes (little-endian; the fields in their WIT order), with its batch index.
fn encode(k: usize, b: &EvalBatch, out: &mut Vec<u8>) {
    let u32s = |out: &mut Vec<u8>, xs: &[u32]| {
        out.extend((xs.len() as u64).to_le_bytes());
        xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
    };
    out.extend((k as u64).to_le_bytes());
    out.push(u8::from(b.kind == PredictionKind::Generated));
    for x in [b.batch_size, b.label_len, b.prediction_len, b.input_len] {
        out.extend(x.to_le_bytes());
    }
    u32s(out, &b.labels.iter().map(|&x| x as u32).collect::<Vec<_>>());
    u32s(out, &b.predictions);
    u32s(out, &b.label_logprob.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    out.push(u8::from(b.inputs.is_some()));
    u32s(out, b.inputs.as_deref().unwrap_or_default());
    out.push(u8::from(b.pad_token_id.is_some()));
    out.extend(b.pad_token_id.unwrap_or(0).to_le_bytes());
}

/// Reads what [`encode`] wrote, from `at`.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let s = self.bytes.get(self.at..self.at + n).ok_or_else(|| Error::Invalid("a metrics batch from another process was cut short".into()))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }
    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.u64()? as usize;
        (0..n).map(|_| self.u32()).collect()
    }
    fn batch(&mut self) -> Result<(usize, EvalBatch)> {
        let k = self.u64()? as usize;
        let kind = if self.u8()? == 1 { PredictionKind::Generated } else { PredictionKind::Argmax };
        let (batch_size, label_len, prediction_len, input_len) = (self.u32()?, self.u32()?, self.u32()?, self.u32()?);
        let labels = self.u32s()?.into_iter().map(|x| x as i32).collect();
        let predictions = self.u32s()?;
        let label_logprob = self.u32s()?.into_iter().map(f32::from_bits).collect();
        let has_inputs = self.u8()? == 1;
        let inputs = self.u32s()?;
        let has_pad = self.u8()? == 1;
        let pad = self.u32()?;
        let inputs = has_inputs.then_some(inputs);
        let pad_token_id = has_pad.then_some(pad);
        Ok((k, EvalBatch { kind, batch_size, label_len, labels, prediction_len, predictions, label_logprob, inputs, input_len, pad_token_id }))
    }
}

impl<B: Backend + Clone, M: TrainerModel<B>> Trainer<B, M> {
    /// The metrics of a split evaluation: every process's batches (`mine`, by batch index) go
    /// to rank 0, whose plugins take them in batch order and compute the metrics (`prefix_`
    /// names); every process returns them.
    pub(super) fn shared_metrics(&mut self, mine: &[(usize, EvalBatch)], prefix: &str) -> Result<Map<String, Value>> {
        let mut bytes = Vec::new();
        for (k, b) in mine {
            encode(*k, b, &mut bytes);
        }
        let gathered = self.step.collective.gather_bytes(&bytes)?;
        let mut text = Vec::new();
        if let Some(all) = gathered {
            let mut batches = Vec::new();
            for bytes in &all {
                let mut r = Reader { bytes, at: 0 };
                while r.at < bytes.len() {
                    batches.push(r.batch()?);
                }
            }
            batches.sort_by_key(|b| b.0);
            for (_, b) in &batches {
                self.plugins.metrics_update(b)?;
            }
            let mut m = Map::new();
            self.plugins.metrics_compute(&mut m, prefix)?;
            text = serde_json::to_vec(&m).unwrap_or_default();
        }
        self.step.collective.broadcast_bytes(&mut text)?;
        serde_json::from_slice(&text).map_err(|e| Error::Invalid(format!("the metrics rank 0 sent could not be read: {e}")))
    }
}
