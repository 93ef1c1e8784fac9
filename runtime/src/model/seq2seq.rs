//! Encoder-decoder models (T5 and BART): loading and saving in transformers' layout, and the
//! forward and backward passes of `T5ForConditionalGeneration` / `BartForConditionalGeneration`
//! over a batch of sources and targets (`seq2seq_pass.rs`). They run on a backend with the
//! encoder-decoder ops ([`Seq2SeqOps`]: the CPU backend).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::io::{self, Dtype};
pub use super::seq2seq_config::{Seq2SeqConfig, Seq2SeqLayout, ENCODER_DECODER};
pub use super::seq2seq_pass::{Seq2SeqActs, Seq2SeqLoss};
use super::LoadOptions;
use crate::backend::seq2seq::Seq2SeqOps;
use crate::error::{Error, Result};
use crate::nn::{GradsMut, Params};
pub use crate::protocol::Seq2SeqBatch;

impl<B: Seq2SeqOps> super::ParamSet<B> for Seq2SeqModel<B> {
    fn backend(&self) -> &B {
        &self.backend
    }
    fn specs(&self) -> &[super::layout::ParamSpec] {
        &self.layout.specs
    }
    fn trainable(&self) -> &[bool] {
        &self.trainable
    }
    fn params_mut(&mut self) -> super::ParamsMut<'_, B> {
        super::ParamsMut { backend: &self.backend, specs: &self.layout.specs, trainable: &self.trainable, params: &mut self.params }
    }
}

/// An encoder-decoder model on a backend: config, layout and one buffer per parameter.
pub struct Seq2SeqModel<B: Seq2SeqOps> {
    pub backend: B,
    pub config: Seq2SeqConfig,
    pub layout: Seq2SeqLayout,
    pub params: Vec<B::Buf>,
    pub trainable: Vec<bool>,
    /// The dtype the weights were stored in (and are saved in by default).
    pub dtype: Dtype,
    pub source: Option<PathBuf>,
    /// Keep only each layer's input in a training pass and recompute the layer in the backward
    /// pass (`gradient_checkpointing`).
    pub gradient_checkpointing: bool,
}

