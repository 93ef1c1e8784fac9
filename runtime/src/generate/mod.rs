//! Generation: a KV cache on the op set, so each new token costs one token's work, and greedy
//! decoding (transformers' `do_sample=False, num_beams=1`) over left-padded batches, with
//! transformers' position ids for left padding and its handling of finished rows.

pub mod config;
pub mod seq2seq;

pub use config::GenerationConfig;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::nn::{AttnCall, BlockBufs};

/// What the decoding strategies drive: a model with its cache, fed one token per row per step
/// (a decoder-only model over its prompts, or an encoder-decoder model's decoder over the
/// prefix that starts each row, its sources encoded once).
pub trait Decoder {
    fn vocab(&self) -> usize;
    /// Makes the state for `per` rows per prompt (beams repeat their prompt; prompt `i`'s rows are
    /// `i * per .. (i + 1) * per`) with room for `max_len` tokens each (an error before any
    /// large allocation when that does not fit in memory), feeds the prompts (left-padded with
    /// `pad`), and returns each row's next-token logits, `[rows, vocab]`.
    fn start(&mut self, prompts: &[Vec<u32>], per: usize, pad: u32, max_len: usize) -> Result<Vec<f32>>;
    /// Feeds one token per row; returns the next-token logits.
    fn step(&mut self, ids: &[i32]) -> Result<Vec<f32>>;
    /// Beam search: row `r` takes over the state of row `src[r]`.
    fn reorder(&mut self, src: &[usize]) -> Result<()>;
}

/// A decoder-only model as a [`Decoder`].
pub struct CausalLm<'a, B: Backend> {
    model: &'a Model<B>,
    st: Option<DecodeState<B>>,
}

impl<'a, B: Backend> CausalLm<'a, B> {
    pub fn new(model: &'a Model<B>) -> Self {
        CausalLm { model, st: None }
    }
    fn state(&mut self) -> Result<&mut DecodeState<B>> {
        self.st.as_mut().ok_or_else(|| Error::Invalid("decoding has not started".into()))
    }
}

impl<B: Backend> Decoder for CausalLm<'_, B> {
    fn vocab(&self) -> usize {
        self.model.config.vocab_size
    }
    fn start(&mut self, prompts: &[Vec<u32>], per: usize, pad: u32, max_len: usize) -> Result<Vec<f32>> {
        let mut st = DecodeState::new(self.model, prompts.len().saturating_mul(per), max_len)?;
        let expanded: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), per)).collect();
        let logits = prefill(self.model, &mut st, &expanded, pad)?;
        self.st = Some(st);
        Ok(logits)
    }
    fn step(&mut self, ids: &[i32]) -> Result<Vec<f32>> {
        let model = self.model;
        decode_step(model, self.state()?, ids, &vec![1; ids.len()])
    }
    fn reorder(&mut self, src: &[usize]) -> Result<()> {
        let be = &self.model.backend;
        self.state()?.reorder(be, src)
    }
}

/// The KV cache and the one-token activations of a batch being decoded.
pub struct DecodeState<B: Backend> {
    batch: usize,
    max_len: usize,
    slot: usize,
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// Beam search's reordering target, the size of one layer's key cache (swapped with each
    /// cache it reorders). Empty until the first reordering.
    spare: B::Buf,
    /// 1 where a cache slot holds a real token, per row: `[batch, max_len]`.
    mask: Vec<i32>,
    next_pos: Vec<i32>,
    /// One layer's input and output (swapped after each layer).
    x: B::Buf,
    y: B::Buf,
    ln: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
    ln2: B::Buf,
    mean2: B::Buf,
    rstd2: B::Buf,
    qkv: B::Buf,
    att: B::Buf,
    tmp: B::Buf,
    lora: crate::nn::LoraScratch<B>,
    res1: B::Buf,
    fc: B::Buf,
    act: B::Buf,
    logits: B::Buf,
}

