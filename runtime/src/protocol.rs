//! The data both sides of a boundary share: a batch of token ids ([`Batch`]), the ignore index,
//! a tokenized example and how examples are padded, and the loss hooks a model calls out to (a
//! plugin's loss implements them). `data` produces these, the models and plugins consume them;
//! this layer imports only the backend's types.

pub use crate::backend::{StatGrads, StatsWanted, TokenStats};
use crate::error::{Error, Result};

/// The label that takes no part in the loss (PyTorch's `ignore_index` default), as the backend's
/// loss ops know it.
pub use crate::backend::IGNORE_INDEX;

/// One batch of token ids, row-major `[batch, seq]`.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<i32>,
    /// 1 = a real token, 0 = padding (keys with 0 are never attended to). All ones when absent.
    pub attention_mask: Option<Vec<i32>>,
    /// Labels aligned with `input_ids` (HF convention: the model shifts them); -100 = no loss.
    pub labels: Option<Vec<i32>>,
    /// Positions for RoPE / learned position embeddings; `0..seq` on every row when absent.
    pub position_ids: Option<Vec<i32>>,
    /// The dataset's numeric columns for these examples, one value per row (for plugins).
    pub columns: Vec<(String, Vec<f64>)>,
    /// An encoder-decoder batch's decoder inputs, `[batch, decoder_seq]` (the labels shifted
    /// right): then `input_ids` and `attention_mask` are the sources, and `labels` are aligned
    /// with the decoder inputs (`[batch, decoder_seq]`, not shifted again).
    pub decoder_input_ids: Option<Vec<i32>>,
    pub decoder_seq: usize,
}

impl Batch {
    /// The length of the label rows: the decoder's for an encoder-decoder batch, else `seq`.
    pub fn label_seq(&self) -> usize {
        if self.decoder_input_ids.is_some() {
            self.decoder_seq
        } else {
            self.seq
        }
    }
}

/// Label tokens of a batch: after the causal-LM shift, or all of an encoder-decoder batch's.
pub fn label_tokens(b: &Batch) -> usize {
    let Some(l) = &b.labels else { return 0 };
    if b.decoder_input_ids.is_some() {
        return l.iter().filter(|&&x| x != IGNORE_INDEX).count();
    }
    (0..b.batch).map(|r| l[r * b.seq + 1..(r + 1) * b.seq].iter().filter(|&&x| x != IGNORE_INDEX).count()).sum()
}

/// The target of each position: after the causal-LM shift (position `t` of a row predicts label
/// `t + 1`; the last position and batches without labels get -100), or an encoder-decoder
/// batch's labels as they are (one per decoder position).
pub fn shifted_labels(b: &Batch) -> Vec<i32> {
    if b.decoder_input_ids.is_some() {
        return b.labels.clone().unwrap_or_else(|| vec![IGNORE_INDEX; b.batch * b.decoder_seq]);
    }
    let mut targets = vec![IGNORE_INDEX; b.batch * b.seq];
    if let Some(labels) = &b.labels {
        for r in 0..b.batch {
            targets[r * b.seq..(r + 1) * b.seq - 1].copy_from_slice(&labels[r * b.seq + 1..(r + 1) * b.seq]);
        }
    }
    targets
}

/// A tokenized training example; `labels[i]` is `input_ids[i]` or -100 (no loss).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

/// `padding_side` / `truncation_side`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "left" => Some(Side::Left),
            "right" => Some(Side::Right),
            _ => None,
        }
    }
}

/// `padding=`: `longest` (transformers' `True`), `max_length`, or `do_not_pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    Longest,
    MaxLength,
    DoNotPad,
}

impl Padding {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "longest" | "true" | "True" => Some(Padding::Longest),
            "max_length" => Some(Padding::MaxLength),
            "do_not_pad" | "false" | "False" => Some(Padding::DoNotPad),
            _ => None,
        }
    }
}

/// How examples are padded into a batch (`tokenizer.pad`'s options).
#[derive(Clone, Copy, Debug)]
pub struct PadOptions {
    pub padding: Padding,
    pub side: Side,
    pub pad_id: u32,
    pub max_length: Option<usize>,
    pub truncation: bool,
    pub pad_to_multiple_of: Option<usize>,
}

impl PadOptions {
    /// transformers' checks: `max_length` padding needs a length, and truncating to a length that
    /// padding would round up is refused.
    pub fn validate(&self) -> Result<()> {
        if self.padding == Padding::MaxLength && self.max_length.is_none() {
            return Err(Error::Invalid("padding `max_length` needs max_length".into()));
        }
        if self.truncation && self.max_length.is_none() {
            return Err(Error::Invalid("truncation needs max_length".into()));
        }
        if let Some(m) = self.pad_to_multiple_of {
            if m == 0 {
                return Err(Error::Invalid("pad_to_multiple_of must be at least 1".into()));
            }
            if let (true, Some(l), false) = (self.truncation, self.max_length, self.padding == Padding::DoNotPad) {
                if l % m != 0 {
                    return Err(Error::Invalid(format!("truncation length ({l}) is not a multiple of pad_to_multiple_of ({m})")));
                }
            }
        }
        Ok(())
    }
}

/// Turns token ids back into text (the run's tokenizer; a plugin's `decode` import).
pub trait TokenDecoder: Send + Sync {
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String>;
}

