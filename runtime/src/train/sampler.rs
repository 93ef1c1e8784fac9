//! The deterministic training sampler: one seeded permutation of the examples per epoch, cut
//! into batches. Its position (epoch, batches consumed) is part of every checkpoint, so resume
//! continues the data order exactly without reading the skipped batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    /// Batches of this epoch already consumed.
    pub batch: u64,
}

pub struct Sampler {
    pub seed: u64,
    pub n_examples: usize,
    pub batch_size: usize,
    pub drop_last: bool,
    /// `train_sampling_strategy = "sequential"`: the file's order every epoch.
    pub sequential: bool,
}

impl Sampler {
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.n_examples / self.batch_size
        } else {
            self.n_examples.div_ceil(self.batch_size)
        }
    }

    /// The example indices of every batch of `epoch`, in order.
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut idx: Vec<usize> = (0..self.n_examples).collect();
        if self.sequential {
            return idx.chunks(self.batch_size).take(self.batches_per_epoch()).map(<[usize]>::to_vec).collect();
        }
        // one stream per (seed, epoch): resuming at any epoch needs no earlier draws
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        idx.shuffle(&mut rng);
        idx.chunks(self.batch_size).take(self.batches_per_epoch()).map(<[usize]>::to_vec).collect()
    }
}

/// Process `rank`'s share of a global batch `ix` of `world` processes: a contiguous slice, the
/// `b` examples from `rank * b` when the batch is full (`world * b` examples), balanced when it is
/// short (the last of an epoch), and empty when it has fewer examples than processes. One process
/// with the whole batch and `world` processes with their shares see the same examples.
pub fn shard(ix: &[usize], rank: usize, world: usize) -> &[usize] {
    let n = ix.len();
    &ix[rank * n / world..(rank + 1) * n / world]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_that_differ_and_repeat() {
        let s = Sampler { seed: 42, n_examples: 10, batch_size: 3, drop_last: false, sequential: false };
        let e0 = s.epoch_batches(0);
        assert_eq!(e0.len(), 4);
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, s.epoch_batches(1));
        assert_eq!(e0, s.epoch_batches(0));
        let d = Sampler { drop_last: true, ..s };
        assert_eq!(d.epoch_batches(0).len(), 3);
        let q = Sampler { sequential: true, ..s };
        assert_eq!(q.epoch_batches(3), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]);
    }

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        let ix: Vec<usize> = (10..16).collect();
        assert_eq!(shard(&ix, 0, 3), &[10, 11]);
        assert_eq!(shard(&ix, 2, 3), &[14, 15]);
        for (n, world) in [(6, 3), (5, 3), (2, 3), (7, 2), (0, 2), (9, 4)] {
            let ix: Vec<usize> = (0..n).collect();
            let joined: Vec<usize> = (0..world).flat_map(|r| shard(&ix, r, world).to_vec()).collect();
            assert_eq!(joined, ix, "{n} examples over {world}");
            let sizes: Vec<usize> = (0..world).map(|r| shard(&ix, r, world).len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }
}