impl<B: Backend> DecodeState<B> {
    /// Room for `max_len` tokens (prompt and generated) in each of `batch` rows.
    /// An error before any allocation when the caches would not fit in the memory available.
    pub fn new(model: &Model<B>, batch: usize, max_len: usize) -> Result<Self> {
        if model.is_sharded() {
            return Err(Error::Unsupported("generation needs the whole weights in one process; they are sharded over processes (fsdp `full_shard`)".into()));
        }
        let (be, c) = (&model.backend, &model.config);
        let kvd = c.n_kv_head * c.head_dim;
        // the key and value caches (f32) and the cache mask (i32), in 128-bit arithmetic
        let slots = batch as u128 * max_len as u128;
        let needed = 4 * slots * (2 * c.n_layer as u128 * kvd as u128 + 1);
        let available =
            if std::env::var_os("RUNTIME_MEMORY_BUDGET_MB").is_some() { None } else { be.free_memory() }.or_else(crate::backend::device::host_memory_budget);
        if let Some(available) = available.filter(|&a| needed > a) {
            let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
            return Err(Error::Invalid(format!(
                "generation needs {:.2} GiB of key/value cache for {batch} rows (prompts x num_beams) of {max_len} tokens (the prompt and max_new_tokens), but {:.2} GiB of memory is available; lower max_new_tokens or num_beams",
                gib(needed),
                gib(available)
            )));
        }
        let z = |n: usize| be.zeros(n);
        Ok(DecodeState {
            batch,
            max_len,
            slot: 0,
            k: (0..c.n_layer).map(|_| z(batch * max_len * kvd)).collect::<Result<_>>()?,
            v: (0..c.n_layer).map(|_| z(batch * max_len * kvd)).collect::<Result<_>>()?,
            spare: z(0)?,
            mask: vec![0; batch * max_len],
            next_pos: vec![0; batch],
            x: z(batch * c.hidden_size)?,
            y: z(batch * c.hidden_size)?,
            ln: z(batch * c.hidden_size)?,
            mean: z(batch)?,
            rstd: z(batch)?,
            ln2: z(batch * c.hidden_size)?,
            mean2: z(batch)?,
            rstd2: z(batch)?,
            qkv: z(batch * c.qkv_width())?,
            att: z(batch * c.n_head * c.head_dim)?,
            tmp: z(batch * c.hidden_size)?,
            lora: crate::nn::LoraScratch::new(be, batch, model.lora_dims(), false)?,
            res1: z(batch * c.hidden_size)?,
            fc: z(batch * c.fc_width())?,
            act: z(batch * c.intermediate_size)?,
            logits: z(batch * c.vocab_size)?,
        })
    }
}

impl<B: Backend> DecodeState<B> {
    /// Beam search: row `r` takes over the cache (keys, values, mask, positions) of row
    /// `src[r]`.
    pub fn reorder(&mut self, be: &B, src: &[usize]) -> Result<()> {
        debug_assert_eq!(src.len(), self.batch);
        if src.iter().enumerate().all(|(r, &s)| r == s) {
            return Ok(());
        }
        crate::nn::reorder_rows(be, self.k.iter_mut().chain(self.v.iter_mut()), &mut self.spare, self.batch, src)?;
        let w = self.max_len;
        self.mask = src.iter().flat_map(|&s| self.mask[s * w..(s + 1) * w].to_vec()).collect();
        self.next_pos = src.iter().map(|&s| self.next_pos[s]).collect();
        Ok(())
    }
}

