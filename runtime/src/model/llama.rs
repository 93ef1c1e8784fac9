//! The Llama family (Llama, Mistral, Qwen2): how their `config.json` reads (grouped-query
//! attention, RoPE settings, biases by model type), their parameters under transformers' names
//! (`model.layers.N.self_attn.q_proj.weight`, with q/k/v and gate/up fused in the engine), and
//! their block: RMSNorm, SwiGLU MLP, rotary positions.

use super::config::{Arch, Dropout, Fields, ModelConfig};
use super::layout::{Builder, Init, LayerParams, Layout};
use super::registry::{Family, Kinds};
use crate::error::Result;
use crate::nn::{Activation, NormKind};
use serde_json::{Map, Value};

pub(super) const FAMILY: Family =
    Family { model_types: &[("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")], config, layout, kinds };

fn kinds(c: &ModelConfig) -> Kinds {
    Kinds { norm: NormKind::RmsNorm, act: Activation::SwiGlu { intermediate: c.intermediate_size }, rope_theta: Some(c.rope_theta) }
}

fn config(f: &Fields, model_type: String) -> Result<ModelConfig> {
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
            if let Some(p) = obj.get("partial_rotary_factor").filter(|p| p.as_f64() != Some(1.0)) {
                return Err(f.err(format!("`{key}.partial_rotary_factor` {p} is not supported (rotary embeddings over the whole head only)")));
            }
        }
    }
    // transformers rotates only this share of each head's dimensions: computing the whole head
    // would be a different model
    if let Some(p) = f.present("partial_rotary_factor").filter(|p| p.as_f64() != Some(1.0)) {
        return Err(f.err(format!("`partial_rotary_factor` {p} is not supported (rotary embeddings over the whole head only)")));
    }
    let attention_bias = f.bool_or("attention_bias", false)?;
    let qwen2 = model_type == "qwen2";
    let sliding_window = match model_type.as_str() {
        "mistral" => f.opt_usize("sliding_window")?,
        "qwen2" if f.bool_or("use_sliding_window", false)? && qwen2_slides(f)? => f.opt_usize("sliding_window")?,
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
        dropout: Dropout { attn: f.prob("attention_dropout", 0.0)?, ..Dropout::default() },
        dtype: None,
        raw: Map::new(),
        model_type,
    })
}

fn layout(mut b: Builder) -> Layout {
    let c = b.cfg;
    let (h, i, std) = (c.hidden_size, c.intermediate_size, c.initializer_range);
    let (q, kv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
    let wte = b.single("model.embed_tokens.weight".into(), vec![c.vocab_size, h], Init::Normal(std));
    let mut layers = Vec::new();
    for l in 0..c.n_layer {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let qkv = |suffix: &str| {
            vec![(p(&format!("self_attn.q_proj.{suffix}")), q), (p(&format!("self_attn.k_proj.{suffix}")), kv), (p(&format!("self_attn.v_proj.{suffix}")), kv)]
        };
        let fc = |suffix: &str| vec![(p(&format!("mlp.gate_proj.{suffix}")), i), (p(&format!("mlp.up_proj.{suffix}")), i)];
        layers.push(LayerParams {
            ln1_w: b.single(p("input_layernorm.weight"), vec![h], Init::Ones),
            ln1_b: None,
            qkv_w: b.stacked(p("self_attn.qkv.weight"), qkv("weight"), Some(h), Init::Normal(std)),
            qkv_b: c.qkv_bias.then(|| b.stacked(p("self_attn.qkv.bias"), qkv("bias"), None, Init::Zeros)),
            o_w: b.single(p("self_attn.o_proj.weight"), vec![h, q], Init::Normal(std)),
            o_b: c.o_bias.then(|| b.single(p("self_attn.o_proj.bias"), vec![h], Init::Zeros)),
            ln2_w: b.single(p("post_attention_layernorm.weight"), vec![h], Init::Ones),
            ln2_b: None,
            fc_w: b.stacked(p("mlp.gate_up.weight"), fc("weight"), Some(h), Init::Normal(std)),
            fc_b: c.mlp_bias.then(|| b.stacked(p("mlp.gate_up.bias"), fc("bias"), None, Init::Zeros)),
            proj_w: b.single(p("mlp.down_proj.weight"), vec![h, i], Init::Normal(std)),
            proj_b: c.mlp_bias.then(|| b.single(p("mlp.down_proj.bias"), vec![h], Init::Zeros)),
        });
    }
    let lnf_w = b.single("model.norm.weight".into(), vec![h], Init::Ones);
    let lm_head = (!c.tie_word_embeddings).then(|| b.single("lm_head.weight".into(), vec![c.vocab_size, h], Init::Normal(std)));
    Layout { specs: b.specs, wte, wpe: None, layers, lnf_w, lnf_b: None, lm_head }
}

/// Whether any layer of a Qwen2 with `use_sliding_window` attends through the window: the layers
/// `layer_types` marks `sliding_attention` or, without it, those from `max_window_layers` on (28
/// by default), as transformers decides. With none, every layer attends to the whole sequence.
fn qwen2_slides(f: &Fields) -> Result<bool> {
    let n_layer = f.usize("num_hidden_layers")?;
    match f.present("layer_types") {
        Some(Value::Array(types)) => {
            if types.len() != n_layer {
                return Err(f.err(format!("`layer_types` has {} entries for {n_layer} layers", types.len())));
            }
            let mut sliding = false;
            for t in types {
                match t.as_str() {
                    Some("full_attention") => {}
                    Some("sliding_attention") => sliding = true,
                    _ => return Err(f.err(format!("`layer_types` entry {t}: expected \"full_attention\" or \"sliding_attention\""))),
                }
            }
            Ok(sliding)
        }
        Some(v) => Err(f.err(format!("field `layer_types` must be a list, found {v}"))),
        None => match f.present("max_window_layers") {
            None => Ok(n_layer > 28),
            Some(v) => v.as_u64().map(|m| (n_layer as u64) > m).ok_or_else(|| f.err(format!("field `max_window_layers` must be a count of layers, found {v}"))),
        },
    }
}
