//! `config.json` for the supported architectures: GPT-2 (`GPT2LMHeadModel`) and the Llama family
//! (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`). Structural sizes are required;
//! optional fields take transformers' defaults. The file's JSON is kept as read so that a saved
//! model carries the user's config unchanged.

use std::path::Path;

use serde_json::{Map, Value};

use super::registry;
use crate::error::{Error, Result};

/// The two model shapes the engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Learned positions, LayerNorm with bias, GELU (tanh) MLP, biases everywhere, `Conv1D` weights.
    Gpt2,
    /// RoPE, RMSNorm, SwiGLU MLP, optional biases, grouped-query attention.
    Llama,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// `model_type` as written: `gpt2`, `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// MLP width (`n_inner` for GPT-2, `intermediate_size` for Llama).
    pub intermediate_size: usize,
    /// `n_positions` / `max_position_embeddings`.
    pub max_positions: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub initializer_range: f32,
    pub pad_token_id: Option<usize>,
    /// Mistral's sliding window, when enabled.
    pub sliding_window: Option<usize>,
    /// The config's `dtype` (transformers 5) or `torch_dtype` (4.x), when present.
    pub dtype: Option<String>,
    /// The JSON as read.
    pub raw: Map<String, Value>,
}

pub(super) struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    pub(super) fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }
    pub(super) fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    pub(super) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(format!("missing field `{key}`")))
    }
    pub(super) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.err(format!("field `{key}` must be a positive integer, found {v}"))),
            },
        }
    }
    pub(super) fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(|x| x as f32).ok_or_else(|| self.err(format!("field `{key}` must be a number, found {v}"))),
        }
    }
    pub(super) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("field `{key}` must be true or false, found {v}"))),
        }
    }
    pub(super) fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.err(format!("field `{key}` must be a string, found {v}"))),
        }
    }
    pub(super) fn token_id(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None if v.is_array() => Ok(None), // several ids (eos lists) are a generation setting
                None => Err(self.err(format!("field `{key}` must be a token id, found {v}"))),
            },
        }
    }
}

impl ModelConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        match value {
            Value::Object(map) => Self::from_json(path, map),
            _ => Err(Error::config(path, "expected a JSON object")),
        }
    }

    pub fn from_json(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let f = Fields { path, map: &raw };
        let model_type = match f.present("model_type") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(f.err(format!("field `model_type` must be a string, found {v}"))),
            None => return Err(f.err(format!("missing field `model_type` (supported: {})", registry::supported()))),
        };
        let family = registry::by_model_type(&model_type)
            .ok_or_else(|| f.err(format!("unsupported model_type `{model_type}` (supported: {})", registry::supported())))?;
        let cfg = (family.config)(&f, model_type.clone())?;
        let dtype = match f.present("dtype").or_else(|| f.present("torch_dtype")) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(ModelConfig { dtype, raw: raw.clone(), ..cfg })
    }

    /// The `architectures` entry transformers writes for this model type.
    pub fn architecture_name(&self) -> &'static str {
        let family = registry::by_arch(self.arch);
        family.model_types.iter().find(|(t, _)| *t == self.model_type).unwrap_or(&family.model_types[0]).1
    }

    /// The positions a sequence may use: learned position embeddings (GPT-2) stop at
    /// `n_positions`; rotary positions (the Llama family) have no table to run off.
    pub fn position_limit(&self) -> Option<usize> {
        (self.arch == Arch::Gpt2).then_some(self.max_positions)
    }

    /// Width of each row of the fused q/k/v projection.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }

    /// Width of the first MLP projection (`4C` for GPT-2, `2 * intermediate` for gate + up).
    pub fn fc_width(&self) -> usize {
        match self.arch {
            Arch::Gpt2 => self.intermediate_size,
            Arch::Llama => 2 * self.intermediate_size,
        }
    }
}