/// Processes the prompts, left-padded with `pad` to one width, in one batched forward pass
/// that fills the cache (transformers' position ids for left padding: each row counts its own
/// tokens from 0), and returns the next-token logits `[batch, vocab]`. The cache must be empty.
pub fn prefill<B: Backend>(model: &Model<B>, st: &mut DecodeState<B>, prompts: &[Vec<u32>], pad: u32) -> Result<Vec<f32>> {
    let n = st.batch;
    if prompts.len() != n || st.slot != 0 {
        return Err(Error::Invalid(format!("prefill: {} prompts for a batch of {n} (the cache must be empty)", prompts.len())));
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 || width > st.max_len {
        return Err(Error::Invalid(format!("prefill: prompts of 1 to {} tokens are needed, the longest has {width}", st.max_len)));
    }
    let v = model.config.vocab_size;
    if let Some(id) = prompts.iter().flatten().find(|&&id| id as usize >= v) {
        return Err(Error::Invalid(format!("token id {id} is outside the vocabulary (size {v})")));
    }
    let mut ids = Vec::with_capacity(n * width);
    let mut mask = Vec::with_capacity(n * width);
    let mut pos = Vec::with_capacity(n * width);
    for p in prompts {
        let padding = width - p.len();
        ids.extend(std::iter::repeat_n(pad as i32, padding).chain(p.iter().map(|&x| x as i32)));
        mask.extend(std::iter::repeat_n(0, padding).chain(std::iter::repeat_n(1, p.len())));
        pos.extend(std::iter::repeat_n(1, padding).chain(0..p.len() as i32));
    }
    let batch =
        crate::model::Batch { batch: n, seq: width, input_ids: ids.clone(), attention_mask: Some(mask.clone()), position_ids: Some(pos), ..Default::default() };
    match model.prefill_into(&batch, &mut st.k, &mut st.v, st.max_len)? {
        Some(logits) => {
            for (b, p) in prompts.iter().enumerate() {
                st.mask[b * st.max_len..b * st.max_len + width].copy_from_slice(&mask[b * width..(b + 1) * width]);
                st.next_pos[b] = p.len() as i32;
            }
            st.slot = width;
            Ok(logits)
        }
        None => {
            let mut logits = Vec::new();
            for t in 0..width {
                let step: Vec<i32> = (0..n).map(|b| ids[b * width + t]).collect();
                let attend: Vec<i32> = (0..n).map(|b| mask[b * width + t]).collect();
                logits = decode_step(model, st, &step, &attend)?;
            }
            Ok(logits)
        }
    }
}

/// Feeds one token per row (`attend[b] = 0` for left padding) and returns the next-token logits,
/// `[batch, vocab]`.
pub fn decode_step<B: Backend>(model: &Model<B>, st: &mut DecodeState<B>, ids: &[i32], attend: &[i32]) -> Result<Vec<f32>> {
    let (be, c) = (&model.backend, &model.config);
    let (n, v) = (st.batch, c.vocab_size);
    if ids.len() != n || attend.len() != n {
        return Err(Error::Invalid(format!("decode step: {} ids for a batch of {n}", ids.len())));
    }
    if st.slot >= st.max_len {
        return Err(Error::Invalid(format!("the KV cache is full ({} tokens)", st.max_len)));
    }
    if let Some(id) = ids.iter().find(|&&id| id < 0 || id as usize >= v) {
        return Err(Error::Invalid(format!("token id {id} is outside the vocabulary (size {v})")));
    }
    // transformers: position ids count the real tokens before (left padding starts at 0); a pad
    // slot gets position 1, which never matters because it is masked as a key
    let mut pos = vec![1i32; n];
    for b in 0..n {
        if attend[b] != 0 {
            pos[b] = st.next_pos[b];
            st.next_pos[b] += 1;
        }
        st.mask[b * st.max_len + st.slot] = i32::from(attend[b] != 0);
    }
    if let Some(limit) = c.position_limit() {
        if let Some(&q) = pos.iter().find(|&&q| q as usize >= limit) {
            return Err(Error::Invalid(format!("position {q} exceeds the model's n_positions ({limit})")));
        }
    }
    let (ids_b, pos_b, mask_b) = (be.upload_ids(ids)?, be.upload_ids(&pos)?, be.upload_ids(&st.mask)?);
    // each unit's parameters at hand for its part of the step (bf16-held frozen weights are made
    // f32 a unit at a time; the token table's rows the step uses and the head a block at a time)
    let emb = model.embedding();
    if !model.held_embedding_fwd(&mut st.x, ids, &pos_b, &mut be.zeros(0)?)? {
        model.with_params(&emb.params(), |p| emb.fwd(be, p, &mut st.x, &ids_b, &pos_b))?;
    }
    for l in 0..c.n_layer {
        let block = model.block(l);
        model.with_params(&block.params(), |p| {
            let mut bufs = BlockBufs {
                ln1: &mut st.ln,
                ln1_mean: &mut st.mean,
                ln1_rstd: &mut st.rstd,
                qkv: &mut st.qkv,
                att_out: &mut st.att,
                res1: &mut st.res1,
                ln2: &mut st.ln2,
                ln2_mean: &mut st.mean2,
                ln2_rstd: &mut st.rstd2,
                fc: &mut st.fc,
                act: &mut st.act,
                tmp: &mut st.tmp,
                recompute: false,
            };
            let call =
                AttnCall::Decode { k_cache: &mut st.k[l], v_cache: &mut st.v[l], mask: &mask_b, pos: &pos_b, slot: st.slot, max_len: st.max_len, batch: n };
            // the same block forward as training, one token per row
            block.fwd(be, p, &st.x, &mut st.y, &mut bufs, &mut st.lora, call, None);
        })?;
        std::mem::swap(&mut st.x, &mut st.y);
    }
    let lnf = model.final_norm();
    model.with_params(&lnf.params(), |p| lnf.fwd(be, p, &mut st.ln, &mut st.mean, &mut st.rstd, &st.x))?;
    if !model.held_head_fwd(&mut st.logits, &st.ln, n)? {
        let head = model.head();
        let idx: Vec<usize> = std::iter::once(head.w).chain(head.b).collect();
        model.with_params(&idx, |p| head.fwd(be, p, &mut st.logits, &st.ln, n))?;
    }
    st.slot += 1;
    be.download(&st.logits)
}

/// Greedy decoding settings (transformers' names).
#[derive(Clone, Debug)]
pub struct GreedyOptions {
    pub max_new_tokens: usize,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: u32,
}

/// Greedy decoding: [`generate`] with `do_sample = false` and no logits processors.
pub fn greedy<B: Backend>(model: &Model<B>, prompts: &[Vec<u32>], opts: &GreedyOptions, on_token: impl FnMut(usize, u32)) -> Result<Vec<Vec<u32>>> {
    let cfg = GenerationConfig {
        max_new_tokens: Some(opts.max_new_tokens),
        eos_token_id: serde_json::json!(opts.eos_token_id),
        pad_token_id: Some(opts.pad_token_id),
        ..GenerationConfig::default()
    };
    generate(model, prompts, &cfg, on_token)
}

/// transformers' logits processors for one row, in its order: repetition penalty, n-gram ban,
/// minimum length, forced BOS (the first token after a one-token start) and forced EOS (the
/// last token `max_length` allows); then, when sampling, temperature, top-k and top-p.
fn process(cfg: &GenerationConfig, eos: &[u32], history: &[u32], new_tokens: usize, max_length: usize, scores: &mut [f32]) {
    if cfg.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            let x = &mut scores[t as usize];
            *x = if *x < 0.0 { *x * cfg.repetition_penalty } else { *x / cfg.repetition_penalty };
        }
    }
    let n = cfg.no_repeat_ngram_size;
    if n > 0 && history.len() + 1 >= n {
        let prefix = &history[history.len() + 1 - n..];
        for i in 0..(history.len() + 1).saturating_sub(n) {
            if &history[i..i + n - 1] == prefix {
                scores[history[i + n - 1] as usize] = f32::NEG_INFINITY;
            }
        }
    }
    if new_tokens < cfg.min_new_tokens {
        eos.iter().for_each(|&e| scores[e as usize] = f32::NEG_INFINITY);
    }
    // both apply when the start token is followed by the last one: transformers' forced EOS
    // runs after the forced BOS and wins
    let forced: Vec<u32> = match cfg.forced_bos_token_id {
        _ if history.len() + 1 == max_length && !cfg.forced_eos_ids().is_empty() => cfg.forced_eos_ids(),
        Some(bos) if history.len() == 1 => vec![bos],
        _ => Vec::new(),
    };
    if !forced.is_empty() {
        scores.fill(f32::NEG_INFINITY);
        forced.iter().for_each(|&t| scores[t as usize] = 0.0);
    }
}

