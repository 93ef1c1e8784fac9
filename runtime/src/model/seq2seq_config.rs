//! What the encoder-decoder families share: one config shape ([`Seq2SeqConfig`]) and one
//! parameter layout ([`Seq2SeqLayout`]) for T5 (`t5.rs`) and BART (`bart.rs`), which each read
//! their own `config.json` fields and name their own tensors. The passes (`seq2seq_pass.rs`)
//! read what differs from here: pre- or post-layer norm, RMS norm or LayerNorm, biases, the
//! position scheme (T5's relative bias, BART's learned table), the embedding's scale and norm,
//! attention scaling, and the head's rescale or bias.

use std::path::Path;

use serde_json::{Map, Value};

use super::config::Fields;
use super::layout::{HfPart, Init, ParamSpec, WeightSet};
use crate::error::{Error, Result};
use crate::nn::NormKind;

/// The encoder-decoder `model_type`s the engine reads.
pub const ENCODER_DECODER: &[&str] = &["t5", "bart"];

/// The feed-forward's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForward {
    /// `wo(relu(wi x))` (T5 v1.0; BART's `activation_function: relu`).
    Relu,
    /// `wo(gelu_new(wi_0 x) * wi_1 x)` (T5 v1.1, Flan-T5: `gated-gelu`).
    GatedGelu,
    /// `fc2(gelu(fc1 x))` with the exact (erf) GELU (BART's default `gelu`).
    Gelu,
    /// `fc2(gelu_new(fc1 x))`, the tanh approximation (BART's `gelu_new`).
    GeluNew,
}

/// T5's own settings.
#[derive(Clone, Copy, Debug)]
pub struct T5Parts {
    /// `relative_attention_num_buckets`, `relative_attention_max_distance`.
    pub num_buckets: usize,
    pub max_distance: usize,
    pub initializer_factor: f32,
}

/// BART's own settings.
#[derive(Clone, Copy, Debug)]
pub struct BartParts {
    /// `max_position_embeddings`: the longest source or target (the table has 2 more rows).
    pub max_positions: usize,
    /// The token embedding is scaled by `sqrt(d_model)`.
    pub scale_embedding: bool,
    pub init_std: f32,
}

#[derive(Clone, Copy, Debug)]
pub enum Family {
    T5(T5Parts),
    Bart(BartParts),
}

#[derive(Clone, Debug)]
pub struct Seq2SeqConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub d_model: usize,
    /// One head's width.
    pub d_kv: usize,
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub eps: f32,
    pub ff: FeedForward,
    /// The LM head is the shared embedding.
    pub tied_head: bool,
    /// The decoder output is scaled by `d_model ** -0.5` before the head (T5's tied head).
    pub scale_decoder_outputs: bool,
    pub pad_token_id: usize,
    pub eos_token_id: Option<usize>,
    pub decoder_start_token_id: usize,
    /// Dropout on the embeddings and each sublayer's output (T5 `dropout_rate`, BART `dropout`).
    pub dropout_rate: f32,
    /// On the attention probabilities (BART `attention_dropout`; `None`: `dropout_rate`, as T5).
    pub attention_dropout: Option<f32>,
    /// After the feed-forward's activation (BART `activation_dropout`; `None`: `dropout_rate`).
    pub activation_dropout: Option<f32>,
    /// The JSON as read (written back unchanged on save).
    pub raw: Map<String, Value>,
}

impl Seq2SeqConfig {
    /// Reads a config by its `model_type` (`t5` or `bart`).
    pub fn from_json(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let f = Fields::new(path, &raw);
        let cfg = match f.str_or("model_type", "")? {
            "t5" => super::t5::config(&f, &raw)?,
            "bart" => super::bart::config(&f, &raw)?,
            other => return Err(f.err(format!("`model_type` `{other}` is not an encoder-decoder type the runtime reads ({})", ENCODER_DECODER.join(", ")))),
        };
        let eps_key = if matches!(cfg.family, Family::T5(_)) { "layer_norm_epsilon" } else { "layer_norm_eps" };
        if cfg.eps.is_nan() || cfg.eps <= 0.0 {
            return Err(f.err(format!("field `{eps_key}` must be positive, found {}", cfg.eps)));
        }
        for (key, id) in
            [("pad_token_id", Some(cfg.pad_token_id)), ("decoder_start_token_id", Some(cfg.decoder_start_token_id)), ("eos_token_id", cfg.eos_token_id)]
        {
            if id.is_some_and(|id| id >= cfg.vocab_size) {
                return Err(f.err(format!("field `{key}` = {} is outside the vocabulary ({} tokens)", id.unwrap_or(0), cfg.vocab_size)));
            }
        }
        Ok(cfg)
    }

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

