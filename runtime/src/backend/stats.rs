//! The per-token statistics of the logits that [`Backend::token_stats`] computes for a loss
//! plugin, and their gradients.

#[cfg(doc)]
use super::Backend;

/// Which per-token statistics [`Backend::token_stats`] computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsWanted {
    pub label_logprob: bool,
    pub logsumexp: bool,
    pub mean_logprob: bool,
    pub entropy: bool,
    pub argmax: bool,
}

/// Per-token statistics of the logits, one value per row (empty when not requested). For logits
/// `z`, `p = softmax(z)` and target `y`: `log p[y]`, `logsumexp(z)`, `mean(log p)`,
/// `-sum(p log p)` and `argmax z`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenStats {
    pub label_logprob: Vec<f32>,
    pub logsumexp: Vec<f32>,
    pub mean_logprob: Vec<f32>,
    pub entropy: Vec<f32>,
    pub argmax: Vec<u32>,
    /// For the backward pass (whatever was requested): `logsumexp(z)` per row when any
    /// differentiable statistic was requested, and `E_p[z]` when the entropy was.
    pub row_lse: Vec<f32>,
    pub row_mean_z: Vec<f32>,
}

impl TokenStats {
    /// Appends the rows of `more` (statistics of the next chunk of rows, same requests).
    pub fn append(&mut self, more: TokenStats) {
        self.label_logprob.extend(more.label_logprob);
        self.logsumexp.extend(more.logsumexp);
        self.mean_logprob.extend(more.mean_logprob);
        self.entropy.extend(more.entropy);
        self.argmax.extend(more.argmax);
        self.row_lse.extend(more.row_lse);
        self.row_mean_z.extend(more.row_mean_z);
    }

    /// Moves out what [`Backend::token_stats_bwd`] needs (`row_lse`, `row_mean_z`), leaving the
    /// requested statistics to be handed over.
    pub fn take_backward_state(&mut self) -> TokenStats {
        TokenStats { row_lse: std::mem::take(&mut self.row_lse), row_mean_z: std::mem::take(&mut self.row_mean_z), ..TokenStats::default() }
    }
}

/// `dloss/dstatistic` per row for [`Backend::token_stats_bwd`] (empty = zero).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatGrads {
    pub label_logprob: Vec<f32>,
    pub logsumexp: Vec<f32>,
    pub mean_logprob: Vec<f32>,
    pub entropy: Vec<f32>,
}

impl StatGrads {
    /// Each gradient is empty, or one value per row for a statistic that was requested; the
    /// message says what is wrong otherwise.
    pub fn check(&self, want: StatsWanted, rows: usize) -> Result<(), String> {
        for (name, d, asked) in [
            ("label-logprob", &self.label_logprob, want.label_logprob),
            ("logsumexp", &self.logsumexp, want.logsumexp),
            ("mean-logprob", &self.mean_logprob, want.mean_logprob),
            ("entropy", &self.entropy, want.entropy),
        ] {
            if !d.is_empty() && (!asked || d.len() != rows) {
                return Err(format!(
                    "the loss returned a gradient for `{name}` ({} values) but {}",
                    d.len(),
                    if asked { format!("the batch has {rows} positions") } else { "did not request that statistic".to_string() }
                ));
            }
        }
        Ok(())
    }
}
