//! Decoding with an encoder-decoder model, as transformers' `generate` runs T5 and BART: the encoder runs
//! once over the sources; each decoder layer computes the cross attention's keys and values
//! from its output once, and keeps a key/value cache for its self-attention, so each new token
//! costs one token's work. Beam search reorders the self-attention caches; the beams of one
//! source share its encoder output, so the cross attention's state never moves.

use super::seq2seq::Seq2SeqModel;
use super::seq2seq_config::Family;
use super::seq2seq_pass::{Geometry, LayerActs, LayerCtx, NormActs, SelfCache};
use super::t5::bucket_map;
use crate::backend::seq2seq::Seq2SeqOps;
use crate::error::{Error, Result};

/// The state of `rows` rows being decoded (each source repeated over `rows / sources` rows, in
/// order: source `i`'s rows are `i * k .. (i + 1) * k`).
pub struct Seq2SeqDecode<B: Seq2SeqOps> {
    rows: usize,
    max_len: usize,
    slot: usize,
    src_len: usize,
    /// The encoder's output, `[rows * src_len, d_model]`, and the source mask.
    enc: B::Buf,
    enc_mask: B::Ids,
    layers: Vec<LayerActs<B>>,
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    spare: B::Buf,
    /// 1 where a self-attention cache slot holds a token: `[rows, max_len]`.
    mask: Vec<i32>,
    x: B::Buf,
    y: B::Buf,
    /// BART's `layernorm_embedding` state.
    emb: NormActs<B>,
    out: B::Buf,
    rstd: B::Buf,
    logits: B::Buf,
}

