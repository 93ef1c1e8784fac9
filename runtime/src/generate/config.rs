//! `GenerationConfig` under transformers' names and defaults: read from the model's
//! `generation_config.json`, overridden by the run's settings (which win), and checked before any
//! work. Beam search is refused until it is implemented.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub max_new_tokens: Option<usize>,
    pub max_length: usize,
    pub min_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub no_repeat_ngram_size: usize,
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: Value,
    pub num_return_sequences: usize,
    /// One id or several.
    pub eos_token_id: Value,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// The first generated token is this one (BART's summarization configs: `<s>`).
    pub forced_bos_token_id: Option<u32>,
    /// The last token `max_length` allows is this one (or one of these; BART's configs: `</s>`).
    pub forced_eos_token_id: Value,
    pub seed: Option<u64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: None,
            max_length: 20,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: Value::Bool(false),
            num_return_sequences: 1,
            eos_token_id: Value::Null,
            pad_token_id: None,
            bos_token_id: None,
            forced_bos_token_id: None,
            forced_eos_token_id: Value::Null,
            seed: None,
        }
    }
}

/// The settings transformers' `GenerationConfig.from_model_config` takes from `config.json` when
/// a model has no `generation_config.json` and that only encoder-decoder configs carry.
const FROM_MODEL_CONFIG: &[&str] = &["forced_bos_token_id", "forced_eos_token_id"];

/// Keys of `generation_config.json` that carry no setting.
const IGNORED: &[&str] = &["transformers_version", "_from_model_config", "use_cache", "decoder_start_token_id"];

impl GenerationConfig {
    /// HF's precedence: the defaults, then the model's `generation_config.json`, then `overrides`.
    pub fn load(model_dir: &Path, overrides: &[(String, Value)]) -> Result<Self> {
        let path = model_dir.join("generation_config.json");
        let mut map = Map::new();
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => map = m,
                _ => return Err(Error::config(&path, "expected a JSON object")),
            }
            map.retain(|k, _| Self::known(k));
            crate::files::check_unique_keys(&text, "json").map_err(|e| Error::config(&path, e))?;
            let mut own = map.clone();
            own.retain(|k, _| !IGNORED.contains(&k.as_str()));
            // the file's own values first, so that an error in them names the file
            serde_path_to_error::deserialize::<_, GenerationConfig>(Value::Object(own))
                .map_err(|e| Error::config(&path, format!("`{}`: {}", e.path(), e.inner())))?;
        } else if let Ok(text) = std::fs::read_to_string(model_dir.join("config.json")) {
            // no generation config: what transformers derives from the model's config
            if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&text) {
                map.extend(m.into_iter().filter(|(k, v)| FROM_MODEL_CONFIG.contains(&k.as_str()) && !v.is_null()));
            }
        }
        for (k, v) in overrides {
            if !Self::known(k) {
                return Err(Error::Invalid(format!("unknown generation setting `{k}`")));
            }
            map.insert(k.clone(), v.clone());
        }
        map.retain(|k, _| !IGNORED.contains(&k.as_str()));
        serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| Error::Invalid(format!("generation setting `{}`: {}", e.path(), e.inner())))
    }

    fn known(key: &str) -> bool {
        IGNORED.contains(&key)
            || serde_json::to_value(GenerationConfig::default()).ok().and_then(|v| v.as_object().map(|m| m.contains_key(key))).unwrap_or(false)
    }

    /// The EOS ids (one or several).
    pub fn eos_ids(&self) -> Vec<u32> {
        ids_of(&self.eos_token_id)
    }

    /// The forced EOS ids (one or several).
    pub fn forced_eos_ids(&self) -> Vec<u32> {
        ids_of(&self.forced_eos_token_id)
    }

    /// New tokens to generate after a prompt of `prompt_len` (`max_new_tokens`, else
    /// `max_length` counts the prompt, as transformers).
    pub fn new_tokens(&self, prompt_len: usize) -> usize {
        self.max_new_tokens.unwrap_or(self.max_length.saturating_sub(prompt_len))
    }

    /// The checks transformers makes (and a few it only warns about), before any work.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.num_beams == 0 {
            return bad("num_beams must be at least 1".into());
        }
        if self.num_beams > 1 && self.do_sample {
            return Err(Error::Unsupported("beam sampling (num_beams > 1 with do_sample) is not supported; use one or the other".into()));
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            return bad(format!(
                "num_return_sequences ({}) must be between 1 and num_beams ({}); sampling several sequences per prompt is not supported",
                self.num_return_sequences, self.num_beams
            ));
        }
        match &self.early_stopping {
            Value::Bool(_) => {}
            Value::String(s) if s == "never" => {}
            other => return bad(format!("early_stopping must be true, false or \"never\", found {other}")),
        }
        if !self.length_penalty.is_finite() {
            return bad(format!("length_penalty must be finite, found {}", self.length_penalty));
        }
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be > 0 when sampling, found {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must lie in (0, 1], found {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty must be > 0, found {}", self.repetition_penalty));
        }
        if let Some(id) = self.eos_ids().into_iter().chain(self.pad_token_id).find(|&id| id as usize >= vocab) {
            return bad(format!("token id {id} (eos/pad) is outside the vocabulary (size {vocab})"));
        }
        if let Some(id) = self.forced_eos_ids().into_iter().chain(self.forced_bos_token_id).find(|&id| id as usize >= vocab) {
            return bad(format!("token id {id} (forced_bos_token_id / forced_eos_token_id) is outside the vocabulary (size {vocab})"));
        }
        Ok(())
    }
}

/// One id or a list of ids (`eos_token_id`, `forced_eos_token_id`).
fn ids_of(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Value::Array(a) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}