impl<B: Seq2SeqOps> Seq2SeqModel<B> {
    /// `from_pretrained`: `config.json` and the safetensors weights of a model folder. A stored
    /// `lm_head.weight` makes the head untied whatever the config says (transformers 5 keeps a
    /// Flan-T5's head that way); a missing `final_logits_bias` (BART) is zeros.
    pub fn load(backend: B, dir: &Path, opts: LoadOptions) -> Result<Self> {
        let mut config = Seq2SeqConfig::from_dir(dir)?;
        if io::read_headers(dir)?.contains_key("lm_head.weight") {
            config.tied_head = false;
        }
        let layout = Seq2SeqLayout::new(&config);
        let mut params: Vec<Option<B::Buf>> = (0..layout.specs.len()).map(|_| None).collect();
        let (stored, _) = io::load_weights_each(dir, &layout, &mut |i, mut t| {
            if let Some(dt) = opts.torch_dtype {
                dt.round_finite(&mut t, &layout.specs[i].name)?;
            }
            params[i] = Some(backend.upload_vec(t)?);
            Ok(())
        })?;
        let params = params
            .into_iter()
            .zip(&layout.specs)
            .enumerate()
            .map(|(i, (p, s))| match p {
                Some(p) => Ok(p),
                None if layout.logits_bias == Some(i) => backend.zeros(s.numel()),
                None => Err(Error::Invalid(format!("no values for `{}`", s.name))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::with_params(backend, config, layout, params, opts.torch_dtype.unwrap_or(stored), Some(dir.to_path_buf())))
    }

    /// A model of these parts: every parameter trainable but BART's `final_logits_bias` (a
    /// buffer in transformers), no gradient checkpointing.
    fn with_params(backend: B, config: Seq2SeqConfig, layout: Seq2SeqLayout, params: Vec<B::Buf>, dtype: Dtype, source: Option<PathBuf>) -> Self {
        let mut trainable = vec![true; layout.specs.len()];
        if let Some(i) = layout.logits_bias {
            trainable[i] = false;
        }
        Seq2SeqModel { backend, config, layout, params, trainable, dtype, source, gradient_checkpointing: false }
    }

    /// A freshly initialised model, deterministic for a config and seed: transformers'
    /// `_init_weights` spreads (T5's scaled by `initializer_factor`; BART's `init_std`, zero
    /// biases and the `padding_idx` row of the shared embedding zero).
    pub fn from_config(backend: B, config: Seq2SeqConfig, seed: u64) -> Result<Self> {
        let layout = Seq2SeqLayout::new(&config);
        let mut params = Vec::with_capacity(layout.specs.len());
        let (pad, d) = (config.padding_idx(), config.d_model);
        super::init::init_specs(&layout.specs, seed, &mut |i, mut t| {
            if let Some(p) = pad.filter(|_| i == layout.shared) {
                t[p * d..(p + 1) * d].fill(0.0);
            }
            params.push(backend.upload_vec(t)?);
            Ok(())
        })?;
        Ok(Self::with_params(backend, config, layout, params, Dtype::F32, None))
    }

    /// The parameters as host f32 vectors, in the layout's order.
    pub fn tensors(&self) -> Result<Vec<Vec<f32>>> {
        self.params.iter().map(|p| self.backend.download(p)).collect()
    }

    /// transformers' `num_parameters()`: BART's `final_logits_bias` is a buffer, not counted.
    pub fn num_parameters(&self) -> usize {
        self.layout.num_parameters()
    }

    /// Zeroed gradient buffers, one per parameter.
    pub fn zero_grads(&self) -> Result<Vec<B::Buf>> {
        self.layout.specs.iter().map(|s| self.backend.zeros(s.numel())).collect()
    }

    pub(super) fn unit_params(&self) -> Params<'_, B> {
        Params::new(&self.params, &self.trainable)
    }

    pub(super) fn grads_mut<'a>(&'a self, bufs: &'a mut [B::Buf]) -> GradsMut<'a, B> {
        GradsMut { bufs, trainable: &self.trainable }
    }

    /// `save_pretrained`: `config.json` and the weights (sharded above `max_shard_size` bytes),
    /// built under a temporary name and renamed into place.
    pub fn save(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64, overwrite: bool) -> Result<()> {
        crate::files::write_folder_atomically(dir, overwrite, |tmp| self.write_into(tmp, dtype, max_shard_size))
    }

    /// Writes `config.json` and the weights into the existing folder `dir`. The head's tying is
    /// spelled out (`tie_word_embeddings`, and a T5's `scale_decoder_outputs`), so that
    /// transformers 4 and 5 both read the model as it is.
    pub fn write_into(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64) -> Result<()> {
        self.write_into_from(dir, dtype, max_shard_size, &mut |i| self.backend.download(&self.params[i]))
    }

    /// [`Seq2SeqModel::write_into`] with parameter `i`'s values from `source(i)`.
    pub fn write_into_from(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64, source: &mut dyn FnMut(usize) -> Result<Vec<f32>>) -> Result<()> {
        let dtype = dtype.unwrap_or(self.dtype);
        let mut raw = self.config.raw.clone();
        raw.insert("tie_word_embeddings".into(), Value::Bool(self.config.tied_head));
        if matches!(self.config.family, super::seq2seq_config::Family::T5(_)) {
            raw.insert("scale_decoder_outputs".into(), Value::Bool(self.config.scale_decoder_outputs));
        }
        super::write_config_json(dir, raw, dtype, self.config.architecture())?;
        io::write_weights_from(dir, &self.layout, source, dtype, max_shard_size)?;
        super::copy_companions(self.source.as_deref(), dir)
    }
}
