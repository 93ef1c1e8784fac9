//! Sequence-to-sequence data, as transformers' `run_summarization.py` / `run_translation.py` and
//! `DataCollatorForSeq2Seq` prepare it: records with a source and a target field (`source` and
//! `target` by default), each tokenized with the tokenizer's special tokens and truncated to
//! `max_source_length` / `max_target_length` (the special tokens kept); batches pad the sources
//! (attention mask 0) and the labels (-100) each to its own longest, rounded up to
//! `pad_to_multiple_of`, on the tokenizer's padding side, and `decoder_input_ids` are the labels
//! shifted right behind `decoder_start_token_id` (what the model makes from `labels`).

use std::path::Path;

use serde_json::Value;

use super::dataset::Record;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::protocol::{Seq2SeqBatch, Side, IGNORE_INDEX};

/// The record fields that hold the source and the target text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq2SeqColumns {
    pub source: String,
    pub target: String,
}

impl Default for Seq2SeqColumns {
    fn default() -> Self {
        Seq2SeqColumns { source: "source".into(), target: "target".into() }
    }
}

/// One tokenized pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq2SeqExample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<u32>,
}

/// Tokenizes every record of the dataset at `path` (its name in messages). A record without
/// either field, or with one that is not a string, is an error naming the file and line.
pub fn seq2seq_examples(
    path: &Path,
    records: &[Record],
    tok: &Tokenizer,
    cols: &Seq2SeqColumns,
    max_source_length: Option<usize>,
    max_target_length: Option<usize>,
) -> Result<Vec<Seq2SeqExample>> {
    let limited = |max: Option<usize>| max.map(|m| tok.truncating(m)).transpose();
    let (src_tok, tgt_tok) = (limited(max_source_length)?, limited(max_target_length)?);
    let text = |r: &Record, field: &str| -> Result<String> {
        match r.fields.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Error::Invalid(format!("{}:{}: field `{field}` must be a string, found {other}", path.display(), r.line))),
            None => {
                let have: Vec<&str> = r.fields.keys().map(String::as_str).collect();
                Err(Error::Invalid(format!(
                    "{}:{}: no `{field}` field (a sequence-to-sequence record needs `{}` and `{}`; this one has: {})",
                    path.display(),
                    r.line,
                    cols.source,
                    cols.target,
                    have.join(", ")
                )))
            }
        }
    };
    records
        .iter()
        .map(|r| {
            let (s, t) = (text(r, &cols.source)?, text(r, &cols.target)?);
            let input_ids = src_tok.as_ref().unwrap_or(tok).encode(&s, true)?.ids;
            let labels = tgt_tok.as_ref().unwrap_or(tok).encode(&t, true)?.ids;
            if input_ids.is_empty() || labels.is_empty() {
                let which = if input_ids.is_empty() { &cols.source } else { &cols.target };
                return Err(Error::Invalid(format!("{}:{}: field `{which}` tokenizes to nothing", path.display(), r.line)));
            }
            Ok(Seq2SeqExample { input_ids, labels })
        })
        .collect()
}

/// `DataCollatorForSeq2Seq` with the model given (so that it makes `decoder_input_ids`).
pub fn collate_seq2seq(examples: &[Seq2SeqExample], pad_id: u32, decoder_start: u32, side: Side, pad_to_multiple_of: Option<usize>) -> Result<Seq2SeqBatch> {
    if examples.is_empty() {
        return Err(Error::Invalid("cannot collate an empty batch".into()));
    }
    if pad_to_multiple_of == Some(0) {
        return Err(Error::Invalid("pad_to_multiple_of must be positive".into()));
    }
    let width = |len: usize| pad_to_multiple_of.map_or(len, |m| len.div_ceil(m) * m);
    let src_len = width(examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0));
    let tgt_len = width(examples.iter().map(|e| e.labels.len()).max().unwrap_or(0));
    let n = examples.len();
    let mut b = Seq2SeqBatch {
        batch: n,
        src_len,
        tgt_len,
        input_ids: vec![pad_id as i32; n * src_len],
        attention_mask: vec![0; n * src_len],
        decoder_input_ids: Vec::new(),
        labels: vec![IGNORE_INDEX; n * tgt_len],
    };
    let at = |len: usize, width: usize| if side == Side::Left { width - len } else { 0 };
    for (i, e) in examples.iter().enumerate() {
        let off = i * src_len + at(e.input_ids.len(), src_len);
        for (k, &id) in e.input_ids.iter().enumerate() {
            b.input_ids[off + k] = id as i32;
            b.attention_mask[off + k] = 1;
        }
        let off = i * tgt_len + at(e.labels.len(), tgt_len);
        for (k, &id) in e.labels.iter().enumerate() {
            b.labels[off + k] = id as i32;
        }
    }
    b.decoder_input_ids = Seq2SeqBatch::shift_right(&b.labels, tgt_len, decoder_start as usize, pad_id as usize);
    Ok(b)
}
