//! What the engine and the trainer need of a model kind ([`TrainModel`]): the decoder-only
//! [`Model`] and the encoder-decoder [`Seq2SeqModel`] are both one, so one optimizer step and one
//! training loop serve both.

use std::path::Path;

use serde_json::{Map, Value};

use super::decoder::{GradsReady, Neftune};
use super::head::{custom_loss_on_logits, custom_loss_setup, LogitsOf};
use super::io::Dtype;
use super::seq2seq::{Seq2SeqActs, Seq2SeqLoss, Seq2SeqModel};
use super::{Activations, Device, Grads, LoadOptions, LossOptions, LossOutput, Model, ParamSet};
use crate::backend::seq2seq::Seq2SeqOps;
use crate::backend::{Backend, StatsWanted, TokenStats};
use crate::error::{Error, Result};
use crate::protocol::{label_tokens, Batch, CustomLoss, Seq2SeqBatch};

/// How a training pass's loss is computed: the built-in cross-entropy (with its options), or a
/// loss from outside the engine (a plugin's) with the divisor `num_items_in_batch`.
pub enum PassLoss<'a, 'b> {
    BuiltIn(LossOptions),
    Custom(&'a mut CustomLoss<'b>, Option<usize>),
}

/// What keeps one weight tensor of a checkpoint as it is read ([`TrainModel::reload`]): given
/// its index and values, it returns what the model itself holds (all of it, or nothing when the
/// pieces live elsewhere).
pub type Keep<'a> = dyn FnMut(usize, Vec<f32>) -> Vec<f32> + 'a;

/// A model the engine can train and the trainer can evaluate, save and reload.
pub trait TrainModel<B: Backend>: ParamSet<B> {
    /// A pass's saved state and scratch (made once, reused while the shapes stay).
    type Acts;
    /// transformers' class name (`LlamaForCausalLM`, `T5ForConditionalGeneration`).
    fn architecture_name(&self) -> String;
    /// The model's `config.json` as read (or made).
    fn raw_config(&self) -> &Map<String, Value>;
    fn params(&self) -> &[B::Buf];
    /// Bytes of weights held outside [`TrainModel::params`] (frozen weights kept in bf16).
    fn held_bytes(&self) -> usize {
        0
    }
    fn num_parameters(&self) -> usize;
    /// Elements a checkpoint or the output folder holds of the weights (with a LoRA adapter,
    /// the trainable ones only).
    fn saved_numel(&self) -> usize;
    /// The dtype the weights were stored in (and the output is saved in).
    fn dtype(&self) -> Dtype;
    fn vocab_size(&self) -> usize;
    /// Whether batches carry decoder inputs (sources and targets) rather than one sequence.
    fn is_encoder_decoder(&self) -> bool;
    /// Zeroed gradients, one buffer per parameter.
    fn zero_grads(&self) -> Result<Grads<B>>;
    /// A pass's workspace, sized for `batch` x `seq` where the kind sizes up front.
    fn workspace(&self, batch: usize, seq: usize) -> Result<Self::Acts>;
    /// The dropout key of the next pass (`None`: no dropout).
    fn set_dropout(acts: &mut Self::Acts, key: Option<u64>);
    /// The groups of parameters [`TrainModel::train_pass`] tells `ready` of, in the order it
    /// tells them (a data-parallel collective lays its sums out in this order). The default: one
    /// group of every parameter, told at the end of the backward pass.
    fn grad_groups(&self) -> Vec<Vec<usize>> {
        vec![(0..self.params().len()).collect()]
    }
    /// Forward, loss and backward for one micro-batch, accumulating into `grads`; `ready` is told
    /// each group of gradients as it is complete.
    fn train_pass(
        &self,
        acts: &mut Self::Acts,
        b: &Batch,
        grads: &mut Grads<B>,
        loss: PassLoss,
        neftune: Option<Neftune>,
        ready: &mut GradsReady<B>,
    ) -> Result<LossOutput>;
    /// The built-in evaluation loss (`None` without labels) and the per-token statistics `want`s.
    fn eval_loss(&self, acts: &mut Self::Acts, b: &Batch, loss: LossOptions, want: Option<StatsWanted>) -> Result<(Option<LossOutput>, Option<TokenStats>)>;
    /// The evaluation loss from a plugin's loss, and the statistics `want`s.
    fn eval_custom(&self, acts: &mut Self::Acts, b: &Batch, custom: &mut CustomLoss, want: Option<StatsWanted>) -> Result<(LossOutput, Option<TokenStats>)>;
    /// Writes the model in transformers' layout into `dir`, parameter `i`'s values from `source(i)`.
    fn write_into_from(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64, source: &mut dyn FnMut(usize) -> Result<Vec<f32>>) -> Result<()>;
    /// Replaces the weights with a saved folder's (a checkpoint of this run), each tensor passed
    /// through `keep` when given.
    fn reload(&mut self, dir: &Path, keep: Option<&mut Keep>) -> Result<()>
    where
        B: Clone;
}

