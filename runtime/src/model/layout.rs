//! The parameter layout: the engine's tensors and how each maps to Hugging Face weight names.
//!
//! The engine fuses what it multiplies together: Llama's `q_proj`/`k_proj`/`v_proj` become one
//! `qkv` weight (rows stacked), `gate_proj`/`up_proj` one `fc` weight. GPT-2's `Conv1D` weights are
//! stored `[in, out]` by transformers and transposed to `[out, in]` here. Loading concatenates the
//! parts; saving splits them again, so the files are exactly transformers' layout.

use super::config::{Arch, ModelConfig};

/// One tensor as transformers names and shapes it.
#[derive(Clone, Debug)]
pub struct HfPart {
    pub name: String,
    pub shape: Vec<usize>,
}

/// How `runtime init` fills a tensor (transformers' `_init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// The engine's name, e.g. `layers.0.qkv.weight`.
    pub name: String,
    /// The engine's shape (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// The transformers tensors this one is made of, stacked along the first dimension.
    pub parts: Vec<HfPart>,
    /// A GPT-2 `Conv1D` weight: stored transposed by transformers.
    pub conv1d: bool,
    /// Whether AdamW applies weight decay (not to biases and normalisation weights, as in HF).
    pub decay: bool,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Indices into [`Layout::specs`] for one transformer block.
#[derive(Clone, Debug)]
pub struct LayerParams {
    pub ln1_w: usize,
    pub ln1_b: Option<usize>,
    pub qkv_w: usize,
    pub qkv_b: Option<usize>,
    pub o_w: usize,
    pub o_b: Option<usize>,
    pub ln2_w: usize,
    pub ln2_b: Option<usize>,
    pub fc_w: usize,
    pub fc_b: Option<usize>,
    pub proj_w: usize,
    pub proj_b: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub specs: Vec<ParamSpec>,
    pub wte: usize,
    pub wpe: Option<usize>,
    pub layers: Vec<LayerParams>,
    pub lnf_w: usize,
    pub lnf_b: Option<usize>,
    /// `None` when the output projection is tied to `wte`.
    pub lm_head: Option<usize>,
}

impl Layout {
    /// The LM head's weight: `lm_head.weight`, or the token embedding when they are tied.
    pub fn head(&self) -> usize {
        self.lm_head.unwrap_or(self.wte)
    }

    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// Names transformers keeps in checkpoints that are buffers, not parameters; they are accepted
    /// on load and never written.
    pub fn is_ignored_buffer(name: &str) -> bool {
        name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name.ends_with("rotary_emb.inv_freq")
    }

    /// Whether a tensor in a weight file that the layout does not use may be ignored: a known
    /// buffer, or the output projection of a tied model that a checkpoint stores anyway.
    pub fn tolerates_extra(&self, name: &str) -> bool {
        Self::is_ignored_buffer(name) || (name == "lm_head.weight" && self.lm_head.is_none())
    }

    pub fn new(cfg: &ModelConfig) -> Self {
        let b = Builder { specs: Vec::new(), cfg };
        match cfg.arch {
            Arch::Gpt2 => b.gpt2(),
            Arch::Llama => b.llama(),
        }
    }
}

struct Builder<'a> {
    specs: Vec<ParamSpec>,
    cfg: &'a ModelConfig,
}