/// Picks the next token: the first maximum, or a sample after temperature, top-k and top-p.
fn pick(cfg: &GenerationConfig, scores: &mut [f32], rng: &mut rand_chacha::ChaCha8Rng) -> u32 {
    if !cfg.do_sample {
        return scores.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 as u32;
    }
    use rand::RngExt;
    let raw = scores.to_vec();
    scores.iter_mut().for_each(|x| *x /= cfg.temperature);
    if scores.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
        // a temperature so small that the scaled scores overflow f32 (1e-39): scale the distance
        // to the best score in f64 instead, which tends to greedy as the temperature goes to 0
        let best = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (x, r) in scores.iter_mut().zip(&raw) {
            *x = ((*r as f64 - best as f64) / cfg.temperature as f64) as f32;
        }
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let k = if cfg.top_k == 0 { scores.len() } else { cfg.top_k.min(scores.len()) };
    order.truncate(k);
    let max = scores[order[0]];
    let probs: Vec<f64> = order.iter().map(|&i| ((scores[i] - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    // top-p: the smallest prefix (by probability) whose mass reaches top_p, at least one token
    let mut keep = probs.len();
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p / total;
            if acc >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    let mass: f64 = probs[..keep].iter().sum();
    let mut u = rng.random::<f64>() * mass;
    for (i, p) in probs[..keep].iter().enumerate() {
        if u < *p {
            return order[i] as u32;
        }
        u -= p;
    }
    order[keep - 1] as u32
}

/// `early_stopping`: `true`, `false` or `"never"` (transformers' values).
#[derive(Clone, Copy, PartialEq, Eq)]
enum EarlyStopping {
    True,
    False,
    Never,
}

/// transformers' beam search (`_beam_search`, transformers 5): per prompt, `num_beams` running
/// beams scored by summed log-probabilities (after the logits processors); each step keeps the
/// best `max(2, 1 + #eos) * num_beams` continuations, moves those of the top `num_beams` that end
/// in EOS (or reach the length limit) into the finished set with the length penalty
/// `score / generated_len^length_penalty`, continues with the best `num_beams` unfinished ones,
/// and stops as transformers' early-stopping heuristic says. Returns `num_return_sequences`
/// rows per prompt (best first), each padded (with the pad id, or EOS when the pad id is 0, as
/// transformers fills) to the longest returned sequence.
fn beam_search(dec: &mut dyn Decoder, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
    let v = dec.vocab();
    let nb = cfg.num_beams;
    let n = prompts.len();
    let eos = cfg.eos_ids();
    let pad = cfg.pad_token_id.or(eos.first().copied()).unwrap_or(0);
    let fill = if pad != 0 || eos.is_empty() { pad } else { eos[0] };
    let early = match &cfg.early_stopping {
        serde_json::Value::Bool(true) => EarlyStopping::True,
        serde_json::Value::String(s) if s == "never" => EarlyStopping::Never,
        _ => EarlyStopping::False,
    };
    let lp = cfg.length_penalty;
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_new = cfg.new_tokens(width);
    let max_length = width.saturating_add(max_new);
    let keep = 2.max(1 + eos.len()) * nb;
    // rows of the decode batch: prompt i's beams are rows i * nb .. (i + 1) * nb
    let rows = n.saturating_mul(nb);
    let padded: Vec<Vec<u32>> = prompts.iter().map(|p| std::iter::repeat_n(pad, width - p.len()).chain(p.iter().copied()).collect()).collect();
    let mut logits = dec.start(prompts, nb, pad, max_length.max(width + 1))?;
    // running beams: generated tokens and scores; finished: up to nb hypotheses per prompt
    let mut running: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut running_scores: Vec<f32> = (0..rows).map(|r| if r % nb == 0 { 0.0 } else { -1.0e9 }).collect();
    let mut finished: Vec<Vec<(Vec<u32>, f32, bool)>> = vec![vec![(Vec::new(), -1.0e9f32, false); nb]; n];
    let mut unsatisfied = vec![true; n];
    let mut cur_len = width;
    while cur_len < max_length {
        let mut all_hit = true;
        let mut src = vec![0usize; rows];
        let mut next_running = vec![Vec::new(); rows];
        let mut next_scores = vec![0.0f32; rows];
        for i in 0..n {
            // accumulated log-probabilities of every (beam, token) continuation
            let mut acc = vec![0.0f32; nb * v];
            for b in 0..nb {
                let r = i * nb + b;
                let z = &logits[r * v..(r + 1) * v];
                let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let lse = max + z.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
                let row = &mut acc[b * v..(b + 1) * v];
                for (o, &x) in row.iter_mut().zip(z) {
                    *o = x - lse;
                }
                let history: Vec<u32> = padded[i].iter().chain(&running[r]).copied().collect();
                process(cfg, &eos, &history, running[r].len(), max_length, row);
                row.iter_mut().for_each(|x| *x += running_scores[r]);
            }
            let mut order: Vec<usize> = (0..nb * v).collect();
            order.sort_by(|&a, &b| acc[b].total_cmp(&acc[a]).then(a.cmp(&b)));
            order.truncate(keep);
            // the stopping criteria on each candidate: EOS, or the length limit
            let cand: Vec<(usize, u32, f32, bool)> = order
                .iter()
                .map(|&j| {
                    let (b, tok) = (j / v, (j % v) as u32);
                    (b, tok, acc[j], eos.contains(&tok) || cur_len + 1 >= max_length)
                })
                .collect();
            all_hit &= cand.iter().all(|c| c.3);
            // the next running beams: the best candidates that did not stop
            let mut live: Vec<(usize, f32)> = cand.iter().enumerate().map(|(k, c)| (k, if c.3 { c.2 + -1.0e9 } else { c.2 })).collect();
            live.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for (slot, &(k, score)) in live.iter().take(nb).enumerate() {
                let (b, tok, _, _) = cand[k];
                let r = i * nb + slot;
                src[r] = i * nb + b;
                next_running[r] = running[i * nb + b].iter().copied().chain([tok]).collect();
                next_scores[r] = score;
            }
            // finished hypotheses: the top `nb` candidates that stopped, length-penalised
            let full = finished[i].iter().all(|f| f.2) && early == EarlyStopping::True;
            let denom = ((cur_len + 1 - width) as f32).powf(lp);
            let mut merged: Vec<(Vec<u32>, f32, bool)> = finished[i].clone();
            for (k, &(b, tok, score, hit)) in cand.iter().enumerate() {
                let done = hit && k < nb;
                let mut s = score / denom;
                if full {
                    s += -1.0e9;
                }
                if !unsatisfied[i] {
                    s += -1.0e9;
                }
                if !done {
                    s += -1.0e9;
                }
                merged.push((running[i * nb + b].iter().copied().chain([tok]).collect(), s, done));
            }
            let mut idx: Vec<usize> = (0..merged.len()).collect();
            idx.sort_by(|&a, &b| merged[b].1.total_cmp(&merged[a].1).then(a.cmp(&b)));
            finished[i] = idx.iter().take(nb).map(|&k| merged[k].clone()).collect();
        }
        running = next_running;
        running_scores = next_scores;
        cur_len += 1;
        // transformers' early-stopping heuristic: can a running beam still beat the worst
        // finished one?
        for i in 0..n {
            let best_len = if early == EarlyStopping::Never && lp > 0.0 { max_length - width } else { cur_len - width };
            let best_running = running_scores[i * nb] / (best_len as f32).powf(lp);
            let worst = finished[i].iter().map(|f| f.1).fold(f32::INFINITY, f32::min);
            let any = finished[i].iter().any(|f| best_running > if f.2 { worst } else { -1.0e9 });
            unsatisfied[i] &= any;
        }
        let improvement = unsatisfied.iter().any(|&u| u);
        let open = !(finished.iter().all(|f| f.iter().all(|x| x.2)) && early == EarlyStopping::True);
        if !(improvement && open && !all_hit) {
            break;
        }
        dec.reorder(&src)?;
        let ids: Vec<i32> = running.iter().map(|r| *r.last().expect("a running beam has a token") as i32).collect();
        logits = dec.step(&ids)?;
    }
    let ret = cfg.num_return_sequences;
    let out: Vec<Vec<u32>> = finished.iter().flat_map(|f| f.iter().take(ret).map(|h| h.0.clone())).collect();
    let len = out.iter().map(Vec::len).max().unwrap_or(0);
    Ok(out
        .into_iter()
        .map(|mut r| {
            r.resize(len, fill);
            r
        })
        .collect())
}

/// Decodes a batch of prompts (left-padded together) under `cfg`. `on_token(row, id)` sees each
/// generated token as it is produced. Returns the generated tokens per row; a row that emitted
/// EOS is padded with `pad_token_id` while the others go on, as transformers does.
pub fn generate<B: Backend>(model: &Model<B>, prompts: &[Vec<u32>], cfg: &GenerationConfig, on_token: impl FnMut(usize, u32)) -> Result<Vec<Vec<u32>>> {
    generate_with(&mut CausalLm::new(model), prompts, cfg, on_token)
}

/// [`generate`] on any [`Decoder`].
pub fn generate_with(dec: &mut dyn Decoder, prompts: &[Vec<u32>], cfg: &GenerationConfig, mut on_token: impl FnMut(usize, u32)) -> Result<Vec<Vec<u32>>> {
    use rand::SeedableRng;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("every prompt needs at least one token".into()));
    }
    let v = dec.vocab();
    cfg.validate(v)?;
    if let Some(id) = prompts.iter().flatten().find(|&&id| id as usize >= v) {
        return Err(Error::Invalid(format!("prompt token {id} is outside the vocabulary (size {v})")));
    }
    if cfg.num_beams > 1 {
        let out = beam_search(dec, prompts, cfg)?;
        for (r, row) in out.iter().enumerate() {
            row.iter().for_each(|&t| on_token(r, t));
        }
        return Ok(out);
    }
    let eos = cfg.eos_ids();
    let pad = cfg.pad_token_id.or(eos.first().copied()).unwrap_or(0);
    let n = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_new = cfg.new_tokens(width);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed.unwrap_or(0));
    // each row's sequence so far, left padding included (transformers' processors see it too)
    let mut history: Vec<Vec<u32>> = prompts.iter().map(|p| std::iter::repeat_n(pad, width - p.len()).chain(p.iter().copied()).collect()).collect();
    let mut logits = dec.start(prompts, 1, pad, width.saturating_add(max_new.max(1)))?;
    let mut out = vec![Vec::new(); n];
    let mut finished = vec![false; n];
    for step in 0..max_new {
        let mut next = vec![pad; n];
        for b in 0..n {
            if finished[b] {
                continue;
            }
            let scores = &mut logits[b * v..(b + 1) * v];
            process(cfg, &eos, &history[b], step, width + max_new, scores);
            next[b] = pick(cfg, scores, &mut rng);
            on_token(b, next[b]);
            finished[b] = eos.contains(&next[b]);
        }
        for b in 0..n {
            out[b].push(next[b]);
            history[b].push(next[b]);
        }
        if finished.iter().all(|&f| f) || step + 1 == max_new {
            break;
        }
        logits = dec.step(&next.iter().map(|&x| x as i32).collect::<Vec<_>>())?;
    }
    Ok(out)
}
