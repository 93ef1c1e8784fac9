//! Generation with an encoder-decoder model (T5), as `transformers.generate` runs it: each row's
//! decoder starts from `decoder_start_token_id`, the sources are encoded once, and the same
//! strategies as for decoder-only models (greedy, sampling, beam search, the logits processors)
//! pick the tokens. `max_length` counts the start token, as transformers counts it.

use super::{generate_with, Decoder, GenerationConfig};
use crate::backend::seq2seq::Seq2SeqOps;
use crate::error::{Error, Result};
use crate::model::seq2seq::Seq2SeqModel;
use crate::model::Seq2SeqDecode;

/// An encoder-decoder model over its sources as a [`Decoder`].
pub struct EncoderDecoder<'a, B: Seq2SeqOps> {
    model: &'a Seq2SeqModel<B>,
    sources: &'a [Vec<u32>],
    st: Option<Seq2SeqDecode<B>>,
}

impl<B: Seq2SeqOps> Decoder for EncoderDecoder<'_, B> {
    fn vocab(&self) -> usize {
        self.model.config.vocab_size
    }
    fn start(&mut self, prompts: &[Vec<u32>], per: usize, _pad: u32, max_len: usize) -> Result<Vec<f32>> {
        let width = prompts.first().map_or(0, Vec::len);
        if width == 0 || prompts.iter().any(|p| p.len() != width) {
            return Err(Error::Invalid("the decoder prefixes of an encoder-decoder batch must have one length".into()));
        }
        let mut st = self.model.decode_start(self.sources, prompts.len().saturating_mul(per), max_len)?;
        let mut logits = Vec::new();
        for t in 0..width {
            let ids: Vec<i32> = prompts.iter().flat_map(|p| std::iter::repeat_n(p[t] as i32, per)).collect();
            logits = self.model.decode_step(&mut st, &ids)?;
        }
        self.st = Some(st);
        Ok(logits)
    }
    fn step(&mut self, ids: &[i32]) -> Result<Vec<f32>> {
        let st = self.st.as_mut().ok_or_else(|| Error::Invalid("decoding has not started".into()))?;
        self.model.decode_step(st, ids)
    }
    fn reorder(&mut self, src: &[usize]) -> Result<()> {
        let st = self.st.as_mut().ok_or_else(|| Error::Invalid("decoding has not started".into()))?;
        st.reorder(&self.model.backend, src)
    }
}

/// Generates from each source under `cfg`; returns the generated tokens per row (without the
/// decoder's start token; `num_return_sequences` rows per source with beam search).
pub fn generate_seq2seq<B: Seq2SeqOps>(
    model: &Seq2SeqModel<B>,
    sources: &[Vec<u32>],
    cfg: &GenerationConfig,
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    if sources.is_empty() || sources.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("every source needs at least one token".into()));
    }
    let prompts = vec![vec![model.config.decoder_start_token_id as u32]; sources.len()];
    let mut dec = EncoderDecoder { model, sources, st: None };
    generate_with(&mut dec, &prompts, cfg, on_token)
}
