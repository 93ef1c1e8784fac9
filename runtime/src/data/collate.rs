//! Collation: truncation and padding of tokenized examples into a rectangular batch, as
//! transformers' `tokenizer.pad` / `DataCollatorForSeq2Seq` do it: pad to the longest example (or
//! to `max_length`), rounded up to `pad_to_multiple_of`, on the tokenizer's padding side, with
//! attention mask 0 and label -100 on the padding.

use crate::error::{Error, Result};
pub use crate::protocol::{Batch, Example, PadOptions, Padding, Side};

/// Truncates one example to `max_length` on the right (transformers' default `truncation_side`).
pub fn truncate(ex: &mut Example, max_length: usize) {
    ex.input_ids.truncate(max_length);
    ex.labels.truncate(max_length);
}

/// Pads `examples` into one batch. Without padding, every example must have the same length.
pub fn pad_batch(examples: &[Example], opts: &PadOptions) -> Result<Batch> {
    opts.validate()?;
    if examples.is_empty() {
        return Err(Error::Invalid("cannot collate an empty batch".into()));
    }
    let mut exs: Vec<Example> = examples.to_vec();
    if opts.truncation {
        let l = opts.max_length.expect("validated");
        exs.iter_mut().for_each(|e| truncate(e, l));
    }
    let longest = exs.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut seq = match opts.padding {
        Padding::Longest => longest,
        Padding::MaxLength => opts.max_length.expect("validated").max(longest),
        Padding::DoNotPad => {
            if exs.iter().any(|e| e.input_ids.len() != longest) {
                return Err(Error::Invalid("examples of different lengths need padding".into()));
            }
            longest
        }
    };
    let n = exs.len();
    if opts.padding != Padding::DoNotPad {
        if let Some(m) = opts.pad_to_multiple_of {
            let overflow = || Error::Invalid(format!("pad_to_multiple_of {m}: the length {seq} rounded up to a multiple of it is beyond any batch"));
            seq = seq.div_ceil(m).checked_mul(m).ok_or_else(overflow)?;
        }
    }
    // three i32 arrays of n x seq: refused, not allocated, when they cannot fit in memory (the
    // budget is read only for a batch far above any training batch's size)
    let bytes = (n as u128) * (seq as u128) * 12;
    if let Some(available) = (bytes > 1 << 26).then(crate::mem::host_memory_budget).flatten().filter(|&a| bytes > a) {
        return Err(Error::Invalid(format!(
            "the padded batch, {n} x {seq} tokens, needs {:.2} GiB; {:.2} GiB of memory is available (see max_length and pad_to_multiple_of)",
            bytes as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64,
        )));
    }
    let mut input_ids = vec![opts.pad_id as i32; n * seq];
    let mut attention_mask = vec![0i32; n * seq];
    let mut labels = vec![-100i32; n * seq];
    for (b, e) in exs.iter().enumerate() {
        let len = e.input_ids.len();
        let off = b * seq + if opts.side == Side::Left { seq - len } else { 0 };
        for (t, (&id, &lab)) in e.input_ids.iter().zip(&e.labels).enumerate() {
            input_ids[off + t] = id as i32;
            attention_mask[off + t] = 1;
            labels[off + t] = lab;
        }
    }
    Ok(Batch { batch: n, seq, input_ids, attention_mask: Some(attention_mask), labels: Some(labels), ..Batch::default() })
}
