//! Models: configuration, the parameter layout and its Hugging Face names, weight files, the
//! initialiser, and the decoder's forward and backward passes.

pub mod activations;
pub mod adapter;
pub mod bart;
pub mod config;
pub mod decoder;
pub mod frozen;
mod gpt2;
pub mod head;
pub mod init;
pub mod io;
pub mod kind;
pub mod layout;
mod llama;
pub mod lora;
pub mod registry;
pub mod residency;
pub mod seq2seq;
mod seq2seq_acts;
mod seq2seq_backward;
pub mod seq2seq_config;
mod seq2seq_decode;
mod seq2seq_pass;
pub use seq2seq_decode::Seq2SeqDecode;
pub mod t5;
mod units;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use activations::{Activations, Grads};
pub use config::{Arch, ModelConfig};
pub use decoder::{Batch, GradsReady, Neftune};
pub use head::{LossOptions, LossOutput};
pub use io::Dtype;
pub use kind::{PassLoss, TrainModel};
pub use layout::Layout;

pub use crate::backend::device::{Device, Selected};
use crate::backend::{AttnImpl, Backend};
use crate::error::{Error, Result};
use crate::files::write_file;

/// Loading options under transformers' names (`from_pretrained(torch_dtype=..., attn_implementation=...)`).
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// The precision of the weights. The CPU backend computes in f32; `bfloat16` rounds the weights
    /// to bf16 on load (what transformers' bf16 model holds) and saves them as bf16. `None`: f32.
    pub torch_dtype: Option<Dtype>,
    pub attn_implementation: AttnImpl,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { torch_dtype: None, attn_implementation: AttnImpl::Flash, device: Device::Auto }
    }
}

/// A model's parameters as an optimizer sees them: the tensors in layout order, their specs
/// (names, shapes, weight decay) and which of them train. Both model kinds (decoder-only
/// [`Model`], encoder-decoder [`seq2seq::Seq2SeqModel`]) are one.
pub trait ParamSet<B: Backend> {
    fn backend(&self) -> &B;
    fn specs(&self) -> &[layout::ParamSpec];
    fn trainable(&self) -> &[bool];
    /// The parameters, with what an update reads beside them.
    fn params_mut(&mut self) -> ParamsMut<'_, B>;
}

/// The parameters, mutable, and the rest of a [`ParamSet`] borrowed beside them.
pub struct ParamsMut<'a, B: Backend> {
    pub backend: &'a B,
    pub specs: &'a [layout::ParamSpec],
    pub trainable: &'a [bool],
    pub params: &'a mut [B::Buf],
}

impl<B: Backend> ParamSet<B> for Model<B> {
    fn backend(&self) -> &B {
        &self.backend
    }
    fn specs(&self) -> &[layout::ParamSpec] {
        &self.layout.specs
    }
    fn trainable(&self) -> &[bool] {
        &self.trainable
    }
    fn params_mut(&mut self) -> ParamsMut<'_, B> {
        ParamsMut { backend: &self.backend, specs: &self.layout.specs, trainable: &self.trainable, params: &mut self.params }
    }
}

/// A model on a backend: config, layout, and one buffer per parameter tensor.
pub struct Model<B: Backend> {
    pub backend: B,
    pub config: ModelConfig,
    pub layout: Layout,
    pub params: Vec<B::Buf>,
    /// Which parameters train (all, unless frozen): a frozen one gets no gradient product and
    /// no optimizer state update.
    pub trainable: Vec<bool>,
    pub attn_impl: AttnImpl,
    /// The dtype the weights were stored in (and are saved in by default).
    pub dtype: Dtype,
    /// The folder the model came from, if any (tokenizer files are copied from it on save).
    pub source: Option<PathBuf>,
    /// `gradient_checkpointing`: keep only layer inputs and recompute each layer in backward.
    /// Read when an [`Activations`] workspace is made.
    pub gradient_checkpointing: bool,
    /// Recompute each layer's norm outputs and MLP activation in the backward pass instead of
    /// keeping them (one set of buffers for all layers; llm.c's `recompute`). Starts as the
    /// backend prefers (on for the CPU, off for CUDA, where the extra passes cost step time).
    /// Read when an [`Activations`] workspace is made.
    pub recompute_activations: bool,
    /// Rows per chunk of the LM head and loss in training and evaluation (`None`: as many as fit
    /// in the backend's `logits_chunk_floats`, see [`Model::head_chunk_rows`]). Read when an
    /// [`Activations`] workspace is made.
    pub loss_chunk_rows: Option<usize>,
    /// The LoRA adapter, when one is attached (`lora.rs`); its tensors follow the base's in
    /// `params`.
    pub lora: Option<lora::LoraState>,
    /// Under `fsdp = "full_shard"`: where the parameters live (then each buffer of `params` is
    /// empty, and the passes fetch what they need through it; `residency.rs`).
    pub residency: Option<residency::SharedResidency<B>>,
    /// Frozen weights held in bf16 (then their buffers in `params` are empty; `frozen.rs`).
    pub frozen: Option<frozen::FrozenBf16<B>>,
}

