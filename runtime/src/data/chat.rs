//! Chat templates: transformers' `apply_chat_template` rendered by a Jinja engine (minijinja, with
//! Python string methods and `raise_exception`, `trim_blocks` and `lstrip_blocks` as transformers
//! sets them), and conversations tokenized with labels on the assistant replies only.

use minijinja::{Environment, ErrorKind};
use serde_json::{json, Value};

use super::dataset::Example;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::protocol::IGNORE_INDEX;

pub struct ChatTemplate {
    env: Environment<'static>,
    specials: Value,
}

impl ChatTemplate {
    /// The tokenizer's `chat_template` (from `tokenizer_config.json` or `chat_template.jinja`).
    pub fn for_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let source = tok.chat_template.clone().ok_or_else(|| {
            Error::Invalid(format!("{}: the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)", tok.dir.display()))
        })?;
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(|e| Error::Invalid(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source).map_err(|e| Error::Invalid(format!("{}: chat_template does not parse: {e}", tok.dir.display())))?;
        let text = |t: &Option<super::tokenizer::SpecialToken>| t.as_ref().map_or(Value::Null, |s| Value::String(s.text.clone()));
        let specials = json!({"bos_token": text(&tok.bos), "eos_token": text(&tok.eos), "pad_token": text(&tok.pad), "unk_token": text(&tok.unk)});
        Ok(ChatTemplate { env, specials })
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.specials.clone();
        ctx["messages"] = Value::Array(messages.to_vec());
        ctx["add_generation_prompt"] = Value::Bool(add_generation_prompt);
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Invalid(e.to_string()))?;
        tmpl.render(minijinja::Value::from(minijinja::value::Serde(&ctx))).map_err(|e| Error::Invalid(format!("rendering the chat template: {e}")))
    }

    /// The conversation's tokens (as `apply_chat_template(tokenize=True)`: no extra special tokens)
    /// with labels on the assistant replies: each reply's span is what rendering up to it adds to
    /// the rendering of the conversation before it with the generation prompt.
    pub fn tokenize(&self, tok: &Tokenizer, messages: &[Value]) -> Result<Example> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let prefix = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
                return Err(Error::Invalid(
                    "the chat template does not render a conversation as a prefix of its continuation, so assistant turns cannot be located".into(),
                ));
            }
            spans.push((prefix.len(), upto.len()));
        }
        let (ids, offsets) = tok.encode_with_offsets(&full, false)?;
        let labels = ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(s, e))| if e > s && spans.iter().any(|&(a, b)| s >= a && e <= b) { id as i32 } else { IGNORE_INDEX })
            .collect();
        Ok(Example { input_ids: ids, labels })
    }
}