impl<B: Seq2SeqOps> Seq2SeqModel<B> {
    /// Runs the encoder over `sources` (right-padded together) and makes the state for `rows`
    /// rows (a multiple of the sources) of up to `max_len` decoder tokens.
    pub fn decode_start(&self, sources: &[Vec<u32>], rows: usize, max_len: usize) -> Result<Seq2SeqDecode<B>> {
        let (be, c) = (&self.backend, &self.config);
        let n = sources.len();
        if n == 0 || !rows.is_multiple_of(n) || sources.iter().any(Vec::is_empty) || max_len == 0 {
            return Err(Error::Invalid(format!("decoding {rows} rows of {n} sources: every source needs a token, and each the same number of rows")));
        }
        if let Some(id) = sources.iter().flatten().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!("source token {id} is outside the vocabulary (size {})", c.vocab_size)));
        }
        let s = sources.iter().map(Vec::len).max().unwrap_or(0);
        c.check_lengths(s, max_len)?;
        self.check_decode_memory(rows, s, max_len)?;
        let mut ids = Vec::with_capacity(n * s);
        let mut mask = Vec::with_capacity(n * s);
        for src in sources {
            ids.extend(src.iter().map(|&t| t as i32).chain(std::iter::repeat_n(c.pad_token_id as i32, s - src.len())));
            mask.extend(std::iter::repeat_n(1, src.len()).chain(std::iter::repeat_n(0, s - src.len())));
        }
        let enc_geo = Geometry { batch: n, len: s, src_len: s, decoder: false };
        let enc = self.stack_fwd(enc_geo, &ids, None, &be.upload_ids(&mask)?, None, (None, None))?;
        let per = rows / n;
        let d = c.d_model;
        let mut out = be.zeros(rows * s * d)?;
        let mut rows_mask = Vec::with_capacity(rows * s);
        for r in 0..rows {
            be.copy_range(&mut out, r * s * d, &enc.out, (r / per) * s * d, s * d);
            rows_mask.extend_from_slice(&mask[(r / per) * s..(r / per + 1) * s]);
        }
        let inner = c.inner();
        let z = |n: usize| be.zeros(n);
        let cache = rows * max_len * inner;
        let layers = (0..c.num_decoder_layers)
            .map(|_| LayerActs::new(be, c, rows, rows * c.num_heads * max_len, Some((rows * s, rows * c.num_heads * s))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Seq2SeqDecode {
            rows,
            max_len,
            slot: 0,
            src_len: s,
            enc: out,
            enc_mask: be.upload_ids(&rows_mask)?,
            layers,
            k: (0..c.num_decoder_layers).map(|_| z(cache)).collect::<Result<_>>()?,
            v: (0..c.num_decoder_layers).map(|_| z(cache)).collect::<Result<_>>()?,
            spare: z(0)?,
            mask: vec![0; rows * max_len],
            x: z(rows * d)?,
            y: z(rows * d)?,
            emb: NormActs::new(be, c, if self.layout.decoder.ln_emb.is_some() { rows } else { 0 })?,
            out: z(rows * d)?,
            rstd: z(rows)?,
            logits: z(rows * c.vocab_size)?,
        })
    }

    /// An error before any allocation when the state of `rows` rows (sources of `s` tokens, up
    /// to `max_len` decoder tokens) would not fit in the memory available.
    fn check_decode_memory(&self, rows: usize, s: usize, max_len: usize) -> Result<()> {
        let c = &self.config;
        let (l, inner, d) = (c.num_decoder_layers as u128, c.inner() as u128, c.d_model as u128);
        let (rows, s, t) = (rows as u128, s as u128, max_len as u128);
        let h = c.num_heads as u128;
        // self-attention caches, cross keys/values, probabilities, the encoder output, the mask
        let floats = rows * (2 * l * t * inner + l * (2 * s * inner + h * (t + s)) + s * d + t + c.vocab_size as u128);
        let needed = 4 * floats;
        if let Some(available) = crate::backend::device::host_memory_budget().filter(|&a| needed > a) {
            let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
            return Err(Error::Invalid(format!(
                "generation needs {:.2} GiB of decoder state for {rows} rows (sources x num_beams) of {max_len} tokens, but {:.2} GiB of memory is available; lower max_new_tokens or num_beams",
                gib(needed),
                gib(available)
            )));
        }
        Ok(())
    }

    /// Feeds one decoder token per row and returns the next-token logits, `[rows, vocab]`.
    pub fn decode_step(&self, st: &mut Seq2SeqDecode<B>, ids: &[i32]) -> Result<Vec<f32>> {
        let (be, c) = (&self.backend, &self.config);
        let (rows, v) = (st.rows, c.vocab_size);
        if ids.len() != rows {
            return Err(Error::Invalid(format!("decode step: {} ids for {rows} rows", ids.len())));
        }
        if st.slot >= st.max_len {
            return Err(Error::Invalid(format!("the decoder's cache is full ({} tokens)", st.max_len)));
        }
        if let Some(id) = ids.iter().find(|&&id| id < 0 || id as usize >= v) {
            return Err(Error::Invalid(format!("token id {id} is outside the vocabulary (size {v})")));
        }
        for r in 0..rows {
            st.mask[r * st.max_len + st.slot] = 1;
        }
        let mask = be.upload_ids(&st.mask)?;
        let stack = &self.layout.decoder;
        // T5: the new query's bias against every slot (those after it are masked)
        let bias = match (c.family, stack.rel_bias) {
            (Family::T5(t), Some(table)) => {
                let buckets = be.upload_ids(&bucket_map(1, st.max_len, st.slot, false, &t))?;
                let mut bias = be.zeros(c.num_heads * st.max_len)?;
                be.position_bias_fwd(&mut bias, &self.params[table], &buckets, c.num_heads);
                Some(bias)
            }
            _ => None,
        };
        // BART: the new token's learned position
        let pos: Vec<i32> = if stack.positions.is_some() { vec![st.slot as i32 + 2; rows] } else { Vec::new() };
        self.embed(true, &be.upload_ids(ids)?, &be.upload_ids(&pos)?, &mut st.x, &mut st.emb, None, rows);
        let geo = Geometry { batch: rows, len: 1, src_len: st.src_len, decoder: true };
        for (l, lp) in stack.layers.iter().enumerate() {
            let cache = SelfCache { k: &mut st.k[l], v: &mut st.v[l], slot: st.slot, max_len: st.max_len, mask: &mask };
            let ctx = LayerCtx { bias: bias.as_ref(), enc: Some(&st.enc), mask: &st.enc_mask, cross_ready: st.slot > 0, cache: Some(cache), drop: None };
            self.layer_fwd(lp, &st.x, &mut st.y, &mut st.layers[l], geo, ctx);
            std::mem::swap(&mut st.x, &mut st.y);
        }
        self.stack_out(stack, &st.x, &mut st.out, &mut st.rstd, None)?;
        if c.scale_decoder_outputs {
            be.scale(&mut st.out, (c.d_model as f32).powf(-0.5));
        }
        self.head().fwd(be, &self.unit_params(), &mut st.logits, &st.out, rows);
        st.slot += 1;
        be.download(&st.logits)
    }
}

impl<B: Seq2SeqOps> Seq2SeqDecode<B> {
    /// Beam search: row `r` takes over the self-attention cache of row `src[r]` (a row of the
    /// same source, so the cross attention's state stays).
    pub fn reorder(&mut self, be: &B, src: &[usize]) -> Result<()> {
        if src.iter().enumerate().all(|(r, &s)| r == s) {
            return Ok(());
        }
        crate::nn::reorder_rows(be, self.k.iter_mut().chain(self.v.iter_mut()), &mut self.spare, self.rows, src)?;
        let w = self.max_len;
        self.mask = src.iter().flat_map(|&s| self.mask[s * w..(s + 1) * w].to_vec()).collect();
        Ok(())
    }
}
