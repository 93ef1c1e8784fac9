//! Row strides and product splits that keep a device's matrix operands 16-byte aligned.

/// The row stride a device gives a matrix product's `[rows, m]` output (and, in bf16, the copy of
/// its output gradient): `m` rounded up to a multiple of 8 elements (16 bytes of bf16). Rows of a
/// width like GPT-2's vocabulary of 50257 are not 16-byte aligned, which leaves cuBLASLt only its
/// unaligned kernels: on an H200 the LM head's three products at 8 x 1024 rows took 17.4 ms per
/// step with rows of 50257 and about 4 ms with the padded stride (the copy included).
pub fn aligned_ld(m: usize) -> usize {
    m.next_multiple_of(8)
}

/// `m` outputs of a product split in two (`main + rest = m`): `main` a multiple of 8 and `rest`
/// fewer than 8, when `m` is not a multiple of 8 (else `(m, 0)`; `(m, 0)` below 8 too). A product
/// whose outputs are the weight's rows reads each part's weight rows and output columns from
/// 16-byte aligned starts. cuBLASLt still chose its unaligned kernels for the LM head at vocab
/// 50257 with padded rows (one product of 50257 outputs: 7.1 ms per step forward and 5.0 ms for
/// the input gradient on an H200); the two parts let it use its aligned ones for the first.
pub fn aligned_split(m: usize) -> (usize, usize) {
    let rest = m % 8;
    if rest == 0 || m < 8 {
        (m, 0)
    } else {
        (m - rest, rest)
    }
}

/// Shared memory a device gives one block (with the opt-in) and one multiprocessor, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SharedMemory {
    pub per_block: usize,
    pub per_sm: usize,
}

/// Whether the fused loss over bf16 logits stages each row of `v` values in shared memory
/// (`cross_entropy_bf16_staged`, which reads the row from device memory once instead of twice):
/// when the row fits a block and two such blocks fit a multiprocessor (with the 1 KiB the driver
/// keeps per block and the kernel's own reduction arrays), so that each multiprocessor still has
/// 1024 threads streaming rows. GPT-2's 50257 values (98 KiB) qualify on an H100 (228 KiB per
/// multiprocessor), not on an A100 (164 KiB).
pub fn loss_row_staged(v: usize, smem: SharedMemory) -> bool {
    let bytes = 2 * v;
    bytes <= smem.per_block && 2 * (bytes + 2048) <= smem.per_sm
}
