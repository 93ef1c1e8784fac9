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
    /// Dropout probabilities in training (GPT-2: `embd_pdrop`, `resid_pdrop`, `attn_pdrop`,
    /// 0.1 each by default; the Llama family: `attention_dropout`, 0 by default).
    pub dropout: Dropout,
    /// The config's `dtype` (transformers 5) or `torch_dtype` (4.x), when present.
    pub dtype: Option<String>,
    /// The JSON as read.
    pub raw: Map<String, Value>,
}

/// The largest value a size field of `config.json` may hold (2^31): larger ones are beyond any
/// model, and keep every product of two sizes within 64 bits.
const MAX_SIZE: u64 = 1 << 31;

pub(super) struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(super) fn new(path: &'a Path, map: &'a Map<String, Value>) -> Self {
        Fields { path, map }
    }
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
                Some(n) if n > 0 && n <= MAX_SIZE => Ok(Some(n as usize)),
                Some(n) if n > MAX_SIZE => Err(self.err(format!("field `{key}` = {n} is beyond any model's size (at most {MAX_SIZE})"))),
                _ => Err(self.err(format!("field `{key}` must be a positive integer, found {v}"))),
            },
        }
    }
    pub(super) fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.present(key) {
            None => Ok(default),
            // a number beyond f32's range would become infinite as the model reads it
            Some(v) => match v.as_f64().filter(|x| x.is_finite()) {
                Some(x) if (x as f32).is_finite() => Ok(x as f32),
                Some(_) => Err(self.err(format!("field `{key}` = {v} is beyond the range of a 32-bit float"))),
                None => Err(self.err(format!("field `{key}` must be a number, found {v}"))),
            },
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

/// The dropout probabilities a config sets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropout {
    /// On the sum of the input embeddings.
    pub embd: f32,
    /// On each residual branch's output (attention's output projection, the MLP's).
    pub resid: f32,
    /// On the attention probabilities.
    pub attn: f32,
}

impl Fields<'_> {
    /// A dropout probability: a number in [0, 1).
    pub(super) fn prob(&self, key: &str, default: f32) -> Result<f32> {
        let p = self.f32_or(key, default)?;
        if !(0.0..1.0).contains(&p) {
            return Err(self.err(format!("field `{key}` must lie in [0, 1), found {p}")));
        }
        Ok(p)
    }
}

impl ModelConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        crate::files::check_unique_keys(&text, "json").map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
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
        if super::seq2seq::ENCODER_DECODER.contains(&model_type.as_str()) {
            return Err(f.err(format!(
                "`{model_type}` is an encoder-decoder model: `inspect`, `convert` and `forward` take it; this command takes the decoder-only types ({})",
                registry::supported()
            )));
        }
        let family = registry::by_model_type(&model_type)
            .ok_or_else(|| f.err(format!("unsupported model_type `{model_type}` (supported: {})", registry::supported())))?;
        let cfg = (family.config)(&f, model_type.clone())?;
        let dtype = match f.present("dtype").or_else(|| f.present("torch_dtype")) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let cfg = ModelConfig { dtype, raw: raw.clone(), ..cfg };
        let (eps_key, theta) = match cfg.arch {
            Arch::Gpt2 => ("layer_norm_epsilon", None),
            Arch::Llama => ("rms_norm_eps", Some(cfg.rope_theta)),
        };
        if cfg.norm_eps.is_nan() || cfg.norm_eps <= 0.0 {
            return Err(f.err(format!("field `{eps_key}` must be positive, found {}", cfg.norm_eps)));
        }
        if let Some(t) = theta.filter(|t| t.is_nan() || *t <= 0.0) {
            return Err(f.err(format!("field `rope_theta` must be positive, found {t}")));
        }
        if cfg.initializer_range.is_nan() || cfg.initializer_range < 0.0 {
            return Err(f.err(format!("field `initializer_range` must be >= 0, found {}", cfg.initializer_range)));
        }
        Ok(cfg)
    }

    /// The number of parameters the config implies (the layout's count), without building a
    /// layout of every layer: from the layouts of one and of two layers, in 128-bit arithmetic.
    pub fn implied_parameters(&self) -> u128 {
        let count = |n_layer: usize| {
            let cfg = ModelConfig { n_layer, ..self.clone() };
            super::Layout::new(&cfg).specs.iter().map(|s| s.shape.iter().map(|&d| d as u128).product::<u128>()).sum::<u128>()
        };
        let (one, two) = (count(1), count(2));
        one + (two - one) * (self.n_layer as u128).saturating_sub(1)
    }

    /// The config's size fields under their names in `config.json`, for messages.
    pub fn size_fields(&self) -> String {
        let c = self;
        match c.arch {
            Arch::Gpt2 => format!(
                "n_layer {}, n_embd {}, n_head {}, n_inner {}, vocab_size {}, n_positions {}",
                c.n_layer, c.hidden_size, c.n_head, c.intermediate_size, c.vocab_size, c.max_positions
            ),
            Arch::Llama => format!(
                "num_hidden_layers {}, hidden_size {}, num_attention_heads {}, num_key_value_heads {}, intermediate_size {}, vocab_size {}",
                c.n_layer, c.hidden_size, c.n_head, c.n_kv_head, c.intermediate_size, c.vocab_size
            ),
        }
    }

    /// Checks, before anything is allocated, that the config's sizes are not far beyond what the
    /// weight files in `dir` hold (from the files' headers only): a config that implies more
    /// than twice the files' parameters gets one error naming its sizes, instead of an
    /// allocation of them. (A smaller shortfall is a missing or misshapen tensor, which loading
    /// names.)
    pub fn check_against_files(&self, dir: &Path) -> Result<()> {
        let held: u128 = super::io::read_headers(dir)?.values().map(|(_, shape, _)| shape.iter().map(|&d| d as u128).product::<u128>()).sum();
        let implied = self.implied_parameters();
        if implied > 2 * held {
            return Err(Error::config(
                &dir.join("config.json"),
                format!("its sizes ({}) imply {implied} parameters, but the weight files hold {held}", self.size_fields()),
            ));
        }
        Ok(())
    }

    /// Checks, before anything is allocated, that `bytes_per_parameter` bytes per implied
    /// parameter (to `what`: initialise, train) fit in the host memory available.
    pub fn check_memory(&self, path: &Path, bytes_per_parameter: f64, what: &str) -> Result<()> {
        let Some(available) = crate::backend::device::host_memory_budget() else { return Ok(()) };
        let implied = self.implied_parameters();
        let needed = (implied as f64 * bytes_per_parameter) as u128;
        if needed > available {
            let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
            return Err(Error::config(
                path,
                format!(
                    "its sizes ({}) imply {implied} parameters, {:.2} GiB to {what}, but {:.2} GiB of memory is available",
                    self.size_fields(),
                    gib(needed),
                    gib(available)
                ),
            ));
        }
        Ok(())
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
