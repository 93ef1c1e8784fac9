//! Datasets: records from JSONL (one object per line) or JSON (an array of objects) files, and
//! the causal-LM examples built from them: `text` records tokenized and packed into `block_size`
//! blocks as `run_clm.py`'s `group_texts` does (or truncated one by one), and `prompt`/
//! `completion` records with labels -100 on the prompt. Every problem names the file and line.

use std::path::Path;

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
pub use crate::protocol::Example;
use crate::protocol::IGNORE_INDEX;

/// One record and where it came from (1-based line for JSONL, 1-based index for JSON arrays).
#[derive(Clone, Debug)]
pub struct Record {
    pub line: usize,
    pub fields: Map<String, Value>,
}

/// What a dataset's records hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Text,
    PromptCompletion,
    Messages,
}

fn located(path: &Path, line: usize, what: &str) -> String {
    format!("{}:{line}: {what}", path.display())
}

/// Reads a `.jsonl` or `.json` dataset file.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let bytes = crate::files::read_bytes(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Invalid(located(path, line, &format!("invalid UTF-8 (byte {at} of the file)")))
    })?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut out = Vec::new();
    match ext.as_str() {
        "jsonl" => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                if let Err(e) = crate::files::check_unique_keys(line, "json") {
                    return Err(Error::Invalid(located(path, i + 1, &format!("malformed JSON: {e}"))));
                }
                match serde_json::from_str::<Value>(line) {
                    Ok(Value::Object(fields)) => out.push(Record { line: i + 1, fields }),
                    Ok(other) => return Err(Error::Invalid(located(path, i + 1, &format!("expected a JSON object, found {}", kind_of(&other))))),
                    Err(e) => return Err(Error::Invalid(located(path, i + 1, &format!("malformed JSON: {e}")))),
                }
            }
        }
        "json" => {
            crate::files::check_unique_keys(&text, "json").map_err(|e| Error::Invalid(format!("{}: malformed JSON: {e}", path.display())))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| Error::Invalid(located(path, e.line(), &format!("malformed JSON: {e}"))))?;
            let Value::Array(items) = value else {
                return Err(Error::Invalid(format!("{}: expected a JSON array of records", path.display())));
            };
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::Object(fields) => out.push(Record { line: i + 1, fields }),
                    other => return Err(Error::Invalid(format!("{}: record {}: expected a JSON object, found {}", path.display(), i + 1, kind_of(&other)))),
                }
            }
        }
        _ => return Err(Error::Invalid(format!("{}: unknown dataset format (use .jsonl or .json)", path.display()))),
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!("{}: the dataset is empty", path.display())));
    }
    Ok(out)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The kind of the first record; every record is then checked against it.
pub fn detect_kind(path: &Path, records: &[Record]) -> Result<RecordKind> {
    let first = &records[0];
    let has = |k: &str| first.fields.contains_key(k);
    if has("messages") {
        Ok(RecordKind::Messages)
    } else if has("prompt") && has("completion") {
        Ok(RecordKind::PromptCompletion)
    } else if has("text") {
        Ok(RecordKind::Text)
    } else if has("source") && has("target") {
        Err(Error::Invalid(located(
            path,
            first.line,
            "`source`/`target` records are sequence-to-sequence data: they train an encoder-decoder model (T5), and this model is decoder-only (it reads `text`, `prompt`/`completion` or `messages` records)",
        )))
    } else {
        let keys: Vec<&str> = first.fields.keys().map(String::as_str).collect();
        Err(Error::Invalid(located(path, first.line, &format!("no `text`, `prompt`/`completion` or `messages` field (found: {})", keys.join(", ")))))
    }
}

fn string_field<'a>(path: &Path, r: &'a Record, key: &str) -> Result<&'a str> {
    match r.fields.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::Invalid(located(path, r.line, &format!("field `{key}` must be a string, found {}", kind_of(other))))),
        None => Err(Error::Invalid(located(path, r.line, &format!("missing field `{key}`")))),
    }
}

/// Tokenizes the `text` field of every record (in parallel), with the tokenizer's special tokens.
pub fn tokenize_texts(path: &Path, records: &[Record], tok: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    records
        .par_iter()
        .map(|r| {
            let text = string_field(path, r, "text")?;
            tok.encode_text(text).map_err(|e| Error::Invalid(located(path, r.line, &e.to_string())))
        })
        .collect::<Vec<Result<_>>>()
        // in record order, so the error reported is the first bad line whatever the threads did
        .into_iter()
        .collect()
}

/// `run_clm.py`'s `group_texts`: concatenates everything and cuts blocks of `block_size`,
/// dropping the remainder; labels are the inputs.
pub fn group_texts(tokenized: &[Vec<u32>], block_size: usize) -> Vec<Example> {
    let all: Vec<u32> = tokenized.iter().flatten().copied().collect();
    let total = (all.len() / block_size.max(1)) * block_size;
    all[..total].chunks(block_size.max(1)).map(|c| Example { input_ids: c.to_vec(), labels: c.iter().map(|&x| x as i32).collect() }).collect()
}

