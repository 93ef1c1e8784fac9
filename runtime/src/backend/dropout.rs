//! Dropout masks: which elements a counter-based stream keeps, the same on every backend.

/// One dropout mask: the stream `key` (mixed from the run's seed, the step, the micro-batch, the
/// layer and the site) and the drop probability, as the integers and factor every backend uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    pub key: u64,
    /// Elements whose hash is below this are dropped: `p * 2^32`.
    pub threshold: u64,
    /// `1 / (1 - p)`, applied to the kept elements.
    pub scale: f32,
}

impl DropoutMask {
    /// The mask of probability `p` (in `[0, 1)`) on stream `key`.
    pub fn new(p: f32, key: u64) -> Self {
        let threshold = ((p as f64) * 4_294_967_296.0).round().clamp(0.0, 4_294_967_295.0) as u64;
        DropoutMask { key, threshold, scale: 1.0 / (1.0 - p) }
    }
}

/// Whether dropout keeps element `i` of stream `key`: the upper 32 bits of SplitMix64's finalizer
/// of `key + (i + 1) * golden`, compared with the threshold. A pure function of its arguments, so
/// a mask does not depend on the thread count and is the same after a resume; the CUDA kernel
/// computes the same integers.
pub fn dropout_keep(key: u64, i: u64, threshold: u64) -> bool {
    let mut z = key.wrapping_add((i.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) >= threshold
}