fn differs(dir: &Path) -> Error {
    Error::Invalid(format!("{}: the checkpoint's model differs from the run's", dir.display()))
}

impl<B: Backend> TrainModel<B> for Model<B> {
    type Acts = Activations<B>;
    fn architecture_name(&self) -> String {
        self.config.architecture_name().to_string()
    }
    fn raw_config(&self) -> &Map<String, Value> {
        &self.config.raw
    }
    fn params(&self) -> &[B::Buf] {
        &self.params
    }
    fn held_bytes(&self) -> usize {
        self.frozen.as_ref().map_or(0, |f| f.bytes())
    }
    fn num_parameters(&self) -> usize {
        Model::num_parameters(self)
    }
    fn saved_numel(&self) -> usize {
        match self.lora {
            Some(_) => self.layout.specs.iter().zip(&self.trainable).filter(|(_, &t)| t).map(|(s, _)| s.numel()).sum(),
            None => self.layout.numel(),
        }
    }
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn is_encoder_decoder(&self) -> bool {
        false
    }
    fn zero_grads(&self) -> Result<Grads<B>> {
        Grads::zeros(self)
    }
    fn grad_groups(&self) -> Vec<Vec<usize>> {
        Model::grad_groups(self)
    }
    fn workspace(&self, batch: usize, seq: usize) -> Result<Activations<B>> {
        Activations::new(self, batch, seq)
    }
    fn set_dropout(acts: &mut Activations<B>, key: Option<u64>) {
        acts.set_dropout(key);
    }
    fn train_pass(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        grads: &mut Grads<B>,
        loss: PassLoss,
        neftune: Option<Neftune>,
        ready: &mut GradsReady<B>,
    ) -> Result<LossOutput> {
        match loss {
            PassLoss::BuiltIn(opts) => self.forward_backward_with(acts, b, grads, opts, neftune, ready),
            PassLoss::Custom(custom, items) => self.forward_backward_custom(acts, b, grads, custom, items, neftune, ready),
        }
    }
    fn eval_loss(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        loss: LossOptions,
        want: Option<StatsWanted>,
    ) -> Result<(Option<LossOutput>, Option<TokenStats>)> {
        Model::eval_loss(self, acts, b, loss, want)
    }
    fn eval_custom(
        &self,
        acts: &mut Activations<B>,
        b: &Batch,
        custom: &mut CustomLoss,
        want: Option<StatsWanted>,
    ) -> Result<(LossOutput, Option<TokenStats>)> {
        Model::eval_custom(self, acts, b, custom, want)
    }
    fn write_into_from(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64, source: &mut dyn FnMut(usize) -> Result<Vec<f32>>) -> Result<()> {
        Model::write_into_from(self, dir, dtype, max_shard_size, source)
    }
    /// With a LoRA adapter, the adapter's weights only.
    fn reload(&mut self, dir: &Path, keep: Option<&mut Keep>) -> Result<()>
    where
        B: Clone,
    {
        if self.lora.is_some() {
            return self.reload_adapter(dir);
        }
        let opts = LoadOptions { torch_dtype: None, attn_implementation: self.attn_impl, device: Device::Cpu };
        let loaded = match keep {
            Some(keep) => Model::load_keeping(self.backend.clone(), dir, opts, keep)?,
            None => Model::load(self.backend.clone(), dir, opts)?,
        };
        if loaded.layout.numel() != self.layout.numel() {
            return Err(differs(dir));
        }
        self.params = loaded.params;
        Ok(())
    }
}

