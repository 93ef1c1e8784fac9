//! Generation: a KV cache on the op set, so each new token costs one token's work, and greedy
//! decoding (transformers' `do_sample=False, num_beams=1`) over left-padded batches, with
//! transformers' position ids for left padding and its handling of finished rows.

pub mod config;

pub use config::GenerationConfig;

use crate::backend::{AttnShape, Backend};
use crate::error::{Error, Result};
use crate::model::{Arch, Model};

/// The KV cache and the one-token activations of a batch being decoded.
pub struct DecodeState<B: Backend> {
    batch: usize,
    max_len: usize,
    slot: usize,
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// 1 where a cache slot holds a real token, per row: `[batch, max_len]`.
    mask: Vec<i32>,
    next_pos: Vec<i32>,
    x: B::Buf,
    ln: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
    qkv: B::Buf,
    att: B::Buf,
    tmp: B::Buf,
    res1: B::Buf,
    fc: B::Buf,
    act: B::Buf,
    logits: B::Buf,
}

impl<B: Backend> DecodeState<B> {
    /// Room for `max_len` tokens (prompt and generated) in each of `batch` rows.
    pub fn new(model: &Model<B>, batch: usize, max_len: usize) -> Self {
        let (be, c) = (&model.backend, &model.config);
        let kvd = c.n_kv_head * c.head_dim;
        let z = |n: usize| be.zeros(n);
        DecodeState {
            batch,
            max_len,
            slot: 0,
            k: (0..c.n_layer).map(|_| z(batch * max_len * kvd)).collect(),
            v: (0..c.n_layer).map(|_| z(batch * max_len * kvd)).collect(),
            mask: vec![0; batch * max_len],
            next_pos: vec![0; batch],
            x: z(batch * c.hidden_size),
            ln: z(batch * c.hidden_size),
            mean: z(batch),
            rstd: z(batch),
            qkv: z(batch * c.qkv_width()),
            att: z(batch * c.n_head * c.head_dim),
            tmp: z(batch * c.hidden_size),
            res1: z(batch * c.hidden_size),
            fc: z(batch * c.fc_width()),
            act: z(batch * c.intermediate_size),
            logits: z(batch * c.vocab_size),
        }
    }
}