    /// The width of the packed attention heads (`num_heads * d_kv`).
    pub fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// The width of the feed-forward's first product (both halves when gated).
    pub fn wi_width(&self) -> usize {
        match self.ff {
            FeedForward::GatedGelu => 2 * self.d_ff,
            _ => self.d_ff,
        }
    }

    pub fn attn_dropout(&self) -> f32 {
        self.attention_dropout.unwrap_or(self.dropout_rate)
    }

    pub fn act_dropout(&self) -> f32 {
        self.activation_dropout.unwrap_or(self.dropout_rate)
    }

    /// Each sublayer's norm comes after its residual add (BART) instead of before the sublayer (T5).
    pub fn post_norm(&self) -> bool {
        matches!(self.family, Family::Bart(_))
    }

    /// T5's RMS norm (no mean, no bias) or BART's LayerNorm.
    pub fn norm_kind(&self) -> NormKind {
        match self.family {
            Family::T5(_) => NormKind::RmsNorm,
            Family::Bart(_) => NormKind::LayerNorm,
        }
    }

    /// The attention scores' scale: 1 for T5 (folded into its initialisation), `d_kv ** -0.5`.
    pub fn attn_scale(&self) -> f32 {
        match self.family {
            Family::T5(_) => 1.0,
            Family::Bart(_) => (self.d_kv as f32).powf(-0.5),
        }
    }

    /// The token embedding's scale (BART's `scale_embedding`: `sqrt(d_model)`).
    pub fn embed_scale(&self) -> f32 {
        match self.family {
            Family::Bart(b) if b.scale_embedding => (self.d_model as f32).sqrt(),
            _ => 1.0,
        }
    }

    /// The longest source or target the model has positions for (T5's relative positions have
    /// no limit).
    pub fn max_positions(&self) -> Option<usize> {
        match self.family {
            Family::T5(_) => None,
            Family::Bart(b) => Some(b.max_positions),
        }
    }

    /// The shared embedding's `padding_idx` (BART's: that row gets no gradient from a lookup).
    pub fn padding_idx(&self) -> Option<usize> {
        matches!(self.family, Family::Bart(_)).then_some(self.pad_token_id)
    }

    pub fn model_type(&self) -> &'static str {
        match self.family {
            Family::T5(_) => "t5",
            Family::Bart(_) => "bart",
        }
    }

    pub fn architecture(&self) -> &'static str {
        match self.family {
            Family::T5(_) => "T5ForConditionalGeneration",
            Family::Bart(_) => "BartForConditionalGeneration",
        }
    }

    /// An error when a source of `src` tokens or a target of `tgt` tokens is longer than the
    /// model has positions for.
    pub fn check_lengths(&self, src: usize, tgt: usize) -> Result<()> {
        let Some(max) = self.max_positions() else { return Ok(()) };
        for (what, n, fix) in [("source", src, "max_source_length"), ("target", tgt, "max_target_length (or generation_max_length)")] {
            if n > max {
                return Err(Error::Invalid(format!(
                    "a {what} of {n} tokens is longer than the model's limit (`max_position_embeddings` = {max}); set {fix} to at most {max}"
                )));
            }
        }
        Ok(())
    }
}

/// A linear map's weight and bias.
#[derive(Clone, Copy, Debug)]
pub struct Lin {
    pub w: usize,
    pub b: Option<usize>,
}

/// A norm's weight and bias.
#[derive(Clone, Copy, Debug)]
pub struct NormP {
    pub w: usize,
    pub b: Option<usize>,
}

/// Cross attention's tensors in a decoder layer.
#[derive(Clone, Copy, Debug)]
pub struct CrossParams {
    pub ln: NormP,
    pub q: Lin,
    pub k: Lin,
    pub v: Lin,
    pub o: Lin,
}

