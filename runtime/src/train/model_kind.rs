//! What the training loop does differently per model kind ([`TrainerModel`]): how examples
//! become a batch, what generation starts from, and the decoding. A decoder-only model pads one
//! sequence per example (through the padding plugin when there is one) and generates from a
//! prompt prefix; an encoder-decoder model collates sources and targets as
//! `DataCollatorForSeq2Seq` does and generates from the whole source, as `Seq2SeqTrainer`.

use crate::backend::seq2seq::Seq2SeqOps;
use crate::backend::Backend;
use crate::data::seq2seq::{collate_seq2seq, Seq2SeqExample};
use crate::data::{pad_batch, Example, PadOptions};
use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
use crate::model::seq2seq::Seq2SeqModel;
use crate::model::{Batch, Model, TrainModel};
use crate::plugin::roles::Plugins;
use crate::protocol::IGNORE_INDEX;

/// A [`TrainModel`] the trainer can also batch, evaluate with generation and predict with.
pub trait TrainerModel<B: Backend>: TrainModel<B> {
    /// The batch of `examples`, padded as `pad` says.
    fn collate(&self, examples: &[Example], pad: &PadOptions, plugins: &Plugins) -> Result<Batch>;
    /// What generation starts from, and the reference it is compared with; `None` when the
    /// example has nothing to generate from or nothing to compare with.
    fn prompt_and_reference(&self, e: &Example) -> Option<(Vec<u32>, Vec<u32>)>;
    /// Generates a continuation (decoder-only) or an output (encoder-decoder) for each prompt.
    fn generate(&self, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>>;
    /// How `predict_with_generate` names what an example needs to generate from.
    fn prompt_needed(&self) -> &'static str;
}

/// The labelled tokens of `labels`, as ids.
fn labelled(labels: &[i32]) -> Vec<u32> {
    labels.iter().filter(|&&l| l >= 0).map(|&l| l as u32).collect()
}

impl<B: Backend> TrainerModel<B> for Model<B> {
    fn collate(&self, examples: &[Example], pad: &PadOptions, plugins: &Plugins) -> Result<Batch> {
        let c = &self.config;
        match plugins.pad(examples, pad, c.vocab_size, c.max_positions) {
            Some(b) => b,
            None => pad_batch(examples, pad),
        }
    }
    /// The prompt is the example's unlabelled prefix (a prompt/completion record's prompt, a
    /// conversation up to the reply), the reference its labelled tokens.
    fn prompt_and_reference(&self, e: &Example) -> Option<(Vec<u32>, Vec<u32>)> {
        let start = e.labels.iter().position(|&l| l != IGNORE_INDEX).filter(|&s| s > 0)?;
        Some((e.input_ids[..start].to_vec(), labelled(&e.labels[start..])))
    }
    fn generate(&self, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
        crate::generate::generate(self, prompts, cfg, |_, _| {})
    }
    fn prompt_needed(&self) -> &'static str {
        "unlabelled prompt tokens followed by labelled ones: prompt/completion or messages records"
    }
}

impl<B: Seq2SeqOps> TrainerModel<B> for Seq2SeqModel<B> {
    /// `DataCollatorForSeq2Seq`: an example's `input_ids` are its source, its `labels` its
    /// target; `pad`'s side, pad id and `pad_to_multiple_of` apply. A padding plugin pads the
    /// sources (the collator hands the tokenizer's `_pad` the features without their labels);
    /// the labels and `decoder_input_ids` are padded as the collator pads them.
    fn collate(&self, examples: &[Example], pad: &PadOptions, plugins: &Plugins) -> Result<Batch> {
        let pairs: Vec<Seq2SeqExample> = examples.iter().map(|e| Seq2SeqExample { input_ids: e.input_ids.clone(), labels: labelled(&e.labels) }).collect();
        let start = self.config.decoder_start_token_id as u32;
        let mut batch = collate_seq2seq(&pairs, pad.pad_id, start, pad.side, pad.pad_to_multiple_of)?;
        if !plugins.has_padding() {
            return Ok(batch.into_batch());
        }
        let sources: Vec<Example> =
            examples.iter().map(|e| Example { input_ids: e.input_ids.clone(), labels: vec![IGNORE_INDEX; e.input_ids.len()] }).collect();
        let limit = self.config.max_positions().unwrap_or(u32::MAX as usize);
        if let Some(padded) = plugins.pad(&sources, pad, self.config.vocab_size, limit) {
            let p = padded?;
            let mask = p.attention_mask.unwrap_or_else(|| vec![1; p.input_ids.len()]);
            if p.batch != pairs.len() || p.seq == 0 || p.input_ids.len() != p.batch * p.seq || mask.len() != p.input_ids.len() {
                return Err(Error::Plugin(format!(
                    "the padding plugin returned a batch of {} x {} with {} ids and {} mask values for {} sources; it must be one row per source, each as long as the batch's sequence length",
                    p.batch,
                    p.seq,
                    p.input_ids.len(),
                    mask.len(),
                    pairs.len()
                )));
            }
            (batch.src_len, batch.input_ids, batch.attention_mask) = (p.seq, p.input_ids, mask);
        }
        Ok(batch.into_batch())
    }
    /// The whole source, and the whole target.
    fn prompt_and_reference(&self, e: &Example) -> Option<(Vec<u32>, Vec<u32>)> {
        let reference = labelled(&e.labels);
        (!e.input_ids.is_empty() && !reference.is_empty()).then(|| (e.input_ids.clone(), reference))
    }
    fn generate(&self, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
        crate::generate::seq2seq::generate_seq2seq(self, prompts, cfg, |_, _| {})
    }
    fn prompt_needed(&self) -> &'static str {
        "a source and a target"
    }
}