/// Feeds one token per row (`attend[b] = 0` for left padding) and returns the next-token logits,
/// `[batch, vocab]`.
pub fn decode_step<B: Backend>(model: &Model<B>, st: &mut DecodeState<B>, ids: &[i32], attend: &[i32]) -> Result<Vec<f32>> {
    let (be, c, lay, p) = (&model.backend, &model.config, &model.layout, &model.params);
    let (n, h, v) = (st.batch, c.hidden_size, c.vocab_size);
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
    if c.arch == Arch::Gpt2 {
        if let Some(&q) = pos.iter().find(|&&q| q as usize >= c.max_positions) {
            return Err(Error::Invalid(format!("position {q} exceeds the model's n_positions ({})", c.max_positions)));
        }
    }
    let (ids_b, pos_b, mask_b) = (be.upload_ids(ids), be.upload_ids(&pos), be.upload_ids(&st.mask));
    let shape = AttnShape { batch: n, seq: 1, n_head: c.n_head, n_kv_head: c.n_kv_head, head_dim: c.head_dim };
    be.embedding_fwd(&mut st.x, &ids_b, &p[lay.wte], lay.wpe.map(|i| (&p[i], &pos_b)), h);
    for (l, lp) in lay.layers.iter().enumerate() {
        model.norm_fwd(&mut st.ln, &mut st.mean, &mut st.rstd, &st.x, lp.ln1_w, lp.ln1_b);
        be.matmul_fwd(&mut st.qkv, &st.ln, &p[lp.qkv_w], lp.qkv_b.map(|i| &p[i]), n, h, c.qkv_width());
        if c.arch == Arch::Llama {
            be.rope(&mut st.qkv, &pos_b, shape, c.rope_theta, false);
        }
        be.kv_append(&mut st.k[l], &mut st.v[l], &st.qkv, st.slot, shape, st.max_len);
        be.attention_decode(&mut st.att, &st.qkv, &st.k[l], &st.v[l], &mask_b, st.slot, shape, st.max_len);
        be.matmul_fwd(&mut st.tmp, &st.att, &p[lp.o_w], lp.o_b.map(|i| &p[i]), n, shape.out_width(), h);
        be.add(&mut st.res1, &st.x, &st.tmp);
        model.norm_fwd(&mut st.ln, &mut st.mean, &mut st.rstd, &st.res1, lp.ln2_w, lp.ln2_b);
        be.matmul_fwd(&mut st.fc, &st.ln, &p[lp.fc_w], lp.fc_b.map(|i| &p[i]), n, h, c.fc_width());
        match c.arch {
            Arch::Gpt2 => be.gelu_fwd(&mut st.act, &st.fc),
            Arch::Llama => be.swiglu_fwd(&mut st.act, &st.fc, c.intermediate_size),
        }
        be.matmul_fwd(&mut st.tmp, &st.act, &p[lp.proj_w], lp.proj_b.map(|i| &p[i]), n, c.intermediate_size, h);
        be.add(&mut st.x, &st.res1, &st.tmp);
    }
    model.norm_fwd(&mut st.ln, &mut st.mean, &mut st.rstd, &st.x, lay.lnf_w, lay.lnf_b);
    be.matmul_fwd(&mut st.logits, &st.ln, &p[lay.lm_head.unwrap_or(lay.wte)], None, n, h, v);
    st.slot += 1;
    Ok(be.download(&st.logits))
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
/// minimum length; then, when sampling, temperature, top-k and top-p.
fn process(cfg: &GenerationConfig, eos: &[u32], history: &[u32], new_tokens: usize, scores: &mut [f32]) {
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
}

/// Picks the next token: the first maximum, or a sample after temperature, top-k and top-p.
fn pick(cfg: &GenerationConfig, scores: &mut [f32], rng: &mut rand_chacha::ChaCha8Rng) -> u32 {
    if !cfg.do_sample {
        return scores.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 as u32;
    }
    use rand::RngExt;
    scores.iter_mut().for_each(|x| *x /= cfg.temperature);
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

/// Decodes a batch of prompts (left-padded together) under `cfg`. `on_token(row, id)` sees each
/// generated token as it is produced. Returns the generated tokens per row; a row that emitted
/// EOS is padded with `pad_token_id` while the others go on, as transformers does.
pub fn generate<B: Backend>(model: &Model<B>, prompts: &[Vec<u32>], cfg: &GenerationConfig, mut on_token: impl FnMut(usize, u32)) -> Result<Vec<Vec<u32>>> {
    use rand::SeedableRng;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("every prompt needs at least one token".into()));
    }
    let v = model.config.vocab_size;
    cfg.validate(v)?;
    if let Some(id) = prompts.iter().flatten().find(|&&id| id as usize >= v) {
        return Err(Error::Invalid(format!("prompt token {id} is outside the vocabulary (size {v})")));
    }
    let eos = cfg.eos_ids();
    let pad = cfg.pad_token_id.or(eos.first().copied()).unwrap_or(0);
    let n = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_new = cfg.new_tokens(width);
    let mut st = DecodeState::new(model, n, width + max_new.max(1));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed.unwrap_or(0));
    // each row's sequence so far, left padding included (transformers' processors see it too)
    let mut history: Vec<Vec<u32>> = prompts.iter().map(|p| std::iter::repeat_n(pad, width - p.len()).chain(p.iter().copied()).collect()).collect();
    let mut logits = Vec::new();
    for t in 0..width {
        let ids: Vec<i32> = history.iter().map(|h| h[t] as i32).collect();
        let attend: Vec<i32> = prompts.iter().map(|p| i32::from(t >= width - p.len())).collect();
        logits = decode_step(model, &mut st, &ids, &attend)?;
    }
    let mut out = vec![Vec::new(); n];
    let mut finished = vec![false; n];
    for step in 0..max_new {
        let mut next = vec![pad; n];
        for b in 0..n {
            if finished[b] {
                continue;
            }
            let scores = &mut logits[b * v..(b + 1) * v];
            process(cfg, &eos, &history[b], step, scores);
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
        logits = decode_step(model, &mut st, &next.iter().map(|&x| x as i32).collect::<Vec<_>>(), &vec![1; n])?;
    }
    Ok(out)
}
