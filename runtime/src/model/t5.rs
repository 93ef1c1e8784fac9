//! T5 (v1.0, v1.1 and Flan-T5; `T5ForConditionalGeneration`): how its `config.json` reads, its
//! parameters under transformers' names, and its relative position buckets.
//!
//! The engine keeps transformers' tensors as they are, except the gated feed-forward's `wi_0` and
//! `wi_1`, stacked into one `wi` (gate rows first) so that one product makes both halves.
//!
//! The head: transformers 5 writes `tie_word_embeddings: true` for every T5 and keeps an
//! untied head by storing `lm_head.weight`; older configs say `tie_word_embeddings: false`. The
//! head is untied when either says so. The decoder's output is scaled by `d_model ** -0.5`
//! before the head when `scale_decoder_outputs` is true (transformers 5), and when that field is
//! absent, when `tie_word_embeddings` is not false (transformers 4's rule).

use std::path::Path;

use serde_json::{Map, Value};

use super::config::Fields;
use super::layout::{HfPart, Init, ParamSpec, WeightSet};
use crate::error::{Error, Result};

/// The feed-forward's activation (`feed_forward_proj`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForward {
    /// `relu` (T5 v1.0): `wo(relu(wi x))`.
    Relu,
    /// `gated-gelu` (v1.1, Flan-T5): `wo(gelu_new(wi_0 x) * wi_1 x)`.
    GatedGelu,
}

#[derive(Clone, Debug)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub eps: f32,
    pub ff: FeedForward,
    /// The LM head is the shared embedding.
    pub tied_head: bool,
    /// The decoder output is scaled by `d_model ** -0.5` before the head.
    pub scale_decoder_outputs: bool,
    pub pad_token_id: usize,
    pub eos_token_id: Option<usize>,
    pub decoder_start_token_id: usize,
    pub dropout_rate: f32,
    pub initializer_factor: f32,
    /// The JSON as read (written back unchanged on save).
    pub raw: Map<String, Value>,
}

impl T5Config {
    pub fn from_json(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let f = Fields::new(path, &raw);
        let ff = match f.str_or("feed_forward_proj", "relu")? {
            "relu" => FeedForward::Relu,
            "gated-gelu" => FeedForward::GatedGelu,
            other => return Err(f.err(format!("unsupported `feed_forward_proj` `{other}` (supported: relu, gated-gelu)"))),
        };
        let num_layers = f.usize("num_layers")?;
        let tie = f.bool_or("tie_word_embeddings", true)?;
        let pad = f.token_id("pad_token_id")?.unwrap_or(0);
        let cfg = T5Config {
            vocab_size: f.usize("vocab_size")?,
            d_model: f.usize("d_model")?,
            d_kv: f.usize("d_kv")?,
            d_ff: f.usize("d_ff")?,
            num_layers,
            num_decoder_layers: f.opt_usize("num_decoder_layers")?.unwrap_or(num_layers),
            num_heads: f.usize("num_heads")?,
            num_buckets: f.opt_usize("relative_attention_num_buckets")?.unwrap_or(32),
            max_distance: f.opt_usize("relative_attention_max_distance")?.unwrap_or(128),
            eps: f.f32_or("layer_norm_epsilon", 1e-6)?,
            ff,
            tied_head: tie,
            scale_decoder_outputs: f.bool_or("scale_decoder_outputs", tie)?,
            pad_token_id: pad,
            eos_token_id: f.token_id("eos_token_id")?,
            decoder_start_token_id: f.token_id("decoder_start_token_id")?.unwrap_or(pad),
            dropout_rate: f.prob("dropout_rate", 0.1)?,
            initializer_factor: f.f32_or("initializer_factor", 1.0)?,
            raw: raw.clone(),
        };
        if cfg.eps.is_nan() || cfg.eps <= 0.0 {
            return Err(f.err(format!("field `layer_norm_epsilon` must be positive, found {}", cfg.eps)));
        }
        if cfg.num_buckets < 4 {
            return Err(f.err(format!("field `relative_attention_num_buckets` must be at least 4, found {}", cfg.num_buckets)));
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
            FeedForward::Relu => self.d_ff,
            FeedForward::GatedGelu => 2 * self.d_ff,
        }
    }
}