/// One layer's tensors (indices into [`Seq2SeqLayout::specs`]). Each norm belongs to the
/// sublayer it normalises the input (T5) or the output (BART) of.
#[derive(Clone, Copy, Debug)]
pub struct LayerParams {
    pub ln_attn: NormP,
    pub q: Lin,
    pub k: Lin,
    pub v: Lin,
    pub o: Lin,
    /// Decoder layers only.
    pub cross: Option<CrossParams>,
    pub ln_ff: NormP,
    pub wi: Lin,
    pub wo: Lin,
}

/// The encoder or the decoder.
#[derive(Clone, Debug)]
pub struct StackParams {
    pub layers: Vec<LayerParams>,
    /// T5: the first layer's `relative_attention_bias` (`[num_buckets, num_heads]`), shared by all.
    pub rel_bias: Option<usize>,
    /// BART: the learned positions (`[max_positions + 2, d_model]`).
    pub positions: Option<usize>,
    /// BART: `layernorm_embedding`.
    pub ln_emb: Option<NormP>,
    /// T5: `final_layer_norm`.
    pub final_norm: Option<NormP>,
}

#[derive(Clone, Debug)]
pub struct Seq2SeqLayout {
    pub specs: Vec<ParamSpec>,
    pub shared: usize,
    pub encoder: StackParams,
    pub decoder: StackParams,
    /// `None` when the head is the shared embedding.
    pub lm_head: Option<usize>,
    /// BART's `final_logits_bias` (`[1, vocab]`), added to the logits; a buffer in transformers,
    /// so it is loaded and saved but not trained.
    pub logits_bias: Option<usize>,
    /// Tied copies some checkpoints store (read past, never written).
    pub tied_copies: Vec<String>,
}

impl Seq2SeqLayout {
    pub fn new(c: &Seq2SeqConfig) -> Self {
        match c.family {
            Family::T5(t) => super::t5::layout(c, t),
            Family::Bart(b) => super::bart::layout(c, b),
        }
    }

    /// transformers' `num_parameters()`: every tensor but the buffer `final_logits_bias`.
    pub fn num_parameters(&self) -> usize {
        self.specs.iter().enumerate().filter(|(i, _)| Some(*i) != self.logits_bias).map(|(_, s)| s.numel()).sum()
    }

    /// The head's weight: `lm_head.weight`, or the shared embedding.
    pub fn head(&self) -> usize {
        self.lm_head.unwrap_or(self.shared)
    }

    pub fn stack(&self, decoder: bool) -> &StackParams {
        if decoder {
            &self.decoder
        } else {
            &self.encoder
        }
    }
}

impl WeightSet for Seq2SeqLayout {
    fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
    fn tolerates_extra(&self, name: &str) -> bool {
        self.tied_copies.iter().any(|n| n == name)
    }
    /// BART's `final_logits_bias` (`_keys_to_ignore_on_load_missing`: zeros when absent).
    fn may_be_missing(&self, name: &str) -> bool {
        self.logits_bias.is_some_and(|i| self.specs[i].name == name)
    }
}

/// Collects a layout's specs in order.
pub(super) struct Specs(pub(super) Vec<ParamSpec>);

impl Specs {
    /// An engine tensor made of `parts` (stacked along the first dimension). Weight decay as
    /// transformers' `Trainer.get_decay_parameter_names`: not for a name holding "bias" (T5's
    /// `relative_attention_bias` too) or a norm.
    pub(super) fn add(&mut self, name: String, shape: Vec<usize>, parts: Vec<HfPart>, init: Init) -> usize {
        let lower = name.to_lowercase();
        let norm =
            lower.contains("layernorm") || lower.contains("rmsnorm") || lower.contains("_norm.") || lower.starts_with("norm.") || lower.contains(".norm.");
        let decay = !(lower.contains("bias") || norm);
        self.0.push(ParamSpec { name, shape, parts, conv1d: false, decay, init, adapter: false });
        self.0.len() - 1
    }

    /// A tensor that is exactly one transformers tensor.
    pub(super) fn single(&mut self, name: String, shape: Vec<usize>, init: Init) -> usize {
        let parts = vec![HfPart { name: name.clone(), shape: shape.clone() }];
        self.add(name, shape, parts, init)
    }
}