/// An encoder-decoder pass's workspace: the previous pass's buffers, reused while the shapes stay.
pub struct Seq2SeqWork<B: Seq2SeqOps> {
    acts: Option<Seq2SeqActs<B>>,
    /// The next training pass's dropout key and NEFTune noise.
    dropout: Option<u64>,
    neftune: Option<Neftune>,
}

impl<B: Seq2SeqOps> Seq2SeqModel<B> {
    /// A forward pass in `work`'s buffers (left in `work.acts`); a training pass (`train`) with
    /// its dropout, and with `grad_scale` the built-in loss's gradient in place of the logits.
    fn pass(&self, work: &mut Seq2SeqWork<B>, b: &Batch, smoothing: f32, (train, grad_scale): (bool, Option<f32>)) -> Result<(Seq2SeqBatch, Seq2SeqLoss)> {
        let sb = Seq2SeqBatch::from_batch(b)?;
        let noise = if train { (work.dropout, work.neftune) } else { (None, None) };
        let (acts, loss) = self.forward_noisy(work.acts.take(), &sb, smoothing, grad_scale, noise)?;
        work.acts = Some(acts);
        Ok((sb, loss))
    }

    /// A plugin's loss on a forward pass's logits (`num_items_in_batch` as in [`LossOptions`]);
    /// in training the logits are replaced by the loss's gradient, ready for the backward pass.
    fn custom_pass(
        &self,
        work: &mut Seq2SeqWork<B>,
        b: &Batch,
        custom: &mut CustomLoss,
        items: Option<usize>,
        train: bool,
    ) -> Result<(Seq2SeqBatch, LossOutput)> {
        let (n_tokens, denom, targets) = custom_loss_setup(b, items)?;
        let (sb, _) = self.pass(work, b, 0.0, (train, None))?;
        let acts = work.acts.as_mut().ok_or_else(no_acts)?;
        let ids = self.backend.upload_ids(&targets)?;
        let on = LogitsOf { logits: &mut acts.logits, target_ids: &ids, targets: &targets, vocab: self.config.vocab_size };
        let loss = custom_loss_on_logits(&self.backend, on, b, custom, denom, train)?;
        let sum = loss as f64 * denom as f64;
        Ok((sb, LossOutput { sum, n_tokens, mean: (sum / n_tokens.max(1) as f64) as f32 }))
    }

    /// The per-token statistics `want`s of the last pass's logits (before a backward pass).
    fn stats(&self, work: &Seq2SeqWork<B>, labels: &[i32], want: Option<StatsWanted>) -> Result<Option<TokenStats>> {
        match (want, &work.acts) {
            (Some(want), Some(acts)) => Ok(Some(self.backend.token_stats(&acts.logits, &self.backend.upload_ids(labels)?, self.config.vocab_size, want)?)),
            _ => Ok(None),
        }
    }
}

impl From<Seq2SeqLoss> for LossOutput {
    fn from(l: Seq2SeqLoss) -> Self {
        LossOutput { sum: l.sum, n_tokens: l.n_tokens, mean: l.mean() }
    }
}

fn no_acts() -> Error {
    Error::Invalid("the pass left no activations".into())
}

