//! `runtime`: a training runtime for Hugging Face format language models.
//!
//! - [`model`]: configs, HF weight names and files, the decoder's forward and backward passes;
//! - [`backend`]: the op set and its CPU implementation;
//! - [`train`]: the optimizer (the trainer loop arrives with its issue).

pub mod args;
pub mod backend;
pub mod bench;
pub mod commands;
pub mod data;
pub mod error;
pub mod example;
pub mod generate;
pub mod model;
pub mod train;

pub use error::{Error, Result};
