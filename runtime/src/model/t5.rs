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

use serde_json::{Map, Value};

use super::config::Fields;
use super::layout::{HfPart, Init};
use super::seq2seq_config::{CrossParams, Family, FeedForward, LayerParams, Lin, NormP, Seq2SeqConfig, Seq2SeqLayout, Specs, StackParams, T5Parts};
use crate::error::Result;

/// Reads a T5 `config.json`.
pub(super) fn config(f: &Fields, raw: &Map<String, Value>) -> Result<Seq2SeqConfig> {
    let ff = match f.str_or("feed_forward_proj", "relu")? {
        "relu" => FeedForward::Relu,
        "gated-gelu" => FeedForward::GatedGelu,
        other => return Err(f.err(format!("unsupported `feed_forward_proj` `{other}` (supported: relu, gated-gelu)"))),
    };
    let num_layers = f.usize("num_layers")?;
    let tie = f.bool_or("tie_word_embeddings", true)?;
    let pad = f.token_id("pad_token_id")?.unwrap_or(0);
    let parts = T5Parts {
        num_buckets: f.opt_usize("relative_attention_num_buckets")?.unwrap_or(32),
        max_distance: f.opt_usize("relative_attention_max_distance")?.unwrap_or(128),
        initializer_factor: f.f32_or("initializer_factor", 1.0)?,
    };
    if parts.num_buckets < 4 {
        return Err(f.err(format!("field `relative_attention_num_buckets` must be at least 4, found {}", parts.num_buckets)));
    }
    // the logarithmic buckets span the distances from half the decoder's buckets up to
    // `max_distance`: at or below that start the bucket formula divides by ln(1) or goes negative
    if parts.max_distance <= parts.num_buckets / 2 {
        return Err(f.err(format!(
            "field `relative_attention_max_distance` must exceed half of `relative_attention_num_buckets` ({}), found {}",
            parts.num_buckets / 2,
            parts.max_distance
        )));
    }
    if parts.initializer_factor.is_nan() || parts.initializer_factor < 0.0 {
        return Err(f.err(format!("field `initializer_factor` must be >= 0, found {}", parts.initializer_factor)));
    }
    Ok(Seq2SeqConfig {
        family: Family::T5(parts),
        vocab_size: f.usize("vocab_size")?,
        d_model: f.usize("d_model")?,
        d_kv: f.usize("d_kv")?,
        d_ff: f.usize("d_ff")?,
        num_layers,
        num_decoder_layers: f.opt_usize("num_decoder_layers")?.unwrap_or(num_layers),
        num_heads: f.usize("num_heads")?,
        eps: f.f32_or("layer_norm_epsilon", 1e-6)?,
        ff,
        tied_head: tie,
        scale_decoder_outputs: f.bool_or("scale_decoder_outputs", tie)?,
        pad_token_id: pad,
        eos_token_id: f.token_id("eos_token_id")?,
        decoder_start_token_id: f.token_id("decoder_start_token_id")?.unwrap_or(pad),
        dropout_rate: f.prob("dropout_rate", 0.1)?,
        attention_dropout: None,
        activation_dropout: None,
        raw: raw.clone(),
    })
}

/// Without bias (T5 has none).
fn lin(w: usize) -> Lin {
    Lin { w, b: None }
}

fn rms(w: usize) -> NormP {
    NormP { w, b: None }
}

/// An attention's q, k, v and o under `prefix`, with transformers' initial spreads.
fn attention(s: &mut Specs, c: &Seq2SeqConfig, t: T5Parts, prefix: &str) -> [Lin; 4] {
    let (f, d, inner) = (t.initializer_factor, c.d_model, c.inner());
    let std = |n: usize| Init::Normal(f * (n as f32).powf(-0.5));
    [
        lin(s.single(format!("{prefix}.q.weight"), vec![inner, d], std(d * c.d_kv))),
        lin(s.single(format!("{prefix}.k.weight"), vec![inner, d], std(d))),
        lin(s.single(format!("{prefix}.v.weight"), vec![inner, d], std(d))),
        lin(s.single(format!("{prefix}.o.weight"), vec![d, inner], std(inner))),
    ]
}

