//! The ops encoder-decoder models add to the op set: attention with an additive position bias,
//! bidirectional or causal, between queries and keys of different lengths (cross attention);
//! T5's relative position bias gathered from its bucket table; the gated-GELU, exact-GELU and
//! ReLU feed-forward activations. A backend that implements them runs T5 and BART (the CPU
//! backend today).

use super::Backend;

/// Columns `off..off + width` of a row-major buffer whose rows are `ld` wide: where a head-packed
/// query, key or value block sits inside a fused projection's output.
#[derive(Clone, Copy, Debug)]
pub struct Cols<'a, Buf> {
    pub buf: &'a Buf,
    pub ld: usize,
    pub off: usize,
}

/// The query, key and value blocks of an attention.
pub type QkvCols<'a, Buf> = (Cols<'a, Buf>, Cols<'a, Buf>, Cols<'a, Buf>);

/// The geometry of a [`Seq2SeqOps::biased_attention_fwd`]: `batch` sequences of `tq` queries
/// attending to `tk` keys, `n_head` heads of `head_dim`, no grouping of keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasedShape {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub n_head: usize,
    pub head_dim: usize,
    /// Query `i` sees keys `0..=i` only (a decoder's self-attention; then `tq == tk`).
    pub causal: bool,
    /// Dropout on the probabilities before they weigh the values (element `[b, h, i, j]` of the
    /// probabilities is element `((b * n_head + h) * tq + i) * tk + j` of the mask's stream); the
    /// saved probabilities are the ones before it.
    pub dropout: Option<super::DropoutMask>,
}

impl BiasedShape {
    /// The floats of the saved probabilities (and of the backward pass's scratch).
    pub fn probs_len(&self) -> usize {
        self.batch * self.tq * self.n_head * self.tk
    }
    /// The width of the packed heads (`n_head * head_dim`).
    pub fn inner(&self) -> usize {
        self.n_head * self.head_dim
    }
}

pub trait Seq2SeqOps: Backend {
    /// `out[b, i, h] = sum_j p[b, h, i, j] v[b, j, h]` with `p = softmax_j(scale * q·k +
    /// bias[h, i, j])` over the keys whose `key_mask[b, j]` is 1 (and `j <= i` when causal); a
    /// row with no key to see attends to all of them evenly, as transformers' additive mask
    /// gives. `q` is `[batch * tq, ..]`, `k` and `v` `[batch * tk, ..]`, each holding the heads
    /// packed in its column block; `out` is `[batch * tq, n_head * head_dim]`; `bias`
    /// `[n_head, tq, tk]`. Keeps the probabilities in `probs` (`shape.probs_len()` floats).
    #[allow(clippy::too_many_arguments)] // the op's operands, the bias and mask, and its geometry
    fn biased_attention_fwd(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        q: Cols<Self::Buf>,
        k: Cols<Self::Buf>,
        v: Cols<Self::Buf>,
        bias: Option<&Self::Buf>,
        key_mask: Option<&Self::Ids>,
        shape: BiasedShape,
        scale: f32,
    );

    /// Its backward pass from `dout`: writes `dq` (`[batch * tq, inner]`), `dk` and `dv`
    /// (`[batch * tk, inner]`), and accumulates the bias's gradient (summed over the batch) into
    /// `dbias` when given. `ds` is scratch of `shape.probs_len()` floats.
    #[allow(clippy::too_many_arguments)] // the three gradients, the forward's operands and scratch
    fn biased_attention_bwd(
        &self,
        grads: (&mut Self::Buf, &mut Self::Buf, &mut Self::Buf),
        dbias: Option<&mut Self::Buf>,
        ds: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: QkvCols<Self::Buf>,
        probs: &Self::Buf,
        shape: BiasedShape,
        scale: f32,
    );

    /// `out[h, i, j] = table[buckets[i * tk + j], h]`: the position bias of `n_head` heads from a
    /// `[num_buckets, n_head]` table and a `[tq, tk]` bucket map.
    fn position_bias_fwd(&self, out: &mut Self::Buf, table: &Self::Buf, buckets: &Self::Ids, n_head: usize);
    /// Its backward pass: `dtable[buckets[i * tk + j], h] += dbias[h, i, j]`.
    fn position_bias_bwd(&self, dtable: &mut Self::Buf, dbias: &Self::Buf, buckets: &Self::Ids, n_head: usize);

    /// Gated GELU (tanh approximation, transformers' `gelu_new`) on a packed `[rows, 2i]` (gate,
    /// then up): `out = gelu(gate) * up`, `[rows, i]`.
    fn geglu_fwd(&self, out: &mut Self::Buf, x: &Self::Buf, i: usize);
    /// Its backward pass: writes `dx` (`[rows, 2i]`).
    fn geglu_bwd(&self, dx: &mut Self::Buf, x: &Self::Buf, dout: &Self::Buf, i: usize);
    /// The exact GELU, `x Φ(x) = 0.5 x (1 + erf(x / sqrt 2))` (transformers' `gelu`, BART's).
    fn gelu_erf_fwd(&self, out: &mut Self::Buf, x: &Self::Buf);
    /// Its backward pass: writes `dx = dout * (Φ(x) + x φ(x))`.
    fn gelu_erf_bwd(&self, dx: &mut Self::Buf, x: &Self::Buf, dout: &Self::Buf);
    /// `out = max(x, 0)`.
    fn relu_fwd(&self, out: &mut Self::Buf, x: &Self::Buf);
    /// Writes `dx = dout * (x > 0)`.
    fn relu_bwd(&self, dx: &mut Self::Buf, x: &Self::Buf, dout: &Self::Buf);
}
