//! `runtime`: a training runtime for Hugging Face format language models.
//!
//! - [`model`]: configs, HF weight names and files, the decoder's forward and backward passes;
//! - [`backend`]: the op set and its CPU implementation;
//! - [`train`]: the trainer: optimizer, schedules, loop, checkpoints;
//! - [`data`]: datasets, tokenization, chat templates, collation;
//! - [`generate`]: decoding with a KV cache;
//! - [`plugin`]: the WebAssembly plugin host (loss, metrics, padding, callbacks).

pub mod args;
pub mod backend;
pub mod bench;
pub mod commands;
pub mod data;
pub mod engine;
pub mod error;
pub mod example;
pub mod files;
pub mod generate;
pub mod jobs;
pub mod mem;
pub mod model;
pub mod nn;
pub mod plugin;
pub mod protocol;
pub mod tools;
pub mod train;

pub use error::{Error, Result};
