//! Data: datasets read from JSONL/JSON files, tokenization with a model's `tokenizer.json` and
//! `tokenizer_config.json`, causal-LM example building (`group_texts` packing, prompt/completion
//! masking), and collation into padded batches.

pub mod cache;
pub mod chat;
pub mod collate;
pub mod dataset;
pub mod seq2seq;
pub mod tokenizer;

pub use collate::{pad_batch, PadOptions, Padding};
pub use dataset::{Example, Record, RecordKind};
pub use tokenizer::{Side, Tokenizer};