/// `prompt`/`completion` records: the prompt with the tokenizer's special tokens, then the
/// completion and the EOS token; labels -100 over the prompt. Examples are truncated to
/// `max_length`; one whose completion is cut away entirely is an error naming its line.
pub fn prompt_completion(path: &Path, records: &[Record], tok: &Tokenizer, max_length: Option<usize>) -> Result<Vec<Example>> {
    records
        .par_iter()
        .map(|r| {
            let p = tok.encode(string_field(path, r, "prompt")?, true)?.ids;
            let mut c = tok.encode(string_field(path, r, "completion")?, false)?.ids;
            if let Some(eos) = &tok.eos {
                c.push(eos.id);
            }
            let mut ex =
                Example { labels: std::iter::repeat_n(IGNORE_INDEX, p.len()).chain(c.iter().map(|&x| x as i32)).collect(), input_ids: [p, c].concat() };
            if let Some(l) = max_length {
                super::collate::truncate(&mut ex, l);
            }
            // the causal shift: position t predicts t + 1, so a label at position 0 is never used
            if ex.labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
                return Err(Error::Invalid(located(path, r.line, "no completion tokens left to learn from (the prompt fills max_seq_length)")));
            }
            Ok(ex)
        })
        .collect::<Vec<Result<_>>>()
        // in record order, so the error reported is the first bad line whatever the threads did
        .into_iter()
        .collect()
}

/// `messages` records rendered with the tokenizer's chat template; labels on assistant replies.
pub fn conversations(path: &Path, records: &[Record], tok: &Tokenizer, max_length: Option<usize>) -> Result<Vec<Example>> {
    let tmpl = super::chat::ChatTemplate::for_tokenizer(tok)?;
    records
        .iter()
        .map(|r| {
            let messages = match r.fields.get("messages") {
                Some(Value::Array(m)) => m,
                Some(other) => return Err(Error::Invalid(located(path, r.line, &format!("field `messages` must be a list, found {}", kind_of(other))))),
                None => return Err(Error::Invalid(located(path, r.line, "missing field `messages`"))),
            };
            for (i, m) in messages.iter().enumerate() {
                let ok = m.get("role").is_some_and(Value::is_string) && m.get("content").is_some_and(Value::is_string);
                if !ok {
                    return Err(Error::Invalid(located(path, r.line, &format!("messages[{i}] needs string `role` and `content` fields"))));
                }
            }
            let mut ex = tmpl.tokenize(tok, messages).map_err(|e| Error::Invalid(located(path, r.line, &e.to_string())))?;
            if let Some(l) = max_length {
                super::collate::truncate(&mut ex, l);
            }
            if ex.labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
                return Err(Error::Invalid(located(path, r.line, "no assistant tokens to learn from (no assistant turn, or truncated away)")));
            }
            Ok(ex)
        })
        .collect()
}

/// A dataset file's examples for causal-LM training: packed blocks for `text` (when
/// `block_size` is given; otherwise one truncated example per record), masked prompts for
/// `prompt`/`completion`.
pub fn load_examples(path: &Path, tok: &Tokenizer, block_size: Option<usize>, max_seq_length: Option<usize>) -> Result<(RecordKind, Vec<Example>)> {
    let records = read_records(path)?;
    let kind = detect_kind(path, &records)?;
    let examples = match kind {
        RecordKind::Text => {
            let tokenized = tokenize_texts(path, &records, tok)?;
            match block_size {
                Some(b) => group_texts(&tokenized, b),
                None => tokenized
                    .into_iter()
                    .map(|ids| {
                        let mut ex = Example { labels: ids.iter().map(|&x| x as i32).collect(), input_ids: ids };
                        if let Some(l) = max_seq_length {
                            super::collate::truncate(&mut ex, l);
                        }
                        ex
                    })
                    .collect(),
            }
        }
        RecordKind::PromptCompletion => prompt_completion(path, &records, tok, max_seq_length)?,
        RecordKind::Messages => conversations(path, &records, tok, max_seq_length)?,
    };
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no examples after tokenization (the text is shorter than one block of {} tokens?)",
            path.display(),
            block_size.unwrap_or(0)
        )));
    }
    Ok((kind, examples))
}

/// The dataset's numeric columns: the top-level number fields present in every record, as
/// `(name, one value per record)`, sorted by name. Plugins receive them per example (e.g. a
/// `weight` column for a weighted loss). Text packed into blocks has no per-example columns.
pub fn numeric_columns(path: &Path) -> Result<Vec<(String, Vec<f64>)>> {
    let records = read_records(path)?;
    let mut names: Vec<String> = records[0].fields.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k.clone()).collect();
    names.retain(|n| records.iter().all(|r| r.fields.get(n).is_some_and(Value::is_number)));
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| {
            let values = records.iter().map(|r| r.fields[&n].as_f64().unwrap_or(f64::NAN)).collect();
            (n, values)
        })
        .collect())
}
