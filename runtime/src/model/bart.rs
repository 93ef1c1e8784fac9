//! BART (`BartForConditionalGeneration`): how its `config.json` reads and its parameters under
//! transformers' names.
//!
//! The differences from T5 the passes read from the config: learned positions (a table of
//! `max_position_embeddings + 2` rows, position `i` at row `i + 2`), the token embedding scaled
//! by `sqrt(d_model)` under `scale_embedding`, `layernorm_embedding` after the embeddings, each
//! sublayer's LayerNorm after its residual add, biases on every linear map, attention scores
//! scaled by `head_dim ** -0.5`, the exact (erf) GELU, no final norm, the head tied to the shared
//! embedding and `final_logits_bias` added to the logits. The shared embedding's `padding_idx`
//! row gets no gradient from a lookup.
//!
//! Refused with an error: encoder and decoder of different widths (`encoder_ffn_dim` /
//! `decoder_ffn_dim`, the two head counts) and LayerDrop (`encoder_layerdrop` /
//! `decoder_layerdrop` above 0).

use serde_json::{Map, Value};

use super::config::Fields;
use super::layout::Init;
use super::seq2seq_config::{BartParts, CrossParams, Family, FeedForward, LayerParams, Lin, NormP, Seq2SeqConfig, Seq2SeqLayout, Specs, StackParams};
use crate::error::Result;

/// Reads a BART `config.json` (transformers' `BartConfig` defaults).
pub(super) fn config(f: &Fields, raw: &Map<String, Value>) -> Result<Seq2SeqConfig> {
    let d_model = f.opt_usize("d_model")?.unwrap_or(1024);
    let same = |a: &str, b: &str, default: usize| -> Result<usize> {
        let (x, y) = (f.opt_usize(a)?.unwrap_or(default), f.opt_usize(b)?.unwrap_or(default));
        if x != y {
            return Err(f.err(format!("`{a}` = {x} and `{b}` = {y} differ; the runtime needs the encoder and the decoder to have the same widths")));
        }
        Ok(x)
    };
    let num_heads = same("encoder_attention_heads", "decoder_attention_heads", 16)?;
    let d_ff = same("encoder_ffn_dim", "decoder_ffn_dim", 4096)?;
    if !d_model.is_multiple_of(num_heads) {
        return Err(f.err(format!("`d_model` = {d_model} is not a multiple of the {num_heads} attention heads")));
    }
    for key in ["encoder_layerdrop", "decoder_layerdrop"] {
        let p = f.prob(key, 0.0)?;
        if p > 0.0 {
            return Err(f.err(format!("`{key}` = {p}: LayerDrop is not supported; set it to 0")));
        }
    }
    let ff = match f.str_or("activation_function", "gelu")? {
        "gelu" => FeedForward::Gelu,
        "gelu_new" => FeedForward::GeluNew,
        "relu" => FeedForward::Relu,
        other => return Err(f.err(format!("unsupported `activation_function` `{other}` (supported: gelu, gelu_new, relu)"))),
    };
    let init_std = f.f32_or("init_std", 0.02)?;
    if init_std.is_nan() || init_std < 0.0 {
        return Err(f.err(format!("field `init_std` must be >= 0, found {init_std}")));
    }
    let parts =
        BartParts { max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(1024), scale_embedding: f.bool_or("scale_embedding", false)?, init_std };
    let num_layers = f.opt_usize("encoder_layers")?.unwrap_or(12);
    Ok(Seq2SeqConfig {
        family: Family::Bart(parts),
        vocab_size: f.opt_usize("vocab_size")?.unwrap_or(50265),
        d_model,
        d_kv: d_model / num_heads,
        d_ff,
        num_layers,
        num_decoder_layers: f.opt_usize("decoder_layers")?.unwrap_or(12),
        num_heads,
        // torch's `nn.LayerNorm` default; BART's config has no field for it
        eps: 1e-5,
        ff,
        tied_head: f.bool_or("tie_word_embeddings", true)?,
        scale_decoder_outputs: false,
        pad_token_id: f.token_id("pad_token_id")?.unwrap_or(1),
        eos_token_id: f.token_id("eos_token_id")?.or(Some(2)),
        decoder_start_token_id: f.token_id("decoder_start_token_id")?.unwrap_or(2),
        dropout_rate: f.prob("dropout", 0.1)?,
        attention_dropout: Some(f.prob("attention_dropout", 0.0)?),
        activation_dropout: Some(f.prob("activation_dropout", 0.0)?),
        raw: raw.clone(),
    })
}