impl<B: Seq2SeqOps> TrainModel<B> for Seq2SeqModel<B> {
    type Acts = Seq2SeqWork<B>;
    fn architecture_name(&self) -> String {
        self.config.architecture().into()
    }
    fn raw_config(&self) -> &Map<String, Value> {
        &self.config.raw
    }
    fn params(&self) -> &[B::Buf] {
        &self.params
    }
    fn num_parameters(&self) -> usize {
        Seq2SeqModel::num_parameters(self)
    }
    fn saved_numel(&self) -> usize {
        self.layout.specs.iter().map(|s| s.numel()).sum()
    }
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn is_encoder_decoder(&self) -> bool {
        true
    }
    fn zero_grads(&self) -> Result<Grads<B>> {
        Ok(Grads { tensors: Seq2SeqModel::zero_grads(self)? })
    }
    fn workspace(&self, _batch: usize, _seq: usize) -> Result<Seq2SeqWork<B>> {
        Ok(Seq2SeqWork { acts: None, dropout: None, neftune: None })
    }
    fn set_dropout(work: &mut Seq2SeqWork<B>, key: Option<u64>) {
        work.dropout = key;
    }
    fn train_pass(
        &self,
        work: &mut Seq2SeqWork<B>,
        b: &Batch,
        grads: &mut Grads<B>,
        loss: PassLoss,
        neftune: Option<Neftune>,
        ready: &mut GradsReady<B>,
    ) -> Result<LossOutput> {
        work.neftune = neftune;
        let (sb, out) = match loss {
            PassLoss::BuiltIn(opts) => {
                let n_tokens = label_tokens(b);
                let denom = opts.num_items_in_batch.unwrap_or(n_tokens);
                if denom == 0 {
                    return Err(Error::Invalid("this batch has no label tokens (every label is -100)".into()));
                }
                let (sb, l) = self.pass(work, b, opts.label_smoothing, (true, Some(1.0 / denom as f32)))?;
                (sb, l.into())
            }
            PassLoss::Custom(custom, items) => self.custom_pass(work, b, custom, items, true)?,
        };
        let acts = work.acts.as_mut().ok_or_else(no_acts)?;
        self.backward(acts, &sb, &mut grads.tensors)?;
        // the whole backward pass is one group: every gradient is complete at its end
        let all: Vec<usize> = (0..self.params.len()).collect();
        ready(&all, &mut grads.tensors);
        Ok(out)
    }
    fn eval_loss(
        &self,
        work: &mut Seq2SeqWork<B>,
        b: &Batch,
        loss: LossOptions,
        want: Option<StatsWanted>,
    ) -> Result<(Option<LossOutput>, Option<TokenStats>)> {
        let (sb, out) = self.pass(work, b, loss.label_smoothing, (false, None))?;
        let stats = self.stats(work, &sb.labels, want)?;
        let out = (b.labels.is_some() && out.n_tokens > 0).then(|| out.into());
        Ok((out, stats))
    }
    fn eval_custom(
        &self,
        work: &mut Seq2SeqWork<B>,
        b: &Batch,
        custom: &mut CustomLoss,
        want: Option<StatsWanted>,
    ) -> Result<(LossOutput, Option<TokenStats>)> {
        let (sb, out) = self.custom_pass(work, b, custom, None, false)?;
        Ok((out, self.stats(work, &sb.labels, want)?))
    }
    fn write_into_from(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64, source: &mut dyn FnMut(usize) -> Result<Vec<f32>>) -> Result<()> {
        Seq2SeqModel::write_into_from(self, dir, dtype, max_shard_size, source)
    }
    fn reload(&mut self, dir: &Path, keep: Option<&mut Keep>) -> Result<()>
    where
        B: Clone,
    {
        let mut loaded = Seq2SeqModel::load(self.backend.clone(), dir, LoadOptions { device: Device::Cpu, ..LoadOptions::default() })?;
        if loaded.layout.specs.len() != self.layout.specs.len() || Seq2SeqModel::num_parameters(&loaded) != Seq2SeqModel::num_parameters(self) {
            return Err(differs(dir));
        }
        if let Some(keep) = keep {
            for (i, p) in loaded.params.iter_mut().enumerate() {
                let kept = keep(i, self.backend.download(p)?);
                *p = self.backend.upload(&kept)?;
            }
        }
        self.params = loaded.params;
        Ok(())
    }
}
