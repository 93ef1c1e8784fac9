//! Generation: a KV cache on the op set, so each new token costs one token's work, and greedy
//! decoding (transformers' `do_sample=False, num_beams=1`) over left-padded batches, with
//! transformers' position ids for left padding and its handling of finished rows.

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

/// Greedy decoding of a batch of prompts (left-padded together). `on_token(row, id)` sees each
/// generated token as it is produced. Returns the generated tokens per row; a row that emitted
/// EOS is padded with `pad_token_id` while the others go on, as transformers does.
pub fn greedy<B: Backend>(model: &Model<B>, prompts: &[Vec<u32>], opts: &GreedyOptions, mut on_token: impl FnMut(usize, u32)) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("every prompt needs at least one token".into()));
    }
    let n = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut st = DecodeState::new(model, n, width + opts.max_new_tokens);
    let v = model.config.vocab_size;
    let mut logits = Vec::new();
    for t in 0..width {
        let (mut ids, mut attend) = (vec![opts.pad_token_id as i32; n], vec![0; n]);
        for (b, p) in prompts.iter().enumerate() {
            let off = width - p.len();
            if t >= off {
                ids[b] = p[t - off] as i32;
                attend[b] = 1;
            }
        }
        logits = decode_step(model, &mut st, &ids, &attend)?;
    }
    let mut out = vec![Vec::new(); n];
    let mut finished = vec![false; n];
    for step in 0..opts.max_new_tokens {
        let next: Vec<u32> = (0..n)
            .map(|b| {
                if finished[b] {
                    return opts.pad_token_id;
                }
                let row = &logits[b * v..(b + 1) * v];
                // the first maximum, as torch.argmax
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 as u32
            })
            .collect();
        for b in 0..n {
            if !finished[b] {
                on_token(b, next[b]);
                finished[b] = opts.eos_token_id.contains(&next[b]);
            }
            out[b].push(next[b]);
        }
        if finished.iter().all(|&f| f) || step + 1 == opts.max_new_tokens {
            break;
        }
        logits = decode_step(model, &mut st, &next.iter().map(|&x| x as i32).collect::<Vec<_>>(), &vec![1; n])?;
    }
    Ok(out)
}