impl Builder<'_> {
    fn push(&mut self, name: String, shape: Vec<usize>, parts: Vec<HfPart>, conv1d: bool, init: Init) -> usize {
        let decay = shape.len() > 1;
        self.specs.push(ParamSpec { name, shape, parts, conv1d, decay, init });
        self.specs.len() - 1
    }

    /// A tensor that is exactly one transformers tensor.
    fn single(&mut self, hf: String, shape: Vec<usize>, init: Init) -> usize {
        let name = hf.clone();
        self.push(name, shape.clone(), vec![HfPart { name: hf, shape }], false, init)
    }

    /// A GPT-2 `Conv1D`: engine `[out, in]`, stored `[in, out]`.
    fn conv1d(&mut self, hf: String, out: usize, inp: usize, std: f32) -> usize {
        self.push(hf.clone(), vec![out, inp], vec![HfPart { name: hf, shape: vec![inp, out] }], true, Init::Normal(std))
    }

    /// Rows of several transformers tensors stacked into one engine tensor.
    fn stacked(&mut self, name: String, parts: Vec<(String, usize)>, inner: Option<usize>, init: Init) -> usize {
        let rows = parts.iter().map(|p| p.1).sum();
        let shape = match inner {
            Some(c) => vec![rows, c],
            None => vec![rows],
        };
        let parts = parts.into_iter().map(|(n, r)| HfPart { name: n, shape: inner.map_or(vec![r], |c| vec![r, c]) }).collect();
        self.push(name, shape, parts, false, init)
    }

    fn gpt2(mut self) -> Layout {
        let c = self.cfg;
        let (h, i, std) = (c.hidden_size, c.intermediate_size, c.initializer_range);
        let proj_std = std / (2.0 * c.n_layer as f32).sqrt();
        let p = |s: &str| format!("transformer.{s}");
        let wte = self.single(p("wte.weight"), vec![c.vocab_size, h], Init::Normal(std));
        let wpe = Some(self.single(p("wpe.weight"), vec![c.max_positions, h], Init::Normal(std)));
        let mut layers = Vec::new();
        for l in 0..c.n_layer {
            let p = |s: &str| format!("transformer.h.{l}.{s}");
            layers.push(LayerParams {
                ln1_w: self.single(p("ln_1.weight"), vec![h], Init::Ones),
                ln1_b: Some(self.single(p("ln_1.bias"), vec![h], Init::Zeros)),
                qkv_w: self.conv1d(p("attn.c_attn.weight"), 3 * h, h, std),
                qkv_b: Some(self.single(p("attn.c_attn.bias"), vec![3 * h], Init::Zeros)),
                o_w: self.conv1d(p("attn.c_proj.weight"), h, h, proj_std),
                o_b: Some(self.single(p("attn.c_proj.bias"), vec![h], Init::Zeros)),
                ln2_w: self.single(p("ln_2.weight"), vec![h], Init::Ones),
                ln2_b: Some(self.single(p("ln_2.bias"), vec![h], Init::Zeros)),
                fc_w: self.conv1d(p("mlp.c_fc.weight"), i, h, std),
                fc_b: Some(self.single(p("mlp.c_fc.bias"), vec![i], Init::Zeros)),
                proj_w: self.conv1d(p("mlp.c_proj.weight"), h, i, proj_std),
                proj_b: Some(self.single(p("mlp.c_proj.bias"), vec![h], Init::Zeros)),
            });
        }
        let lnf_w = self.single(p("ln_f.weight"), vec![h], Init::Ones);
        let lnf_b = Some(self.single(p("ln_f.bias"), vec![h], Init::Zeros));
        let lm_head = (!c.tie_word_embeddings).then(|| self.single("lm_head.weight".into(), vec![c.vocab_size, h], Init::Normal(std)));
        Layout { specs: self.specs, wte, wpe, layers, lnf_w, lnf_b, lm_head }
    }

    fn llama(mut self) -> Layout {
        let c = self.cfg;
        let (h, i, std) = (c.hidden_size, c.intermediate_size, c.initializer_range);
        let (q, kv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let wte = self.single("model.embed_tokens.weight".into(), vec![c.vocab_size, h], Init::Normal(std));
        let mut layers = Vec::new();
        for l in 0..c.n_layer {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let qkv = |suffix: &str| {
                vec![
                    (p(&format!("self_attn.q_proj.{suffix}")), q),
                    (p(&format!("self_attn.k_proj.{suffix}")), kv),
                    (p(&format!("self_attn.v_proj.{suffix}")), kv),
                ]
            };
            let fc = |suffix: &str| vec![(p(&format!("mlp.gate_proj.{suffix}")), i), (p(&format!("mlp.up_proj.{suffix}")), i)];
            layers.push(LayerParams {
                ln1_w: self.single(p("input_layernorm.weight"), vec![h], Init::Ones),
                ln1_b: None,
                qkv_w: self.stacked(p("self_attn.qkv.weight"), qkv("weight"), Some(h), Init::Normal(std)),
                qkv_b: c.qkv_bias.then(|| self.stacked(p("self_attn.qkv.bias"), qkv("bias"), None, Init::Zeros)),
                o_w: self.single(p("self_attn.o_proj.weight"), vec![h, q], Init::Normal(std)),
                o_b: c.o_bias.then(|| self.single(p("self_attn.o_proj.bias"), vec![h], Init::Zeros)),
                ln2_w: self.single(p("post_attention_layernorm.weight"), vec![h], Init::Ones),
                ln2_b: None,
                fc_w: self.stacked(p("mlp.gate_up.weight"), fc("weight"), Some(h), Init::Normal(std)),
                fc_b: c.mlp_bias.then(|| self.stacked(p("mlp.gate_up.bias"), fc("bias"), None, Init::Zeros)),
                proj_w: self.single(p("mlp.down_proj.weight"), vec![h, i], Init::Normal(std)),
                proj_b: c.mlp_bias.then(|| self.single(p("mlp.down_proj.bias"), vec![h], Init::Zeros)),
            });
        }
        let lnf_w = self.single("model.norm.weight".into(), vec![h], Init::Ones);
        let lm_head = (!c.tie_word_embeddings).then(|| self.single("lm_head.weight".into(), vec![c.vocab_size, h], Init::Normal(std)));
        Layout { specs: self.specs, wte, wpe: None, layers, lnf_w, lnf_b: None, lm_head }
    }
}
