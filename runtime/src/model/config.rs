//! `config.json` for the supported architectures: GPT-2 (`GPT2LMHeadModel`) and the Llama family
//! (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`). Structural sizes are required;
//! optional fields take transformers' defaults. The file's JSON is kept as read so that a saved
//! model carries the user's config unchanged.

use std::path::Path;

use serde_json::{Map, Value};

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

struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }
    fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(format!("missing field `{key}`")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.err(format!("field `{key}` must be a positive integer, found {v}"))),
            },
        }
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(|x| x as f32).ok_or_else(|| self.err(format!("field `{key}` must be a number, found {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("field `{key}` must be true or false, found {v}"))),
        }
    }
    fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.err(format!("field `{key}` must be a string, found {v}"))),
        }
    }
    fn token_id(&self, key: &str) -> Result<Option<usize>> {
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

pub const SUPPORTED: &str = "gpt2, llama, mistral, qwen2";

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
            None => return Err(f.err(format!("missing field `model_type` (supported: {SUPPORTED})"))),
        };
        let cfg = match model_type.as_str() {
            "gpt2" => Self::gpt2(&f, model_type.clone())?,
            "llama" | "mistral" | "qwen2" => Self::llama(&f, model_type.clone())?,
            other => return Err(f.err(format!("unsupported model_type `{other}` (supported: {SUPPORTED})"))),
        };
        let dtype = match f.present("dtype").or_else(|| f.present("torch_dtype")) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(ModelConfig { dtype, raw: raw.clone(), ..cfg })
    }

    fn gpt2(f: &Fields, model_type: String) -> Result<Self> {
        let hidden = f.usize("n_embd")?;
        let n_head = f.usize("n_head")?;
        if hidden % n_head != 0 {
            return Err(f.err(format!("`n_embd` ({hidden}) must be divisible by `n_head` ({n_head})")));
        }
        let act = f.str_or("activation_function", "gelu_new")?;
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
            return Err(f.err(format!("unsupported `activation_function` `{act}` (supported: gelu_new, gelu_pytorch_tanh, gelu_fast)")));
        }
        for (key, want) in [("scale_attn_by_inverse_layer_idx", false), ("add_cross_attention", false), ("scale_attn_weights", true)] {
            if f.bool_or(key, want)? != want {
                return Err(f.err(format!("`{key}: {}` is not supported", !want)));
            }
        }
        Ok(ModelConfig {
            model_type,
            arch: Arch::Gpt2,
            vocab_size: f.usize("vocab_size")?,
            hidden_size: hidden,
            n_layer: f.usize("n_layer")?,
            n_head,
            n_kv_head: n_head,
            head_dim: hidden / n_head,
            intermediate_size: f.opt_usize("n_inner")?.unwrap_or(4 * hidden),
            max_positions: f.usize("n_positions")?,
            norm_eps: f.f32_or("layer_norm_epsilon", 1e-5)?,
            rope_theta: 0.0,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
            initializer_range: f.f32_or("initializer_range", 0.02)?,
            pad_token_id: f.token_id("pad_token_id")?,
            sliding_window: None,
            dtype: None,
            raw: Map::new(),
        })
    }

    fn llama(f: &Fields, model_type: String) -> Result<Self> {
        let hidden = f.usize("hidden_size")?;
        let n_head = f.usize("num_attention_heads")?;
        let n_kv_head = f.opt_usize("num_key_value_heads")?.unwrap_or(n_head);
        if n_head % n_kv_head != 0 {
            return Err(f.err(format!("`num_attention_heads` ({n_head}) must be a multiple of `num_key_value_heads` ({n_kv_head})")));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden % n_head == 0 => hidden / n_head,
            None => return Err(f.err(format!("`hidden_size` ({hidden}) must be divisible by `num_attention_heads` ({n_head})"))),
        };
        if head_dim % 2 != 0 {
            return Err(f.err(format!("head dimension {head_dim} must be even for rotary embeddings")));
        }
        let act = f.str_or("hidden_act", "silu")?;
        if act != "silu" {
            return Err(f.err(format!("unsupported `hidden_act` `{act}` (supported: silu)")));
        }
        // transformers 5 nests RoPE settings in `rope_parameters`; 4.x has `rope_theta` + `rope_scaling`
        let mut rope_theta = f.f32_or("rope_theta", if model_type == "qwen2" { 1e6 } else { 1e4 })?;
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(v) = f.present(key) {
                let Some(obj) = v.as_object() else {
                    return Err(f.err(format!("field `{key}` must be an object, found {v}")));
                };
                let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(f.err(format!("`{key}.rope_type` `{kind}` is not supported (supported: default)")));
                }
                if let Some(t) = obj.get("rope_theta").and_then(Value::as_f64) {
                    rope_theta = t as f32;
                }
            }
        }
        let attention_bias = f.bool_or("attention_bias", false)?;
        let qwen2 = model_type == "qwen2";
        let sliding_window = match model_type.as_str() {
            "mistral" => f.opt_usize("sliding_window")?,
            "qwen2" if f.bool_or("use_sliding_window", false)? => f.opt_usize("sliding_window")?,
            _ => None,
        };
        Ok(ModelConfig {
            arch: Arch::Llama,
            vocab_size: f.usize("vocab_size")?,
            hidden_size: hidden,
            n_layer: f.usize("num_hidden_layers")?,
            n_head,
            n_kv_head,
            head_dim,
            intermediate_size: f.usize("intermediate_size")?,
            max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: !qwen2 && f.bool_or("mlp_bias", false)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            initializer_range: f.f32_or("initializer_range", 0.02)?,
            pad_token_id: f.token_id("pad_token_id")?,
            sliding_window,
            dtype: None,
            raw: Map::new(),
            model_type,
        })
    }

    /// The `architectures` entry transformers writes for this model type.
    pub fn architecture_name(&self) -> &'static str {
        match self.model_type.as_str() {
            "gpt2" => "GPT2LMHeadModel",
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        }
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
