//! GPT-2: how its `config.json` reads (`n_embd`, `n_head`, `n_positions`, ...), its parameters
//! under transformers' names (`transformer.h.N.attn.c_attn.weight`, stored as `Conv1D`), and its
//! block: LayerNorm with biases, GELU (tanh) MLP, learned positions.

use super::config::{Arch, Dropout, Fields, ModelConfig};
use super::layout::{Builder, Init, LayerParams, Layout};
use super::registry::{Family, Kinds};
use crate::error::Result;
use crate::nn::{Activation, NormKind};
use serde_json::Map;

pub(super) const FAMILY: Family = Family { model_types: &[("gpt2", "GPT2LMHeadModel")], config, layout, kinds };

fn kinds(_: &ModelConfig) -> Kinds {
    Kinds { norm: NormKind::LayerNorm, act: Activation::Gelu, rope_theta: None }
}

fn config(f: &Fields, model_type: String) -> Result<ModelConfig> {
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
        dropout: Dropout { embd: f.prob("embd_pdrop", 0.1)?, resid: f.prob("resid_pdrop", 0.1)?, attn: f.prob("attn_pdrop", 0.1)? },
        dtype: None,
        raw: Map::new(),
    })
}

fn layout(mut b: Builder) -> Layout {
    let c = b.cfg;
    let (h, i, std) = (c.hidden_size, c.intermediate_size, c.initializer_range);
    let proj_std = std / (2.0 * c.n_layer as f32).sqrt();
    let p = |s: &str| format!("transformer.{s}");
    let wte = b.single(p("wte.weight"), vec![c.vocab_size, h], Init::Normal(std));
    let wpe = Some(b.single(p("wpe.weight"), vec![c.max_positions, h], Init::Normal(std)));
    let mut layers = Vec::new();
    for l in 0..c.n_layer {
        let p = |s: &str| format!("transformer.h.{l}.{s}");
        layers.push(LayerParams {
            ln1_w: b.single(p("ln_1.weight"), vec![h], Init::Ones),
            ln1_b: Some(b.single(p("ln_1.bias"), vec![h], Init::Zeros)),
            qkv_w: b.conv1d(p("attn.c_attn.weight"), 3 * h, h, std),
            qkv_b: Some(b.single(p("attn.c_attn.bias"), vec![3 * h], Init::Zeros)),
            o_w: b.conv1d(p("attn.c_proj.weight"), h, h, proj_std),
            o_b: Some(b.single(p("attn.c_proj.bias"), vec![h], Init::Zeros)),
            ln2_w: b.single(p("ln_2.weight"), vec![h], Init::Ones),
            ln2_b: Some(b.single(p("ln_2.bias"), vec![h], Init::Zeros)),
            fc_w: b.conv1d(p("mlp.c_fc.weight"), i, h, std),
            fc_b: Some(b.single(p("mlp.c_fc.bias"), vec![i], Init::Zeros)),
            proj_w: b.conv1d(p("mlp.c_proj.weight"), h, i, proj_std),
            proj_b: Some(b.single(p("mlp.c_proj.bias"), vec![h], Init::Zeros)),
        });
    }
    let lnf_w = b.single(p("ln_f.weight"), vec![h], Init::Ones);
    let lnf_b = Some(b.single(p("ln_f.bias"), vec![h], Init::Zeros));
    let lm_head = (!c.tie_word_embeddings).then(|| b.single("lm_head.weight".into(), vec![c.vocab_size, h], Init::Normal(std)));
    Layout { specs: b.specs, wte, wpe, layers, lnf_w, lnf_b, lm_head }
}
