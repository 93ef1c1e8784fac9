//! The `model_type` registry: each family of models the engine implements, the `model_type`s it
//! reads (with the `architectures` name transformers writes for each), how its config maps onto
//! [`ModelConfig`], its parameter layout under transformers' names, and what its block is made of.
//! Adding a family is a file beside `gpt2.rs` and `llama.rs` and a line in [`FAMILIES`].

use super::config::{Arch, Fields, ModelConfig};
use super::layout::{Builder, Layout};
use crate::error::Result;
use crate::nn::{Activation, NormKind};

/// What a family's block is made of.
pub(super) struct Kinds {
    pub norm: NormKind,
    pub act: Activation,
    /// RoPE's base, when positions are rotary (otherwise learned position embeddings).
    pub rope_theta: Option<f32>,
}

pub(super) struct Family {
    /// `model_type` and the `architectures` entry transformers writes for it.
    pub model_types: &'static [(&'static str, &'static str)],
    pub config: fn(&Fields, String) -> Result<ModelConfig>,
    pub layout: fn(Builder) -> Layout,
    pub kinds: fn(&ModelConfig) -> Kinds,
}

pub(super) const FAMILIES: [&Family; 2] = [&super::gpt2::FAMILY, &super::llama::FAMILY];

/// The family that reads `model_type`.
pub(super) fn by_model_type(model_type: &str) -> Option<&'static Family> {
    FAMILIES.into_iter().find(|f| f.model_types.iter().any(|(t, _)| *t == model_type))
}

/// The family of an architecture.
pub(super) fn by_arch(arch: Arch) -> &'static Family {
    match arch {
        Arch::Gpt2 => &super::gpt2::FAMILY,
        Arch::Llama => &super::llama::FAMILY,
    }
}

/// Every `model_type` the engine reads, for messages.
pub fn supported() -> String {
    FAMILIES.iter().flat_map(|f| f.model_types.iter().map(|(t, _)| *t)).collect::<Vec<_>>().join(", ")
}