/// The encoder (`part` = "encoder") or the decoder's tensors.
fn stack(s: &mut Specs, c: &Seq2SeqConfig, t: T5Parts, part: &str, n: usize, decoder: bool) -> StackParams {
    let (f, d) = (t.initializer_factor, c.d_model);
    let std = |n: usize| Init::Normal(f * (n as f32).powf(-0.5));
    let mut layers = Vec::with_capacity(n);
    let mut rel_bias = 0;
    for l in 0..n {
        let p = format!("{part}.block.{l}.layer");
        let [q, k, v, o] = attention(s, c, t, &format!("{p}.0.SelfAttention"));
        if l == 0 {
            rel_bias = s.single(format!("{p}.0.SelfAttention.relative_attention_bias.weight"), vec![t.num_buckets, c.num_heads], std(d));
        }
        let ln_attn = rms(s.single(format!("{p}.0.layer_norm.weight"), vec![d], Init::Ones));
        let cross = decoder.then(|| {
            let [q, k, v, o] = attention(s, c, t, &format!("{p}.1.EncDecAttention"));
            CrossParams { q, k, v, o, ln: rms(s.single(format!("{p}.1.layer_norm.weight"), vec![d], Init::Ones)) }
        });
        let ff = format!("{p}.{}.DenseReluDense", if decoder { 2 } else { 1 });
        let wi = match c.ff {
            FeedForward::GatedGelu => {
                let parts = ["wi_0", "wi_1"].map(|w| HfPart { name: format!("{ff}.{w}.weight"), shape: vec![c.d_ff, d] }).to_vec();
                s.add(format!("{ff}.wi.weight"), vec![2 * c.d_ff, d], parts, std(d))
            }
            _ => s.single(format!("{ff}.wi.weight"), vec![c.d_ff, d], std(d)),
        };
        let wo = s.single(format!("{ff}.wo.weight"), vec![d, c.d_ff], std(c.d_ff));
        let ln_ff = rms(s.single(format!("{p}.{}.layer_norm.weight", if decoder { 2 } else { 1 }), vec![d], Init::Ones));
        layers.push(LayerParams { ln_attn, q, k, v, o, cross, ln_ff, wi: lin(wi), wo: lin(wo) });
    }
    let final_norm = Some(rms(s.single(format!("{part}.final_layer_norm.weight"), vec![d], Init::Ones)));
    StackParams { layers, rel_bias: Some(rel_bias), positions: None, ln_emb: None, final_norm }
}

/// T5's tensors in transformers' order and names.
pub(super) fn layout(c: &Seq2SeqConfig, t: T5Parts) -> Seq2SeqLayout {
    let mut s = Specs(Vec::new());
    let f = t.initializer_factor;
    let shared = s.single("shared.weight".into(), vec![c.vocab_size, c.d_model], Init::Normal(f));
    let encoder = stack(&mut s, c, t, "encoder", c.num_layers, false);
    let decoder = stack(&mut s, c, t, "decoder", c.num_decoder_layers, true);
    let lm_head = (!c.tied_head).then(|| s.single("lm_head.weight".into(), vec![c.vocab_size, c.d_model], Init::Normal(f)));
    let tied_copies = vec!["encoder.embed_tokens.weight".into(), "decoder.embed_tokens.weight".into()];
    Seq2SeqLayout { specs: s.0, shared, encoder, decoder, lm_head, logits_bias: None, tied_copies }
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
pub fn bucket_map(tq: usize, tk: usize, q0: usize, bidirectional: bool, t: &T5Parts) -> Vec<i32> {
    let mut out = Vec::with_capacity(tq * tk);
    for i in 0..tq {
        for j in 0..tk {
            out.push(relative_bucket(j as i64 - (i + q0) as i64, bidirectional, t.num_buckets, t.max_distance) as i32);
        }
    }
    out
}