/// Files transformers keeps beside the weights that a saved model should carry along.
const COMPANION_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
    "spiece.model",
];

/// Writes `config.json` into `dir`: the config as read, its dtype field set to `dtype` (under the
/// key the file used: `torch_dtype` in transformers 4, `dtype` in 5) and `architectures` added
/// when absent.
pub(super) fn write_config_json(dir: &Path, mut raw: serde_json::Map<String, Value>, dtype: Dtype, architecture: &str) -> Result<()> {
    let key = if raw.contains_key("torch_dtype") && !raw.contains_key("dtype") { "torch_dtype" } else { "dtype" };
    raw.insert(key.into(), Value::String(dtype.hf_name().into()));
    raw.entry("architectures").or_insert_with(|| Value::Array(vec![Value::String(architecture.into())]));
    let text = serde_json::to_string_pretty(&Value::Object(raw)).expect("JSON of JSON");
    write_file(&dir.join("config.json"), format!("{text}\n").as_bytes())
}

/// Copies the tokenizer and generation files of the folder a model came from into `dir`.
pub(super) fn copy_companions(source: Option<&Path>, dir: &Path) -> Result<()> {
    let Some(src) = source else { return Ok(()) };
    for name in COMPANION_FILES {
        let from = src.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            write_file(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

impl<B: Backend> Model<B> {
    /// `from_pretrained`: reads `config.json` and the safetensors weights of a model folder.
    pub fn load(backend: B, dir: &Path, opts: LoadOptions) -> Result<Self> {
        Self::load_keeping(backend, dir, opts, &mut |_, t| t)
    }

    /// [`Model::load`] with each tensor passed through `keep` as it is read (see
    /// [`Model::from_each`]).
    pub fn load_keeping(backend: B, dir: &Path, opts: LoadOptions, keep: &mut dyn FnMut(usize, Vec<f32>) -> Vec<f32>) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        config.check_against_files(dir)?;
        let layout = Layout::new(&config);
        let mut stored = Dtype::F32;
        let produce = |put: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>| -> Result<()> {
            stored = io::load_weights_each(dir, &layout, &mut |i, mut t| {
                if let Some(dt) = opts.torch_dtype {
                    dt.round_finite(&mut t, &layout.specs[i].name)?;
                }
                put(i, t)
            })?
            .0;
            Ok(())
        };
        let mut model = Self::from_each(backend, config, opts, produce, keep)?;
        model.dtype = opts.torch_dtype.unwrap_or(stored);
        model.source = Some(dir.to_path_buf());
        Ok(model)
    }

    /// A model from given f32 tensors in the engine's layout.
    pub fn from_tensors(backend: B, config: ModelConfig, tensors: Vec<Vec<f32>>, opts: LoadOptions) -> Result<Self> {
        let n = Layout::new(&config).specs.len();
        if tensors.len() != n {
            return Err(Error::Invalid(format!("{} tensors given, the layout has {n}", tensors.len())));
        }
        let produce = |put: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>| tensors.into_iter().enumerate().try_for_each(|(i, t)| put(i, t));
        Self::from_each(backend, config, opts, produce, &mut |_, t| t)
    }

    /// A model whose tensors come one at a time from `produce` (which calls its argument with
    /// each parameter's index and values), each checked and passed through `keep` before it is
    /// uploaded: what `keep` returns is what the model holds (the tensor, or nothing when the
    /// weights are sharded over processes and the caller keeps this process's pieces).
    pub fn from_each(
        backend: B,
        config: ModelConfig,
        opts: LoadOptions,
        produce: impl FnOnce(&mut dyn FnMut(usize, Vec<f32>) -> Result<()>) -> Result<()>,
        keep: &mut dyn FnMut(usize, Vec<f32>) -> Vec<f32>,
    ) -> Result<Self> {
        let layout = Layout::new(&config);
        backend.check_head_dim(config.head_dim).map_err(Error::Unsupported)?;
        let mut params: Vec<Option<B::Buf>> = (0..layout.specs.len()).map(|_| None).collect();
        produce(&mut |i, t| {
            let spec = layout.specs.get(i).ok_or_else(|| Error::Invalid(format!("tensor {i} given, the layout has {}", layout.specs.len())))?;
            if t.len() != spec.numel() {
                return Err(Error::Invalid(format!("tensor `{}` has {} values, expected {}", spec.name, t.len(), spec.numel())));
            }
            params[i] = Some(backend.upload_vec(keep(i, t))?);
            Ok(())
        })?;
        let recompute_activations = backend.recompute_activations();
        let params = params
            .into_iter()
            .zip(&layout.specs)
            .map(|(p, s)| p.ok_or_else(|| Error::Invalid(format!("no values given for tensor `{}`", s.name))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            backend,
            config,
            trainable: vec![true; layout.specs.len()],
            layout,
            params,
            attn_impl: opts.attn_implementation,
            dtype: opts.torch_dtype.unwrap_or(Dtype::F32),
            source: None,
            gradient_checkpointing: false,
            recompute_activations,
            loss_chunk_rows: None,
            lora: None,
            residency: None,
            frozen: None,
        })
    }

    /// The parameters as host f32 vectors, in the engine's layout.
    pub fn tensors(&self) -> Result<Vec<Vec<f32>>> {
        (0..self.params.len()).map(|i| self.param_values(i)).collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.layout.numel()
    }

    /// `save_pretrained`: writes `config.json`, the weights (sharded above `max_shard_size`
    /// bytes) and the source folder's tokenizer/generation files into `dir`. The folder is built
    /// under a temporary name and renamed into place, so it is either complete or absent.
    pub fn save(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64, overwrite: bool) -> Result<()> {
        crate::files::write_folder_atomically(dir, overwrite, |tmp| self.write_into(tmp, dtype, max_shard_size))
    }

    /// Writes `config.json`, the weights and the companion files into the existing folder `dir`
    /// (used by [`Model::save`] and by checkpoints, which build their own temporary folder).
    /// With a LoRA adapter attached, what is written is the adapter folder PEFT writes
    /// (`adapter_config.json`, `adapter_model.safetensors`) and the companion files, not the base.
    pub fn write_into(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64) -> Result<()> {
        self.write_into_from(dir, dtype, max_shard_size, &mut |i| self.param_values(i))
    }

    /// [`Model::write_into`] with each parameter's values from `source` (by index in the
    /// layout), asked for as the weight files are written: a model whose weights are sharded
    /// over processes is saved a gathered tensor at a time.
    pub fn write_into_from(&self, dir: &Path, dtype: Option<Dtype>, max_shard_size: u64, source: &mut dyn FnMut(usize) -> Result<Vec<f32>>) -> Result<()> {
        if self.lora.is_some() {
            self.write_adapter_into(dir)?;
            return self.copy_companions(dir);
        }
        let dtype = dtype.unwrap_or(self.dtype);
        write_config_json(dir, self.config.raw.clone(), dtype, self.config.architecture_name())?;
        io::write_weights_from(dir, &self.layout, source, dtype, max_shard_size)?;
        self.copy_companions(dir)
    }

    /// Copies the source folder's tokenizer and generation files into `dir`.
    fn copy_companions(&self, dir: &Path) -> Result<()> {
        copy_companions(self.source.as_deref(), dir)
    }
}
