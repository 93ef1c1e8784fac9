//! A model's tokenizer: `tokenizer.json` through the `tokenizers` crate, with the special tokens,
//! padding side and length limit of `tokenizer_config.json` (and `special_tokens_map.json`), as
//! transformers' `PreTrainedTokenizerFast` reads them.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
pub use crate::protocol::Side;
use crate::protocol::TokenDecoder;

/// A byte range `[start, end)` of a text.
pub type Span = (usize, usize);

/// One special token: its text and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// The result of encoding one text.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    /// 1 where the token is a special token (added by the template or written in the text).
    pub special: Vec<u8>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    pub padding_side: Side,
    /// `model_max_length`, when the config sets a real one.
    pub model_max_length: Option<usize>,
    pub chat_template: Option<String>,
    pub dir: PathBuf,
}

fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    crate::files::check_unique_keys(&text, "json").map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(Error::config(path, "expected a JSON object")),
        Err(e) => Err(Error::config(path, format!("not valid JSON: {e}"))),
    }
}

/// A template post-processor (`TemplateProcessing`, alone or in a `Sequence`) may only insert
/// special tokens its `special_tokens` defines: the tokenizers crate would panic at the first
/// encoding otherwise.
fn check_template(post: &Value) -> std::result::Result<(), String> {
    match post.get("type").and_then(Value::as_str) {
        Some("Sequence") => post.get("processors").and_then(Value::as_array).into_iter().flatten().try_for_each(check_template),
        Some("TemplateProcessing") => {
            let defined = post.get("special_tokens").and_then(Value::as_object);
            for piece in ["single", "pair"].iter().filter_map(|k| post.get(*k)).filter_map(Value::as_array).flatten() {
                let Some(id) = piece.get("SpecialToken").and_then(|t| t.get("id")).and_then(Value::as_str) else { continue };
                if !defined.is_some_and(|d| d.contains_key(id)) {
                    return Err(format!("the template inserts the special token {id:?}, which its `special_tokens` does not define"));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json` and, when present, `DIR/tokenizer_config.json` and
    /// `DIR/special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Invalid(format!(
                "{}: no tokenizer.json (a fast tokenizer file is needed; save the tokenizer with transformers to get one)",
                dir.display()
            )));
        }
        // read once, for the tokenizers crate and for the template check (which parses it again
        // only when it holds a template; no check of repeated keys here, as the crate makes none)
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut inner: tokenizers::Tokenizer = text.parse().map_err(|e| Error::config(&path, format!("not a valid tokenizer file: {e}")))?;
        if text.contains("TemplateProcessing") {
            let post = serde_json::from_str::<Value>(&text).ok().and_then(|mut v| v.get_mut("post_processor").map(Value::take));
            if let Some(post) = post {
                check_template(&post).map_err(|e| Error::config(&path, format!("`post_processor`: {e}")))?;
            }
        }
        // padding and truncation are the runtime's (collate.rs), not the file's
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::config(&path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut cfg = read_json_object(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        for (k, v) in read_json_object(&cfg_path)?.unwrap_or_default() {
            cfg.insert(k, v);
        }
        let special = |field: &str| -> Result<Option<SpecialToken>> {
            let Some(v) = cfg.get(field).filter(|v| !v.is_null()) else { return Ok(None) };
            let text = token_text(v).ok_or_else(|| Error::config(&cfg_path, format!("`{field}` must be a token string, found {v}")))?;
            let id = inner
                .token_to_id(&text)
                .ok_or_else(|| Error::config(&cfg_path, format!("`{field}` {text:?} is not in the vocabulary of {}", path.display())))?;
            Ok(Some(SpecialToken { text, id }))
        };
        let padding_side = match cfg.get("padding_side").and_then(Value::as_str) {
            None => Side::Right,
            Some(s) => Side::parse(s).ok_or_else(|| Error::config(&cfg_path, format!("`padding_side` must be \"left\" or \"right\", found {s:?}")))?,
        };
        let model_max_length = cfg.get("model_max_length").and_then(Value::as_f64).filter(|x| (1.0..1e9).contains(x)).map(|x| x as usize);
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Tokenizer {
            bos: special("bos_token")?,
            eos: special("eos_token")?,
            pad: special("pad_token")?,
            unk: special("unk_token")?,
            padding_side,
            model_max_length,
            chat_template,
            dir: dir.to_path_buf(),
            inner,
        })
    }

    /// The same tokenizer truncating each text to `max_length` tokens with the template's
    /// special tokens counted in and kept (`tokenizer(text, max_length=..., truncation=True)`).
    pub fn truncating(&self, max_length: usize) -> Result<Tokenizer> {
        let mut inner = self.inner.clone();
        let params = tokenizers::TruncationParams { max_length, ..Default::default() };
        inner.with_truncation(Some(params)).map_err(|e| Error::Invalid(format!("truncation to {max_length} tokens: {e}")))?;
        Ok(Tokenizer {
            inner,
            bos: self.bos.clone(),
            eos: self.eos.clone(),
            pad: self.pad.clone(),
            unk: self.unk.clone(),
            padding_side: self.padding_side,
            model_max_length: self.model_max_length,
            chat_template: self.chat_template.clone(),
            dir: self.dir.clone(),
        })
    }

    /// `tokenizer(text, add_special_tokens=...)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoded> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Invalid(format!("tokenizing {}: {e}", shown(text))))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            tokens: enc.get_tokens().to_vec(),
            special: enc.get_special_tokens_mask().iter().map(|&m| m as u8).collect(),
        })
    }

    /// The ids of a `text` record, as [`Tokenizer::encode`] gives them, with a record longer than
    /// [`LONG_TEXT_BYTES`] tokenized in pieces cut at whitespace (a fast tokenizer's memory grows
    /// far faster than its input on one huge string: a 5 MB line took 1.9 GB). The special tokens
    /// the template adds go around the whole, once. At whitespace a byte-level or word-level
    /// tokenizer gives the same tokens as on the whole text; a piece with no whitespace in
    /// [`LONG_TEXT_BYTES`] is cut at a character boundary, where a token may differ.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        if text.len() <= LONG_TEXT_BYTES {
            return Ok(self.encode(text, true)?.ids);
        }
        // the template's tokens around a one-character text
        let (with, without) = (self.encode("a", true)?.ids, self.encode("a", false)?.ids);
        let at = with.windows(without.len().max(1)).position(|w| w == without.as_slice()).unwrap_or(with.len());
        let (prefix, suffix) = (&with[..at], &with[(at + without.len()).min(with.len())..]);
        let mut ids = prefix.to_vec();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = rest.len().min(LONG_TEXT_BYTES);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut < rest.len() {
                // before the last whitespace, which stays with the next piece (as byte-level
                // pre-tokenizers attach a space to the word after it)
                if let Some(ws) = rest[..cut].rfind(char::is_whitespace).filter(|&w| w > 0) {
                    cut = ws;
                }
            }
            ids.extend(self.encode(&rest[..cut], false)?.ids);
            rest = &rest[cut..];
        }
        ids.extend_from_slice(suffix);
        Ok(ids)
    }

    /// Ids and the byte span of the text each token came from (empty for added template tokens).
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Invalid(format!("tokenizing {}: {e}", shown(text))))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Invalid(format!("decoding {ids:?}: {e}")))
    }

    /// Vocabulary size including added tokens (`len(tokenizer)`).
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TokenDecoder for Tokenizer {
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        Tokenizer::decode(self, ids, skip_special_tokens)
    }
}

/// Records longer than this many bytes are tokenized in pieces ([`Tokenizer::encode_text`]).
pub const LONG_TEXT_BYTES: usize = 1 << 18;

/// A text for an error message: quoted, and cut after 80 characters.
fn shown(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((i, _)) => format!("{:?}... ({} bytes)", &text[..i], text.len()),
        None => format!("{text:?}"),
    }
}