/// Cross attention's tensors in a decoder layer.
#[derive(Clone, Copy, Debug)]
pub struct CrossParams {
    pub ln: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
}

/// One T5 block's tensors (indices into [`T5Layout::specs`]).
#[derive(Clone, Copy, Debug)]
pub struct T5LayerParams {
    pub ln_attn: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    /// Decoder layers only.
    pub cross: Option<CrossParams>,
    pub ln_ff: usize,
    pub wi: usize,
    pub wo: usize,
}

/// The encoder or the decoder.
#[derive(Clone, Debug)]
pub struct StackParams {
    pub layers: Vec<T5LayerParams>,
    /// The first layer's `relative_attention_bias` (`[num_buckets, num_heads]`), shared by all.
    pub rel_bias: usize,
    pub final_norm: usize,
}

#[derive(Clone, Debug)]
pub struct T5Layout {
    pub specs: Vec<ParamSpec>,
    pub shared: usize,
    pub encoder: StackParams,
    pub decoder: StackParams,
    /// `None` when the head is the shared embedding.
    pub lm_head: Option<usize>,
}

/// Collects the specs in order.
struct Specs(Vec<ParamSpec>);

impl Specs {
    /// An engine tensor made of `parts` (stacked along the first dimension). transformers keeps
    /// every name holding "bias" or a norm out of weight decay (T5's `relative_attention_bias`
    /// too).
    fn add(&mut self, name: String, shape: Vec<usize>, parts: Vec<HfPart>, init: Init) -> usize {
        let decay = !(name.contains("bias") || name.contains("layer_norm"));
        self.0.push(ParamSpec { name, shape, parts, conv1d: false, decay, init, adapter: false });
        self.0.len() - 1
    }

    /// A tensor that is exactly one transformers tensor.
    fn single(&mut self, name: String, shape: Vec<usize>, init: Init) -> usize {
        let parts = vec![HfPart { name: name.clone(), shape: shape.clone() }];
        self.add(name, shape, parts, init)
    }

    /// An attention's q, k, v and o under `prefix`, with transformers' initial spreads.
    fn attention(&mut self, c: &T5Config, prefix: &str) -> [usize; 4] {
        let (f, d, inner) = (c.initializer_factor, c.d_model, c.inner());
        let std = |n: usize| Init::Normal(f * (n as f32).powf(-0.5));
        [
            self.single(format!("{prefix}.q.weight"), vec![inner, d], std(d * c.d_kv)),
            self.single(format!("{prefix}.k.weight"), vec![inner, d], std(d)),
            self.single(format!("{prefix}.v.weight"), vec![inner, d], std(d)),
            self.single(format!("{prefix}.o.weight"), vec![d, inner], std(inner)),
        ]
    }