/// A linear map `[out, inp]` with its bias under `prefix`.
fn linear(s: &mut Specs, prefix: &str, out: usize, inp: usize, std: f32) -> Lin {
    Lin { w: s.single(format!("{prefix}.weight"), vec![out, inp], Init::Normal(std)), b: Some(s.single(format!("{prefix}.bias"), vec![out], Init::Zeros)) }
}

fn layer_norm(s: &mut Specs, prefix: &str, d: usize) -> NormP {
    NormP { w: s.single(format!("{prefix}.weight"), vec![d], Init::Ones), b: Some(s.single(format!("{prefix}.bias"), vec![d], Init::Zeros)) }
}

/// `q_proj`, `k_proj`, `v_proj` and `out_proj` under `prefix`.
fn attention(s: &mut Specs, c: &Seq2SeqConfig, std: f32, prefix: &str) -> [Lin; 4] {
    let (d, inner) = (c.d_model, c.inner());
    [
        linear(s, &format!("{prefix}.q_proj"), inner, d, std),
        linear(s, &format!("{prefix}.k_proj"), inner, d, std),
        linear(s, &format!("{prefix}.v_proj"), inner, d, std),
        linear(s, &format!("{prefix}.out_proj"), d, inner, std),
    ]
}

/// The encoder (`part` = "encoder") or the decoder's tensors, in transformers' order.
fn stack(s: &mut Specs, c: &Seq2SeqConfig, b: BartParts, part: &str, n: usize, decoder: bool) -> StackParams {
    let (d, std) = (c.d_model, b.init_std);
    let positions = s.single(format!("model.{part}.embed_positions.weight"), vec![b.max_positions + 2, d], Init::Normal(std));
    let mut layers = Vec::with_capacity(n);
    for l in 0..n {
        let p = format!("model.{part}.layers.{l}");
        let [q, k, v, o] = attention(s, c, std, &format!("{p}.self_attn"));
        let ln_attn = layer_norm(s, &format!("{p}.self_attn_layer_norm"), d);
        let cross = decoder.then(|| {
            let [q, k, v, o] = attention(s, c, std, &format!("{p}.encoder_attn"));
            CrossParams { q, k, v, o, ln: layer_norm(s, &format!("{p}.encoder_attn_layer_norm"), d) }
        });
        let wi = linear(s, &format!("{p}.fc1"), c.d_ff, d, std);
        let wo = linear(s, &format!("{p}.fc2"), d, c.d_ff, std);
        let ln_ff = layer_norm(s, &format!("{p}.final_layer_norm"), d);
        layers.push(LayerParams { ln_attn, q, k, v, o, cross, ln_ff, wi, wo });
    }
    let ln_emb = Some(layer_norm(s, &format!("model.{part}.layernorm_embedding"), d));
    StackParams { layers, rel_bias: None, positions: Some(positions), ln_emb, final_norm: None }
}

/// BART's tensors under transformers' names (`model.` prefixed).
pub(super) fn layout(c: &Seq2SeqConfig, b: BartParts) -> Seq2SeqLayout {
    let mut s = Specs(Vec::new());
    let shared = s.single("model.shared.weight".into(), vec![c.vocab_size, c.d_model], Init::Normal(b.init_std));
    let encoder = stack(&mut s, c, b, "encoder", c.num_layers, false);
    let decoder = stack(&mut s, c, b, "decoder", c.num_decoder_layers, true);
    let lm_head = (!c.tied_head).then(|| s.single("lm_head.weight".into(), vec![c.vocab_size, c.d_model], Init::Normal(b.init_std)));
    let logits_bias = Some(s.single("final_logits_bias".into(), vec![1, c.vocab_size], Init::Zeros));
    let tied_copies = vec!["model.encoder.embed_tokens.weight".into(), "model.decoder.embed_tokens.weight".into()];
    Seq2SeqLayout { specs: s.0, shared, encoder, decoder, lm_head, logits_bias, tied_copies }
}