/// A loss computed outside the engine from per-token statistics (the plugin `loss` hook).
pub trait StatsLoss {
    fn wanted(&mut self) -> Result<StatsWanted>;
    /// The micro-batch's loss and `dloss/dstatistic`; `targets` are the shifted labels and
    /// `num_items_in_batch` the divisor the built-in loss would use.
    fn loss(&mut self, b: &Batch, targets: &[i32], stats: TokenStats, num_items_in_batch: usize) -> Result<(f32, StatGrads)>;
}

/// A loss computed outside the engine from whole rows of logits (the plugin `loss-logits`
/// hook), a chunk of labelled rows at a time; the losses of the chunks add up.
pub trait RowsLoss {
    /// `positions[i]` is row `i`'s index in the batch's `[batch * seq]` rows, `labels[i]` its
    /// label, `logits[i * v..(i + 1) * v]` its logits. Returns the chunk's loss and
    /// `dloss/dlogits` for its rows.
    fn chunk(&mut self, b: &Batch, positions: &[u32], labels: &[i32], logits: &[f32], v: usize, num_items_in_batch: usize) -> Result<(f32, Vec<f32>)>;
}

/// A loss the model calls out to instead of its built-in cross-entropy.
pub enum CustomLoss<'a> {
    Stats(&'a mut dyn StatsLoss),
    Rows(&'a mut dyn RowsLoss),
}

/// A batch of `batch` sources of `src_len` tokens and targets of `tgt_len` (padded), as
/// `DataCollatorForSeq2Seq` makes it: `labels` padded with -100 and `decoder_input_ids` the labels
/// shifted right behind `decoder_start_token_id`.
#[derive(Clone, Debug, Default)]
pub struct Seq2SeqBatch {
    pub batch: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    pub input_ids: Vec<i32>,
    /// `[batch, src_len]`, 1 = a real source token.
    pub attention_mask: Vec<i32>,
    pub decoder_input_ids: Vec<i32>,
    /// `[batch, tgt_len]`, -100 where no loss is taken.
    pub labels: Vec<i32>,
}

impl Seq2SeqBatch {
    /// The batch as the trainer carries it (a [`Batch`] with decoder inputs).
    pub fn into_batch(self) -> Batch {
        Batch {
            batch: self.batch,
            seq: self.src_len,
            input_ids: self.input_ids,
            attention_mask: Some(self.attention_mask),
            labels: Some(self.labels),
            position_ids: None,
            columns: Vec::new(),
            decoder_input_ids: Some(self.decoder_input_ids),
            decoder_seq: self.tgt_len,
        }
    }

    /// An encoder-decoder [`Batch`] in this form; an error for a batch without decoder inputs
    /// (a decoder-only batch given to an encoder-decoder model).
    pub fn from_batch(b: &Batch) -> Result<Self> {
        let Some(dec) = &b.decoder_input_ids else {
            return Err(Error::Invalid("an encoder-decoder model was given a batch without decoder inputs (source/target records make them)".into()));
        };
        Ok(Seq2SeqBatch {
            batch: b.batch,
            src_len: b.seq,
            tgt_len: b.decoder_seq,
            input_ids: b.input_ids.clone(),
            attention_mask: b.attention_mask.clone().unwrap_or_else(|| vec![1; b.batch * b.seq]),
            decoder_input_ids: dec.clone(),
            labels: b.labels.clone().unwrap_or_else(|| vec![IGNORE_INDEX; b.batch * b.decoder_seq]),
        })
    }

    /// The model's `_shift_right`: `decoder_input_ids` from `labels`, each row starting with
    /// `start` and -100 replaced by `pad`.
    pub fn shift_right(labels: &[i32], tgt_len: usize, start: usize, pad: usize) -> Vec<i32> {
        let mut out = Vec::with_capacity(labels.len());
        for row in labels.chunks(tgt_len.max(1)) {
            out.push(start as i32);
            out.extend(row[..row.len() - 1].iter().map(|&t| if t == -100 { pad as i32 } else { t }));
        }
        out
    }

    /// Checks the sizes and that every id lies in a vocabulary of `vocab` tokens.
    pub fn check(&self, vocab: usize) -> Result<()> {
        let (s, t) = (self.batch * self.src_len, self.batch * self.tgt_len);
        if self.batch == 0 || self.src_len == 0 || self.tgt_len == 0 {
            return Err(Error::Invalid(format!("an empty batch ({} sources of {} tokens, targets of {})", self.batch, self.src_len, self.tgt_len)));
        }
        for (what, len, want) in [
            ("input_ids", self.input_ids.len(), s),
            ("attention_mask", self.attention_mask.len(), s),
            ("decoder_input_ids", self.decoder_input_ids.len(), t),
            ("labels", self.labels.len(), t),
        ] {
            if len != want {
                return Err(Error::Invalid(format!("`{what}` has {len} values, expected {want}")));
            }
        }
        let bad = |ids: &[i32], ignore: bool| ids.iter().copied().find(|&i| !(ignore && i == -100) && (i < 0 || i as usize >= vocab));
        for (what, ids, ignore) in
            [("input_ids", &self.input_ids, false), ("decoder_input_ids", &self.decoder_input_ids, false), ("labels", &self.labels, true)]
        {
            if let Some(id) = bad(ids, ignore) {
                return Err(Error::Invalid(format!("`{what}` holds token id {id}, outside the vocabulary ({vocab} tokens)")));
            }
        }
        Ok(())
    }
}