    /// The encoder (`part` = "encoder") or the decoder's tensors.
    fn stack(&mut self, c: &T5Config, part: &str, n: usize, decoder: bool) -> StackParams {
        let (f, d) = (c.initializer_factor, c.d_model);
        let std = |n: usize| Init::Normal(f * (n as f32).powf(-0.5));
        let mut layers = Vec::with_capacity(n);
        let mut rel_bias = 0;
        for l in 0..n {
            let p = format!("{part}.block.{l}.layer");
            let [q, k, v, o] = self.attention(c, &format!("{p}.0.SelfAttention"));
            if l == 0 {
                rel_bias = self.single(format!("{p}.0.SelfAttention.relative_attention_bias.weight"), vec![c.num_buckets, c.num_heads], std(d));
            }
            let ln_attn = self.single(format!("{p}.0.layer_norm.weight"), vec![d], Init::Ones);
            let cross = decoder.then(|| {
                let [q, k, v, o] = self.attention(c, &format!("{p}.1.EncDecAttention"));
                CrossParams { q, k, v, o, ln: self.single(format!("{p}.1.layer_norm.weight"), vec![d], Init::Ones) }
            });
            let ff = format!("{p}.{}.DenseReluDense", if decoder { 2 } else { 1 });
            let wi = match c.ff {
                FeedForward::Relu => self.single(format!("{ff}.wi.weight"), vec![c.d_ff, d], std(d)),
                FeedForward::GatedGelu => {
                    let parts = ["wi_0", "wi_1"].map(|w| HfPart { name: format!("{ff}.{w}.weight"), shape: vec![c.d_ff, d] }).to_vec();
                    self.add(format!("{ff}.wi.weight"), vec![2 * c.d_ff, d], parts, std(d))
                }
            };
            let wo = self.single(format!("{ff}.wo.weight"), vec![d, c.d_ff], std(c.d_ff));
            let ln_ff = self.single(format!("{p}.{}.layer_norm.weight", if decoder { 2 } else { 1 }), vec![d], Init::Ones);
            layers.push(T5LayerParams { ln_attn, q, k, v, o, cross, ln_ff, wi, wo });
        }
        let final_norm = self.single(format!("{part}.final_layer_norm.weight"), vec![d], Init::Ones);
        StackParams { layers, rel_bias, final_norm }
    }
}

impl T5Layout {
    pub fn new(c: &T5Config) -> Self {
        let mut s = Specs(Vec::new());
        let f = c.initializer_factor;
        let shared = s.single("shared.weight".into(), vec![c.vocab_size, c.d_model], Init::Normal(f));
        let encoder = s.stack(c, "encoder", c.num_layers, false);
        let decoder = s.stack(c, "decoder", c.num_decoder_layers, true);
        let lm_head = (!c.tied_head).then(|| s.single("lm_head.weight".into(), vec![c.vocab_size, c.d_model], Init::Normal(f)));
        T5Layout { specs: s.0, shared, encoder, decoder, lm_head }
    }

    /// The head's weight: `lm_head.weight`, or the shared embedding.
    pub fn head(&self) -> usize {
        self.lm_head.unwrap_or(self.shared)
    }
}

impl WeightSet for T5Layout {
    fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
    /// The embeddings' tied copies, which some checkpoints store.
    fn tolerates_extra(&self, name: &str) -> bool {
        name == "encoder.embed_tokens.weight" || name == "decoder.embed_tokens.weight"
    }
}

/// T5's bucket of a relative position (`key - query`), as transformers'
/// `T5Attention._relative_position_bucket` computes it (the logarithmic part in f32, as torch does).
pub fn relative_bucket(rel: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let (mut nb, mut bucket) = (num_buckets as i64, 0i64);
    let pos = if bidirectional {
        nb /= 2;
        if rel > 0 {
            bucket += nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = nb / 2;
    bucket += if pos < max_exact {
        pos
    } else {
        let scaled = (pos as f32 / max_exact as f32).ln() / (max_distance as f64 / max_exact as f64).ln() as f32 * (nb - max_exact) as f32;
        (max_exact + scaled as i64).min(nb - 1)
    };
    bucket as usize
}

/// The `[tq, tk]` bucket map of queries at positions `q0..q0 + tq` against keys `0..tk`.
pub fn bucket_map(tq: usize, tk: usize, q0: usize, bidirectional: bool, c: &T5Config) -> Vec<i32> {
    let mut out = Vec::with_capacity(tq * tk);
    for i in 0..tq {
        for j in 0..tk {
            out.push(relative_bucket(j as i64 - (i + q0) as i64, bidirectional, c.num_buckets, c.max_distance) as i32);
        }
    }
    out
}
