//! The parameter layout: the engine's tensors and how each maps to Hugging Face weight names.
//!
//! The engine fuses what it multiplies together: Llama's `q_proj`/`k_proj`/`v_proj` become one
//! `qkv` weight (rows stacked), `gate_proj`/`up_proj` one `fc` weight. GPT-2's `Conv1D` weights are
//! stored `[in, out]` by transformers and transposed to `[out, in]` here. Loading concatenates the
//! parts; saving splits them again, so the files are exactly transformers' layout.

use super::config::ModelConfig;

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
    /// A LoRA adapter's tensor (`lora.rs`): saved in the adapter's file, never in the model's.
    pub adapter: bool,
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
        (super::registry::by_arch(cfg.arch).layout)(Builder { specs: Vec::new(), cfg })
    }
}

/// A model's tensors as the weight files see them: what `io.rs` loads and saves (the decoder
/// families' [`Layout`], T5's layout).
pub trait WeightSet {
    fn specs(&self) -> &[ParamSpec];
    /// Whether a tensor in a weight file that the set does not use may be ignored.
    fn tolerates_extra(&self, name: &str) -> bool;
    /// Whether a tensor may be absent from the files (its parameter is then not read: the
    /// loader keeps its initial value).
    fn may_be_missing(&self, _name: &str) -> bool {
        false
    }
}

impl WeightSet for Layout {
    fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
    fn tolerates_extra(&self, name: &str) -> bool {
        Layout::tolerates_extra(self, name)
    }
}

/// Builds a family's layout tensor by tensor (`gpt2.rs`, `llama.rs`).
pub(super) struct Builder<'a> {
    pub specs: Vec<ParamSpec>,
    pub cfg: &'a ModelConfig,
}

impl Builder<'_> {
    pub(super) fn push(&mut self, name: String, shape: Vec<usize>, parts: Vec<HfPart>, conv1d: bool, init: Init) -> usize {
        let decay = shape.len() > 1;
        self.specs.push(ParamSpec { name, shape, parts, conv1d, decay, init, adapter: false });
        self.specs.len() - 1
    }

    /// A tensor that is exactly one transformers tensor.
    pub(super) fn single(&mut self, hf: String, shape: Vec<usize>, init: Init) -> usize {
        let name = hf.clone();
        self.push(name, shape.clone(), vec![HfPart { name: hf, shape }], false, init)
    }

    /// A GPT-2 `Conv1D`: engine `[out, in]`, stored `[in, out]`.
    pub(super) fn conv1d(&mut self, hf: String, out: usize, inp: usize, std: f32) -> usize {
        self.push(hf.clone(), vec![out, inp], vec![HfPart { name: hf, shape: vec![inp, out] }], true, Init::Normal(std))
    }

    /// Rows of several transformers tensors stacked into one engine tensor.
    pub(super) fn stacked(&mut self, name: String, parts: Vec<(String, usize)>, inner: Option<usize>, init: Init) -> usize {
        let rows = parts.iter().map(|p| p.1).sum();
        let shape = match inner {
            Some(c) => vec![rows, c],
            None => vec![rows],
        };
        let parts = parts.into_iter().map(|(n, r)| HfPart { name: n, shape: inner.map_or(vec![r], |c| vec![r, c]) }).collect();
        self.push(name, shape, parts, false, init)
    }
}
